"""Consistency sampling (Song et al. 2023, "Consistency Models", Alg. 1): one step ``x_0 = f(sigma_max z, sigma_max)``,
or several: ``x <- f(x + sqrt(tau_j^2 - eps^2) z_j, tau_j)`` at the decreasing levels ``tau_1 > tau_2 > ...``.

The sampler takes the suite's grid ``sigmas`` (``tau_0 = sigma_0 > tau_1 > ... > 0``): ``steps=1`` is the one-step
sample; a level at or below ``eps`` (the consistency model's ``sigma_min``; its ``f`` is the identity there) costs
no evaluation, so a native EDM grid of ``steps`` levels, which ends at ``sigma_min``, takes ``steps - 1``
evaluations when ``steps > 1`` (as the CM code's ``ts=0,22,39``, whose last level is ``sigma_min``).

The re-injected noise ``z_j`` of a sample is a pure function of its starting point ``x_T`` (the seed's noise,
``sampling.noise``) and the step ``j``: it is drawn in float32 from a numpy ``PCG64`` generator seeded with the
SHA-256 of ``x_T``'s float32 bytes and ``j`` (``consistency_noise``).  So multistep samples are reproducible from
the same seeds, bit-identical across batch sizes, ranks and runs, and independent of the evaluation noise stream.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from torch import Tensor

from .solvers import Denoiser, _grid, _prepare, _report

__all__ = ["sample_consistency", "consistency_noise", "DEFAULT_EPS"]

#: ``eps`` of a denoiser that names no ``sigma_min`` (the papers' 0.002)
DEFAULT_EPS = 0.002


def consistency_noise(x_T: Tensor, step: int) -> Tensor:
    """The standard normal noise re-injected at multistep step ``step`` for each row of ``x_T``: row ``i`` depends
    only on ``x_T[i]`` (its float32 bytes) and ``step``."""
    rows = x_T.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    out = np.empty(rows.shape, dtype=np.float32)
    for i, row in enumerate(rows):
        key = hashlib.sha256(b"consistency-noise:%d:" % int(step) + row.tobytes()).digest()
        rng = np.random.Generator(np.random.PCG64(int.from_bytes(key[:16], "little")))
        out[i] = rng.standard_normal(row.shape, dtype=np.float32)
    return torch.from_numpy(out).to(device=x_T.device, dtype=x_T.dtype)


def sample_consistency(
    denoiser: Denoiser,
    x_T: Tensor,
    sigmas: Tensor,
    labels: Tensor | None = None,
    *,
    guidance: float = 1.0,
    stats: dict | None = None,
    eps: float | None = None,
) -> Tensor:
    """CM Alg. 1 on the levels of ``sigmas`` above ``eps`` (default: the denoiser's ``sigma_min``, else 0.002)."""
    sig, sig_d = _grid(sigmas, x_T)
    if eps is None:
        eps = float(getattr(denoiser, "sigma_min", DEFAULT_EPS))
    f, labels = _prepare(denoiser, x_T, labels, guidance)
    x = f(x_T, sig_d[0], labels)
    for j in range(1, len(sig) - 1):
        if sig[j] <= eps:
            continue  # f(x, eps) = x and the noise sqrt(tau^2 - eps^2) vanishes
        x = x + math.sqrt(sig[j] ** 2 - eps**2) * consistency_noise(x_T, j)
        x = f(x, sig_d[j], labels)
    _report(stats, f)
    return x
