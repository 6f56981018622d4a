"""params.yaml into frozen dataclasses: every shipped default parses, bad input names the param."""

from __future__ import annotations

from pathlib import Path

import pytest

from edadm.calib.selection import SelectConfig
from edadm.config import ParamError, as_dict, from_dict, load_params, load_section
from edadm.diffusion.loading import ModelConfig
from edadm.diffusion.samples import SampleConfig
from edadm.diffusion.sampling import SamplerConfig
from edadm.diffusion.trajectories import DumpConfig
from edadm.metrics.reference import ReferenceConfig
from edadm.quant import QuantConfig, ReconConfig

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {
    "model": ModelConfig,
    "reference": ReferenceConfig,
    "sampler": SamplerConfig,
    "dump": DumpConfig,
    "select": SelectConfig,
    "quant": QuantConfig,
    "recon": ReconConfig,
    "sample": SampleConfig,
}


@pytest.mark.parametrize("profile", [ROOT / "params.yaml", ROOT / "tests" / "profiles" / "tiny.yaml"])
def test_every_section_of_the_shipped_params_parses(profile):
    params = load_params(profile)
    for section, cls in SECTIONS.items():
        config = load_section(cls, section, params)
        # the dataclass spells params back as params.yaml does (e.g. select.tdac.lambda)
        assert from_dict(cls, as_dict(config), section) == config


def test_params_yaml_sets_every_knob_explicitly():
    """Every key a user may set with -S exists in params.yaml."""
    params = load_params(ROOT / "params.yaml")

    def missing(defaults: dict, given: dict, prefix: str) -> list[str]:
        out = []
        for key, value in defaults.items():
            if key not in given:
                out.append(f"{prefix}{key}")
            elif isinstance(value, dict):
                out += missing(value, given[key], f"{prefix}{key}.")
        return out

    for section, cls in SECTIONS.items():
        assert missing(as_dict(cls()), params[section], f"{section}.") == []


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
