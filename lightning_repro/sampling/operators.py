"""Forward operators ``A`` of inverse problems: box inpainting with a centred square mask (Zhang et al., ICML
2024, Sec. 4.2 / App. F, Fig. 10; the setting of DPS, Chung et al. 2023).

The paper masks a centred square of CIFAR-10's 32 x 32 images: "easy" 16 x 16 (25% of the pixels) and
"hard" 25 x 25 (61%).  ``center_square_mask(resolution, kind)`` scales the side to other resolutions as
``round(side_32 * resolution / 32)`` (Python's round, half to even) and centres it at offset
``(resolution - side) // 2`` (the extra pixel of an odd margin goes to the bottom / right):

    resolution   8     28      32      64
    easy         4x4   14x14   16x16   32x32
    hard         6x6   22x22   25x25   50x50

so 8 x 8 digits lose 25% (easy) and 56% (hard) of their pixels.  ``kind`` may also be an integer side.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["MASK_SIDES_32", "mask_side", "center_square_mask", "InpaintingOperator"]

#: side of the masked square at 32 x 32 (the paper's CIFAR-10 setting)
MASK_SIDES_32 = {"easy": 16, "hard": 25}


def _hw(resolution: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(resolution, int):
        h = w = resolution
    else:
        h, w = (int(v) for v in resolution)
    if h < 1 or w < 1:
        raise ValueError(f"resolution must be positive, got {resolution!r}.")
    return h, w


def mask_side(resolution: int | Sequence[int], kind: str | int) -> int:
    """Side of the masked square for ``kind`` ("easy" | "hard" | an int) at ``resolution`` (the smaller side)."""
    h, w = _hw(resolution)
    if isinstance(kind, str):
        if kind not in MASK_SIDES_32:
            raise ValueError(
                f"unknown mask kind {kind!r}; valid kinds are {sorted(MASK_SIDES_32)} or a side in pixels."
            )
        side = max(1, round(MASK_SIDES_32[kind] * min(h, w) / 32))
    elif isinstance(kind, int) and not isinstance(kind, bool):
        side = kind
    else:
        raise ValueError(f"mask kind must be 'easy', 'hard' or an integer side, got {kind!r}.")
    if side < 1:
        raise ValueError(f"the masked square must have a side of at least 1 pixel, got {side}.")
    if side > min(h, w):
        raise ValueError(f"a {side}x{side} mask is larger than the {h}x{w} image.")
    return side


def center_square_mask(resolution: int | Sequence[int], kind: str | int = "easy") -> Tensor:
    """Float (H, W) mask: 1 where the pixel is observed, 0 on the centred ``side x side`` square (see module doc)."""
    h, w = _hw(resolution)
    side = mask_side((h, w), kind)
    top, left = (h - side) // 2, (w - side) // 2
    mask = torch.ones(h, w)
    mask[top : top + side, left : left + side] = 0.0
    return mask


class InpaintingOperator:
    """``A(x) = m * x``: keeps the observed pixels and sets the masked square to 0 (differentiable, linear).

    ``mask`` is (H, W) (or broadcastable to the images), 1 = observed.  Build it from a kind with
    ``InpaintingOperator.centered(resolution, "easy" | "hard")``.
    """

    def __init__(self, mask: Tensor):
        mask = torch.as_tensor(mask, dtype=torch.float32)
        if mask.ndim < 2 or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must be a (H, W) tensor of 0 (masked) and 1 (observed) values.")
        self.mask = mask

    @classmethod
    def centered(cls, resolution: int | Sequence[int], kind: str | int = "easy") -> InpaintingOperator:
        op = cls(center_square_mask(resolution, kind))
        op.kind = kind
        return op

    @property
    def observed_fraction(self) -> float:
        return float(self.mask.mean())

    def __call__(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-self.mask.ndim :]) != tuple(self.mask.shape):
            raise ValueError(
                f"images of shape {tuple(x.shape)} do not match the mask of shape {tuple(self.mask.shape)}."
            )
        return x * self.mask.to(device=x.device, dtype=x.dtype)

    def __repr__(self) -> str:
        h, w = self.mask.shape[-2:]
        return f"InpaintingOperator({h}x{w}, {1 - self.observed_fraction:.0%} masked)"
