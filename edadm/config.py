"""Params: one frozen dataclass per concern, built from a section of params.yaml.

Each concept module defines the dataclass for its own knobs (e.g. ``TDACConfig`` next to
TDAC); this module only turns a mapping into such a dataclass and reports bad input with the
dotted param name, so a user knows which ``-S key=value`` to fix.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from edadm.errors import VERBOSE_HELP, ParamError, user_errors

T = TypeVar("T")


def load_params(path: str | Path = "params.yaml", overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read params.yaml (the file DVC tracks) into a plain dict.

    ``overrides``: ``"dotted.key=value"`` strings (values parsed as YAML) applied on top, the
    way the sweep's stages vary one setting of the shared params.yaml.
    """
    path = Path(path)
    if not path.exists():
        raise ParamError(f"{path} not found: run from the repository root or pass --params PATH")
    try:
        with path.open() as f:
            params = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise ParamError(
            f"{path} is not valid YAML{at} ({getattr(err, 'problem', None) or err}); fix the file "
            "(`git diff params.yaml` shows what changed) or restore it with `git checkout params.yaml`"
        ) from err
    if not isinstance(params, dict):
        raise ParamError(f"{path} must hold a mapping of sections, got {type(params).__name__}")
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise ParamError(f"--set {override!r}: expected KEY=VALUE, e.g. --set quant.w_bits=4")
        *parents, leaf = key.split(".")
        section = params
        for name in parents:
            section = section.setdefault(name, {})
            if not isinstance(section, dict):
                raise ParamError(f"--set {override!r}: {name} is not a section of {path}")
        try:
            section[leaf] = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ParamError(f"--set {override!r}: the value is not valid YAML ({err})") from None
    return params


def params_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Click options ``--params PATH``, repeatable ``--set KEY=VALUE`` and ``-v`` for a stage script.

    The decorated function receives the loaded dict as ``params``; a ParamError or ArtifactError
    it raises ends the script with one line on stderr and exit code 2 (``user_errors``).
    """
    import click

    @functools.wraps(func)
    def wrapper(
        *args: Any, params_path: str, overrides: tuple[str, ...], verbose: bool, **kwargs: Any
    ) -> Any:
        with user_errors(verbose):
            return func(*args, params=load_params(params_path, overrides), **kwargs)

    wrapper = click.option("-v", "--verbose", is_flag=True, help=VERBOSE_HELP)(wrapper)
    wrapper = click.option(
        "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a param (repeatable)"
    )(wrapper)
    return click.option("--params", "params_path", default="params.yaml", show_default=True)(wrapper)


def param_key(field: dataclasses.Field) -> str:
    """The key in params.yaml for a dataclass field (``metadata={"key": "lambda"}`` renames)."""
    return field.metadata.get("key", field.name)


def from_dict(cls: type[T], data: Mapping[str, Any] | None, section: str) -> T:
    """Build the frozen dataclass ``cls`` from ``data``, the params section called ``section``.

    Missing keys take the dataclass default; unknown keys are an error (a typo in params.yaml
    would otherwise be silently ignored). Nested dataclass fields recurse with ``section.key``.
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    known = {param_key(f): f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        names = ", ".join(f"{section}.{k}" for k in unknown)
        raise ParamError(f"unknown param(s) {names}; known: {', '.join(sorted(known))}")
    kwargs = {}
    for key, field in known.items():
        name = f"{section}.{key}"
        if key not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ParamError(f"param {name} is required")
            continue
        kwargs[field.name] = _coerce(hints[field.name], data[key], name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, ParamError):
            raise
        raise ParamError(f"{section}: {err}") from err


def _coerce(hint: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ParamError(f"param {name} must be a mapping, got {value!r}")
        return from_dict(hint, value, name)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, name)
            except ParamError as err:
                errors.append(str(err))
        raise ParamError(f"param {name}={value!r} fits none of {hint}")
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ParamError(f"param {name}={value!r} must be one of {', '.join(map(repr, choices))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ParamError(f"param {name} must be a list, got {value!r}")
        args = typing.get_args(hint)
        item = args[0] if args else Any
        return tuple(_coerce(item, v, f"{name}[{i}]") for i, v in enumerate(value))
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamError(f"param {name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamError(f"param {name} must be an integer, got {value!r}")
        return value
    if hint is float:
        # YAML reads 1e-3 as a string (no dot before the exponent): accept it as a number.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ParamError(f"param {name} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(f"param {name} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ParamError(f"param {name} must be a string, got {value!r}")
        return value
    return value


def check_range(name: str, value: float, low: float | None = None, high: float | None = None) -> None:
    """Raise ParamError naming ``name`` when ``value`` lies outside [low, high]."""
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ParamError(f"param {name}={value} is out of range {bounds}")


def as_dict(config: Any) -> dict[str, Any]:
    """A dataclass back to the params.yaml spelling (for artifact attributes and manifests)."""
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            value = as_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[param_key(field)] = value
    return out


def load_section(cls: type[T], section: str, params: Mapping[str, Any]) -> T:
    """The dataclass ``cls`` for the dotted ``section`` (e.g. ``"select"``) of loaded params."""
    data: Any = params
    for key in section.split("."):
        data = (data or {}).get(key) if isinstance(data, Mapping) else None
    return from_dict(cls, data, section)
