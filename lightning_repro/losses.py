"""``DenoisingLoss``: denoising score matching in the EDM variable (Karras et al. 2022, Eq. 2 and Sec. 5).

``E_{sigma ~ p_train, n ~ N(0, I)} lambda(sigma) || D(x_0 + sigma n; sigma) - x_0 ||^2`` with the kernel's training
distribution ``p_train`` (``Kernel.sample_sigma``) and weight ``lambda`` (``Kernel.loss_weight``), shaped as EDM's
``training/loss.py``.  With a ``target`` denoiser ``T`` the regression target ``x_0`` becomes
``T(x_0 + sigma n; sigma)`` (distillation of a denoiser; with the optimal denoiser of the training set, Zhang et al.
2024 Prop. 1, the loss has the same minimiser without the target's noise).  The draws of one step come from one
generator and are made for the whole global batch (``batch_size * world_size`` rows, each rank keeping its own
rows), so a DDP run draws what one process does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .kernels import Kernel

__all__ = ["DenoisingLoss"]


class DenoisingLoss:
    """The training loss of a ``DiffusionModule``: a callable ``(denoiser, x0, labels, generator, rank, world) -> loss``.

    Args:
        kernel: the noise kernel: ``sample_sigma`` is the training-noise distribution, ``loss_weight`` lambda(sigma).
        label_dropout: probability of replacing a label by the null class -1 (classifier-free guidance).
        target: None (regress onto ``x0``) or a frozen Denoiser whose output at the noisy image is the target.
    """

    def __init__(self, kernel: Kernel, label_dropout: float = 0.0, target: Callable[..., Tensor] | None = None):
        self.kernel = kernel  # VP / sub-VP / VE / EDM (kernels.py)
        self.label_dropout = float(label_dropout)  # 0 for unconditional models; e.g. 0.1 for guidance
        self.target = target  # None: denoising score matching; a Denoiser: its D(x; sigma) replaces x0

    def __call__(self, denoiser: Callable[..., Tensor], x0: Tensor, labels: Tensor | None,
                 generator: torch.Generator, rank: int = 0, world_size: int = 1) -> Tensor:
        """The mean loss of this rank's rows (the DDP gradient, a mean of ranks' means, is the global mean)."""
        sigma, noise, labels = self.draw(x0, labels, generator, rank, world_size)
        return self.weighted_error(denoiser, x0, labels, sigma, noise)

    def draw(self, x0: Tensor, labels: Tensor | None, generator: torch.Generator, rank: int = 0,
             world_size: int = 1) -> tuple[Tensor, Tensor, Tensor | None]:
        """``sigma`` (B,), ``noise`` like x0 and the labels after dropout, in this order from ``generator``: drawn
        for the global batch of ``B * world_size`` rows, of which rows ``[rank * B, (rank + 1) * B)`` are returned."""
        b, world = x0.shape[0], int(world_size)
        if not 0 <= int(rank) < world:
            raise ValueError(f"rank must lie in [0, {world - 1}] for world_size={world}, got {rank}.")
        rows = slice(int(rank) * b, (int(rank) + 1) * b)
        sigma = self.kernel.sample_sigma(b * world, generator=generator, device=x0.device)[rows]  # sigma ~ p_train
        noise = torch.randn((b * world, *x0.shape[1:]), generator=generator, device=x0.device, dtype=x0.dtype)[rows]
        if self.label_dropout > 0 and labels is not None:
            drop = torch.rand(b * world, generator=generator, device=x0.device)[rows] < self.label_dropout
            labels = torch.where(drop, torch.full_like(labels, -1), labels)  # -1: the null class
        return sigma, noise, labels

    def weighted_error(self, denoiser: Callable[..., Tensor], x0: Tensor, labels: Tensor | None, sigma: Tensor,
                       noise: Tensor) -> Tensor:
        """``mean( lambda(sigma) * || D(x0 + sigma n; sigma) - y ||^2 )`` for given draws, ``y = x0`` or the
        target denoiser's ``T(x0 + sigma n; sigma)``."""
        x = x0 + sigma.view(-1, 1, 1, 1).to(x0.dtype) * noise
        D = denoiser(x, sigma, labels)
        if self.target is None:
            y = x0
        else:
            with torch.no_grad():
                y = self.target(x, sigma, labels)
        weight = self.kernel.loss_weight(sigma.double()).float().view(-1, 1, 1, 1)
        return (weight * (D.float() - y.float()) ** 2).mean()
