"""Artifacts on disk: atomic writes, Zarr store schemas, and clear errors for bad stores.

Every store carries ``edadm_schema`` (what it is), ``schema_version`` and ``complete``
attributes. A stage writes into a temporary sibling path and renames it into place only when
it has finished, so a killed stage leaves the old artifact or none, never a half one. Under
torchrun the ranks write one store together (``shared_output``): rank 0 creates it, each rank
writes its chunk-aligned region, rank 0 marks it complete and renames it.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from edadm.errors import ArtifactError

if TYPE_CHECKING:  # only the type: a single-process stage never touches torch.distributed
    from edadm.distributed import Dist


@dataclass(frozen=True)
class StoreSchema:
    """What a Zarr store must hold; ``stage`` is the DVC stage that makes it."""

    kind: str
    version: int
    stage: str
    arrays: tuple[str, ...]


TRAJECTORIES = StoreSchema("trajectories", 1, "dump", ("x", "t", "x0"))
CALIBRATION = StoreSchema("calibration", 1, "select", ("x", "t", "traj", "step"))
SAMPLES = StoreSchema("samples", 1, "sample", ("images", "seeds"))
SCHEMAS = {s.kind: s for s in (TRAJECTORIES, CALIBRATION, SAMPLES)}


# ---------------------------------------------------------------------------------------------
# Atomic output
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces ``path`` (file or directory).

    On an exception the temporary path is removed and ``path`` is left as it was. A process
    killed outright (SIGKILL, power loss) cannot clean up: its ``.NAME.tmp-*`` / ``.NAME.old-*``
    siblings are removed here, by the next writer of ``path`` (DVC runs one writer per out).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (*path.parent.glob(f".{path.name}.tmp-*"), *path.parent.glob(f".{path.name}.old-*")):
        _remove(stale)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        _replace(tmp, path)
    finally:
        _remove(tmp)


@contextlib.contextmanager
def shared_output(path: str | Path, dist: Dist) -> Iterator[Path]:
    """``atomic_output`` for a store that every rank of ``dist`` writes a region of.

    Every rank gets the same temporary path (rank 0's, broadcast). Rank 0 alone cleans stale
    temporaries, removes the temporary on an error and renames it into place on success; the
    other ranks only write into it. The body follows one protocol:

        with shared_output(path, dist) as tmp:
            if dist.is_main:
                ...  # create_store(tmp, ...) and every array
            store = join_store(tmp, dist)  # a barrier: the store exists for every rank
            ...  # each rank writes its region (writable_array)
            dist.barrier()  # every region is written
            if dist.is_main:
                finish_store(store)

    A rank killed on the way never reaches the last barrier, so the store is never marked
    complete; torchrun ends the other ranks and the next run removes the temporary. With one
    process this is ``atomic_output``.
    """
    if dist.is_main:
        with atomic_output(path) as tmp:
            dist.broadcast(str(tmp))
            yield tmp
    else:
        yield Path(dist.broadcast(None))


def join_store(path: str | Path, dist: Dist) -> zarr.Group:
    """The store rank 0 has created at ``path``, opened for writing by every rank after a barrier."""
    dist.barrier()
    return zarr.open_group(store=str(path), mode="r+")


def writable_array(group: zarr.Group, name: str) -> zarr.Array:
    """``group[name]`` writing every chunk, as ``create_array`` made it (the setting is not stored)."""
    return group[name].with_config({"write_empty_chunks": True})


def _replace(src: Path, dst: Path) -> None:
    if dst.is_dir() and not dst.is_symlink():
        # os.replace cannot overwrite a non-empty directory: move the old one aside first.
        trash = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, trash)
        os.replace(src, dst)
        _remove(trash)
    else:
        os.replace(src, dst)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


@contextlib.contextmanager
def timed(path: str | Path, write: bool = True) -> Iterator[dict[str, Any]]:
    """Time the block and write ``{"seconds": ..., **details}`` to ``path`` when it succeeds.

    Timings never go into an artifact another stage reads (they would change its hash on every
    run); they go to ``metrics/timings/STAGE.json``, declared in dvc.yaml with ``cache: false``.
    The yielded dict takes extra figures (e.g. seconds of a phase). ``write`` False times
    without writing (ranks of torchrun other than 0: one writer per file).
    """
    details: dict[str, Any] = {}
    start = time.perf_counter()
    yield details
    if write:
        write_json(path, {"seconds": round(time.perf_counter() - start, 1), **details})


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], header: Sequence[str] = ()) -> None:
    """Write dict rows as CSV, atomically; the header is ``header`` or the first row's keys."""
    with atomic_output(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(header or (rows[0] if rows else [])))
        writer.writeheader()
        writer.writerows(rows)


def read_json(path: str | Path, stage: str) -> Any:
    """Read a JSON artifact made by ``stage``, with a clear error when missing or corrupt."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path} not found: it is made by the '{stage}' stage (run `dvc repro {stage}`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is not valid JSON ({err}); rerun `dvc repro -f {stage}`") from err


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ---------------------------------------------------------------------------------------------
# Zarr stores
# ---------------------------------------------------------------------------------------------
def create_store(path: str | Path, schema: StoreSchema, attrs: Mapping[str, Any]) -> zarr.Group:
    """Create a new (temporary) store for ``schema``; call ``finish_store`` when it is full."""
    group = zarr.open_group(store=str(path), mode="w", zarr_format=3)
    group.attrs.update(
        {
            "edadm_schema": schema.kind,
            "schema_version": schema.version,
            "complete": False,
            **json.loads(json.dumps(dict(attrs), default=_json_default)),
        }
    )
    return group


def finish_store(group: zarr.Group) -> None:
    """Mark a store complete: the last write before the atomic rename."""
    group.attrs["complete"] = True


def create_array(
    group: zarr.Group,
    name: str,
    shape: Sequence[int],
    dtype: Any,
    chunks: Sequence[int] | None = None,
    data: np.ndarray | None = None,
) -> zarr.Array:
    """A Zarr array with explicit (MB-sized) chunks; ``data`` is written when given."""
    shape = tuple(int(s) for s in shape)
    chunks = tuple(int(c) for c in (chunks or shape)) if shape else ()
    # Every chunk is written, even one equal to the fill value, so a missing chunk file means
    # a truncated store (open_store checks the count).
    array = group.create_array(
        name, shape=shape, chunks=chunks or None, dtype=np.dtype(dtype), config={"write_empty_chunks": True}
    )
    if data is not None:
        array[...] = data
    return array


def open_store(path: str | Path, schema: StoreSchema, stage: str | None = None) -> zarr.Group:
    """Open a finished store read-only, checking that it is the store ``schema`` describes.

    ``stage`` overrides the schema's producing stage in messages (e.g. ``sample_quant``).
    """
    path = Path(path)
    stage = stage or schema.stage
    remedy = f"it is made by the '{stage}' stage: run `dvc repro {stage}`"
    if not path.exists():
        raise ArtifactError(f"{path} not found; {remedy}")
    try:
        group = zarr.open_group(store=str(path), mode="r")
        attrs = dict(group.attrs)
    except Exception as err:  # zarr raises several types for a damaged store
        raise ArtifactError(f"{path} is not a readable Zarr store ({err}); {remedy}") from err
    kind = attrs.get("edadm_schema")
    if kind != schema.kind:
        raise ArtifactError(f"{path} holds a '{kind}' store, expected '{schema.kind}'; {remedy}")
    if attrs.get("schema_version") != schema.version:
        raise ArtifactError(
            f"{path} has schema version {attrs.get('schema_version')}, this edadm reads {schema.version}; "
            f"rerun it with `dvc repro -f {stage}`"
        )
    if not attrs.get("complete", False):
        raise ArtifactError(f"{path} is incomplete (its writer was interrupted); {remedy}")
    present = set(group.array_keys())
    missing = [name for name in schema.arrays if name not in present]
    if missing:
        raise ArtifactError(f"{path} lacks array(s) {', '.join(missing)} (truncated?); {remedy}")
    for name in sorted(present):
        expected = _expected_chunks(group[name])
        found = _chunk_files(path / name)
        if found is not None and found < expected:
            raise ArtifactError(f"{path}/{name} has {found} of its {expected} chunks (truncated); {remedy}")
    return group


def _expected_chunks(array: zarr.Array) -> int:
    return (
        int(np.prod([-(-s // c) for s, c in zip(array.shape, array.chunks, strict=True)]))
        if array.shape
        else 1
    )


def _chunk_files(array_dir: Path) -> int | None:
    """Chunk files of a local array (default v3 key encoding ``c/i/j/...``); None if not local."""
    if not array_dir.is_dir():
        return None
    chunk_root = array_dir / "c"
    if chunk_root.is_file():  # a 0-d array's single chunk
        return 1
    return sum(1 for f in chunk_root.rglob("*") if f.is_file()) if chunk_root.is_dir() else 0


def read_array(group: zarr.Group, name: str, path: str | Path, stage: str) -> np.ndarray:
    """Read a whole array, turning a missing or damaged chunk into an ArtifactError."""
    try:
        return np.asarray(group[name][...])
    except Exception as err:
        raise ArtifactError(
            f"{path}/{name} could not be read ({err}); rerun the '{stage}' stage with `dvc repro -f {stage}`"
        ) from err


def describe_store(group: zarr.Group) -> list[str]:
    """Lines describing every array (shape, dtype, chunks) and the store's attributes."""
    lines = []
    for name in sorted(group.array_keys()):
        array = group[name]
        lines.append(
            f"  {name:<12} shape={tuple(array.shape)} dtype={array.dtype} chunks={tuple(array.chunks)}"
        )
    lines.append("  attributes:")
    for key, value in dict(group.attrs).items():
        text = json.dumps(value, default=_json_default)
        lines.append(f"    {key}: {text if len(text) < 100 else text[:97] + '...'}")
    return lines


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB pieces)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()
