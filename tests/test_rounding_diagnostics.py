"""AdaRound's rounding when learning ends: the undecided share and the soft- against hard-rounding loss."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import quick_recon, tiny_attn_unet, tiny_calib

from edadm.inspect import describe
from edadm.quant.adaround import AdaRoundQuantizer
from edadm.quant.config import QuantConfig
from edadm.recon.api import run_reconstruction


def test_undecided_counts_soft_roundings_strictly_inside_the_margins():
    weight = torch.tensor([[0.0, 0.25, 0.5, 0.995, 1.7]])
    quantizer = AdaRoundQuantizer(weight, torch.ones(1, 1), torch.zeros(1, 1), bits=4)
    # initialised so that h(alpha) = frac(W / delta): 0, 0.25, 0.5, 0.995, 0.7
    assert quantizer.undecided() == (3, 5)
    with torch.no_grad():
        quantizer.alpha.copy_(torch.tensor([[-9.0, 9.0, -9.0, 9.0, 9.0]]))  # committed: h is 0 or 1
    assert quantizer.undecided() == (0, 5)


@pytest.mark.parametrize("method", ["fbr", "brecq"])
def test_report_and_inspect_carry_the_rounding_diagnostics(tmp_path, method):
    unet = tiny_attn_unet()
    unet.save_pretrained(tmp_path / "model")
    recon = quick_recon(method=method, iters=6, round_reg=True)
    run_reconstruction(
        unet, tiny_calib(16), QuantConfig(w_bits=4), recon, tmp_path / "quant", tmp_path / "w", "cpu"
    )
    report = json.loads((tmp_path / "quant" / "report.json").read_text())
    units = [e for e in report["steps"] if e["phase"] != "calibrate"]
    learned = [e for e in units if e["phase"] in ("joint", "weights")]
    assert learned and all("rounding" in e for e in learned)
    assert not any("rounding" in e for e in units if e["phase"] == "activations")  # brecq's second pass
    for entry in learned:
        rounding = entry["rounding"]
        assert 0.0 <= rounding["undecided_share"] <= 1.0
        assert rounding["loss_soft"] >= 0.0
        assert rounding["loss_hard"] == entry["loss_after"]  # the deployed, hard rounding
    assert report["totals"]["rounding"]["units"] == len(learned)
    text = describe(tmp_path / "quant")
    assert "undecided" in text and "soft" in text
