"""``SwitchedDenoiser`` and the sigma-switch command: the limits are each denoiser alone, per-sample routing."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from study_helpers import tiny_unet_checkpoint

import lightning_repro.evaluation as ev
from lightning_repro.data import SubsetDataModule
from lightning_repro.sampling import sample
from lightning_repro.sampling.hybrid import SwitchedDenoiser, main
from lightning_repro.theory import EmpiricalOptimalDenoiser

pytestmark = pytest.mark.usefixtures("one_thread_module")  # conftest: one torch thread per module


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_unet_checkpoint(tmp_path_factory.mktemp("hybrid") / "ddpmpp.ckpt", size=32)


def _optimal():
    return EmpiricalOptimalDenoiser(SubsetDataModule("digits", size=32).images)


@pytest.mark.parametrize("switch, alone", [(math.inf, "low"), (1e9, "low"), (0.0, "high")])
def test_the_limits_are_each_denoiser_alone(ckpt, switch, alone):
    _, net, kernel = ckpt
    opt = _optimal()
    hybrid = sample(SwitchedDenoiser(net, opt, switch), kernel, "0-5", (1, 8, 8), steps=4)
    assert torch.equal(hybrid, sample(net if alone == "high" else opt, kernel, "0-5", (1, 8, 8), steps=4))


def test_the_switch_routes_each_sample_by_its_own_sigma():
    def high(x, sigma, labels):
        return x + torch.as_tensor(sigma).view(-1, 1, 1, 1) + 100 * labels.view(-1, 1, 1, 1)

    def low(x, sigma, labels):
        return x - torch.as_tensor(sigma).view(-1, 1, 1, 1) - 1000 * labels.view(-1, 1, 1, 1)

    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 2, 2).clone()
    sigma, labels = torch.tensor([3.0, 0.5, 2.0, 1.0]), torch.tensor([1, 2, 3, 4])
    got = SwitchedDenoiser(high, low, 1.0)(x, sigma, labels)  # sigma == sigma_switch goes below ("otherwise")
    want = torch.tensor([0 + 3 + 100, 1 - 0.5 - 2000, 2 + 2 + 300, 3 - 1 - 4000]).view(4, 1, 1, 1).expand(4, 1, 2, 2)
    assert torch.equal(got, want)


def test_a_mixed_batch_gives_each_row_what_its_denoiser_gives_it(ckpt):
    _, net, _ = ckpt
    opt = _optimal()
    x, sigma = torch.randn(5, 1, 8, 8), torch.tensor([5.0, 0.2, 0.2, 5.0, 0.4])
    with torch.inference_mode():
        got = SwitchedDenoiser(net, opt, 0.5)(x, sigma)
        hi, lo = torch.tensor([0, 3]), torch.tensor([1, 2, 4])
        assert torch.equal(got[hi], net(x[hi], sigma[hi]))
        assert torch.equal(got[lo], opt(x[lo], sigma[lo]))


def test_bad_switch_is_one_sentence():
    with pytest.raises(ValueError, match=r"^sigma_switch must be a noise level >= 0 \(inf allowed\), got -1\.$"):
        SwitchedDenoiser(None, None, -1)


def test_command_rp_limits_equal_the_evaluation_cli(ckpt, tmp_path):
    path, _, _ = ckpt
    rows = main([path, "--switch", "inf", "1.2", "0", "--seeds", "0-7", "--steps", "4", "--out", str(tmp_path)])
    assert [r["sigma_switch"] for r in rows] == [math.inf, 1.2, 0.0]
    assert rows[0]["rp"] == 1.0 and rows[0]["mae_mean"] == 0.0  # the reference below everything: itself
    alone = ev.main(["--pair", path, "optimal:", "--seeds", "0-7", "--steps", "4", "--no-wandb", "--no-progress",
                     "--out", str(tmp_path / "pair")])
    assert rows[2]["rp"] == alone["rp"] and rows[2]["mean_similarity"] == alone["mean_similarity"]
    with open(tmp_path / "hybrid.csv") as f:
        written = list(csv.DictReader(f))
    assert [(float(r["sigma_switch"]), float(r["rp"]), int(r["n"])) for r in written] == [
        (r["sigma_switch"], r["rp"], 8) for r in rows]
    assert (tmp_path / "hybrid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
