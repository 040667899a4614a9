"""Noise-level (time) embeddings shared by all networks.

* ``timestep_embedding``: the sinusoidal embedding of Vaswani et al. 2017 as used for diffusion time by
  Ho et al. 2020 (``[sin(t w_i), cos(t w_i)]``, ``w_i = max_period^(-i / half)``) and by DiT / U-ViT.
  ``flip=True`` gives ``[cos, sin]`` (the order of EDM's ``PositionalEmbedding(endpoint=True)`` differs
  only by the frequency endpoint; see ``PositionalEmbedding``).
* ``PositionalEmbedding``: EDM's (Karras et al. 2022) sinusoidal embedding of ``c_noise``.
* ``FourierEmbedding``: random Fourier features (Tancik et al. 2020), NCSN++'s embedding of log sigma.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["timestep_embedding", "PositionalEmbedding", "FourierEmbedding"]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, flip: bool = False) -> Tensor:
    """Sinusoidal embedding of a (B,) tensor of (possibly fractional) times into (B, dim), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip else [torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class PositionalEmbedding(nn.Module):
    """EDM's positional embedding: ``freqs = (1/max_positions)^(i / (half - endpoint))``, output ``[cos, sin]``."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: Tensor) -> Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        args = x.float()[:, None] * freqs[None]
        return torch.cat([args.cos(), args.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features with a fixed (buffer) frequency vector ``freqs ~ N(0, scale^2)``."""

    def __init__(self, num_channels: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: Tensor) -> Tensor:
        args = x.float()[:, None] * (2 * math.pi * self.freqs[None])
        return torch.cat([args.cos(), args.sin()], dim=1)
