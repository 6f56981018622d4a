"""params.yaml into frozen dataclasses: params.yaml holds exactly the dataclass defaults, every
shipped profile parses, bad input names the dotted param."""

from __future__ import annotations

from pathlib import Path

import pytest

from edadm.calib.selection import SelectConfig
from edadm.config import as_dict, from_dict, load_params, load_section
from edadm.diffusion.conditioning import ConditionConfig
from edadm.diffusion.loading import ModelConfig
from edadm.diffusion.samples import SampleConfig
from edadm.diffusion.sampling import SamplerConfig
from edadm.diffusion.trajectories import DumpConfig
from edadm.distributed import DistConfig
from edadm.errors import ParamError
from edadm.metrics.evaluation import EvaluateConfig
from edadm.metrics.reference import ReferenceConfig
from edadm.quant.config import QuantConfig
from edadm.recon.config import ReconConfig
from edadm.runtime import DeviceConfig, load_device

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {
    "model": ModelConfig,
    "reference": ReferenceConfig,
    "sampler": SamplerConfig,
    "condition": ConditionConfig,
    "dump": DumpConfig,
    "select": SelectConfig,
    "quant": QuantConfig,
    "recon": ReconConfig,
    "sample": SampleConfig,
    "evaluate": EvaluateConfig,
    "device": DeviceConfig,
    "dist": DistConfig,
}


@pytest.mark.parametrize("profile", [ROOT / "params.yaml", ROOT / "tests" / "profiles" / "tiny.yaml"])
def test_every_section_of_the_shipped_params_parses(profile):
    params = load_params(profile)
    for section, cls in SECTIONS.items():
        config = load_section(cls, section, params)
        # the dataclass spells params back as params.yaml does (e.g. select.tdac.lambda)
        assert from_dict(cls, as_dict(config), section) == config


def differences(defaults: dict, given: dict, prefix: str) -> list[str]:
    """Dotted keys where ``given`` (params.yaml) differs from ``defaults`` (``as_dict(cls())``)."""
    out = []
    for key in sorted(set(defaults) | set(given)):
        name = f"{prefix}{key}"
        if key not in given:
            out.append(f"{name}: missing from params.yaml (default {defaults[key]!r})")
        elif key not in defaults:
            out.append(f"{name}: in params.yaml but not a field")
        elif isinstance(defaults[key], dict) and isinstance(given[key], dict):
            out += differences(defaults[key], given[key], f"{name}.")
        elif defaults[key] != given[key] or type(defaults[key]) is not type(given[key]):
            out.append(f"{name}: params.yaml {given[key]!r}, dataclass default {defaults[key]!r}")
    return out


def test_differences_reports_missing_extra_and_changed_keys():
    defaults = {"a": 1, "b": {"c": [1, 2], "d": "x"}, "e": 1.0}
    given = {"a": 1, "b": {"c": [1, 3], "z": 0}, "e": 1}
    assert differences(defaults, given, "s.") == [
        "s.b.c: params.yaml [1, 3], dataclass default [1, 2]",
        "s.b.d: missing from params.yaml (default 'x')",
        "s.b.z: in params.yaml but not a field",
        "s.e: params.yaml 1, dataclass default 1.0",
    ]


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_params_yaml_holds_exactly_the_dataclass_defaults(section):
    """One source of defaults: every knob is in params.yaml (so ``-S`` finds it), with its default."""
    params = load_params(ROOT / "params.yaml")
    assert differences(as_dict(SECTIONS[section]()), params[section], f"{section}.") == []


def test_params_yaml_has_no_section_without_a_dataclass():
    params = load_params(ROOT / "params.yaml")
    assert set(params) == set(SECTIONS)


def test_errors_name_the_dotted_param():
    with pytest.raises(ParamError, match="select.tdac.lambada"):
        from_dict(SelectConfig, {"tdac": {"lambada": 1.0}}, "select")
    with pytest.raises(ParamError, match="sampler.steps"):
        from_dict(SamplerConfig, {"steps": "many"}, "sampler")
    with pytest.raises(ParamError, match="dump.feature_batch"):
        from_dict(DumpConfig, {"trajectories": 8, "feature_batch": 9}, "dump")
    with pytest.raises(ParamError, match="sampler.name"):
        from_dict(SamplerConfig, {"name": "euler"}, "sampler")
    # YAML reads 1e-3 as a string: numbers written that way are accepted
    assert from_dict(SamplerConfig, {"eta": "1e-1"}, "sampler").eta == pytest.approx(0.1)


def test_set_overrides_a_dotted_param_without_touching_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("quant:\n  w_bits: 4\nselect:\n  tdac:\n    lambda: 1.2\n")
    params = load_params(path, ["quant.w_bits=8", "select.tdac.lambda=2.5", "recon.method=brecq"])
    assert params["quant"]["w_bits"] == 8 and params["select"]["tdac"]["lambda"] == 2.5
    assert params["recon"] == {"method": "brecq"}
    assert "w_bits: 4" in path.read_text()
    with pytest.raises(ParamError, match="KEY=VALUE"):
        load_params(path, ["quant.w_bits"])


def test_device_section(monkeypatch):
    assert load_device({"device": {"name": "cpu"}}).type == "cpu"
    assert load_device({}).type in ("cpu", "cuda")  # auto
    with pytest.raises(ParamError, match=r"device\.name='tpu'"):
        load_device({"device": {"name": "tpu"}})
    with pytest.raises(ParamError, match=r"device\.name='xla'"):
        load_device({"device": {"name": "xla"}})  # a torch device type the stages do not run on
    with pytest.raises(ParamError, match=r"device='cpu' must be a section"):
        load_device({"device": "cpu"})  # the old spelling
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ParamError, match=r"device\.name='cuda'.*0 CUDA device"):
        load_device({"device": {"name": "cuda"}})
    assert load_device({"device": {"name": "auto"}}).type == "cpu"


def test_evaluate_section_errors_name_the_param():
    assert load_section(EvaluateConfig, "evaluate", {"evaluate": {"pr_k": 5}}).pr_k == 5
    for key in ("pr_k", "is_splits", "batch_size"):
        with pytest.raises(ParamError, match=rf"evaluate\.{key}"):
            load_section(EvaluateConfig, "evaluate", {"evaluate": {key: 0}})
