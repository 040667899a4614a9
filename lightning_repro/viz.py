"""Image grids: float images in [-1, 1] (N×C×H×W) -> one PNG; matplotlib figures -> PNG (both written atomically)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .files import atomic_write_bytes

__all__ = ["make_grid", "save_grid", "save_figure", "atomic_write_bytes"]


def make_grid(images: Tensor, nrow: int | None = None, pad: int = 1, scale: int | None = None) -> np.ndarray:
    """uint8 H×W×3 grid; ``nrow`` images per row (default: square); small images are upscaled (nearest)."""
    x = images.detach().float().clamp(-1, 1).cpu()
    n, c, h, w = x.shape
    if c == 1:
        x = x.expand(n, 3, h, w)
    if scale is None:
        scale = max(1, 32 // max(h, w))
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    h, w = x.shape[-2:]
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = torch.ones(3, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = x[i]
    return ((grid.permute(1, 2, 0) * 127.5 + 128).clamp(0, 255)).to(torch.uint8).numpy()


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int | None = None, **kw) -> Path:
    """Save a grid PNG atomically and return its path."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(make_grid(images, nrow=nrow, **kw)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure as a PNG at its own dpi, atomically; returns the path."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
