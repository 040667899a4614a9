"""Progressive distillation (Salimans & Ho 2022): nested Karras grids, the halving list, the Alg. 2 target, one
4 -> 2 stage from a tiny teacher checkpoint, the written student and ``evaluate.py`` sampling it at its own steps."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from torch import Tensor

from lightning_repro.data import SubsetDataModule
from lightning_repro.data.sources import float_to_uint8
from lightning_repro.kernels import EDMKernel, VPKernel, karras_sigmas
from lightning_repro.module import DDPMpp, ProgressiveDistillation, load_denoiser, module_from_checkpoint
from lightning_repro.progressive import (
    check_halving,
    ddim_step,
    distillation_target,
    distillation_weight,
    grid_kernel_kwargs,
    progressive_sigmas,
)
from lightning_repro.sampling import seed_noise
from lightning_repro.sampling.solvers import sample_euler
from lightning_repro.theory import EmpiricalOptimalDenoiser

pytestmark = pytest.mark.usefixtures("one_thread_module")

NET = dict(model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0.0)


def _trainer(steps: int, root: Path) -> L.Trainer:
    return L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                     default_root_dir=str(root), accelerator="cpu", devices=1)


def _errors(student, teacher, x0: Tensor, m: ProgressiveDistillation) -> float:
    """Mean squared distance, on the training batch ``x0`` at both student steps (fixed noise), between one
    student DDIM step and the teacher's two DDIM steps."""
    s2, s4, g, out = m.sigmas(2), m.sigmas(4), torch.Generator().manual_seed(123), []
    with torch.no_grad():
        for i in range(2):
            full = lambda v: torch.full((len(x0),), float(v), dtype=torch.float64)  # noqa: E731
            sig, mid, nxt = full(s2[i]), full(s4[2 * i + 1]), full(s2[i + 1])
            z = x0 + sig.view(-1, 1, 1, 1).float() * torch.randn(x0.shape, generator=g)
            two = ddim_step(teacher, ddim_step(teacher, z, sig, mid, None), mid, nxt, None)
            out.append(float((ddim_step(student, z, sig, nxt, None) - two).pow(2).mean()))
    return sum(out) / len(out)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A tiny DDPMpp teacher (30 steps on 8 digits), then one stage 4 -> 2 of 60 steps initialised from it."""
    root = tmp_path_factory.mktemp("progressive")
    dm = SubsetDataModule(source="digits", size=8, batch_size=8, val_seeds=0)
    teacher = DDPMpp(**NET, image_shape=(1, 8, 8), lr=5e-3, ema_halflife_kimg=0)
    trainer = _trainer(30, root / "teacher")
    trainer.fit(teacher, datamodule=dm)
    trainer.save_checkpoint(root / "teacher.ckpt")
    m = ProgressiveDistillation(teacher=str(root / "teacher.ckpt"), student_kwargs=NET, steps=[2], steps_per_stage=60,
                                image_shape=(1, 8, 8), lr=3e-3, ema_halflife_kimg=0, stage_lr_decay="constant",
                                students_dir=str(root / "students"))
    den, _ = load_denoiser(root / "teacher.ckpt")
    x0 = dm.images[:8]
    before = _errors(den, den, x0, m)  # the first student is the teacher: its error is the teacher's own 1 step
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        _trainer(60, root / "student").fit(m, datamodule=dm)
    return SimpleNamespace(root=root, m=m, teacher=den, x0=x0, before=before, after=_errors(m.ema, den, x0, m),
                           printed=printed.getvalue(), student=root / "students" / "student_0002steps.ckpt")


def test_the_k_step_grid_is_exactly_the_even_points_of_the_2k_grid():
    for kernel in (EDMKernel(), VPKernel()):
        lo, hi = kernel.sigma_min, kernel.sigma_max
        for k in (1, 2, 4, 8, 64, 4096):
            fine, coarse = progressive_sigmas(2 * k, lo, hi), progressive_sigmas(k, lo, hi)
            assert torch.equal(coarse, fine[::2]) and coarse[-1] == 0 and len(coarse) == k + 1
            assert abs(float(coarse[0]) - hi) <= 1e-13 * hi  # (sigma_max^(1/rho))^rho, as karras_sigmas
            assert bool((coarse[:-1] > lo).all()) and bool((coarse[1:] < coarse[:-1]).all())
            if k > 1:  # the Karras grid of k steps down to its smallest level is the same grid (to round-off)
                torch.testing.assert_close(karras_sigmas(k, float(coarse[-2]), hi), coarse, rtol=1e-12, atol=0)
    assert torch.equal(progressive_sigmas(1, 0.002, 80.0), karras_sigmas(1, 0.002, 80.0))


def test_a_step_list_that_does_not_halve_is_one_sentence():
    msg = "steps must halve from each stage to the next (e.g. [64, 32, 16]); got [64, 16], where 16 is not 64 / 2."
    with pytest.raises(ValueError) as err:
        check_halving([64, 16])
    assert str(err.value) == msg
    with pytest.raises(ValueError) as err:
        ProgressiveDistillation(steps=[64, 16], image_shape=(1, 8, 8), student_kwargs=NET)
    assert str(err.value) == msg
    with pytest.raises(ValueError, match=r"^save_steps \[3\] names \[3\], which is not a stage of steps \[4, 2\]\.$"):
        check_halving([4, 2], [3])
    assert check_halving([8, 4, 2, 1], [8, 1]) == ([8, 4, 2, 1], [8, 1])


def test_the_target_is_where_one_ddim_step_lands_on_the_teachers_two():
    """Alg. 2 in the EDM variable: one DDIM step with ``D = x~`` reaches the teacher's two-step point exactly."""
    dm = SubsetDataModule(source="digits", size=8, batch_size=8, val_seeds=0)
    teacher = EmpiricalOptimalDenoiser(dm.images)
    z = dm.images[:4] + 3.0 * torch.randn(4, 1, 8, 8)
    sig, mid = torch.tensor([3.0, 3.0, 3.0, 3.0], dtype=torch.float64), torch.tensor([1.0, 1.5, 2.0, 0.5]).double()
    for nxt in (torch.full((4,), 0.2, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)):
        x_tilde = distillation_target(teacher, z, sig, mid, nxt)
        two = ddim_step(teacher, ddim_step(teacher, z, sig, mid, None), mid, nxt, None)
        one = ddim_step(lambda x, s, y, d=x_tilde: d, z, sig, nxt, None)  # a denoiser that returns x~
        torch.testing.assert_close(one, two, rtol=0, atol=1e-5)
    torch.testing.assert_close(x_tilde, two)  # into sigma = 0 the target is the teacher's end point itself
    s = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    assert distillation_weight(s).tolist() == [4.0, 1.0, 1.0]  # max(SNR, 1)
    assert distillation_weight(s, "snr_plus_one").tolist() == [5.0, 2.0, 1.25]


