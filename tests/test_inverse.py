"""Deterministic DPS (``sampling.sample_dps``), the inpainting operator and the inverse-problem study (Fig. 10).

The acceptance check: with the optimal denoiser of a small training set and an observation of a *training*
image, deterministic DPS recovers that image (RP = 1 with the pixel descriptor, MAE ~ 0)."""

import csv

import pytest
import torch

from lightning_repro.data import SubsetDataModule
from lightning_repro.kernels import get_kernel
from lightning_repro.metrics import get_descriptor, mae_score, rp_score
from lightning_repro.nets.dit import DiT
from lightning_repro.precond import get_precond
from lightning_repro.sampling import (
    InpaintingOperator,
    center_square_mask,
    data_consistency_error,
    get_sigmas,
    sample_dps,
    seed_noise,
)
from lightning_repro.studies import inverse
from lightning_repro.theory import EmpiricalOptimalDenoiser

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def digits8():
    dm = SubsetDataModule(source="digits", size=8, subset_seed=0)
    return dm.images


def _start(seeds, shape, steps=18):
    kernel = get_kernel("edm")
    sigmas = get_sigmas("native", steps, kernel)
    return kernel.prior_scale * seed_noise(seeds, shape), sigmas


# ----------------------------------------------------------------------------- the operator


@pytest.mark.parametrize(
    "res, kind, side, offset",
    [(32, "easy", 16, 8), (32, "hard", 25, 3), (8, "easy", 4, 2), (8, "hard", 6, 1), (64, "hard", 50, 7)],
)
def test_center_square_mask_sizes(res, kind, side, offset):
    m = center_square_mask(res, kind)
    assert m.shape == (res, res)
    assert int((m == 0).sum()) == side * side
    zeros = (m == 0).nonzero()
    assert zeros.min().item() == offset and zeros[:, 0].max().item() == offset + side - 1
    assert zeros[:, 1].max().item() == offset + side - 1


def test_paper_fractions_at_32():
    assert (1 - center_square_mask(32, "easy").mean()).item() == pytest.approx(0.25)
    assert (1 - center_square_mask(32, "hard").mean()).item() == pytest.approx(625 / 1024)  # 61%


def test_mask_larger_than_image_is_one_clear_sentence():
    with pytest.raises(ValueError, match=r"a 9x9 mask is larger than the 8x8 image\."):
        center_square_mask(8, 9)
    with pytest.raises(ValueError, match="unknown mask kind 'medium'"):
        center_square_mask(8, "medium")


def test_operator_zeroes_exactly_the_masked_area():
    x = torch.rand(3, 1, 8, 8) * 0.5 + 0.5  # no zero pixels
    op = InpaintingOperator.centered(8, "hard")
    y = op(x)
    hole = torch.zeros(8, 8, dtype=torch.bool)
    hole[1:7, 1:7] = True
    assert bool((y[..., hole] == 0).all())
    assert torch.equal(y[..., ~hole], x[..., ~hole])
    with pytest.raises(ValueError, match="do not match the mask"):
        op(torch.zeros(1, 1, 16, 16))


# ----------------------------------------------------------------------------- autograd through denoisers


def test_optimal_denoiser_differentiable_path_matches_streamed(digits8):
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 3, 3])
    D = EmpiricalOptimalDenoiser(digits8, labels=labels)
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    for sigma, lab in [(0.7, None), (torch.tensor([0.0, 0.3, 1.0, 3.0, 0.1]), torch.tensor([0, 1, -1, 3, 2]))]:
        ref = D(x, sigma, lab)
        xg = x.clone().requires_grad_(True)
        out = D(xg, sigma, lab)
        assert out.requires_grad
        torch.testing.assert_close(out.detach(), ref, rtol=0, atol=1e-12)
    xg = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: D(z, 1.3), (xg,))


# ----------------------------------------------------------------------------- deterministic DPS


@pytest.mark.parametrize("kind", ["easy", "hard"])
def test_dps_with_optimal_denoiser_recovers_the_training_image(digits8, kind):
    D = EmpiricalOptimalDenoiser(digits8)
    op = InpaintingOperator.centered(8, kind)
    y = op(digits8)  # observations of the 8 training images
    x_T, sigmas = _start(range(8), (1, 8, 8))
    x = sample_dps(D, x_T, sigmas, y, op, zeta=10.0).clamp(-1, 1)
    desc = get_descriptor("pixel")
    assert rp_score(desc(x), desc(digits8), 0.97) == 1.0
    assert mae_score(x, digits8)["mae_mean"] < 0.5  # in 0-255 levels
    assert float(data_consistency_error(x, y, op).max()) < 1e-3
    # without the data-consistency term the same seeds land on other training images
    x0 = sample_dps(D, x_T, sigmas, y, op, zeta=0.0).clamp(-1, 1)
    assert rp_score(desc(x0), desc(digits8), 0.97) < 0.5


