"""The learning-rate schedule of ``DiffusionModule``: linear warm-up, then constant (EDM) or a half cosine to 0."""

import math

import pytest

from lightning_repro.module import DiT


class _Trainer:
    max_steps = 110


def _module(decay):
    m = DiT(patch_size=8, hidden_size=16, depth=1, num_heads=2, warmup_steps=10, lr_decay=decay)
    m._trainer = _Trainer()
    return m


def test_cosine_decay_follows_the_closed_form_after_the_warm_up():
    m = _module("cosine")
    assert m.lr_factor(0) == pytest.approx(0.1 * 1.0)  # warm-up step 1 of 10, cosine not started
    assert m.lr_factor(9) == pytest.approx(1.0)
    assert m.lr_factor(60) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert m.lr_factor(110) == pytest.approx(0.0)


def test_constant_is_the_default_and_unknown_names_are_refused():
    assert [_module("constant").lr_factor(s) for s in (4, 9, 100)] == pytest.approx([0.5, 1.0, 1.0])
    with pytest.raises(ValueError, match="lr_decay must be 'constant' or 'cosine', got 'linear'"):
        _module("linear")


def test_without_a_trainer_the_run_length_is_passed_or_only_the_warm_up_applies():
    m = DiT(patch_size=8, hidden_size=16, depth=1, num_heads=2, warmup_steps=10, lr_decay="cosine")
    assert m.lr_factor(60) == pytest.approx(1.0)  # no Trainer, no total_steps: warm-up only
    assert m.lr_factor(60, total_steps=110) == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"needs trainer.max_steps > warmup_steps \(10\), got 10"):
        m.lr_factor(5, total_steps=10)
