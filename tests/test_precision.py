"""The precision command: perturbing the optimal denoiser's images, and errors along its trajectories."""

from __future__ import annotations

import csv

import pytest
import torch
from study_helpers import tiny_unet_checkpoint

import lightning_repro.evaluation as ev
from lightning_repro.data import SubsetDataModule
from lightning_repro.sampling import sample
from lightning_repro.sampling.precision import TrajectoryErrors, main, perturbed_images
from lightning_repro.theory import EmpiricalOptimalDenoiser

pytestmark = pytest.mark.usefixtures("one_thread_module")  # conftest: one torch thread per module


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_unet_checkpoint(tmp_path_factory.mktemp("precision") / "ddpmpp.ckpt", size=16)[0]


def test_errors_along_the_trajectories_are_those_of_a_known_offset():
    """A denoiser off by a constant c per pixel has rms error |c| at every level; sampling with the probe gives the
    reference's own samples; the levels recorded are Heun's (every level but the final 0)."""
    opt = EmpiricalOptimalDenoiser(SubsetDataModule("digits", size=16).images)
    probe = TrajectoryErrors(opt, {"offset": lambda x, s, labels=None: opt(x, s) + 0.25, "itself": opt})
    got = sample(probe, "edm", "0-5", (1, 8, 8), steps=5)
    assert torch.equal(got, sample(opt, "edm", "0-5", (1, 8, 8), steps=5))
    rms = probe.rms()
    assert len(rms["offset"]) == 5 and list(rms["offset"]) == sorted(rms["offset"], reverse=True)
    assert all(abs(e - 0.25) < 1e-6 for e in rms["offset"].values())
    assert all(e == 0.0 for e in rms["itself"].values())


def test_perturbation_is_one_direction_scaled_and_bad_std_is_one_sentence():
    images = SubsetDataModule("digits", size=4).images
    assert torch.equal(perturbed_images(images, 0.0), images)
    d1, d2 = perturbed_images(images, 0.1) - images, perturbed_images(images, 0.2) - images
    assert torch.allclose(d2, 2 * d1, atol=1e-6) and abs(float(d1.std()) - 0.1) < 0.02
    with pytest.raises(ValueError, match=r"^a perturbation std must be a finite number >= 0, got -0\.1\.$"):
        perturbed_images(images, -0.1)


def test_command_rp_equals_the_evaluation_cli_and_zero_perturbation_is_exact(ckpt, tmp_path):
    res = main([ckpt, "--stds", "0", "3", "--seeds", "0-7", "--steps", "4", "--out", str(tmp_path)])
    label = next(iter(res["rp"]))
    alone = ev.main(["--pair", ckpt, "optimal:", "--seeds", "0-7", "--steps", "4", "--no-wandb", "--no-progress",
                     "--out", str(tmp_path / "pair")])
    assert res["rp"][label] == alone["rp"]
    assert res["perturbed"][0] == {"std": 0.0, "rp": 1.0, "mean_similarity": pytest.approx(1.0)}
    assert res["perturbed"][1]["rp"] < 0.5  # images drowned in noise of std 3: other samples
    with open(tmp_path / "errors.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["model"] for r in rows} == {label}
    assert [float(r["rms_error_per_pixel"]) for r in rows] == list(res["errors"][label].values())
    assert (tmp_path / "precision.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_mog_reference_measures_the_errors_along_the_mixtures_trajectories(ckpt, tmp_path):
    """``--reference mog:...``: no perturbations, the errors along the closed form's trajectories, and the RP of
    ``evaluate.py --pair CKPT mog:...``; ``--stds`` with it is one sentence."""
    spec = "mog:mog?rank=3&num_samples=64&size=16"
    res = main([ckpt, "--reference", spec, "--seeds", "0-7", "--steps", "4", "--out", str(tmp_path)])
    label = next(iter(res["rp"]))
    alone = ev.main(["--pair", ckpt, spec, "--seeds", "0-7", "--steps", "4", "--no-wandb", "--no-progress", "--out",
                     str(tmp_path / "pair")])
    assert res["perturbed"] == [] and res["rp"][label] == alone["rp"]
    mog = ev.resolve_model(spec).denoiser(torch.device("cpu"))
    probe = TrajectoryErrors(mog, {label: ev.resolve_model(ckpt).denoiser(torch.device("cpu"))})
    sample(probe, "edm", "0-7", (1, 8, 8), steps=4)
    assert res["errors"] == probe.rms()
    with pytest.raises(ValueError, match=r"^--stds perturbs the training images of an optimal: reference; a mog: "):
        main([ckpt, "--reference", spec, "--stds", "0.1", "--out", str(tmp_path / "o")])


def test_a_reference_that_is_not_a_closed_form_is_one_sentence(ckpt, tmp_path):
    with pytest.raises(ValueError, match=r"^--reference must be an optimal: or mog: spec"):
        main([ckpt, "--reference", ckpt, "--seeds", "0-3", "--out", str(tmp_path)])
