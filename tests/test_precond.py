"""Preconditionings return x0 exactly when their network outputs the true target."""

import pytest
import torch
from torch import nn

from lightning_repro.kernels import get_kernel
from lightning_repro.precond import (
    DDPMPrecond,
    Denoiser,
    EDMPrecond,
    EpsPrecond,
    VPrecond,
    X0Precond,
    get_precond,
)


class Oracle(nn.Module):
    """Outputs a preset tensor and records what it was called with."""

    def __init__(self):
        super().__init__()
        self.out = None
        self.calls = []

    def forward(self, x, c_noise, labels=None):
        self.calls.append((x.clone(), c_noise.clone(), labels))
        return self.out


CASES = [("eps", "vp"), ("eps", "subvp"), ("eps", "ve"), ("ddpm", "vp_discrete"), ("x0", "vp"), ("x0", "ve"),
         ("v", "vp"), ("v", "edm"), ("edm", "edm"), ("edm", "vp")]


@pytest.mark.parametrize("name,kernel", CASES)
def test_true_target_gives_x0(name, kernel):
    torch.manual_seed(0)
    k = get_kernel(kernel)
    net = Oracle()
    pre = get_precond(name, net, k)
    x0 = torch.rand(6, 3, 4, 4, dtype=torch.float64) * 2 - 1
    n = torch.randn_like(x0)
    sigma = torch.tensor([k.sigma_min * 1.01, 0.01, 0.3, 1.0, 10.0, k.sigma_max * 0.99], dtype=torch.float64)
    net.out = pre.target(x0, n, sigma)
    x = x0 + sigma.view(-1, 1, 1, 1) * n
    D = pre(x, sigma)
    assert isinstance(pre, Denoiser)
    assert torch.allclose(D, x0, atol=1e-9, rtol=0)


def test_coefficients_match_papers():
    k = get_kernel("vp")
    net = Oracle()
    sigma = torch.tensor([0.5, 2.0], dtype=torch.float64)
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    # epsilon-prediction on VP: network sees x_t = s(t) x = x / sqrt(1 + sigma^2), time 999 t
    net.out = torch.zeros_like(x)
    EpsPrecond(net, k)(x, sigma)
    xin, cn, _ = net.calls[-1]
    assert torch.allclose(xin, x / torch.sqrt(1 + sigma**2).view(-1, 1, 1, 1))
    assert torch.allclose(cn.double(), 999 * k.t_of_sigma(sigma), rtol=1e-6)
    # EDM (Karras et al. Table 1): c_in = 1/sqrt(sigma^2 + 0.25), c_noise = ln(sigma)/4, c_skip at F = 0
    D = EDMPrecond(net, "edm")(x, sigma)
    xin, cn, _ = net.calls[-1]
    assert torch.allclose(xin, x / torch.sqrt(sigma**2 + 0.25).view(-1, 1, 1, 1))
    assert torch.allclose(cn.double(), torch.log(sigma) / 4, rtol=1e-6)
    assert torch.allclose(D, x * (0.25 / (sigma**2 + 0.25)).view(-1, 1, 1, 1))
    # DDPM timesteps: sigma of timestep i maps back to i
    kd = get_kernel("vp_discrete")
    t = torch.tensor([0.0, 17.0, 999.0], dtype=torch.float64)
    net.out = torch.zeros(3, 1, 2, 2)
    DDPMPrecond(net, kd)(torch.zeros(3, 1, 2, 2), kd.sigma(t).float())
    net.out = torch.zeros_like(x)
    assert torch.allclose(net.calls[-1][1].double(), t, atol=2e-3)
    # x0- and v-prediction
    X0Precond(net, k)(x, sigma)
    VPrecond(net, k)(x, sigma)
    assert torch.allclose(net.calls[-1][0], x / torch.sqrt(1 + sigma**2).view(-1, 1, 1, 1))


def test_labels_pass_through_and_scalar_sigma():
    net = Oracle()
    pre = EDMPrecond(net)
    x = torch.randn(3, 1, 2, 2)
    net.out = torch.zeros_like(x)
    lab = torch.tensor([1, 2, -1])
    pre(x, 0.7, lab)
    assert net.calls[-1][2] is lab and net.calls[-1][1].shape == (3,)


def test_errors():
    with pytest.raises(ValueError, match="DDPMPrecond needs the discrete VP kernel"):
        DDPMPrecond(Oracle(), "vp")
    with pytest.raises(ValueError, match="Unknown preconditioning 'foo'; valid ones are: eps, ddpm, x0, v, edm"):
        get_precond("foo", Oracle(), "edm")
    with pytest.raises(ValueError, match="sigma has 2 values for a batch of 3 images"):
        EDMPrecond(Oracle())(torch.zeros(3, 1, 2, 2), torch.ones(2))
