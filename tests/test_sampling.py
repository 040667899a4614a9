"""Tests for seed-indexed noise, sigma grids, the deterministic solvers and ``sample()``.

Exactness is checked on Gaussian data N(mu, c^2 I), where the ideal denoiser and the probability-flow
ODE solution are closed forms (Karras et al. 2022, Eq. 4):
    D(x, s) = mu + c^2 / (c^2 + s^2) (x - mu),   x(s) = mu + sqrt((c^2 + s^2) / (c^2 + S^2)) (x_T - mu).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_repro.kernels import EDMKernel, SubVPKernel, VEKernel, VPKernel
from lightning_repro.precond import EDMPrecond
from lightning_repro.sampling import SAMPLERS, get_sigmas, parse_seeds, sample, seed_noise
from lightning_repro.sampling.solvers import (
    CountingDenoiser,
    get_sampler,
    guided,
    sample_dpmpp,
    sample_euler,
    sample_heun,
    sample_ode,
)

S_MAX, S_MIN, C = 80.0, 0.002, 0.5


pytestmark = pytest.mark.usefixtures("one_thread_module")  # conftest: one torch thread per module


# -- closed-form denoisers ------------------------------------------------------------------------------------


def _sig(s, x):
    s = torch.as_tensor(s, dtype=x.dtype, device=x.device)
    return s.reshape(-1, *([1] * (x.ndim - 1))) if s.numel() > 1 else s


class GaussianDenoiser:
    def __init__(self, mu: torch.Tensor, c: float = C):
        self.mu, self.c = mu, c

    def __call__(self, x, sigma, labels=None):
        s = _sig(sigma, x)
        return self.mu + self.c**2 / (self.c**2 + s**2) * (x - self.mu)

    def solution(self, x_T, s, s_start=S_MAX):
        return self.mu + math.sqrt((self.c**2 + s**2) / (self.c**2 + s_start**2)) * (x_T - self.mu)


class MoGDenoiser:
    """Exact denoiser of an equal-weight mixture of N(mu_k, c^2 I) on flat vectors (nonlinear in x)."""

    def __init__(self, mus: torch.Tensor, c: float = 0.3):
        self.mus, self.c = mus, c

    def __call__(self, x, sigma, labels=None):
        s = _sig(sigma, x).reshape(-1, 1)
        v = self.c**2 + s**2
        logw = -((x[:, None, :] - self.mus[None]) ** 2).sum(-1) / (2 * v)
        w = (logw - logw.amax(dim=1, keepdim=True)).exp()
        w = w / w.sum(dim=1, keepdim=True)  # softmax (torch.softmax is slow on tiny CPU tensors under load)
        post = self.mus[None] + (self.c**2 / v)[..., None] * (x[:, None, :] - self.mus[None])
        return (w[..., None] * post).sum(1)


class TinyNet(nn.Module):
    """A small conditional conv net with the suite's network signature."""

    def __init__(self, channels: int = 3, width: int = 16, num_classes: int = 4):
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.out = nn.Conv2d(width, channels, 3, padding=1)
        self.emb = nn.Linear(1, width)
        self.cls = nn.Embedding(num_classes + 1, width)  # last row = null class (-1)
        self.num_classes = num_classes

    def forward(self, x, noise_labels, class_labels=None):
        h = self.inp(x) + self.emb(noise_labels.reshape(-1, 1))[:, :, None, None]
        if class_labels is not None:
            idx = torch.where(class_labels < 0, self.num_classes, class_labels)
            h = h + self.cls(idx)[:, :, None, None]
        return self.out(torch.tanh(h))


def _tiny_denoiser():
    torch.manual_seed(0)
    return EDMPrecond(TinyNet(), "edm").eval()


