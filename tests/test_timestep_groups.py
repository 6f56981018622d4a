"""quant.act_timestep_groups: activation ranges per group of sampling steps, on tiny UNets."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import fake_and_integer_samples, float_samples, quick_recon, sample_psnr, tiny_attn_unet

from edadm.calib.calibration_set import CalibrationSet
from edadm.config import from_dict
from edadm.deploy.export import export_quantized, export_summary, load_exported
from edadm.deploy.integer import to_integer
from edadm.deploy.kernels import onednn_available
from edadm.diffusion.samples import SampleConfig
from edadm.diffusion.sampling import SamplerConfig, sampling_timesteps
from edadm.errors import ParamError
from edadm.quant.config import QuantConfig
from edadm.quant.model import act_quantizers, calibrate_activations, quantize_model
from edadm.quant.state import load_quant_model, load_quant_state, quant_state_dict
from edadm.quant.timestep_groups import BOUNDARIES_KEY, TimestepGroups, timestep_groups
from edadm.recon.api import run_reconstruction
from edadm.recon.network import reconstruct

TIMESTEPS = [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]  # a 10-step sampler, noisiest first
RATIO = 10.0  # group 0's inputs are RATIO times group 1's
BACKENDS = ["int_mm"] + (["onednn"] if onednn_available() else [])


def two_group_calib(per_group: int = 8) -> CalibrationSet:
    """Samples alternating between the groups (t >= 500 / t < 500), with the same noise z:
    RATIO * z in group 0, z in group 1, so each batch of 8 holds 4 of each."""
    z = torch.randn(per_group, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    cycle = torch.arange(per_group) % 5
    t = torch.stack([torch.tensor(TIMESTEPS[:5])[cycle], torch.tensor(TIMESTEPS[5:])[cycle]], 1)
    x = torch.stack([RATIO * z, z], 1).reshape(2 * per_group, 1, 8, 8)
    return CalibrationSet(x, t.reshape(-1))


def calibrated(
    groups: int = 2, calib: CalibrationSet | None = None, batch: int = 8, **config
) -> torch.nn.Module:
    model = quantize_model(
        tiny_attn_unet(), QuantConfig(act_timestep_groups=groups, **config), timesteps=TIMESTEPS
    )
    calibrate_activations(model, (calib or two_group_calib()).batches(batch, "cpu"))
    return model.eval()


def mixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(6, 1, 8, 8, generator=g), torch.tensor([950, 20, 500, 499, 0, 700])


# ---------------------------------------------------------------------------------------------
# Groups from timesteps
# ---------------------------------------------------------------------------------------------
def test_groups_cut_the_steps_and_map_any_timestep() -> None:
    groups = TimestepGroups.from_timesteps(TIMESTEPS, 3)  # steps 0-3, 4-6, 7-9
    assert groups.boundaries.tolist() == [300.0, 600.0]
    assert groups.group_of(torch.tensor(TIMESTEPS)).tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    # timesteps the sampler never visits map too
    assert groups.group_of(torch.tensor([5000, 650, 599.5, 299, -3])).tolist() == [0, 0, 1, 2, 2]
    assert groups.describe(1) == "group 1 of 3 (300 <= timesteps < 600)"
    # the official quadratic spacing repeats its last timesteps: a cut between repeats is refused
    with pytest.raises(ParamError, match="quant.act_timestep_groups=5 cuts between"):
        TimestepGroups.from_timesteps([9, 6, 4, 2, 2, 2, 1, 0, 0, 0], 5)


def test_bad_values_raise_param_errors() -> None:
    for value in (0, -1, 1.5, True):
        with pytest.raises(ParamError, match="quant.act_timestep_groups"):
            QuantConfig(act_timestep_groups=value)
    with pytest.raises(ParamError, match="quant.act_timestep_groups"):
        from_dict(QuantConfig, {"act_timestep_groups": 0}, "quant")
    with pytest.raises(ParamError, match=r"quant.act_timestep_groups=11 must lie in \[1, 10\]"):
        quantize_model(tiny_attn_unet(), QuantConfig(act_timestep_groups=11), timesteps=TIMESTEPS)


# ---------------------------------------------------------------------------------------------
# G = 1 is the official single set; G = 2 fits each group on its own samples
# ---------------------------------------------------------------------------------------------
def test_one_group_is_the_single_set_of_ranges() -> None:
    calib = two_group_calib()
    plain = quantize_model(tiny_attn_unet(), QuantConfig())
    calibrate_activations(plain, calib.batches(8, "cpu"))
    one = calibrated(1, calib)  # the feature's path, with the sampler's timesteps given
    state, reference = quant_state_dict(one), quant_state_dict(plain)
    assert BOUNDARIES_KEY not in state and state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)
    assert all(q.scale.ndim == 0 and q.timestep_groups is None for q in act_quantizers(one))
    assert not one._forward_pre_hooks and not one._forward_hooks


def test_each_group_is_calibrated_on_its_own_samples() -> None:
    calib = two_group_calib()
    model = calibrated(2, calib)
    scale = model.conv_in.act_quantizer.scale  # conv_in's input is the sample itself
    assert scale.shape == (2,) and float(scale[0] / scale[1]) == pytest.approx(RATIO, rel=0.02)
    # every quantizer's group g equals a single set calibrated on group g's samples alone (the
    # same 4 of them a batch): nothing of the other group reaches a group's range
    for g in (0, 1):
        alone = calibrated(1, calib.subset(torch.arange(g, len(calib), 2)), batch=4)
        for i, (q, q_alone) in enumerate(zip(act_quantizers(model), act_quantizers(alone), strict=True)):
            assert float(q.scale[g]) == pytest.approx(float(q_alone.scale), rel=1e-3), (i, g)
            assert float(q.zero_point[g]) == float(q_alone.zero_point), (i, g)


def test_mixed_batch_equals_single_group_forwards() -> None:
    model = calibrated()
    x, t = mixed_batch()
    high, low = t >= 500, t < 500
    with torch.no_grad():
        mixed = model(x, t).sample
        parts = torch.empty_like(mixed)
        parts[high] = model(x[high], t[high]).sample
        parts[low] = model(x[low], t[low]).sample
        assert torch.allclose(mixed, parts, atol=1e-6, rtol=0)
        # a scalar timestep is every sample's
        assert torch.allclose(model(x[:2], 20).sample, model(x[:2], torch.tensor([20, 20])).sample)
        # the two groups' ranges differ, so the output does
        assert not torch.allclose(mixed[2], model(x[2:3], torch.tensor([499])).sample[0], atol=1e-4)


def test_a_group_without_calibration_samples_is_an_error() -> None:
    calib = two_group_calib()
    only_high = calib.subset(torch.arange(0, len(calib), 2))
    with pytest.raises(ValueError, match=r"no sample in timestep group 1 of 2 \(timesteps < 500\)"):
        calibrated(2, only_high)
    model = quantize_model(tiny_attn_unet(), QuantConfig(act_timestep_groups=2), timesteps=TIMESTEPS)
    with pytest.raises(ValueError, match="group 1 of 2"):
        reconstruct(model, only_high, quick_recon(), "cpu")


def test_a_quantizer_without_groups_set_fails_loudly() -> None:
    model = calibrated()
    layer = model.conv_in
    x, t = mixed_batch()
    with torch.no_grad(), pytest.raises(RuntimeError, match="without groups set"):
        layer(x)
    with torch.no_grad(), timestep_groups(layer, t):
        y = layer(x)
    assert y.shape[0] == len(x)


# ---------------------------------------------------------------------------------------------
# Reconstruction, artifacts, export, integer kernels
# ---------------------------------------------------------------------------------------------
def test_reconstruct_learns_group_steps_and_round_trips(tmp_path) -> None:
    unet = tiny_attn_unet()
    unet.save_pretrained(tmp_path / "model")
    calib = CalibrationSet(two_group_calib().x, two_group_calib().t, attrs={"dump": {"timesteps": TIMESTEPS}})
    calibrated_state = {}

    def keep_calibration(step: str, entry: dict) -> None:
        if step == "calibrate":
            calibrated_state.update(quant_state_dict(unet, activations_only=True))

    qc = QuantConfig(w_bits=4, act_timestep_groups=2)
    run_reconstruction(
        unet, calib, qc, quick_recon(iters=4), tmp_path / "quant", tmp_path / "work", "cpu",
        callback=keep_calibration,
    )  # fmt: skip
    state = load_file(tmp_path / "quant" / "state.safetensors")
    assert state[BOUNDARIES_KEY].tolist() == [500.0]
    # a block's [G] steps were learned, both groups' (the batches mix them)
    key = "down_blocks.1.attentions.0.to_q.act_quantizer.scale"
    assert state[key].shape == (2,) and (state[key] != calibrated_state[key]).all()
    manifest = json.loads((tmp_path / "quant" / "manifest.json").read_text())
    assert manifest["quant"]["act_timestep_groups"] == 2
    assert manifest["timestep_groups"] == {"groups": 2, "boundaries": [500.0]}

    loaded = load_quant_model(tmp_path / "model", tmp_path / "quant")
    assert all(torch.equal(v, state[k]) for k, v in quant_state_dict(loaded).items())
    x, t = mixed_batch()
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, unet(x, t).sample)

    # the export keeps the groups: boundaries, [G] ranges, metadata
    summary = export_quantized(unet, tmp_path / "model.safetensors")
    exported = load_exported(tmp_path / "model.safetensors")
    with torch.no_grad():
        assert torch.equal(exported(x, t).sample, unet(x, t).sample)
    header = export_summary(tmp_path / "model.safetensors")
    assert header["timestep_groups"] == {"groups": 2, "boundaries": [500.0]}
    assert header["extra"] == {} and header["fp32_bytes"] == summary["fp32_bytes"]

    # a state with groups does not load into a model with one set
    with pytest.raises(KeyError, match="act_timestep_groups=1"):
        load_quant_state(quantize_model(tiny_attn_unet(), QuantConfig(w_bits=4)), state)


def test_run_reconstruction_needs_the_sampler_timesteps(tmp_path) -> None:
    with pytest.raises(ValueError, match="needs the sampler's timesteps"):
        run_reconstruction(
            tiny_attn_unet(), two_group_calib(), QuantConfig(act_timestep_groups=2), quick_recon(),
            tmp_path / "quant", tmp_path / "work", "cpu",
        )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_model_matches_fake_quantization(backend: str) -> None:
    model = calibrated(w_bits=4)
    x, t = mixed_batch()
    with torch.no_grad():
        fake = model(x, t).sample
        integer_model = copy.deepcopy(model)
        report = to_integer(integer_model, backend)
        integer = integer_model(x, t).sample
        single = integer_model(x[:2], 20).sample
    assert list(report.fake_layers) == ["conv_out"]
    assert float((integer - fake).abs().max() / fake.abs().mean()) < 1e-4
    with torch.no_grad():
        assert torch.allclose(single, model(x[:2], 20).sample, atol=1e-4)  # one group, no split


def test_integer_sampling_matches_fake_sampling(tmp_path, tiny_scheduler) -> None:
    sampler, config = SamplerConfig(steps=4), SampleConfig(n=4, batch_size=4)
    timesteps = sampling_timesteps(tiny_scheduler, sampler)
    model = quantize_model(tiny_attn_unet(), QuantConfig(act_timestep_groups=2), timesteps=timesteps)
    cycle = torch.tensor(timesteps).repeat(4)
    calibrate_activations(model, CalibrationSet(torch.randn(16, 1, 8, 8), cycle).batches(8, "cpu"))
    floating = float_samples(model, tiny_scheduler, sampler, config, tmp_path)
    fake, integer = fake_and_integer_samples(model, tiny_scheduler, sampler, config, tmp_path)
    # Integer kernels give the fake path's codes but for values on a rounding boundary, which
    # differ by CPU; through the sampler a flipped code spreads (this W8A8 random model, 4 steps:
    # 59 % of pixels within 1e-3 on an AMD EPYC, all of them on an Intel Xeon). What holds on any
    # CPU: integer sampling is much closer to fake sampling than quantization is to float.
    quantization, integer_psnr = sample_psnr(fake, floating), sample_psnr(integer, fake)  # 20 / 39 dB
    assert integer_psnr >= max(quantization + 10.0, 30.0), (integer_psnr, quantization)


class Interrupt(Exception):
    pass


def test_resume_writes_the_same_bytes(tmp_path) -> None:
    calib = two_group_calib()
    qc, rc = QuantConfig(w_bits=4, act_timestep_groups=2), quick_recon(iters=2)
    steps: list[str] = []

    def stop_after_first_unit(step: str, entry: dict) -> None:
        steps.append(step)
        if len(steps) == 2:
            raise Interrupt

    def run(out: str, work: str, **kwargs) -> None:
        run_reconstruction(
            tiny_attn_unet(), calib, qc, rc, tmp_path / out, tmp_path / work, "cpu",
            timesteps=TIMESTEPS, **kwargs,
        )  # fmt: skip

    with pytest.raises(Interrupt):
        run("a", "work", callback=stop_after_first_unit)
    run("a", "work")
    run("b", "work2")
    for name in ("report.json", "manifest.json", "state.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