def test_the_student_matches_its_teachers_two_steps_after_its_stage(distilled):
    """After the 4 -> 2 stage the student's one DDIM step lands within 0.005 (mean squared, images in [-1, 1]) of
    the teacher's two on the training batch, and at most 0.4 of where the teacher's own single step lands."""
    d = distilled
    assert "starts from the teacher's weights" in d.printed and "wrote the 2-step student" in d.printed
    assert d.after <= 0.005 and d.after <= 0.4 * d.before, (d.before, d.after)


def test_the_student_checkpoint_records_its_ddim_sampler_and_grid(distilled):
    d = distilled
    rebuilt = module_from_checkpoint(d.student)
    meta = rebuilt.checkpoint_meta
    assert type(rebuilt) is DDPMpp and meta["arch"] == "ddpmpp" and meta["kernel"] == "edm"
    assert meta["sampling"] == {"sampler": "ddim", "steps": 2, "grid": "native"}
    assert (rebuilt.hparams.val_sampler, rebuilt.hparams.val_steps) == ("ddim", 2)
    assert meta["distillation"]["teacher_steps"] == 4 and meta["distillation"]["sigmas"] == d.m.sigmas(2).tolist()
    torch.testing.assert_close(rebuilt.kernel.sigmas(2), d.m.sigmas(2), rtol=1e-12, atol=0)  # its own native grid
    x, s = torch.randn(3, 1, 8, 8), torch.tensor([80.0, 2.5, 0.1])
    with torch.no_grad():
        assert torch.equal(rebuilt.ema(x, s), d.m.ema(x, s))


