"""Seed-indexed initial noise: the shared ``z`` of every model comparison (Zhang et al., ICML 2024, Sec. 2).

Model reproducibility is measured by sampling different models from the *same* initial noise with a
deterministic sampler and comparing the outputs seed by seed.  That only works when the noise of seed
``k`` is a pure function of ``k`` and the image shape: the same tensor whatever the batch it is drawn
in, the device or dtype of the model, the number of DDP ranks or the run.

``seed_noise`` achieves this by drawing every seed's ``z ~ N(0, I)`` on the CPU from its own
``torch.Generator().manual_seed(k)`` in float32 (the CPU Philox/Mersenne stream is stable across
machines and batch sizes), and only then moving / casting the stacked batch.

``parse_seeds`` turns the command-line syntax ``"0-9999"`` or ``"0,5,7-9"`` (inclusive ranges) into a
list of seeds.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["seed_noise", "parse_seeds", "SEED_SYNTAX"]

SEED_SYNTAX = (
    "a comma-separated list of non-negative integers or inclusive ranges, e.g. '0-9999' or '0,5,7-9'"
)
_MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed accepts any 64-bit value; keep seeds int64-storable.
_ITEM = re.compile(r"^(\d+)\s*(?:-\s*(\d+))?$")


def _bad(seeds, why: str = "") -> ValueError:
    text = repr(seeds)
    text = text if len(text) <= 60 else text[:57] + "..."
    return ValueError(f"Invalid seeds {text}{why}: expected {SEED_SYNTAX}.")


def _check_int(k, original) -> int:
    if isinstance(k, bool):
        raise _bad(original, f" (item {k!r} is not an integer)")
    try:
        k = operator.index(k)  # int, numpy / torch integer scalars; rejects floats and strings
    except TypeError:
        raise _bad(original, f" (item {k!r} is not an integer)") from None
    if k < 0 or k > _MAX_SEED:
        raise _bad(original, f" (seed {k} is out of range 0..2^63-1)")
    return k


def parse_seeds(seeds: str | int | Iterable[int] | Tensor) -> list[int]:
    """Seeds as a list of ints from ``"0-9999"``, ``"0,5,7-9"``, an int (one seed), a list/range/tensor.

    Ranges ``a-b`` are inclusive (``"7-9"`` is 7, 8, 9) and need ``a <= b``.  The order given is kept.
    Empty, malformed (``"5-"``, ``"a"``, ``"9-3"``) or negative input raises ``ValueError``.
    """
    if isinstance(seeds, Tensor):
        if seeds.is_floating_point() or seeds.is_complex() or seeds.dtype == torch.bool:
            raise _bad(seeds, " (a seed tensor must hold integers)")
        seeds = seeds.reshape(-1).tolist()
    if isinstance(seeds, str):
        text = seeds.strip()
        if not text:
            raise _bad(seeds, " (empty)")
        out: list[int] = []
        for part in text.split(","):
            m = _ITEM.match(part.strip())
            if m is None:
                raise _bad(seeds, " (seeds must be non-negative)" if part.strip().startswith("-") else "")
            a = int(m.group(1))
            b = a if m.group(2) is None else int(m.group(2))
            if b < a:
                raise _bad(seeds, f" (range {a}-{b} is descending)")
            if b > _MAX_SEED:
                raise _bad(seeds, f" (seed {b} is out of range 0..2^63-1)")
            out.extend(range(a, b + 1))
        return out
    if isinstance(seeds, bool):
        raise _bad(seeds)
    if isinstance(seeds, int):
        return [_check_int(seeds, seeds)]
    if isinstance(seeds, range):
        out = list(seeds)
    elif isinstance(seeds, Iterable):
        out = [_check_int(k, seeds) for k in seeds]
    else:
        raise _bad(seeds)
    if not out:
        raise _bad(seeds, " (empty)")
    for k in out:
        _check_int(k, seeds)
    return out


def seed_noise(
    seeds: str | int | Sequence[int] | Tensor,
    shape: Sequence[int],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise of shape ``(len(seeds), *shape)``; row ``i`` depends only on ``seeds[i]`` and ``shape``.

    Each seed's tensor is drawn on the CPU with its own ``torch.Generator().manual_seed(seed)`` in
    float32, so it is bit-identical whatever the batch, device or run; the batch is then moved to
    ``device`` and cast to ``dtype`` (a float64 copy holds exactly the float32 values).
    """
    seeds = parse_seeds(seeds)
    shape = tuple(int(s) for s in shape)
    if any(s < 1 for s in shape):
        raise ValueError(f"seed_noise shape must hold positive sizes, got {shape}.")
    out = torch.empty((len(seeds), *shape), dtype=torch.float32)
    g = torch.Generator(device="cpu")
    for i, k in enumerate(seeds):
        g.manual_seed(k)
        torch.randn(shape, generator=g, dtype=torch.float32, out=out[i])
    return out.to(device=device, dtype=dtype)
