"""Sampling grids: descending noise levels ``sigma_0 > ... > sigma_{N-1} > 0`` followed by ``sigma_N = 0``.

Kinds (``get_sigmas(kind, steps, kernel, sigma_min, sigma_max, rho)``):

* ``"native"``         the kernel's own grid ``kernel.sigmas(steps)`` (uniform in its time ``t`` for VP /
                       sub-VP / VE as Song et al. 2021; DDIM's timestep skipping for discrete DDPM;
                       the rho-grid for ``EDMKernel``).
* ``"karras"``         Karras et al. 2022, Eq. 5: ``(s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``.
* ``"logsnr"``         uniform in ``lambda = -log sigma`` (half the log-SNR), DPM-Solver's ``skip_type="logSNR"``
                       (Lu et al. 2022, Sec. 3.4) — the default for DPM-Solver++.
* ``"time_uniform"``   uniform in the kernel's time ``t`` between ``t(sigma_max)`` and ``t(sigma_min)``.
* ``"time_quadratic"`` DPM-Solver's quadratic time grid: uniform in ``sqrt(t)``.

Every grid is float64, has ``steps`` non-zero values and ends in 0, so a solver takes ``steps``
transitions, the last one being the final denoise ``x_0 = D(x, sigma_{N-1})`` (Euler into 0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..kernels import Kernel, append_zero, get_kernel, karras_sigmas

__all__ = ["GRIDS", "get_sigmas"]

GRIDS = ("native", "karras", "logsnr", "time_uniform", "time_quadratic")
_ALIASES = {"logsnr": "logsnr", "log_snr": "logsnr", "rho": "karras", "edm": "karras"}


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}.")


def get_sigmas(
    kind: str,
    steps: int,
    kernel: Kernel | str | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
) -> Tensor:
    """A descending float64 grid of ``steps`` noise levels from ``sigma_max`` to ``sigma_min``, then 0.

    ``sigma_min`` / ``sigma_max`` default to the kernel's; ``"native"``, ``"time_uniform"`` and
    ``"time_quadratic"`` need a kernel.  ``rho`` only affects ``"karras"``.
    """
    _check_steps(steps)
    key = str(kind).lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in GRIDS:
        raise ValueError(f"Unknown sigma grid {kind!r}; valid grids are: {', '.join(GRIDS)}.")
    if kernel is not None:
        kernel = get_kernel(kernel)
    if key == "native":
        if kernel is None:
            raise ValueError("The 'native' sigma grid needs a kernel (pass kernel=...).")
        if sigma_min is not None or sigma_max is not None:
            raise ValueError(
                "The 'native' sigma grid spans the kernel's own range; pass grid='karras', 'logsnr' or "
                "'time_uniform' to choose sigma_min / sigma_max."
            )
        return kernel.sigmas(steps).to(torch.float64)
    if sigma_min is None or sigma_max is None:
        if kernel is None:
            raise ValueError(
                f"The {key!r} sigma grid needs sigma_min and sigma_max, or a kernel to take them from."
            )
        sigma_min = kernel.sigma_min if sigma_min is None else sigma_min
        sigma_max = kernel.sigma_max if sigma_max is None else sigma_max
    sigma_min, sigma_max = float(sigma_min), float(sigma_max)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"A sigma grid needs 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}.")
    if key == "karras":
        return karras_sigmas(steps, sigma_min, sigma_max, rho)
    if key == "logsnr":
        lam = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64)
        return append_zero(lam.exp())
    if kernel is None:
        raise ValueError(
            f"The {key!r} sigma grid is uniform in a kernel's time and needs a kernel (pass kernel=...)."
        )
    bounds = torch.tensor([sigma_max, sigma_min], dtype=torch.float64)
    t_hi, t_lo = (float(v) for v in kernel.t_of_sigma(bounds))
    if key == "time_uniform":
        t = torch.linspace(t_hi, t_lo, steps, dtype=torch.float64)
    else:  # time_quadratic
        if t_lo < 0:
            raise ValueError(
                f"The 'time_quadratic' grid needs non-negative kernel times, got t down to {t_lo}."
            )
        t = torch.linspace(math.sqrt(t_hi), math.sqrt(t_lo), steps, dtype=torch.float64) ** 2
    sig = kernel.sigma(t).to(torch.float64)
    if steps > 1:  # pin the ends exactly (t_of_sigma round trips are only float-accurate)
        sig[0], sig[-1] = sigma_max, sigma_min
    else:
        sig[0] = sigma_max
    return append_zero(sig)