def test_evaluate_samples_a_student_at_its_own_steps_unless_told_otherwise(distilled, tmp_path):
    from lightning_repro.evaluation.cli import main
    from lightning_repro.evaluation.shards import load_samples

    main(["sample", str(distilled.student), "--seeds", "0-3", "--out", str(tmp_path / "own"), "--no-progress"])
    own = load_samples(tmp_path / "own")
    assert (own.provenance["sampler"], own.provenance["steps"], own.provenance["grid"]) == ("ddim", 2, "native")
    z = seed_noise(list(range(4)), (1, 8, 8))
    with torch.no_grad():
        want = sample_euler(distilled.m.ema, distilled.m.kernel.sigma_max * z, distilled.m.sigmas(2)).clamp(-1, 1)
    assert np.abs(own.images.astype(int) - float_to_uint8(want).astype(int)).max() <= 1  # uint8 rounding
    main(["sample", str(distilled.student), "--seeds", "0-3", "--steps", "3", "--out", str(tmp_path / "told"),
          "--no-progress"])
    told = load_samples(tmp_path / "told").provenance
    assert (told["sampler"], told["steps"]) == ("heun", 3)  # a flag given: the command line's sampling throughout
    res = main(["--pair", str(distilled.student), str(distilled.root / "teacher.ckpt"), "--seeds", "0-3", "--out",
                str(tmp_path / "pair"), "--no-wandb", "--no-progress"])
    assert res["model_a"]["sampling"] == {"sampler": "ddim", "steps": 2, "grid": "native"}
    assert sorted(p.name.rsplit("_", 1)[-1] for p in (tmp_path / "pair" / "samples").iterdir()) == ["ddim2", "heun18"]


def test_two_stages_hand_the_first_student_to_the_second_as_teacher(tmp_path):
    dm = SubsetDataModule(source="digits", size=8, batch_size=8, val_seeds=0)
    m = ProgressiveDistillation(teacher="optimal:", student_kwargs=NET, steps=[2, 1], steps_per_stage=2,
                                image_shape=(1, 8, 8), students_dir=str(tmp_path))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        _trainer(4, tmp_path).fit(m, datamodule=dm)
    assert "starts from scratch (the teacher optimal: is not a lightning_repro checkpoint)" in printed.getvalue()
    first = torch.load(tmp_path / "student_0002steps.ckpt", weights_only=True)["state_dict"]
    teacher = m._teacher.state_dict()
    assert m.stages_done == 2 and (tmp_path / "student_0001steps.ckpt").is_file()
    assert all(torch.equal(teacher[k], first[f"ema.{k}"]) for k in teacher)  # stage 2's teacher: the 2-step student


def test_run_length_and_teacher_initialisation_sentences(tmp_path):
    m = ProgressiveDistillation(teacher="optimal:", student_kwargs=NET, steps=[2], steps_per_stage=60,
                                image_shape=(1, 8, 8), init_from_teacher=True)
    with pytest.raises(ValueError) as err:
        _trainer(5, tmp_path).fit(m, datamodule=SubsetDataModule(source="digits", size=8, batch_size=8, val_seeds=0))
    assert str(err.value) == ("ProgressiveDistillation trains 1 stage(s) of steps_per_stage 60 steps: set "
                              "trainer.max_steps to 60 (got 5).")
    m.teacher_provenance = {"kind": "optimal"}
    with pytest.raises(ValueError, match=r"^init_from_teacher: the first student cannot start from the teacher: the "
                                         r"teacher optimal: is not a lightning_repro checkpoint\.$"):
        m._init_from_teacher()
    with pytest.raises(ValueError, match=r"^progressive distillation samples students on a Karras grid, whose range a "
                                         r"'vp_discrete' kernel cannot record; use the edm, ve, vp or subvp kernel\.$"):
        grid_kernel_kwargs(VPKernel(discrete=True), 0.1)
    vp = VPKernel()
    shifted = VPKernel(**grid_kernel_kwargs(vp, 0.05))
    assert abs(shifted.sigma_min - 0.05) < 1e-12 and shifted.sigma_max == vp.sigma_max
