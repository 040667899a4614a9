"""Sampling from the shared seed-indexed noise with deterministic ODE solvers (Zhang et al., ICML 2024, Sec. 2).

``sample(denoiser, kernel, seeds, shape)`` is the one entry point: it draws ``z = seed_noise(seeds, shape)``,
starts from ``x_T = kernel.prior_scale * z`` in the EDM variable (VE / EDM: ``sigma_max * z``; VP and
sub-VP: ``z`` in their own variable, i.e. ``z / s(T)``; Song et al. 2021, Karras et al. 2022) and runs a
deterministic solver of the probability-flow ODE on a sigma grid.  Every model compared in a study is
sampled this way from the same seeds, so outputs are compared seed by seed.  (Design decision since
DESIGN.md's first version: the start is always ``x_T = kernel.prior_scale * z`` in the EDM variable, so one
sampler serves every kernel, network and closed-form denoiser.  Precisely it is ``kernel.start_scale(sigmas) * z``,
which is ``prior_scale`` for every built-in kernel; a diffusers schedule whose first timestep depends on the step
count starts, as its pipelines do, from ``z`` in the VP variable at that timestep.)

``precision="bf16"`` runs every network evaluation under ``torch.autocast(bfloat16)`` (``AutocastDenoiser``)
while the solver's state and arithmetic stay in ``dtype`` (float32): the speed of bf16 tensor cores with
a float32 ODE integration.  bf16 samples differ from float32 ones by the network's round-off.

``sample_seeds(denoiser, kernel, seeds, shape, SolverConfig(...))`` is the same for an already parsed seed list
and one options object (what ``evaluation.shards`` calls); all entry points share one batch loop.

``sample_from_noise(denoiser, kernel, z, ...)`` does the same from explicit standard-normal noise ``z`` (e.g.
points of a plane through three seeds' noises, ``studies.hyperplane``), starting from ``kernel.prior_scale * z``.

See ``noise`` (seed_noise, parse_seeds), ``grids`` (get_sigmas) and ``solvers`` (the samplers); ``dps``
(``sample_dps``: deterministic diffusion posterior sampling for inverse problems, Sec. 4.2) and ``operators``
(``InpaintingOperator``, ``center_square_mask``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..kernels import Kernel, get_kernel
from .consistency import sample_consistency
from .dps import data_consistency_error, sample_dps
from .grids import GRIDS, get_sigmas
from .noise import parse_seeds, seed_noise
from .operators import InpaintingOperator, center_square_mask
from .solvers import SAMPLERS, CountingDenoiser, get_sampler, guided

__all__ = [
    "seed_noise",
    "parse_seeds",
    "sample",
    "sample_from_noise",
    "sample_seeds",
    "SolverConfig",
    "get_sigmas",
    "get_sampler",
    "guided",
    "CountingDenoiser",
    "SAMPLERS",
    "GRIDS",
    "DEFAULT_GRID",
    "PRECISIONS",
    "AutocastDenoiser",
    "autocast_dtype",
    "sample_dps",
    "data_consistency_error",
    "InpaintingOperator",
    "center_square_mask",
]

SAMPLERS["consistency"] = sample_consistency  # CM Alg. 1 (sampling/consistency.py)
DEFAULT_GRID = {"dpmpp": "logsnr", "dpmpp_2m": "logsnr", "dpmpp_3m": "logsnr"}  # others: "native"


#: ``precision`` names -> the autocast dtype of the network evaluations (None: no autocast)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_PRECISION_ALIASES = {
    "32": "fp32",
    "float32": "fp32",
    "32-true": "fp32",
    "bfloat16": "bf16",
    "bf16-mixed": "bf16",
    "16": "fp16",
    "float16": "fp16",
    "16-mixed": "fp16",
}


def autocast_dtype(precision: str) -> tuple[str, torch.dtype | None]:
    """``precision`` (``fp32`` | ``bf16`` | ``fp16`` or Lightning's ``32-true`` / ``bf16-mixed`` / ``16-mixed``)
    -> (canonical name, autocast dtype or None)."""
    key = str(precision).lower()
    key = _PRECISION_ALIASES.get(key, key)
    if key not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; valid precisions are: {', '.join(PRECISIONS)}.")
    return key, PRECISIONS[key]


class AutocastDenoiser:
    """Runs ``denoiser`` under ``torch.autocast(x.device.type, dtype)`` and returns ``x.dtype``.

    Only the network runs in low precision; the solver that calls this keeps its state in ``x.dtype``.
    """

    def __init__(self, denoiser, dtype: torch.dtype = torch.bfloat16):
        self.denoiser, self.dtype = denoiser, dtype

    def __call__(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            out = self.denoiser(x, sigma, labels)
        return out.to(x.dtype)


def _default_device(denoiser) -> torch.device:
    if isinstance(denoiser, nn.Module):
        for p in denoiser.parameters():
            return p.device
        for b in denoiser.buffers():
            return b.device
    return torch.device("cpu")


def _labels_for(labels, n: int, denoiser=None) -> Tensor | None:
    """Labels on the host, one per seed, range-checked once here (networks skip the check on accelerators)."""
    if labels is None:
        return None
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if labels.numel() == 1:
        return labels.expand(n).clone()
    if labels.numel() != n:
        raise ValueError(f"labels must be one class or one per seed ({n}), got {labels.numel()} labels.")
    num_classes = getattr(getattr(denoiser, "net", None), "num_classes", None)
    if num_classes and labels.numel() and (int(labels.min()) < -1 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [-1, {num_classes - 1}] (-1 = no label), "
                         f"got [{int(labels.min())}, {int(labels.max())}].")
    return labels


@dataclass(frozen=True)
class SolverConfig:
    """Everything a deterministic sampling run needs besides the denoiser, kernel, noise and labels."""

    sampler: str = "heun"  # one of SAMPLERS
    steps: int = 18  # non-zero noise levels of the grid
    grid: str | None = None  # one of GRIDS; None: logsnr for DPM-Solver++, else the kernel's native grid
    guidance: float = 1.0  # classifier-free guidance weight (needs labels when != 1)
    batch_size: int = 256
    precision: str = "fp32"  # fp32 | bf16 | fp16: network evaluations under autocast, the solver in ``dtype``
    dtype: torch.dtype = torch.float32  # of x_T, the solver state and the result
    sigma_min: float | None = None  # shape non-native grids
    sigma_max: float | None = None
    rho: float = 7.0
    opts: dict = field(default_factory=dict)  # to the sampler (e.g. order, lower_order_final, rtol, atol)


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
    precision: str = "fp32",
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    stats: dict | None = None,
    decode=None,
    **opts,
) -> Tensor:
    """Deterministic samples ``(len(seeds), *shape)``, float (``dtype``) in [-1, 1] (clamped), on the CPU.

    * ``seeds``: ``"0-9999"``, ``"0,5,7-9"``, an int, a list or a range (see ``parse_seeds``); sample ``i``
      depends only on ``seeds[i]`` (and its label), never on ``batch_size`` (up to float round-off of
      the network on different batch shapes).
    * ``x_T = kernel.prior_scale * seed_noise(seeds, shape)``.
    * the other options are those of ``SolverConfig``; ``device``: default the denoiser's parameter device
      (CPU for plain callables); ``stats``: a dict that receives ``nfe`` (evaluations per sample, max over
      batches), ``calls`` and ``sigmas``; ``decode(x, sigma_end)``: latent models' decoder (``shape`` is then the
      latent shape, ``Reference.sample_shape``); ``opts`` go to the sampler.

    Runs under ``torch.inference_mode()`` in batches of ``batch_size``.
    """
    config = SolverConfig(sampler, steps, grid, guidance, batch_size, precision, dtype, sigma_min, sigma_max, rho, opts)
    return sample_seeds(denoiser, kernel, parse_seeds(seeds), shape, config, labels, device, progress, stats,
                        decode=decode)


def sample_seeds(denoiser, kernel: Kernel | str, seeds: list[int], shape: Sequence[int], config: SolverConfig,
                 labels=None, device=None, progress: bool = False, stats: dict | None = None,
                 callback=None, decode=None) -> Tensor:
    """``sample`` for already parsed ``seeds`` (a list of ints) and a ``SolverConfig``; ``callback(n)`` is
    called after each batch of ``n`` samples; ``decode(x, sigma_end)`` maps each batch's final state to images
    before the clamp (latent models: the VAE decoder; ``shape`` is then the latent shape)."""
    return _sample_batches(
        denoiser, kernel, len(seeds), lambda a, b, dev: seed_noise(seeds[a:b], shape, device=dev, dtype=config.dtype),
        config, labels, device, progress, stats, callback, decode)


def _sample_batches(denoiser, kernel, n: int, noise_of, config: SolverConfig, labels, device, progress, stats,
                    callback=None, decode=None) -> Tensor:
    """The loop every entry point shares: ``x_T = kernel.start_scale(sigmas) * noise_of(start, end, device)``
    (``prior_scale`` for every built-in kernel) batch by batch, the deterministic solver on one sigma grid,
    ``decode`` if given, clamped results on the CPU."""
    kernel = get_kernel(kernel)
    solver = get_sampler(config.sampler)
    _, amp_dtype = autocast_dtype(config.precision)
    batch_size = config.batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    grid = config.grid
    if grid is None:
        key = str(config.sampler).lower().replace("-", "_").replace("++", "pp")
        grid = DEFAULT_GRID.get(key, "native") if isinstance(config.sampler, str) else "native"
    sigmas = get_sigmas(grid, config.steps, kernel, sigma_min=config.sigma_min, sigma_max=config.sigma_max,
                        rho=config.rho)
    device = torch.device(device) if device is not None else _default_device(denoiser)
    all_labels = _labels_for(labels, n, denoiser)
    if amp_dtype is not None:
        denoiser = AutocastDenoiser(denoiser, amp_dtype)
    batches = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"sampling ({config.sampler}, {config.steps} steps)", unit="batch")
    out, nfe, calls = [], 0, 0
    with torch.inference_mode():
        for start in batches:
            end = min(start + batch_size, n)
            x_T = kernel.start_scale(sigmas) * noise_of(start, end, device)
            lab = None if all_labels is None else all_labels[start:end].to(device)
            st: dict = {}
            x0 = solver(denoiser, x_T, sigmas, lab, guidance=config.guidance, stats=st, **config.opts)
            if decode is not None:
                x0 = decode(x0, float(sigmas[-1]))
            out.append(x0.clamp(-1, 1).to("cpu"))
            nfe, calls = max(nfe, st.get("nfe", 0)), calls + st.get("calls", 0)
            if callback is not None:
                callback(end - start)
    if stats is not None:
        stats.update(nfe=nfe, calls=calls, sigmas=sigmas)
    return torch.cat(out)


def sample_from_noise(
    denoiser,
    kernel: Kernel | str,
    z: Tensor,
    sampler: str = "heun",
    steps: int = 18,
    labels: Tensor | Sequence[int] | int | None = None,
    grid: str | None = None,
    guidance: float = 1.0,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = False,
    dtype: torch.dtype = torch.float32,
    precision: str = "fp32",
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    stats: dict | None = None,
    **opts,
) -> Tensor:
    """Deterministic samples from explicit noise ``z`` (B, *shape) instead of seeds, float in [-1, 1] on the CPU.

    Exactly what ``sample`` does after drawing its noise (same options): ``x_T = kernel.prior_scale * z`` in the
    EDM variable, then the deterministic ``sampler`` on the same sigma grid, in batches of ``batch_size``.
    ``sample_from_noise(D, k, seed_noise(seeds, shape))`` equals ``sample(D, k, seeds, shape)``.
    """
    if not isinstance(z, Tensor) or z.ndim < 2 or z.shape[0] < 1 or not z.is_floating_point():
        raise ValueError("z must be a float tensor of shape (B, *image_shape) with B >= 1.")
    config = SolverConfig(sampler, steps, grid, guidance, batch_size, precision, dtype, sigma_min, sigma_max, rho, opts)
    return _sample_batches(denoiser, kernel, z.shape[0], lambda a, b, dev: z[a:b].to(device=dev, dtype=dtype), config,
                           labels, device, progress, stats)
