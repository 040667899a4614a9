"""Regression tests of the reliability issue's seed items: no aliased seeds, no huge seed lists, no duplicates."""

from __future__ import annotations

import re
import tracemalloc

import numpy as np
import pytest
import torch

from lightning_repro.kernels import EDMKernel
from lightning_repro.sampling import parse_seeds, sample, seed_noise
from lightning_repro.sampling.noise import MAX_SEEDS, SEED_LIMIT, SEED_SYNTAX

SHAPE = (3, 4, 4)


def _message(seeds: str, why: str) -> str:
    return f"Invalid seeds {seeds!r} ({why}): expected {SEED_SYNTAX}."


def _cpu_draw(seed: int, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


# -- 1. seeds are 32-bit: no two accepted seeds share their noise ---------------------------------------------


def test_the_cpu_generator_keeps_32_bits_of_a_seed():
    """The premise of the limit: torch's CPU generator gives seeds k and k + 2^32 the same stream."""
    assert SEED_LIMIT == 2**32
    assert torch.equal(_cpu_draw(5), _cpu_draw(5 + 2**32))


def test_a_seed_of_2_to_the_32_or_more_is_refused_in_one_sentence():
    too_large = "seed 4294967301 is not below 2^32 = 4294967296, the seeds torch's CPU generator tells apart"
    with pytest.raises(ValueError) as err:
        parse_seeds("5,4294967301")
    assert str(err.value) == _message("5,4294967301", too_large)
    with pytest.raises(ValueError, match=re.escape(f"({too_large})")):
        seed_noise([5, 4294967301], SHAPE)  # an int list passed from Python
    with pytest.raises(ValueError, match=re.escape("(seed 4294967296 is not below 2^32")):
        seed_noise(torch.tensor([0, 2**32]), SHAPE)  # an int64 tensor
    with pytest.raises(ValueError, match=re.escape("(seed 9223372036854775807 is not below 2^32")):
        seed_noise(np.array([2**63 - 1]), SHAPE)  # numpy integers too
    with pytest.raises(ValueError, match=re.escape("(seed 4294967296 is not below 2^32")):
        parse_seeds("4294967290-4294967296")  # the end of a range


def test_seeds_below_2_to_the_32_keep_their_noise_bit_for_bit():
    seeds = [0, 1, 5, 12345, 2**31, 2**32 - 1]
    z = seed_noise(seeds, SHAPE)
    assert parse_seeds(str(2**32 - 1)) == [2**32 - 1]
    for row, k in zip(z, seeds):
        assert torch.equal(row, _cpu_draw(k))
    assert len({row.numpy().tobytes() for row in z}) == len(seeds)  # distinct seeds, distinct noise


def test_noise_equals_nvlabs_edm_latents_drawn_on_the_cpu():
    """edm's StackedRandomGenerator("cpu", seeds).randn([n, *shape]): one CPU generator per seed, seeded with
    seed % 2^32, float32 randn of the per-sample shape, stacked (written out here from its documented rule)."""
    seeds = [0, 7, 63, 2**32 - 1]
    edm_cpu = torch.stack(
        [torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(s % (1 << 32))) for s in seeds]
    )
    assert torch.equal(seed_noise(seeds, SHAPE), edm_cpu)
    assert torch.equal(seed_noise(seeds, SHAPE, dtype=torch.float64), edm_cpu.double())


# -- 2. a seed string is counted before it is built ----------------------------------------------------------


def test_a_huge_seed_range_is_refused_without_building_it():
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as err:
            parse_seeds("0-4294967295")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(err.value) == _message("0-4294967295", f"4,294,967,296 seeds, more than the {MAX_SEEDS:,} allowed")
    assert peak < 1 << 20  # not a list of four billion ints
    # the example ends beyond 2^32: refused for its range first, as one sentence
    with pytest.raises(ValueError, match=re.escape("(seed 99999999999 is not below 2^32")):
        parse_seeds("0-99999999999")
    # the count is over all the ranges of the string
    with pytest.raises(ValueError, match=re.escape("(1,000,002 seeds, more than the 1,000,000 allowed)")):
        parse_seeds("0-500000,600000-1100000")


def test_the_largest_allowed_seed_string_is_parsed():
    assert MAX_SEEDS == 1_000_000
    seeds = parse_seeds(f"0-{MAX_SEEDS - 1}")
    assert len(seeds) == MAX_SEEDS and seeds[0] == 0 and seeds[-1] == MAX_SEEDS - 1


# -- 3. a seed string names each seed once ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("0,0,0,1", "seed 0 is given more than once"),
        ("0-5,3-7", "seeds 3, 4, 5 are given more than once"),
        ("0-9,0-9", "seeds 0, 1, 2, 3, 4 and 5 more are given more than once"),
        ("7, 7", "seed 7 is given more than once"),
    ],
)
def test_a_seed_string_with_a_repeated_seed_is_refused(text, why):
    with pytest.raises(ValueError) as err:
        parse_seeds(text)
    assert str(err.value) == _message(text, why)
    with pytest.raises(ValueError, match=re.escape(f"({why})")):
        seed_noise(text, SHAPE)  # the seed syntax means the same wherever it is given


def test_python_sequences_may_repeat_a_seed_on_purpose():
    """The conditional study samples each seed under several class labels: [0, 0, 1, 1] with labels [0, 1, 0, 1]."""
    assert parse_seeds([0, 0, 1, 1]) == [0, 0, 1, 1]
    assert parse_seeds(torch.tensor([3, 3])) == [3, 3]
    assert parse_seeds("0,0,1", unique=False) == [0, 0, 1]
    z = seed_noise([0, 0, 1], SHAPE)
    assert torch.equal(z[0], z[1]) and torch.equal(z[0], _cpu_draw(0)) and torch.equal(z[2], _cpu_draw(1))
    with pytest.raises(ValueError, match=re.escape("(seed 4 is given more than once)")):
        parse_seeds([4, 1, 4], unique=True)

    def shrink(x, sigma, labels=None):  # a denoiser whose output depends on the label
        return 0.5 * x / (1 + sigma) + 0.1 * labels.view(-1, 1, 1, 1).to(x.dtype)

    x = sample(shrink, EDMKernel(), [0, 0, 1, 1], SHAPE, steps=3, labels=[0, 1, 0, 1])
    alone = sample(shrink, EDMKernel(), [0], SHAPE, steps=3, labels=[1])
    assert torch.equal(x[1], alone[0]) and not torch.equal(x[0], x[1])