def _gaussian_problem(n=64, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = 0.3 * torch.randn(d, generator=g, dtype=torch.float64)
    x_T = S_MAX * torch.randn(n, d, generator=g, dtype=torch.float64)
    return GaussianDenoiser(mu), x_T


# -- exactness / order of convergence ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, solver, opts, order",
    [
        ("euler", sample_euler, {}, 1),
        ("heun", sample_heun, {}, 2),
        ("dpmpp_2m", sample_dpmpp, {"order": 2}, 2),
        ("dpmpp_3m", sample_dpmpp, {"order": 3}, 3),
    ],
)
def test_order_of_convergence_on_gaussian_data(name, solver, opts, order):
    # Karras rho-grid (non-uniform in log sigma) from 80 to 0.002 then the final step into 0.  The exact
    # result of that final step is D(x(sigma_min), sigma_min), an affine map of x(sigma_min) with slope ~1,
    # so the error at sigma = 0 falls at the solver's order.
    D, x_T = _gaussian_problem()
    ref = D(D.solution(x_T, S_MIN), S_MIN)
    steps = [32, 64, 128, 256]
    errs = []
    for n in steps:
        x0 = solver(D, x_T, get_sigmas("karras", n, sigma_min=S_MIN, sigma_max=S_MAX), **opts)
        errs.append((x0 - ref).abs().max().item())
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert abs(slope - order) <= 0.3, f"{name}: errors {errs}, fitted order {slope:.2f}"


def test_dpmpp_3m_is_third_order_on_a_mixture_and_legacy_coefficient_is_not():
    # A nonlinear (mixture) denoiser: the Taylor-consistent D2 gives order 3; the reference codes'
    # coefficient (legacy_3m=True) only order ~2.
    g = torch.Generator().manual_seed(1)
    D = MoGDenoiser(torch.randn(3, 4, generator=g, dtype=torch.float64))
    x_T = S_MAX * torch.randn(16, 4, generator=g, dtype=torch.float64)
    ref = sample_dpmpp(D, x_T, get_sigmas("logsnr", 4000, sigma_min=S_MIN, sigma_max=S_MAX), order=3)
    steps = [64, 128, 256]

    def fitted(**opts):
        errs = [
            (
                sample_dpmpp(
                    D, x_T, get_sigmas("logsnr", n, sigma_min=S_MIN, sigma_max=S_MAX), order=3, **opts
                )
                - ref
            )
            .abs()
            .max()
            .item()
            for n in steps
        ]
        return -np.polyfit(np.log(steps), np.log(errs), 1)[0]

    assert abs(fitted() - 3) <= 0.3
    assert fitted(legacy_3m=True) < 2.5


def test_ode_matches_closed_form():
    D, x_T = _gaussian_problem(n=4)
    sigmas = get_sigmas("logsnr", 18, sigma_min=S_MIN, sigma_max=S_MAX)
    stats: dict = {}
    x0 = sample_ode(D, x_T, sigmas, rtol=1e-6, atol=1e-6, stats=stats)
    ref = D(D.solution(x_T, S_MIN), S_MIN)
    assert (x0 - ref).abs().max().item() < 1e-4
    assert len(stats["nfe_per_sample"]) == 4 and stats["nfe"] == max(stats["nfe_per_sample"]) > 10


def test_ode_sample_independent_of_batch_mates():
    g = torch.Generator().manual_seed(2)
    D = MoGDenoiser(torch.randn(3, 4, generator=g, dtype=torch.float64))
    x_T = S_MAX * torch.randn(64, 4, generator=g, dtype=torch.float64)
    sigmas = get_sigmas("karras", 10, sigma_min=S_MIN, sigma_max=S_MAX)
    batch = sample_ode(D, x_T, sigmas, rtol=1e-4, atol=1e-4)
    for i in (0, 37):
        alone = sample_ode(D, x_T[i : i + 1], sigmas, rtol=1e-4, atol=1e-4)
        assert (alone - batch[i : i + 1]).abs().max().item() <= 1e-6


def test_euler_is_ddim_for_vp():
    # One DDIM step (eta = 0) in the VP variable == one Euler step in the EDM variable, rescaled.
    k = VPKernel()
    D, _ = _gaussian_problem()
    t, t_next = torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64)
    s, s_next = k.sigma(t), k.sigma(t_next)
    a, a_next = k.s(t) ** 2, k.s(t_next) ** 2  # alpha_bar
    g = torch.Generator().manual_seed(3)
    x_vp = torch.randn(8, 16, generator=g, dtype=torch.float64)
    x0_hat = D(x_vp / k.s(t), s)
    eps = (x_vp - a.sqrt() * x0_hat) / (1 - a).sqrt()
    ddim = a_next.sqrt() * x0_hat + (1 - a_next).sqrt() * eps
    euler = sample_euler(D, x_vp / k.s(t), torch.stack([s, s_next])) * k.s(t_next)
    torch.testing.assert_close(euler, ddim, rtol=1e-12, atol=1e-12)


