"""Preconditionings: a plain network's native output turned into a ``Denoiser``.

Everything that denoises is a ``Denoiser``: ``D(x, sigma, labels=None) -> x0_hat`` in the EDM variable
``x = x_0 + sigma * n`` (Karras et al. 2022, Sec. 5 and Table 1).  A preconditioning computes

    D(x; sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, c_noise(sigma), labels)

where ``F`` is the network.  Implemented:

* ``EpsPrecond``   epsilon-prediction (Ho et al. 2020; Song et al. 2021): ``c_skip = 1, c_out = -sigma``,
                   ``c_in = s(t)`` (the network sees its kernel's own variable), ``c_noise`` = the
                   kernel's ``network_time``.
* ``DDPMPrecond``  epsilon-prediction on the discrete DDPM schedule: ``c_noise`` is the timestep index.
* ``X0Precond``    x_0-prediction: ``c_skip = 0, c_out = 1``.
* ``VPrecond``     v-prediction (Salimans & Ho 2022): ``v = alpha n - sigma_t x_0`` with
                   ``alpha = 1/sqrt(1+sigma^2)``, ``sigma_t = sigma alpha``; ``c_skip = 1/(1+sigma^2)``,
                   ``c_out = -sigma/sqrt(1+sigma^2)``, ``c_in = 1/sqrt(1+sigma^2)``.
* ``EDMPrecond``   Karras et al. 2022, Eq. 7 / Table 1: ``c_skip = sd^2/(sigma^2+sd^2)``,
                   ``c_out = sigma sd / sqrt(sigma^2+sd^2)``, ``c_in = 1/sqrt(sigma^2+sd^2)``,
                   ``c_noise = ln(sigma)/4``.

Each preconditioning also exposes ``target(x0, noise, sigma)``: what ``F`` outputs when ``D`` returns
``x_0`` exactly (used in tests and available for target-space losses).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .kernels import EDMKernel, Kernel, VPKernel, get_kernel

__all__ = [
    "Denoiser",
    "Precond",
    "EpsPrecond",
    "DDPMPrecond",
    "X0Precond",
    "VPrecond",
    "EDMPrecond",
    "PRECONDS",
    "get_precond",
    "as_sigma_batch",
]


@runtime_checkable
class Denoiser(Protocol):
    """``D(x, sigma, labels=None) -> x0_hat``; ``sigma`` is a scalar or a per-sample tensor of shape (B,)."""

    def __call__(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor: ...


def as_sigma_batch(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast ``sigma`` (scalar, (B,) or (B,1,1,1)) to a float (B,) tensor on ``x``'s device."""
    sigma = torch.as_tensor(sigma, device=x.device)
    if not sigma.is_floating_point():
        sigma = sigma.float()
    sigma = sigma.reshape(-1)
    if sigma.numel() == 1:
        sigma = sigma.expand(x.shape[0])
    if sigma.numel() != x.shape[0]:
        raise ValueError(f"sigma has {sigma.numel()} values for a batch of {x.shape[0]} images.")
    return sigma


def _bc(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1)))


class Precond(nn.Module):
    """Base class; subclasses define ``coefficients(sigma) -> (c_skip, c_out, c_in, c_noise)`` (all (B,))."""

    def __init__(self, net: nn.Module, kernel: Kernel | str = "edm"):
        super().__init__()
        self.net = net
        self.kernel = get_kernel(kernel)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def forward(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None, **net_kwargs) -> Tensor:
        sigma = as_sigma_batch(sigma, x)
        s64 = sigma.to(torch.float64)
        c_skip, c_out, c_in, c_noise = self.coefficients(s64)
        dtype = x.dtype
        F = self.net(x * _bc(c_in, x).to(dtype), c_noise.to(torch.float32), labels, **net_kwargs)
        return _bc(c_skip, x).to(dtype) * x + _bc(c_out, x).to(dtype) * F.to(dtype)

    def target(self, x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
        """The network output ``F`` for which ``D(x0 + sigma * noise) == x0``."""
        sigma = as_sigma_batch(sigma, x0).to(torch.float64)
        c_skip, c_out, _, _ = self.coefficients(sigma)
        x = x0 + _bc(sigma, x0).to(x0.dtype) * noise
        return (x0 - _bc(c_skip, x0).to(x0.dtype) * x) / _bc(c_out, x0).to(x0.dtype)


class EpsPrecond(Precond):
    """Epsilon-prediction: ``D = x - sigma * F(s(t) x, network_time)``."""

    def coefficients(self, sigma):
        t = self.kernel.t_of_sigma(sigma)
        c_in = self.kernel.s(t).to(sigma.dtype) * torch.ones_like(sigma)
        return torch.ones_like(sigma), -sigma, c_in, self.kernel.network_time(sigma)


class DDPMPrecond(EpsPrecond):
    """Epsilon-prediction conditioned on the DDPM timestep index (Ho et al. 2020).

    Noise levels between the discrete ones map to fractional timesteps (the sinusoidal time
    embedding is smooth), so every sampler grid works.
    """

    def __init__(self, net: nn.Module, kernel: Kernel | str = "vp_discrete"):
        kernel = get_kernel(kernel)
        if not (isinstance(kernel, VPKernel) and kernel.discrete):
            raise ValueError(f"DDPMPrecond needs the discrete VP kernel ('vp_discrete'), got {kernel!r}.")
        super().__init__(net, kernel)


class X0Precond(Precond):
    """x_0-prediction: ``D = F(s(t) x, network_time)``."""

    def coefficients(self, sigma):
        t = self.kernel.t_of_sigma(sigma)
        c_in = self.kernel.s(t).to(sigma.dtype) * torch.ones_like(sigma)
        return torch.zeros_like(sigma), torch.ones_like(sigma), c_in, self.kernel.network_time(sigma)


class VPrecond(Precond):
    """v-prediction (Salimans & Ho 2022) in the variance-preserving scaling of the EDM variable."""

    def coefficients(self, sigma):
        r = 1.0 / (1.0 + sigma**2)
        return r, -sigma * r.sqrt(), r.sqrt(), self.kernel.network_time(sigma)


class EDMPrecond(Precond):
    """Karras et al. 2022, Eq. 7: ``sigma_data`` from an ``EDMKernel`` (0.5) unless given."""

    def __init__(self, net: nn.Module, kernel: Kernel | str = "edm", sigma_data: float | None = None):
        super().__init__(net, kernel)
        if sigma_data is None:
            sigma_data = self.kernel.sigma_data if isinstance(self.kernel, EDMKernel) else 0.5
        self.sigma_data = float(sigma_data)

    def coefficients(self, sigma):
        sd2 = self.sigma_data**2
        denom = sigma**2 + sd2
        return sd2 / denom, sigma * self.sigma_data / denom.sqrt(), 1.0 / denom.sqrt(), 0.25 * torch.log(sigma)


PRECONDS: dict[str, type[Precond]] = {
    "eps": EpsPrecond,
    "ddpm": DDPMPrecond,
    "x0": X0Precond,
    "v": VPrecond,
    "edm": EDMPrecond,
}


def get_precond(name: str, net: nn.Module, kernel: Kernel | str) -> Precond:
    """Preconditioning by name (``eps``, ``ddpm``, ``x0``, ``v``, ``edm``)."""
    if name not in PRECONDS:
        raise ValueError(f"Unknown preconditioning {name!r}; valid ones are: {', '.join(PRECONDS)}.")
    return PRECONDS[name](net, kernel)
