"""Closed-form denoisers: the empirical optimal denoiser (Prop. 1) and the low-rank MoG (Eq. 2, Prop. 2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_repro.theory import EmpiricalOptimalDenoiser, LowRankMoG, score_error

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int, shape=(3, 4, 4), seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *shape, generator=_gen(seed), dtype=F64) * 2 - 1


def _naive(x: torch.Tensor, y: torch.Tensor, sigma: float) -> torch.Tensor:
    """The textbook formula: softmax over direct squared distances, then the weighted mean."""
    d2 = ((x.flatten(1)[:, None, :] - y.flatten(1)[None, :, :]) ** 2).sum(-1)
    w = torch.softmax(-d2 / (2 * sigma**2), dim=1)
    return (w @ y.flatten(1)).reshape(x.shape)


# ------------------------------------------------------------------ EmpiricalOptimalDenoiser
SIGMAS_WIDE = [1e-3, 1e-2, 0.1, 0.5, 1.0, 3.0, 10.0, 80.0, 1e3]


def test_single_image_returns_it_at_every_sigma():
    y = _images(1)
    den = EmpiricalOptimalDenoiser(y)
    x = torch.randn(5, 3, 4, 4, generator=_gen(1), dtype=F64) * 10
    for sigma in SIGMAS_WIDE:
        out = den(x, sigma)
        assert torch.allclose(out, y.expand_as(out), rtol=0, atol=1e-15), sigma


def test_small_sigma_returns_nearest_training_image():
    y = _images(10)
    den = EmpiricalOptimalDenoiser(y)
    x = torch.randn(8, 3, 4, 4, generator=_gen(2), dtype=F64)
    brute = ((x.flatten(1)[:, None] - y.flatten(1)[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(den.nearest(x), brute)
    for sigma in [1e-4, 1e-8, 0.0]:
        assert torch.allclose(den(x, sigma), y[brute], rtol=0, atol=1e-12), sigma


def test_equals_naive_formula_in_float64():
    y = _images(7, shape=(2, 3, 3), seed=3)
    den = EmpiricalOptimalDenoiser(y, chunk_size=3)
    x = y[torch.tensor([0, 3, 5, 6])] + 0.3 * torch.randn(4, 2, 3, 3, generator=_gen(4), dtype=F64)
    for sigma in [0.05, 0.2, 0.5, 1.0, 5.0, 100.0]:
        err = (den(x, sigma) - _naive(x, y, sigma)).abs().max().item()
        assert err < 1e-10, (sigma, err)
    # per-sample sigma, and the output dtype follows the input
    sig = torch.tensor([0.1, 0.4, 2.0, 9.0], dtype=F64)
    ref = torch.stack([_naive(x[i : i + 1], y, float(s))[0] for i, s in enumerate(sig)])
    assert (den(x, sig) - ref).abs().max().item() < 1e-10
    out32 = den(x.float(), 0.5)
    assert out32.dtype == torch.float32 and out32.shape == x.shape
    assert (out32.double() - _naive(x.float().double(), y, 0.5)).abs().max().item() < 1e-6


def test_equals_tweedie_with_autograd_of_log_density():
    y = _images(9, seed=5)
    den = EmpiricalOptimalDenoiser(y, chunk_size=4)
    for sigma in [0.1, 0.5, 2.0]:
        x = (y[:3] + sigma * torch.randn(3, 3, 4, 4, generator=_gen(6), dtype=F64)).requires_grad_(True)
        logp = den.log_density(x, sigma)
        (grad,) = torch.autograd.grad(logp.sum(), x)
        tweedie = x.detach() + sigma**2 * grad
        assert (tweedie - den(x.detach(), sigma)).abs().max().item() < 1e-10, sigma
        # and the density itself is the Gaussian-smoothed empirical density, constant included
        d2 = ((x.detach().flatten(1)[:, None] - y.flatten(1)[None]) ** 2).sum(-1)
        dim = y[0].numel()
        ref = (
            torch.logsumexp(-d2 / (2 * sigma**2), 1)
            - math.log(9)
            - 0.5 * dim * math.log(2 * math.pi * sigma**2)
        )
        assert torch.allclose(logp.detach(), ref, rtol=1e-12, atol=1e-9)


def test_finite_and_convex_on_32x32x3_for_sigma_1e_3_to_1e3():
    y = _images(16, shape=(3, 32, 32), seed=7)
    den = EmpiricalOptimalDenoiser(y, chunk_size=5)
    lo, hi = y.amin(0), y.amax(0)
    for sigma in np.logspace(-3, 3, 13).tolist():
        near = y[:4] + sigma * torch.randn(4, 3, 32, 32, generator=_gen(8), dtype=F64)
        far = sigma * torch.randn(4, 3, 32, 32, generator=_gen(9), dtype=F64)
        for x in (near, far, near.float()):
            out = den(x, sigma).double()
            assert torch.isfinite(out).all(), sigma
            # a convex combination of training images stays inside their coordinate-wise range
            assert (out >= lo - 1e-6).all() and (out <= hi + 1e-6).all(), sigma
        if sigma <= 1e-2:  # noise far below the image spacing: the denoiser returns the clean image
            assert (den(near, sigma) - y[:4]).abs().max().item() < 1e-12, sigma
    # sigma = inf: every weight is equal, the output is the training mean
    assert torch.allclose(den(far, math.inf), y.mean(0).expand_as(far), atol=1e-12)


def test_accurate_between_two_images_at_sigma_1e_3():
    """Two training images with comparable weights at sigma = 1e-3 (the cancellation-prone case),
    checked against the formula evaluated in extended precision (numpy longdouble)."""
    y = _images(6, shape=(3, 32, 32), seed=10)
    den = EmpiricalOptimalDenoiser(y, chunk_size=4)
    sigma = 1e-3
    y0, y1 = y[0].flatten(), y[1].flatten()
    u = (y1 - y0) / (y1 - y0).norm()
    xs = []
    for gap in [-2.0, 0.0, 0.7, 3.0]:  # logit difference between image 0 and image 1
        t = gap * sigma**2 / (y1 - y0).norm()
        xs.append((y0 + y1) / 2 - t * u)
    x = torch.stack(xs).reshape(4, 3, 32, 32)
    out = den(x, sigma)
    xl = x.flatten(1).numpy().astype(np.longdouble)
    yl = y.flatten(1).numpy().astype(np.longdouble)
    d2 = ((xl[:, None, :] - yl[None]) ** 2).sum(-1)
    lg = -d2 / (2 * np.longdouble(sigma) ** 2)
    w = np.exp(lg - lg.max(1, keepdims=True))
    ref = (w @ yl) / w.sum(1, keepdims=True)
    err = np.abs(out.flatten(1).numpy().astype(np.longdouble) - ref).max()
    assert float(err) < 1e-5, float(err)
    # and the two images really do share the weight: the output is far from both
    assert (out.flatten(1)[1] - y0).abs().max() > 0.1 and (out.flatten(1)[1] - y1).abs().max() > 0.1


def test_class_conditional_only_returns_images_of_the_class():
    y = _images(12, seed=11)
    labels = torch.tensor([0, 1, 2] * 4)
    den = EmpiricalOptimalDenoiser(y, labels=labels, chunk_size=5)
    x = torch.randn(9, 3, 4, 4, generator=_gen(12), dtype=F64)
    want = torch.tensor([0, 1, 2] * 3)
    out = den(x, 1e-3, labels=want)
    d = (out.flatten(1)[:, None] - y.flatten(1)[None]).abs().amax(-1)  # (9, 12)
    hit = d.argmin(1)
    assert d.min(1).values.max().item() < 1e-12
    assert torch.equal(labels[hit], want)
    assert torch.equal(labels[den.nearest(x, labels=want)], want)
    # large sigma: the class mean; moderate sigma: the naive formula restricted to the class
    for c in range(3):
        ys = y[labels == c]
        assert torch.allclose(den(x, math.inf, labels=want)[want == c], ys.mean(0).expand(3, -1, -1, -1))
        ref = _naive(x[want == c], ys, 0.7)
        assert (den(x, 0.7, labels=want)[want == c] - ref).abs().max().item() < 1e-10
    # label -1 = unconditional; mixed batches work
    mixed = torch.tensor([-1, 0, -1, 1, 2, -1, 0, 1, 2])
    out = den(x, 0.7, labels=mixed)
    uncond = den(x, 0.7)
    assert torch.allclose(out[mixed == -1], uncond[mixed == -1], rtol=0, atol=1e-13)
    assert torch.allclose(den(x, 0.7, labels=torch.full((9,), -1)), uncond, rtol=0, atol=1e-13)
    # the training images come back in their input order
    assert torch.allclose(den.train_images, y, rtol=0, atol=1e-15)


def test_chunk_size_does_not_change_the_result():
    y = _images(10, seed=13)
    labels = torch.tensor([1, 0] * 5)
    x = torch.randn(6, 3, 4, 4, generator=_gen(14), dtype=F64)
    lab = torch.tensor([0, 1, -1, 0, 1, -1])
    sig = torch.tensor([0.01, 0.1, 0.3, 1.0, 4.0, 50.0], dtype=F64)
    ref = EmpiricalOptimalDenoiser(y, labels=labels, chunk_size=1000)
    for chunk in [1, 3, 7, 10]:
        den = EmpiricalOptimalDenoiser(y, labels=labels, chunk_size=chunk)
        assert (den(x, sig) - ref(x, sig)).abs().max().item() < 1e-12, chunk
        assert (den(x, sig, labels=lab) - ref(x, sig, labels=lab)).abs().max().item() < 1e-12, chunk
        assert (den.log_density(x, sig) - ref.log_density(x, sig)).abs().max().item() < 1e-10, chunk


def test_bad_input_raises_one_clear_sentence():
    y = _images(4)
    den = EmpiricalOptimalDenoiser(y)
    with pytest.raises(ValueError, match="x must have shape"):
        den(torch.zeros(2, 3, 5, 5), 1.0)
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        den(torch.zeros(2, 3, 4, 4), -1.0)
    with pytest.raises(ValueError, match="sigma has 3 values"):
        den(torch.zeros(2, 3, 4, 4), torch.ones(3))
    with pytest.raises(ValueError, match="built without training labels"):
        den(torch.zeros(2, 3, 4, 4), 1.0, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="label 5 has no training images"):
        EmpiricalOptimalDenoiser(y, labels=torch.tensor([0, 0, 1, 1]))(
            torch.zeros(1, 3, 4, 4), 1.0, labels=torch.tensor([5])
        )
    with pytest.raises(ValueError, match="labels must be an integer tensor of shape \\(4,\\)"):
        EmpiricalOptimalDenoiser(y, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="train_images must be a float tensor"):
        EmpiricalOptimalDenoiser(torch.zeros(4, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        EmpiricalOptimalDenoiser(y, chunk_size=0)


def _karras_grid(steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0) -> torch.Tensor:
    i = torch.arange(steps, dtype=F64)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return torch.cat([(a + i / (steps - 1) * (b - a)) ** rho, torch.zeros(1, dtype=F64)])


def _heun(denoiser, x, sigmas):
    """EDM Algorithm 1 (Karras et al. 2022), deterministic (S_churn = 0): a local copy for this test."""
    for s_cur, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        d = (x - denoiser(x, s_cur)) / s_cur
        x_next = x + (s_next - s_cur) * d
        if s_next > 0:
            d2 = (x_next - denoiser(x_next, s_next)) / s_next
            x_next = x + (s_next - s_cur) * 0.5 * (d + d2)
        x = x_next
    return x


def test_heun_sampling_of_the_optimal_denoiser_memorizes_digits():
    from sklearn.datasets import load_digits

    digits = torch.as_tensor(load_digits().images, dtype=F64) / 8.0 - 1.0  # 0..16 -> [-1, 1]
    perm = torch.randperm(digits.shape[0], generator=_gen(0))
    train = digits[perm[:64]].unsqueeze(1)  # (64, 1, 8, 8)
    den = EmpiricalOptimalDenoiser(train)
    z = torch.cat([torch.randn(1, 1, 8, 8, generator=_gen(seed), dtype=F64) for seed in range(256)])
    sigmas = _karras_grid()
    x0 = _heun(den, sigmas[0] * z, sigmas)
    dist = (x0.flatten(1)[:, None] - train.flatten(1)[None]).abs().amax(-1).min(1).values
    print(f"max distance of 256 Heun samples to the nearest training digit: {dist.max().item():.3e}")
    assert dist.max().item() < 1e-2
    # and the samples are not all the same image
    assert len(set(den.nearest(x0).tolist())) > 16


# ------------------------------------------------------------------ LowRankMoG
def test_mog_bases_are_orthonormal_and_seeded():
    mog = LowRankMoG((2, 4, 4), K=3, d=5, seed=1)
    assert mog.U.shape == (3, 32, 5)
    eye = torch.eye(5, dtype=F64).expand(3, 5, 5)
    assert torch.allclose(mog.U.transpose(1, 2) @ mog.U, eye, atol=1e-12)
    assert torch.equal(LowRankMoG((2, 4, 4), K=3, d=5, seed=1).U, mog.U)
    assert not torch.allclose(LowRankMoG((2, 4, 4), K=3, d=5, seed=2).U, mog.U)
    assert mog.scale == pytest.approx(0.5 * math.sqrt(32 / 5))
    assert LowRankMoG(10, 2, 3, scale=1.0).scale == 1.0


def test_mog_score_equals_autograd_of_log_density():
    mog = LowRankMoG((1, 4, 4), K=3, d=3, weights=[0.2, 0.3, 0.5], seed=3, scale=1.3)
    x0 = mog.sample(8, generator=_gen(0), dtype=F64)
    for sig in [torch.full((8,), s, dtype=F64) for s in (0.01, 0.1, 1.0, 10.0)] + [
        torch.logspace(-2, 1, 8, dtype=F64)
    ]:
        x = (
            x0 + sig.view(-1, 1, 1, 1) * torch.randn(8, 1, 4, 4, generator=_gen(1), dtype=F64)
        ).requires_grad_()
        (grad,) = torch.autograd.grad(mog.log_prob(x, sig).sum(), x)
        score = mog.score(x.detach(), sig)
        rel = ((score - grad).norm() / grad.norm()).item()
        assert rel < 1e-6, rel
        # the denoiser is Tweedie's formula
        den = mog(x.detach(), sig)
        assert torch.allclose(den, x.detach() + sig.view(-1, 1, 1, 1) ** 2 * score, atol=1e-9)
    # log_prob of one full-rank component is the Gaussian log-density
    g = LowRankMoG(6, K=1, d=6, scale=2.0)
    x = torch.randn(4, 6, generator=_gen(2), dtype=F64)
    ref = torch.distributions.MultivariateNormal(
        torch.zeros(6, dtype=F64), (4.0 + 0.25) * torch.eye(6, dtype=F64)
    )
    assert torch.allclose(g.log_prob(x, 0.5), ref.log_prob(x), atol=1e-12)


def test_mog_samples_have_the_right_covariance_per_subspace():
    mog = LowRankMoG((1, 4, 4), K=3, d=4, weights=[0.5, 0.25, 0.25], seed=4)
    x, k = mog.sample(24000, generator=_gen(5), return_components=True, dtype=F64)
    assert x.shape == (24000, 1, 4, 4) and k.shape == (24000,)
    freq = torch.bincount(k, minlength=3).double() / 24000
    assert torch.allclose(freq, torch.tensor([0.5, 0.25, 0.25], dtype=F64), atol=0.02)
    xf = x.flatten(1)
    for c in range(3):
        xc = xf[k == c]
        proj = xc @ mog.U[c]  # (n_c, d)
        cov = proj.T @ proj / xc.shape[0]
        tol = 5 / math.sqrt(xc.shape[0])
        assert torch.allclose(cov / mog.scale**2, torch.eye(4, dtype=F64), atol=tol), c
        resid = xc - proj @ mog.U[c].T  # orthogonal complement: exactly zero
        assert resid.abs().max().item() < 1e-12
    # a different generator state gives different samples; the same gives the same
    assert torch.equal(mog.sample(5, generator=_gen(6)), mog.sample(5, generator=_gen(6)))


def test_mog_default_scale_gives_pixel_std_one_half():
    mog = LowRankMoG((3, 16, 16), K=4, d=8, seed=0)
    x = mog.sample(2000, generator=_gen(0))
    assert x.dtype == torch.float32
    assert 0.45 < x.std().item() < 0.55
    assert (x.abs() > 1).float().mean().item() < 0.1  # about 95% of the values lie in [-1, 1]


def test_mog_denoiser_limits_and_conditioning():
    mog = LowRankMoG(12, K=2, d=2, seed=7)
    x, k = mog.sample(6, generator=_gen(1), return_components=True, dtype=F64)
    assert torch.allclose(mog(x, 0.0), x, atol=1e-12)  # clean points on a subspace are fixed points
    assert torch.allclose(mog(x, 1e-4), x, atol=1e-6)
    assert mog(x, 1e6).abs().max().item() < 1e-9  # huge noise: the mean, 0
    # conditioning on the true component: close to the clean point; on the other one: its projection
    other = 1 - k
    proj_other = torch.einsum("bnd,bd->bn", mog.U[other], torch.einsum("bn,bnd->bd", x, mog.U[other]))
    assert torch.allclose(mog(x, 0.0, labels=other), proj_other, atol=1e-12)
    assert torch.allclose(mog(x, 0.5, labels=torch.full((6,), -1)), mog(x, 0.5))
    with pytest.raises(ValueError, match="labels must be 6 integers in \\[-1, 1\\]"):
        mog(x, 0.5, labels=torch.full((6,), 2))
    with pytest.raises(ValueError, match="x must have shape \\(B, 12\\)"):
        mog(torch.zeros(2, 13), 1.0)
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        mog.score(x, 0.0)
    with pytest.raises(ValueError, match="d \\(rank\\) must be an integer in \\[1, n=12\\]"):
        LowRankMoG(12, K=2, d=13)
    with pytest.raises(ValueError, match="weights must be 2 non-negative numbers"):
        LowRankMoG(12, K=2, d=2, weights=[1.0, -1.0])


def test_score_error_zero_for_the_true_denoiser_and_closed_form_for_zero():
    mog = LowRankMoG((1, 4, 4), K=3, d=2, seed=8)
    assert score_error(mog, mog, num_samples=256, generator=_gen(0), dtype=F64) < 1e-18
    assert score_error(mog, mog, num_samples=64, sigmas=[0.05, 1.0], generator=_gen(0), dtype=F64) < 1e-18
    # one full-rank component N(0, c^2 I) and D = 0: s* = -x/(c^2+s^2), s_theta = -x/s^2, so
    # E||s_theta - s*||^2 = n c^4 / (s^4 (c^2 + s^2)) at each sigma.
    g = LowRankMoG(16, K=1, d=16, scale=1.0)
    sig = [0.5, 2.0]
    err = score_error(
        lambda x, s, labels=None: torch.zeros_like(x), g, num_samples=4096, sigmas=sig, generator=_gen(1)
    )
    want = sum(16 / (s**4 * (1 + s**2)) for s in sig) / len(sig)
    assert err == pytest.approx(want, rel=0.03)
    # the same seed gives the same estimate
    den = EmpiricalOptimalDenoiser(mog.sample(32, generator=_gen(2), dtype=F64))
    e1 = score_error(den, mog, num_samples=128, generator=_gen(3))
    assert e1 == score_error(den, mog, num_samples=128, generator=_gen(3)) and e1 > 0
    with pytest.raises(ValueError, match="sigmas must be a non-empty list"):
        score_error(mog, mog, sigmas=[0.0])