def test_dpmpp_order1_equals_euler_exactly():
    g = torch.Generator().manual_seed(4)
    D = MoGDenoiser(torch.randn(3, 4, generator=g, dtype=torch.float64))
    x_T = S_MAX * torch.randn(8, 4, generator=g, dtype=torch.float64)
    for grid in ("logsnr", "karras"):
        sig = get_sigmas(grid, 12, sigma_min=S_MIN, sigma_max=S_MAX)
        assert torch.equal(sample_dpmpp(D, x_T, sig, order=1), sample_euler(D, x_T, sig))
    net = _tiny_denoiser()
    z = 80 * seed_noise(range(3), (3, 8, 8))
    sig = EDMKernel().sigmas(6)
    with torch.inference_mode():
        assert torch.equal(sample_dpmpp(net, z, sig, order=1), sample_euler(net, z, sig))


def test_dpmpp_warmup_and_lower_order_final():
    # 3 steps = 2 between non-zero sigmas + the final denoise: step 0 warms up at order 1, and
    # lower_order_final drops the last non-zero step to order 1 too.
    D, x_T = _gaussian_problem(n=4)
    sig = get_sigmas("logsnr", 3, sigma_min=S_MIN, sigma_max=S_MAX)
    one = sample_dpmpp(D, x_T, sig, order=1)
    assert not torch.equal(sample_dpmpp(D, x_T, sig, order=2, lower_order_final=False), one)
    assert torch.equal(sample_dpmpp(D, x_T, sig, order=2, lower_order_final=True), one)
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        sample_dpmpp(D, x_T, sig, order=4)


def test_dpmpp_lower_order_final_rules():
    # diffusers counts the final step into sigma = 0: for 2M it lowers nothing else (== off); for 3M its
    # second-to-last step (into the last non-zero sigma) is 2nd order, which neither other rule gives
    D, x_T = _gaussian_problem(n=4)
    sig = get_sigmas("logsnr", 6, sigma_min=S_MIN, sigma_max=S_MAX)
    run = lambda order, rule: sample_dpmpp(D, x_T, sig, order=order, lower_order_final=rule)  # noqa: E731
    assert torch.equal(run(2, "diffusers"), run(2, "off")) and torch.equal(run(2, True), run(2, "dpm-solver"))
    assert not torch.equal(run(2, "diffusers"), run(2, "dpm-solver"))
    three = {rule: run(3, rule) for rule in ("dpm-solver", "diffusers", "off")}
    assert not any(torch.equal(three[a], three[b]) for a, b in (("dpm-solver", "diffusers"), ("diffusers", "off")))
    on_min = sig[:-1]  # a grid ending at a non-zero sigma (diffusers' final_sigmas_type="sigma_min"): rules agree
    assert torch.equal(sample_dpmpp(D, x_T, on_min, order=3, lower_order_final="diffusers"),
                       sample_dpmpp(D, x_T, on_min, order=3, lower_order_final=True))
    long = get_sigmas("logsnr", 15, sigma_min=S_MIN, sigma_max=S_MAX)  # from 15 steps on no rule lowers
    assert torch.equal(sample_dpmpp(D, x_T, long, order=3, lower_order_final="diffusers"),
                       sample_dpmpp(D, x_T, long, order=3, lower_order_final=False))
    with pytest.raises(ValueError) as err:
        run(2, "last")
    assert str(err.value) == ("lower_order_final must be one of dpm-solver, diffusers, off (or true / false), "
                              "got 'last'.")
    from lightning_repro.evaluation import SamplingOptions

    assert SamplingOptions(sampler="dpm++", lower_order_final="off").cache_tag == "dpmpp18_lof-off"
    with pytest.raises(ValueError) as err:
        SamplingOptions(sampler="heun", lower_order_final="diffusers")
    assert str(err.value) == ("--lower-order-final diffusers applies to the DPM-Solver++ samplers (dpmpp, dpmpp_2m, "
                              "dpmpp_3m), not to heun.")


# -- NFE counting -------------------------------------------------------------------------------------------


