"""Noise kernels as a scale ``s(t)`` and a noise level ``sigma(t)`` (Karras et al. 2022, Table 1).

Every kernel describes the forward process ``x_t = s(t) * (x_0 + sigma(t) * n)``, ``n ~ N(0, I)``.
The suite works in the *EDM variable* ``x = x_t / s(t) = x_0 + sigma * n``, so a sampler only needs a
descending grid of ``sigma`` values; the kernel supplies

* ``s(t)``, ``sigma(t)`` and the inverse ``t_of_sigma(sigma)``,
* ``sigmas(steps)``: its native sampling grid (descending, ending in 0),
* ``prior_scale``: the standard deviation of ``x_T`` in the EDM variable, i.e. where the shared noise
  ``z`` starts: VE/EDM start from ``sigma_max * z``; VP and sub-VP start from ``z`` in their *own*
  variable, which is ``z / s(T)`` in the EDM variable (Song et al. 2021, Sec. 3.4),
* ``sample_sigma(n)`` and ``loss_weight(sigma)``: the training-noise distribution and the weight
  ``lambda(sigma)`` of ``|| D(x_0 + sigma n; sigma) - x_0 ||^2``,
* ``network_time(sigma)``: the time input a native network of this kernel is conditioned on.

Kernels
-------
``VPKernel``     Song et al. 2021 (Eq. 32, 33): ``B(t) = beta_min t + beta_d t^2 / 2``,
                 ``s = exp(-B/2)``, ``sigma = sqrt(exp(B) - 1)``; ``discrete=True`` gives the DDPM
                 schedule of Ho et al. 2020 (linear betas 1e-4..0.02, T = 1000) indexed by timestep.
``SubVPKernel``  Song et al. 2021 (Eq. 34): mean ``exp(-B/2) x_0``, std ``1 - exp(-B)``,
                 so ``sigma = exp(B/2) - exp(-B/2)``.
``VEKernel``     Song et al. 2021 (Eq. 30, 31): ``s = 1``, ``sigma = sigma_min (sigma_max/sigma_min)^t``.
``EDMKernel``    Karras et al. 2022: ``s = 1``, ``sigma = t``; rho-grid (Eq. 5); log-normal training noise.

With ``loss_weight = 1 / sigma^2`` the x_0-loss equals the epsilon-matching loss of DDPM / score SDE
(``||eps_hat - n||^2``); EDM's weight is ``(sigma^2 + sigma_data^2) / (sigma sigma_data)^2``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "Kernel",
    "VPKernel",
    "SubVPKernel",
    "VEKernel",
    "EDMKernel",
    "KERNELS",
    "get_kernel",
    "karras_sigmas",
    "append_zero",
]


def _as_tensor(x) -> Tensor:
    return x if isinstance(x, Tensor) else torch.as_tensor(x, dtype=torch.float64)


def append_zero(sigmas: Tensor) -> Tensor:
    """Append the final ``sigma = 0`` to a descending grid."""
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, Eq. 5: ``(s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``, then 0."""
    _check_steps(steps)
    if steps == 1:
        return append_zero(torch.tensor([sigma_max], dtype=torch.float64))
    i = torch.arange(steps, dtype=torch.float64)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return append_zero((a + i / (steps - 1) * (b - a)) ** rho)


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}.")


