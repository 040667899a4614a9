"""Seed-indexed initial noise: the shared ``z`` of every model comparison (Zhang et al., ICML 2024, Sec. 2).

Model reproducibility is measured by sampling different models from the *same* initial noise with a
deterministic sampler and comparing the outputs seed by seed.  That only works when the noise of seed
``k`` is a pure function of ``k`` and the image shape: the same tensor whatever the batch it is drawn
in, the device or dtype of the model, the number of DDP ranks or the run, and different for different
seeds.  ``seed_noise`` draws every seed's ``z ~ N(0, I)`` in float32 from its own CPU
``torch.Generator().manual_seed(k)`` (mt19937, stable across machines and batch sizes) and only then
moves / casts the stacked batch.  The CPU generator keeps the low 32 bits of a seed, so seeds are
limited to ``0 <= k < 2**32`` (``SEED_LIMIT``): a larger seed is refused rather than silently aliased.

``parse_seeds`` turns the command-line syntax ``"0-9999"`` or ``"0,5,7-9"`` (inclusive ranges) into a
list of distinct seeds, counting them (at most ``MAX_SEEDS``) before building the list.
"""

from __future__ import annotations

import operator
import re
from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["seed_noise", "parse_seeds", "SEED_SYNTAX", "SEED_LIMIT", "MAX_SEEDS"]

SEED_LIMIT = 2**32  # torch's CPU generator (mt19937) keeps the low 32 bits: seeds k and k + 2^32 would alias.
MAX_SEEDS = 1_000_000  # seeds one seed string may name (the paper uses 10,000 per model)
SEED_SYNTAX = (
    "a comma-separated list of distinct integers in 0..4294967295 or inclusive ranges of them, "
    "e.g. '0-9999' or '0,5,7-9'"
)
_ITEM = re.compile(r"^(\d+)\s*(?:-\s*(\d+))?$")


def _bad(seeds, why: str = "") -> ValueError:
    text = repr(seeds)
    text = text if len(text) <= 60 else text[:57] + "..."
    return ValueError(f"Invalid seeds {text}{why}: expected {SEED_SYNTAX}.")


def _too_large(k: int) -> str:
    return f" (seed {k} is not below 2^32 = {SEED_LIMIT}, the seeds torch's CPU generator tells apart)"


def _check_int(k, original) -> int:
    if isinstance(k, bool):
        raise _bad(original, f" (item {k!r} is not an integer)")
    try:
        k = operator.index(k)  # int, numpy / torch integer scalars; rejects floats and strings
    except TypeError:
        raise _bad(original, f" (item {k!r} is not an integer)") from None
    if k < 0:
        raise _bad(original, f" (seed {k} is negative)")
    if k >= SEED_LIMIT:
        raise _bad(original, _too_large(k))
    return k


def _check_distinct(out: list[int], original) -> None:
    if len(set(out)) == len(out):
        return
    repeated = [k for k, n in Counter(out).items() if n > 1]
    names = ", ".join(map(str, repeated[:5])) + (f" and {len(repeated) - 5} more" if len(repeated) > 5 else "")
    verb = "is" if len(repeated) == 1 else "are"
    raise _bad(original, f" (seed{'s' if len(repeated) > 1 else ''} {names} {verb} given more than once)")


def _parse_text(seeds: str) -> list[int]:
    """The seed syntax: ranges checked and counted first, the list built only when it is small enough."""
    text = seeds.strip()
    if not text:
        raise _bad(seeds, " (empty)")
    ranges: list[tuple[int, int]] = []
    for part in text.split(","):
        m = _ITEM.match(part.strip())
        if m is None:
            raise _bad(seeds, " (seeds must be non-negative)" if part.strip().startswith("-") else "")
        a = int(m.group(1))
        b = a if m.group(2) is None else int(m.group(2))
        if b < a:
            raise _bad(seeds, f" (range {a}-{b} is descending)")
        if b >= SEED_LIMIT:
            raise _bad(seeds, _too_large(b))
        ranges.append((a, b))
    count = sum(b - a + 1 for a, b in ranges)
    if count > MAX_SEEDS:
        raise _bad(seeds, f" ({count:,} seeds, more than the {MAX_SEEDS:,} allowed)")
    return [k for a, b in ranges for k in range(a, b + 1)]


def parse_seeds(seeds: str | int | Iterable[int] | Tensor, *, unique: bool | None = None) -> list[int]:
    """Seeds as a list of ints from ``"0-9999"``, ``"0,5,7-9"``, an int (one seed), a list/range/tensor.

    Every seed is an integer ``0 <= k < 2**32`` (``SEED_LIMIT``).  Ranges ``a-b`` are inclusive
    (``"7-9"`` is 7, 8, 9) and need ``a <= b``; a seed string names at most ``MAX_SEEDS`` seeds, counted
    before the list is built.  The order given is kept.  ``unique`` refuses a seed given twice; by
    default (``None``) it is on for a seed string (the command line, where a repeat would be counted as
    a second sample) and off for Python sequences, which may repeat a seed on purpose (the conditional
    study samples each seed under several class labels).  Bad input raises ``ValueError`` (one sentence).
    """
    if isinstance(seeds, str):
        out = _parse_text(seeds)
        if unique is not False:
            _check_distinct(out, seeds)
        return out
    if isinstance(seeds, Tensor):
        if seeds.is_floating_point() or seeds.is_complex() or seeds.dtype == torch.bool:
            raise _bad(seeds, " (a seed tensor must hold integers)")
        seeds = seeds.reshape(-1).tolist()
    if isinstance(seeds, bool):
        raise _bad(seeds)
    if isinstance(seeds, int):
        return [_check_int(seeds, seeds)]
    if not isinstance(seeds, Iterable):
        raise _bad(seeds)
    out = [_check_int(k, seeds) for k in seeds]
    if not out:
        raise _bad(seeds, " (empty)")
    if unique:
        _check_distinct(out, seeds)
    return out


def seed_noise(
    seeds: str | int | Sequence[int] | Tensor,
    shape: Sequence[int],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise of shape ``(len(seeds), *shape)``; row ``i`` depends only on ``seeds[i]`` and ``shape``.

    Each seed ``k`` (``0 <= k < 2**32``, see ``parse_seeds``; a Python sequence may repeat a seed, giving
    equal rows) is drawn on the CPU with its own ``torch.Generator().manual_seed(k)`` in float32, so it is
    bit-identical whatever the batch, device or run; the batch is then moved to ``device`` and cast to
    ``dtype`` (a float64 copy holds exactly the float32 values).

    Relation to NVlabs/edm (``generate.py``, ``StackedRandomGenerator``): edm seeds one
    ``torch.Generator(device).manual_seed(seed % 2**32)`` per seed and draws float32
    ``torch.randn(shape)`` from it *on the model's device*.  On the CPU that is exactly this function:
    ``seed_noise(seeds, shape)`` equals edm's ``StackedRandomGenerator("cpu", seeds).randn([n, *shape])``
    bit for bit.  edm's default device is CUDA, whose generator (Philox) gives a different stream, so
    the latents of an edm run on a GPU are *not* these; and edm reduces a seed of ``2**32`` or more
    modulo ``2**32`` where this function refuses it.  Only the initial latents correspond: edm then draws
    random class labels, and with ``S_churn > 0`` fresh noise, from the same generators.
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