def test_nfe_counts():
    D, x_T = _gaussian_problem(n=2)
    sig = EDMKernel().sigmas(18)
    for solver, nfe in ((sample_heun, 35), (sample_euler, 18), (sample_dpmpp, 18)):
        stats: dict = {}
        counted = CountingDenoiser(D)
        solver(counted, x_T, sig, stats=stats)
        assert stats["nfe"] == counted.nfe == nfe
    stats = {}
    sample(_tiny_denoiser(), "edm", range(3), (3, 8, 8), sampler="heun", steps=18, stats=stats)
    assert stats["nfe"] == 35


# -- seed noise ---------------------------------------------------------------------------------------------


def test_seed_noise_is_a_function_of_the_seed():
    shape = (3, 8, 8)
    full = seed_noise(range(64), shape)
    assert full.shape == (64, *shape) and full.dtype == torch.float32
    for bs in (1, 7, 64):
        parts = torch.cat([seed_noise(range(i, min(i + bs, 64)), shape) for i in range(0, 64, bs)])
        assert torch.equal(parts, full)
    assert torch.equal(seed_noise([5, 2], shape), full[[5, 2]])
    assert torch.equal(full[9], torch.randn(shape, generator=torch.Generator().manual_seed(9)))
    assert torch.equal(seed_noise(range(4), shape, dtype=torch.float64).float(), full[:4])
    assert not torch.equal(full[0], full[1])
    assert torch.equal(seed_noise("0-63", shape), full)


def test_parse_seeds_accepts_the_documented_forms():
    assert parse_seeds("0-9999") == list(range(10000))
    assert parse_seeds("0,5,7-9") == [0, 5, 7, 8, 9]
    assert parse_seeds(" 3 , 4 - 5") == [3, 4, 5]
    assert parse_seeds(7) == [7]
    assert parse_seeds(range(3)) == [0, 1, 2]
    assert parse_seeds([4, 1]) == [4, 1]
    assert parse_seeds(torch.tensor([2, 3])) == [2, 3]


@pytest.mark.parametrize("bad", ["", "5-", "a", "9-3", "-1", "1,,2", [-1], [], [1.5], 1.5])
def test_parse_seeds_rejects_bad_input(bad):
    with pytest.raises(ValueError, match=r"Invalid seeds .*expected .*'0-9999' or '0,5,7-9'\.$"):
        parse_seeds(bad)


# -- grids --------------------------------------------------------------------------------------------------


def test_grids():
    edm, ve = EDMKernel(), VEKernel()
    for kind in ("native", "karras", "logsnr", "time_uniform", "time_quadratic"):
        for k in (edm, ve, VPKernel(), SubVPKernel()):
            g = get_sigmas(kind, 7, k)
            assert g.dtype == torch.float64 and len(g) == 8 and g[-1] == 0
            assert bool((g[:-1] > 0).all()) and bool((g[1:] < g[:-1]).all())
            assert math.isclose(g[0].item(), k.sigma_max, rel_tol=1e-9)
            assert math.isclose(g[-2].item(), k.sigma_min, rel_tol=1e-9)
    torch.testing.assert_close(get_sigmas("native", 9, edm), get_sigmas("karras", 9, edm))
    torch.testing.assert_close(get_sigmas("time_uniform", 9, ve), ve.sigmas(9))
    lg = get_sigmas("logsnr", 6, sigma_min=0.01, sigma_max=10).log()[:-1]
    torch.testing.assert_close(lg.diff(), torch.full((5,), math.log(1e-3) / 5, dtype=torch.float64))
    stats: dict = {}
    sample(_tiny_denoiser(), edm, [0], (3, 8, 8), sampler="dpmpp", steps=5, stats=stats)
    torch.testing.assert_close(stats["sigmas"], get_sigmas("logsnr", 5, edm))
    with pytest.raises(ValueError, match="Unknown sigma grid 'cosine'; valid grids are: native, karras"):
        get_sigmas("cosine", 5, edm)
    with pytest.raises(ValueError, match="needs a kernel"):
        get_sigmas("native", 5)


# -- bad input ----------------------------------------------------------------------------------------------