class Kernel:
    """Base class: a forward process in the (s, sigma) parameterisation."""

    name: str = "kernel"
    t_min: float = 0.0
    t_max: float = 1.0

    # -- the process -------------------------------------------------------------------------
    def s(self, t) -> Tensor:
        raise NotImplementedError

    def sigma(self, t) -> Tensor:
        raise NotImplementedError

    def t_of_sigma(self, sigma) -> Tensor:
        raise NotImplementedError

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(torch.tensor(self.t_max, dtype=torch.float64)))

    @property
    def sigma_min(self) -> float:
        return float(self.sigma(torch.tensor(self.t_min, dtype=torch.float64)))

    @property
    def prior_scale(self) -> float:
        """Std of ``x_T`` in the EDM variable: ``x_T = prior_scale * z`` for the shared noise ``z``."""
        return self.sigma_max

    def start_scale(self, sigmas: Tensor) -> float:
        """Std of ``x_T`` for a grid starting at ``sigmas[0]``: ``prior_scale`` (a discrete schedule whose first
        timestep depends on the step count overrides it, e.g. ``published.diffusers.DiffusersKernel``)."""
        return self.prior_scale

    # -- sampling grid ---------------------------------------------------------------------
    def sigmas(self, steps: int) -> Tensor:
        """Native grid: ``steps`` descending noise levels from ``sigma_max`` to ``sigma_min``, then 0."""
        _check_steps(steps)
        t = torch.linspace(self.t_max, self.t_min, steps, dtype=torch.float64)
        return append_zero(self.sigma(t))

    # -- training --------------------------------------------------------------------------
    def sample_sigma(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """Training noise levels: ``t ~ U(t_min, t_max)``, ``sigma = sigma(t)`` (float32)."""
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
        return self.sigma(self.t_min + (self.t_max - self.t_min) * u).float()

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """``lambda(sigma) = 1 / sigma^2`` (epsilon-matching, Ho et al. 2020; Song et al. 2021)."""
        return 1.0 / sigma**2

    def network_time(self, sigma: Tensor) -> Tensor:
        """Time input of a native network: ``(M - 1) t`` with M = 1000 (Song et al.'s DDPM++ convention)."""
        return 999.0 * self.t_of_sigma(sigma)

    def config(self) -> dict:
        return {"name": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class VPKernel(Kernel):
    """Variance preserving (Song et al. 2021; DDPM of Ho et al. 2020 when ``discrete=True``)."""

    name = "vp"

    def __init__(
        self,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        epsilon_t: float = 1e-5,
        discrete: bool = False,
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ):
        if beta_max <= beta_min or beta_min < 0:
            raise ValueError(f"VPKernel needs 0 <= beta_min < beta_max, got {beta_min}, {beta_max}.")
        self.beta_min, self.beta_max, self.epsilon_t = float(beta_min), float(beta_max), float(epsilon_t)
        self.discrete = bool(discrete)
        self.num_timesteps, self.beta_start, self.beta_end = int(num_timesteps), float(beta_start), float(beta_end)
        if self.discrete:
            betas = torch.linspace(self.beta_start, self.beta_end, self.num_timesteps, dtype=torch.float64)
            # -log(alpha_bar_i), i = 0..T-1; piecewise linear in between for fractional timesteps.
            self._neg_log_abar = -torch.cumsum(torch.log1p(-betas), 0)
            self.t_min, self.t_max = 0.0, float(self.num_timesteps - 1)
        else:
            self.t_min, self.t_max = self.epsilon_t, 1.0

    # B(t) = int_0^t beta(u) du, i.e. -log(alpha_bar(t)).
    def _B(self, t) -> Tensor:
        t = _as_tensor(t)
        if self.discrete:
            table = self._neg_log_abar.to(t.device)
            tc = t.to(torch.float64).clamp(0, self.num_timesteps - 1)
            lo = tc.floor().long().clamp(max=self.num_timesteps - 2)
            w = tc - lo
            return (table[lo] * (1 - w) + table[lo + 1] * w).to(t.dtype)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def _t_of_B(self, B: Tensor) -> Tensor:
        if self.discrete:
            table = self._neg_log_abar.to(B.device)
            Bd = B.to(torch.float64).clamp(float(self._neg_log_abar[0]), float(self._neg_log_abar[-1]))  # host
            hi = torch.searchsorted(table, Bd.contiguous()).clamp(1, self.num_timesteps - 1)
            lo = hi - 1
            w = (Bd - table[lo]) / (table[hi] - table[lo])
            return (lo + w).to(B.dtype)
        bd = self.beta_max - self.beta_min
        return (torch.sqrt(self.beta_min**2 + 2 * bd * B) - self.beta_min) / bd

    def s(self, t) -> Tensor:
        return torch.exp(-0.5 * self._B(t))

    def sigma(self, t) -> Tensor:
        return torch.sqrt(torch.expm1(self._B(t)))

    def t_of_sigma(self, sigma) -> Tensor:
        return self._t_of_B(torch.log1p(_as_tensor(sigma) ** 2))

    @property
    def prior_scale(self) -> float:
        # x_T = z in the VP variable  <=>  x = z / s(T) in the EDM variable.
        return float(1.0 / self.s(torch.tensor(self.t_max, dtype=torch.float64)))

    def sigmas(self, steps: int) -> Tensor:
        if not self.discrete:
            return super().sigmas(steps)
        _check_steps(steps)  # DDIM's uniform timestep skipping (Song, Meng & Ermon 2021).
        t = torch.linspace(self.t_max, 0, steps, dtype=torch.float64).round()
        return append_zero(self.sigma(t))

    def sample_sigma(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        if not self.discrete:
            return super().sample_sigma(n, generator, device)
        i = torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device)
        return self.sigma(i.to(torch.float64)).float()

    def network_time(self, sigma: Tensor) -> Tensor:
        if self.discrete:
            return self.t_of_sigma(sigma)  # the DDPM timestep index (fractional between grid points)
        return super().network_time(sigma)

    def config(self) -> dict:
        keys = ("beta_min", "beta_max", "epsilon_t", "discrete")
        cfg = {"name": self.name, **{k: getattr(self, k) for k in keys}}
        if self.discrete:
            cfg.update(num_timesteps=self.num_timesteps, beta_start=self.beta_start, beta_end=self.beta_end)
        return cfg

    def __repr__(self) -> str:
        return f"VPKernel({', '.join(f'{k}={v}' for k, v in self.config().items() if k != 'name')})"


class SubVPKernel(VPKernel):
    """Sub-variance preserving (Song et al. 2021, Eq. 34): std of ``x_t`` is ``1 - exp(-B(t))``."""

    name = "subvp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, epsilon_t: float = 1e-5):
        super().__init__(beta_min=beta_min, beta_max=beta_max, epsilon_t=epsilon_t, discrete=False)

    def sigma(self, t) -> Tensor:
        return 2.0 * torch.sinh(0.5 * self._B(t))

    def t_of_sigma(self, sigma) -> Tensor:
        return self._t_of_B(2.0 * torch.asinh(0.5 * _as_tensor(sigma)))

    def config(self) -> dict:
        return {"name": self.name, "beta_min": self.beta_min, "beta_max": self.beta_max, "epsilon_t": self.epsilon_t}


class VEKernel(Kernel):
    """Variance exploding (Song et al. 2021, NCSN): ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``.

    Defaults 0.01..50 as Song et al. for CIFAR-10; EDM's 0.02..100 is ``VEKernel(0.02, 100)``.
    """

    name = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"VEKernel needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}.")
        self._smin, self._smax = float(sigma_min), float(sigma_max)

    @property
    def sigma_min(self) -> float:  # type: ignore[override]
        return self._smin

    @property
    def sigma_max(self) -> float:  # type: ignore[override]
        return self._smax

    def s(self, t) -> Tensor:
        return torch.ones_like(_as_tensor(t))

    def sigma(self, t) -> Tensor:
        return self._smin * (self._smax / self._smin) ** _as_tensor(t)

    def t_of_sigma(self, sigma) -> Tensor:
        return torch.log(_as_tensor(sigma) / self._smin) / math.log(self._smax / self._smin)

    def network_time(self, sigma: Tensor) -> Tensor:
        """``log(sigma / 2)`` as EDM's VE preconditioning (Karras et al. 2022, Table 1)."""
        return torch.log(0.5 * sigma)

    def config(self) -> dict:
        return {"name": self.name, "sigma_min": self._smin, "sigma_max": self._smax}

    def __repr__(self) -> str:
        return f"VEKernel(sigma_min={self._smin}, sigma_max={self._smax})"


class EDMKernel(Kernel):
    """Karras et al. 2022: ``s = 1``, ``sigma(t) = t``, rho-grid, ``ln sigma ~ N(P_mean, P_std^2)``."""

    name = "edm"

    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        sigma_data: float = 0.5,
    ):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"EDMKernel needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}.")
        self._smin, self._smax = float(sigma_min), float(sigma_max)
        self.rho, self.P_mean, self.P_std, self.sigma_data = float(rho), float(P_mean), float(P_std), float(sigma_data)
        self.t_min, self.t_max = self._smin, self._smax

    @property
    def sigma_min(self) -> float:  # type: ignore[override]
        return self._smin

    @property
    def sigma_max(self) -> float:  # type: ignore[override]
        return self._smax

    def s(self, t) -> Tensor:
        return torch.ones_like(_as_tensor(t))

    def sigma(self, t) -> Tensor:
        return _as_tensor(t)

    def t_of_sigma(self, sigma) -> Tensor:
        return _as_tensor(sigma)

    def sigmas(self, steps: int) -> Tensor:
        return karras_sigmas(steps, self._smin, self._smax, self.rho)

    def sample_sigma(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        z = torch.randn(n, generator=generator, device=device)
        return (z * self.P_std + self.P_mean).exp()

    def loss_weight(self, sigma: Tensor) -> Tensor:
        sd = self.sigma_data
        return (sigma**2 + sd**2) / (sigma * sd) ** 2

    def network_time(self, sigma: Tensor) -> Tensor:
        return 0.25 * torch.log(sigma)

    def config(self) -> dict:
        return {
            "name": self.name, "sigma_min": self._smin, "sigma_max": self._smax, "rho": self.rho,
            "P_mean": self.P_mean, "P_std": self.P_std, "sigma_data": self.sigma_data,
        }

    def __repr__(self) -> str:
        return f"EDMKernel({', '.join(f'{k}={v}' for k, v in self.config().items() if k != 'name')})"


KERNELS: dict[str, type[Kernel]] = {
    "vp": VPKernel,
    "subvp": SubVPKernel,
    "ve": VEKernel,
    "edm": EDMKernel,
}


def get_kernel(name: str | Kernel, **kwargs) -> Kernel:
    """Kernel by name (``vp``, ``vp_discrete`` / ``ddpm``, ``subvp``, ``ve``, ``edm``); extra kwargs set constants."""
    if isinstance(name, Kernel):
        return name
    key = str(name).lower().replace("-", "").replace("_", "")
    if key in ("vpdiscrete", "ddpm"):
        return VPKernel(discrete=True, **kwargs)
    if key not in KERNELS:
        builtin = ("vp", "subvp", "ve", "edm")  # then vp_discrete, then kernels registered by other modules
        valid = ", ".join([*builtin, "vp_discrete", *(k for k in KERNELS if k not in builtin)])
        raise ValueError(f"Unknown kernel {name!r}; valid kernels are: {valid}.")
    return KERNELS[key](**kwargs)
