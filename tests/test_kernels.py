"""Kernels: marginals of the forward SDEs, inverses, grids, names."""

import math

import pytest
import torch

from lightning_repro.kernels import EDMKernel, SubVPKernel, VEKernel, VPKernel, get_kernel, karras_sigmas


def _moments_by_euler(f, g2, t0, t1, n=100_000):
    """Fine Euler integration of the forward SDE's moment equations.

    For dx = f(t) x dt + g(t) dw:  m' = f m,  v' = 2 f v + g^2  (m(t0) = 1, v(t0) = 0).
    Returns m(t1) (= s(t1)) and sqrt(v(t1)) (= s(t1) sigma(t1) minus the start's contribution).
    """
    ts = torch.linspace(t0, t1, n + 1, dtype=torch.float64)
    dt = ts[1] - ts[0]
    tm = ts[:-1] + 0.5 * dt  # midpoint evaluation of the coefficients
    F = f(tm)
    G2 = g2(tm)
    # m_{k+1} = m_k (1 + F dt); v_{k+1} = v_k (1 + 2 F dt) + G2 dt
    a = 1 + 2 * F * dt
    logA = torch.cumsum(torch.log(a).flip(0), 0).flip(0)  # prod_{j>=k} a_j
    tail = torch.cat([logA[1:], logA.new_zeros(1)])
    v = (G2 * dt * torch.exp(tail)).sum()
    m = torch.exp(torch.log1p(F * dt).sum())
    return m, v.sqrt()


def _beta(k):
    return lambda t: k.beta_min + (k.beta_max - k.beta_min) * t


@pytest.mark.parametrize("t", [0.05, 0.3, 0.7, 1.0])
def test_vp_marginals_match_sde(t):
    k = VPKernel()
    beta = _beta(k)
    m, sd = _moments_by_euler(lambda u: -0.5 * beta(u), beta, 0.0, t)
    tt = torch.tensor(t, dtype=torch.float64)
    assert abs(m - k.s(tt)) < 1e-3
    assert abs(sd - k.s(tt) * k.sigma(tt)) < 1e-3


@pytest.mark.parametrize("t", [0.05, 0.3, 0.7, 1.0])
def test_subvp_marginals_match_sde(t):
    k = SubVPKernel()
    beta = _beta(k)

    def B(u):
        return k.beta_min * u + 0.5 * (k.beta_max - k.beta_min) * u**2

    m, sd = _moments_by_euler(lambda u: -0.5 * beta(u), lambda u: beta(u) * (1 - torch.exp(-2 * B(u))), 0.0, t)
    tt = torch.tensor(t, dtype=torch.float64)
    assert abs(m - k.s(tt)) < 1e-3
    assert abs(sd - k.s(tt) * k.sigma(tt)) < 1e-3
    assert abs(k.s(tt) * k.sigma(tt) - (1 - torch.exp(-B(tt)))) < 1e-12  # Song et al. Eq. 34


@pytest.mark.parametrize("t", [0.2, 0.6, 1.0])
def test_ve_marginals_match_sde(t):
    k = VEKernel()
    r = math.log(k.sigma_max / k.sigma_min)
    # dx = sqrt(d sigma^2/dt) dw, started at x(0) with variance sigma_min^2 already present.
    g2 = lambda u: 2 * r * (k.sigma_min * (k.sigma_max / k.sigma_min) ** u) ** 2  # noqa: E731
    m, sd = _moments_by_euler(lambda u: torch.zeros_like(u), g2, 0.0, t)
    tt = torch.tensor(t, dtype=torch.float64)
    assert abs(m - 1) < 1e-12
    total = math.sqrt(sd**2 + k.sigma_min**2)
    assert abs(total - float(k.sigma(tt))) / float(k.sigma(tt)) < 1e-3


@pytest.mark.parametrize("t", [0.01, 1.0, 20.0, 80.0])
def test_edm_marginals_match_sde(t):
    k = EDMKernel()  # dx = sqrt(2 t) dw  =>  Var = t^2
    m, sd = _moments_by_euler(lambda u: torch.zeros_like(u), lambda u: 2 * u, 0.0, t)
    assert abs(m - 1) < 1e-12 and abs(sd - k.sigma(torch.tensor(t, dtype=torch.float64))) < 1e-3 * max(1, t)


def test_discrete_vp_is_the_ddpm_chain():
    k = VPKernel(discrete=True)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    v = torch.tensor(0.0, dtype=torch.float64)
    for i in (0, 10, 500, 999):
        t = torch.tensor(float(i), dtype=torch.float64)
        assert torch.allclose(k.s(t) ** 2, abar[i], rtol=1e-12)
        assert torch.allclose(k.sigma(t) ** 2, (1 - abar[i]) / abar[i], rtol=1e-10)
    # chain variance v_i = (1 - b_i) v_{i-1} + b_i equals 1 - abar_i = s^2 sigma^2
    for i in range(1000):
        v = (1 - betas[i]) * v + betas[i]
    t = torch.tensor(999.0, dtype=torch.float64)
    assert torch.allclose(v, (k.s(t) * k.sigma(t)) ** 2, rtol=1e-10)
    # continuous VP is its limit (beta(t) = T beta_i): -log abar_T ~= B(1) = beta_min + beta_d / 2
    assert abs(-torch.log(abar[-1]) / (0.1 + 0.5 * 19.9) - 1) < 0.01


@pytest.mark.parametrize("name", ["vp", "vp_discrete", "subvp", "ve", "edm"])
def test_inverse_and_grid(name):
    k = get_kernel(name)
    sig = k.sigmas(18)
    assert sig.shape == (19,) and sig[-1] == 0 and torch.all(sig[:-1] > 0)
    assert torch.all(sig[:-1][1:] < sig[:-1][:-1])
    assert math.isclose(float(sig[0]), k.sigma_max, rel_tol=1e-9)
    assert math.isclose(float(sig[-2]), k.sigma_min, rel_tol=1e-6)
    s = sig[:-1]
    assert torch.allclose(k.sigma(k.t_of_sigma(s)), s, rtol=1e-8)
    draws = k.sample_sigma(1000, generator=torch.Generator().manual_seed(0))
    assert draws.dtype == torch.float32 and torch.all(draws > 0)
    assert torch.all(k.loss_weight(draws) > 0)


def test_constants_and_defaults():
    assert VEKernel().sigma_max == 50 and VEKernel().sigma_min == 0.01
    assert VEKernel(0.02, 100).sigma_max == 100
    e = EDMKernel()
    assert (e.sigma_min, e.sigma_max, e.rho, e.P_mean, e.P_std, e.sigma_data) == (0.002, 80, 7, -1.2, 1.2, 0.5)
    vp = VPKernel()
    assert vp.t_min == 1e-5 and math.isclose(vp.sigma_max, math.sqrt(math.expm1(0.1 + 0.5 * 19.9)))
    assert math.isclose(vp.prior_scale, math.sqrt(1 + vp.sigma_max**2))  # z in the VP variable
    assert VEKernel().prior_scale == 50 and EDMKernel().prior_scale == 80
    assert torch.allclose(karras_sigmas(18, 0.002, 80)[:-1], EDMKernel().sigmas(18)[:-1])
    sd = 0.5
    assert torch.allclose(e.loss_weight(torch.tensor(1.0)), torch.tensor((1 + sd**2) / sd**2))


def test_unknown_kernel_lists_names():
    with pytest.raises(ValueError, match=r"Unknown kernel 'foo'; valid kernels are: vp, subvp, ve, edm, vp_discrete"):
        get_kernel("foo")
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        EDMKernel().sigmas(0)