def test_unknown_sampler_and_bad_steps():
    with pytest.raises(
        ValueError, match="Unknown sampler 'rk45'; valid samplers are: euler, ddim, heun, dpmpp"
    ):
        get_sampler("rk45")
    with pytest.raises(ValueError, match="Unknown sampler"):
        sample(_tiny_denoiser(), "edm", [0], (3, 8, 8), sampler="rk45")
    assert get_sampler("dpm++_2m") is SAMPLERS["dpmpp_2m"] and SAMPLERS["ddim"] is sample_euler
    for steps in (0, -3):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            sample(_tiny_denoiser(), "edm", [0], (3, 8, 8), steps=steps)
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            get_sigmas("logsnr", steps, "edm")
    D, x_T = _gaussian_problem(n=2)
    with pytest.raises(ValueError, match="at least 2 noise levels"):
        sample_euler(D, x_T, torch.tensor([80.0]))
    with pytest.raises(ValueError, match="strictly descending"):
        sample_heun(D, x_T, torch.tensor([1.0, 2.0, 0.0]))


# -- labels and guidance ------------------------------------------------------------------------------------


def test_classifier_free_guidance():
    net = _tiny_denoiser()
    z = 80 * seed_noise(range(4), (3, 8, 8))
    labels = torch.tensor([0, 1, 2, 3])
    sig = EDMKernel().sigmas(4)
    with torch.inference_mode():
        plain = sample_heun(net, z, sig, labels)
        assert torch.equal(sample_heun(net, z, sig, labels, guidance=1.0), plain)
        assert not torch.equal(sample_heun(net, z, sig, None), plain)  # labels reach the network
        s = torch.tensor(3.0)
        w = 2.5
        expect = net(z, s, torch.full_like(labels, -1)) + w * (
            net(z, s, labels) - net(z, s, torch.full_like(labels, -1))
        )
        torch.testing.assert_close(guided(net, w)(z, s, labels), expect, rtol=1e-5, atol=1e-5)
        stats: dict = {}
        sample_euler(net, z, sig, labels, guidance=w, stats=stats)
        assert stats["nfe"] == 4
    with pytest.raises(ValueError, match="guidance=2.0 needs class labels"):
        sample_euler(net, z, sig, None, guidance=2.0)
    a = sample(net, "edm", range(4), (3, 8, 8), steps=4, labels=labels)
    b = sample(net, "edm", range(4), (3, 8, 8), steps=4, labels=labels, guidance=1.0)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="labels must be one class or one per seed"):
        sample(net, "edm", range(4), (3, 8, 8), steps=4, labels=[0, 1])


# -- sample() ----------------------------------------------------------------------------------------------


class _FirstInput:
    def __init__(self):
        self.first = None

    def __call__(self, x, sigma, labels=None):
        if self.first is None:
            self.first = x.clone()
        return torch.zeros_like(x)


@pytest.mark.parametrize(
    "kernel, scale",
    [
        (VEKernel(), 50.0),  # sigma_max * z
        (EDMKernel(), 80.0),
        (VPKernel(), math.exp(0.5 * (0.1 + 0.5 * 19.9))),  # z / s(T), s(1) = exp(-B(1)/2)
        (SubVPKernel(), math.exp(0.5 * (0.1 + 0.5 * 19.9))),
    ],
)
def test_start_noise_per_kernel(kernel, scale):
    rec = _FirstInput()
    sample(rec, kernel, [3, 11], (2, 4, 4), sampler="euler", steps=3, dtype=torch.float64)
    z = seed_noise([3, 11], (2, 4, 4), dtype=torch.float64)
    torch.testing.assert_close(rec.first, scale * z, rtol=1e-12, atol=0)


def test_sample_is_deterministic_and_batch_size_independent():
    net = _tiny_denoiser()
    kw = {"sampler": "heun", "steps": 6}
    a = sample(net, "edm", "0-19", (3, 8, 8), batch_size=7, **kw)
    b = sample(net, "edm", "0-19", (3, 8, 8), batch_size=64, **kw)
    assert a.shape == (20, 3, 8, 8) and a.dtype == torch.float32
    assert float(a.min()) >= -1 and float(a.max()) <= 1
    assert (a - b).abs().max().item() <= 1e-5
    assert torch.equal(sample(net, "edm", "0-19", (3, 8, 8), batch_size=7, **kw), a)
    # one seed alone equals itself inside the batch
    assert (sample(net, "edm", [13], (3, 8, 8), **kw)[0] - a[13]).abs().max().item() <= 1e-5
    for name in ("euler", "dpmpp_3m", "ode"):
        x1 = sample(net, "edm", range(3), (3, 8, 8), sampler=name, steps=5)
        x2 = sample(net, "edm", range(3), (3, 8, 8), sampler=name, steps=5)
        assert torch.equal(x1, x2), name