def test_dps_is_deterministic_and_batch_independent(digits8):
    torch.manual_seed(0)
    net = DiT(img_resolution=8, in_channels=1, out_channels=1, patch_size=4, hidden_size=16, depth=1, num_heads=1)
    with torch.no_grad():  # DiT zero-initialises its output layers: give every weight a value
        for p in net.parameters():
            p.normal_(0.0, 0.1)
    den = get_precond("edm", net, "edm").eval().requires_grad_(False)
    op = InpaintingOperator.centered(8, "easy")
    y = op(digits8[:4])
    x_T, sigmas = _start(range(4), (1, 8, 8), steps=5)
    st: dict = {}
    for D in (den, EmpiricalOptimalDenoiser(digits8)):
        for solver in ("heun", "euler"):
            a = sample_dps(D, x_T, sigmas, y, op, zeta=2.0, solver=solver, stats=st)
            b = sample_dps(D, x_T, sigmas, y, op, zeta=2.0, solver=solver)
            assert torch.equal(a, b)
            assert not torch.equal(a, sample_dps(D, x_T, sigmas, y, op, zeta=0.0, solver=solver))  # the term acts
            one = sample_dps(D, x_T[1:2], sigmas, y[1:2], op, zeta=2.0, solver=solver)
            torch.testing.assert_close(one, a[1:2], rtol=1e-5, atol=1e-5)  # per-sample norm: no batch coupling
    assert st == {"nfe": 5, "grads": 5}  # euler: one evaluation and one gradient per step


def test_dps_rejects_bad_options(digits8):
    D = EmpiricalOptimalDenoiser(digits8)
    op = InpaintingOperator.centered(8, "easy")
    x_T, sigmas = _start(range(2), (1, 8, 8), steps=3)
    with pytest.raises(ValueError, match="unknown DPS solver"):
        sample_dps(D, x_T, sigmas, op(digits8[:2]), op, solver="dpmpp")
    with pytest.raises(ValueError, match="zeta must be a non-negative number"):
        sample_dps(D, x_T, sigmas, op(digits8[:2]), op, zeta=-1)
    with pytest.raises(ValueError, match="unknown DPS step schedule"):
        sample_dps(D, x_T, sigmas, op(digits8[:2]), op, schedule="linear")


# ----------------------------------------------------------------------------- the study


def test_inverse_quick_study(tmp_path, capsys):
    rows = inverse.main(["--quick", "--out", str(tmp_path)])
    with open(tmp_path / "inverse.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["mask"], r["model_a"], r["model_b"]) for r in table] == [
        ("easy", "dit", "optimal"),
        ("hard", "dit", "optimal"),
    ]
    for r in table:
        assert 0.0 <= float(r["rp"]) <= 1.0 and float(r["mae"]) >= 0.0
    assert [float(r["masked_fraction"]) for r in table] == [0.25, 0.5625]
    assert len(rows) == 2
    from PIL import Image

    with Image.open(tmp_path / "reconstructions_hard.png") as im:  # columns: y, dit, optimal, truth; 6 rows
        assert im.size == (4 * 33 + 1, 6 * 33 + 1)
    assert "inverse done in" in capsys.readouterr().out
    # a mask larger than the image: one sentence, no traceback
    bad = tmp_path / "bad.yaml"
    bad.write_text("inverse: {masks: [easy, 9]}\n")
    with pytest.raises(SystemExit, match=r"error: a 9x9 mask is larger than the 8x8 image\."):
        inverse.main(["--quick", "--config", str(bad), "--out", str(tmp_path / "bad")])


def test_held_out_images_are_not_in_the_training_subset():
    dm = SubsetDataModule(source="digits", size=64, subset_seed=0)
    held = inverse.held_out_images(dm, 32)
    d = torch.cdist(held.flatten(1), dm.images.flatten(1))
    assert held.shape == (32, 1, 8, 8)
    assert float(d.min()) > 0  # none of them is a training image
    with pytest.raises(ValueError, match="held-out images are needed"):
        inverse.held_out_images(dm, 2000)
