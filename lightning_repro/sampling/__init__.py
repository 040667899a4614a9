"""Sampling from the shared seed-indexed noise with deterministic ODE solvers (Zhang et al., ICML 2024, Sec. 2).

``sample(denoiser, kernel, seeds, shape)`` is the one entry point: it draws ``z = seed_noise(seeds, shape)``,
starts from ``x_T = kernel.prior_scale * z`` in the EDM variable (VE / EDM: ``sigma_max * z``; VP and
sub-VP: ``z`` in their own variable, i.e. ``z / s(T)``; Song et al. 2021, Karras et al. 2022) and runs a
deterministic solver of the probability-flow ODE on a sigma grid.  Every model compared in a study is
sampled this way from the same seeds, so outputs are compared seed by seed.

See ``noise`` (seed_noise, parse_seeds), ``grids`` (get_sigmas) and ``solvers`` (the samplers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..kernels import Kernel, get_kernel
from .grids import GRIDS, get_sigmas
from .noise import parse_seeds, seed_noise
from .solvers import SAMPLERS, CountingDenoiser, get_sampler, guided

__all__ = [
    "seed_noise",
    "parse_seeds",
    "sample",
    "get_sigmas",
    "get_sampler",
    "guided",
    "CountingDenoiser",
    "SAMPLERS",
    "GRIDS",
    "DEFAULT_GRID",
]

DEFAULT_GRID = {"dpmpp": "logsnr", "dpmpp_2m": "logsnr", "dpmpp_3m": "logsnr"}  # others: "native"


def _default_device(denoiser) -> torch.device:
    if isinstance(denoiser, nn.Module):
        for p in denoiser.parameters():
            return p.device
        for b in denoiser.buffers():
            return b.device
    return torch.device("cpu")


def _labels_for(labels, n: int) -> Tensor | None:
    if labels is None:
        return None
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if labels.numel() == 1:
        return labels.expand(n).clone()
    if labels.numel() != n:
        raise ValueError(f"labels must be one class or one per seed ({n}), got {labels.numel()} labels.")
    return labels


def sample(
    denoiser,
    kernel: Kernel | str,
    seeds: str | int | Sequence[int] | Tensor,
    shape: Sequence[int],
    sampler: str = "heun",
    steps: int = 18,
    labels: Tensor | Sequence[int] | int | None = None,
    grid: str | None = None,
    guidance: float = 1.0,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = False,
    dtype: torch.dtype = torch.float32,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    stats: dict | None = None,
    **opts,
) -> Tensor:
    """Deterministic samples ``(len(seeds), *shape)``, float (``dtype``) in [-1, 1] (clamped), on the CPU.

    * ``seeds``: ``"0-9999"``, ``"0,5,7-9"``, an int, a list or a range (see ``parse_seeds``); sample ``i``
      depends only on ``seeds[i]`` (and its label), never on ``batch_size`` (up to float round-off of
      the network on different batch shapes).
    * ``x_T = kernel.prior_scale * seed_noise(seeds, shape)``.
    * ``sampler``: one of ``SAMPLERS`` (``euler``/``ddim``, ``heun``, ``dpmpp``/``dpmpp_2m``, ``dpmpp_3m``,
      ``ode``); ``steps`` non-zero noise levels then 0 (heun: ``2 steps - 1`` evaluations; ``ode`` is
      adaptive and only uses the grid's ends).
    * ``grid``: one of ``GRIDS``; default ``"native"`` (the kernel's own grid — EDM's is the rho-grid)
      and ``"logsnr"`` for DPM-Solver++.  ``sigma_min`` / ``sigma_max`` / ``rho`` shape non-native grids.
    * ``labels``: one class for all seeds or one per seed (int64; -1 = unconditional); ``guidance`` is the
      classifier-free guidance weight (needs labels when != 1).
    * ``device``: default the denoiser's parameter device (CPU for plain callables); ``dtype`` of ``x`` and of the result.
    * ``stats``: a dict that receives ``nfe`` (evaluations per sample, max over batches) and ``calls``.
    * ``opts`` go to the sampler (e.g. ``order``, ``lower_order_final``, ``rtol``, ``atol``).

    Runs under ``torch.inference_mode()`` in batches of ``batch_size``.
    """
    kernel = get_kernel(kernel)
    solver = get_sampler(sampler)
    seeds = parse_seeds(seeds)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    if grid is None:
        key = str(sampler).lower().replace("-", "_").replace("++", "pp")
        grid = DEFAULT_GRID.get(key, "native") if isinstance(sampler, str) else "native"
    sigmas = get_sigmas(grid, steps, kernel, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    device = torch.device(device) if device is not None else _default_device(denoiser)
    all_labels = _labels_for(labels, len(seeds))
    batches = range(0, len(seeds), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"sampling ({sampler}, {steps} steps)", unit="batch")
    out, nfe, calls = [], 0, 0
    with torch.inference_mode():
        for start in batches:
            chunk = seeds[start : start + batch_size]
            x_T = kernel.prior_scale * seed_noise(chunk, shape, device=device, dtype=dtype)
            lab = None if all_labels is None else all_labels[start : start + batch_size].to(device)
            st: dict = {}
            x0 = solver(denoiser, x_T, sigmas, lab, guidance=guidance, stats=st, **opts)
            out.append(x0.clamp(-1, 1).to("cpu"))
            nfe, calls = max(nfe, st.get("nfe", 0)), calls + st.get("calls", 0)
    if stats is not None:
        stats.update(nfe=nfe, calls=calls, sigmas=sigmas)
    return torch.cat(out)
