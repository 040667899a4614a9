"""Progressive distillation (Salimans & Ho, ICLR 2022, Algorithm 2) of any teacher into few-step DDIM students.

A student takes one DDIM step where its teacher takes two.  In the EDM variable DDIM is Euler on a sigma grid,
``x' = D(x, s) + (s' / s) (x - D(x, s))`` (``sampling.solvers.sample_euler``), so for a training image ``x0``,
a student grid point ``s_i`` and noise ``n``, with ``z = x0 + s_i n``:

* the teacher goes ``z -> z' -> z''`` by two DDIM steps ``s_i -> s'_i -> s_{i+1}`` (``s'_i`` the point between
  them on the teacher's 2K-step grid),
* the target ``x~ = (z'' - (s_{i+1} / s_i) z) / (1 - s_{i+1} / s_i)`` is the denoised image from which one student
  DDIM step ``s_i -> s_{i+1}`` lands on ``z''`` (the paper's ``x~``, divided by ``alpha``: the EDM variable),
* the loss is ``w(s_i) || D_student(z, s_i) - x~ ||^2`` with ``w = max(SNR, 1)`` ("truncated SNR", the paper's
  choice) or ``SNR + 1`` (the v-prediction loss), ``SNR = 1 / s^2``; ``i`` is uniform on the K student steps.

Grids: K steps sample Karras et al.'s rho-schedule between the kernel's ``sigma_max`` and ``sigma_min`` at
``u_i = i / K`` (``i = 0 .. K-1``), then 0 (``progressive_sigmas``): the K grid is *exactly* the even points of the
2K grid.  (Karras's own K-point grid puts ``sigma_min`` at ``i = K - 1`` and does not nest.)  It is the Karras grid
of K steps down to ``sigma_min_K = sigma(u = (K-1)/K)``, so a student checkpoint records its kernel with that
``sigma_min``, its sampler (``sampling: {sampler: ddim, steps: K, grid: karras}``) and ``evaluate.py`` given no
``--sampler/--steps/--grid`` samples it on exactly the grid it was trained for.

``ProgressiveDistillation`` repeats the halving over ``steps`` (e.g. 64, 32, ..., 1: the first student distils the
teacher's 128-step DDIM), ``steps_per_stage`` optimiser steps each; each stage's student (its EMA) becomes the next
stage's frozen teacher and the next student's initialisation (optimiser state reset, learning rate annealed within
each stage).  The first student starts from the teacher's weights when the teacher is a suite checkpoint of the
student's architecture (else from scratch; the run says which).  Students at ``save_steps`` are written as ordinary
checkpoints of the student preset (``DDPMpp``, ...), loadable by ``load_denoiser`` and ``evaluate.py``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoints import CKPT_KEY, load_checkpoint
from .diffusion_module import DiffusionModule
from .files import atomic_write
from .kernels import EDMKernel, Kernel, SubVPKernel, VEKernel, VPKernel, append_zero, get_kernel

__all__ = ["ProgressiveDistillation", "progressive_sigmas", "check_halving", "distillation_target",
           "distillation_weight", "WEIGHTINGS", "grid_kernel_kwargs"]

#: loss weights ``w(sigma)`` of the x-space error (Salimans & Ho 2022, Sec. 4), SNR = 1 / sigma^2
WEIGHTINGS = ("truncated_snr", "snr_plus_one")


def progressive_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """``steps`` noise levels ``(a + (i / steps) (b - a))^rho``, ``a = sigma_max^(1/rho)``, ``b = sigma_min^(1/rho)``,
    ``i = 0 .. steps-1``, then 0 (float64).  ``progressive_sigmas(K)`` equals ``progressive_sigmas(2K)[::2]`` exactly."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}.")
    u = torch.arange(steps, dtype=torch.float64) / steps  # i / K: (2i) / (2K) rounds to the same float
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return append_zero((a + u * (b - a)) ** rho)


def check_halving(steps, save_steps=None) -> tuple[list[int], list[int]]:
    """The stage step counts (each half the one before) and the saved ones, or one sentence on what is wrong."""
    if isinstance(steps, (str, bytes)):
        steps = [steps]
    try:
        counts = [int(k) for k in steps]
    except (TypeError, ValueError):
        raise ValueError(f"steps must be a list of step counts (e.g. [64, 32, 16]), got {steps!r}.") from None
    if not counts or any(k < 1 or k != v for k, v in zip(counts, steps)):
        raise ValueError(f"steps must be a non-empty list of positive integers (e.g. [64, 32, 16]), got {steps!r}.")
    for prev, k in zip(counts, counts[1:]):
        if 2 * k != prev:
            raise ValueError(f"steps must halve from each stage to the next (e.g. [64, 32, 16]); got {counts}, "
                             f"where {k} is not {prev} / 2.")
    saved = counts if save_steps is None else [int(k) for k in save_steps]
    missing = [k for k in saved if k not in counts]
    if missing:
        raise ValueError(f"save_steps {saved} names {missing}, which is not a stage of steps {counts}.")
    return counts, saved


def ddim_step(denoiser, x: Tensor, sigma: Tensor, sigma_next: Tensor, labels: Tensor | None) -> Tensor:
    """One DDIM (= Euler) step of each sample from ``sigma`` (B,) to ``sigma_next`` (B,): ``D + (s'/s) (x - D)``."""
    d = denoiser(x, sigma, labels)
    ratio = (sigma_next / sigma).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return torch.lerp(d.to(x.dtype), x, ratio)


def distillation_target(teacher, z: Tensor, sigma: Tensor, sigma_mid: Tensor, sigma_next: Tensor,
                        labels: Tensor | None = None) -> Tensor:
    """Salimans & Ho 2022, Alg. 2: two teacher DDIM steps ``sigma -> sigma_mid -> sigma_next`` from ``z``, and the
    ``x~`` from which one DDIM step ``sigma -> sigma_next`` reaches the same point."""
    z2 = ddim_step(teacher, ddim_step(teacher, z, sigma, sigma_mid, labels), sigma_mid, sigma_next, labels)
    ratio = (sigma_next / sigma).to(z.dtype).view(-1, *([1] * (z.ndim - 1)))
    return (z2 - ratio * z) / (1 - ratio)


def distillation_weight(sigma: Tensor, weighting: str = "truncated_snr") -> Tensor:
    """``max(SNR, 1)`` (``truncated_snr``) or ``SNR + 1`` (``snr_plus_one``) with ``SNR = 1 / sigma^2``."""
    snr = 1.0 / sigma.double() ** 2
    if weighting == "truncated_snr":
        return snr.clamp(min=1.0)
    if weighting == "snr_plus_one":
        return snr + 1.0
    raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}.")


def grid_kernel_kwargs(kernel: Kernel, sigma_min: float) -> dict[str, float]:
    """The kernel constants that make ``kernel.sigma_min == sigma_min`` (the rest of the kernel unchanged: the
    preconditionings do not read its range), so its Karras grid of K steps is a student's progressive grid."""
    if isinstance(kernel, (EDMKernel, VEKernel)):
        return {"sigma_min": float(sigma_min)}
    if isinstance(kernel, (VPKernel, SubVPKernel)) and not getattr(kernel, "discrete", False):
        return {"epsilon_t": float(kernel.t_of_sigma(torch.tensor(sigma_min, dtype=torch.float64)))}
    name = "vp_discrete" if getattr(kernel, "discrete", False) else kernel.name
    raise ValueError(f"progressive distillation samples students on a Karras grid, whose range a {name!r} "
                     "kernel cannot record; use the edm, ve, vp or subvp kernel.")


def _student_class(name: str) -> type[DiffusionModule]:
    from .presets import ARCHS

    cls = ARCHS.get(str(name).lower())
    if cls is None or cls is ProgressiveDistillation:
        valid = ", ".join(k for k, c in ARCHS.items() if c is not ProgressiveDistillation)
        raise ValueError(f"student {name!r} is not an architecture preset; valid students are: {valid}.")
    return cls


class ProgressiveDistillation(DiffusionModule):
    """Progressive distillation of ``teacher`` into DDIM students of ``steps`` steps (module docstring).

    Args (besides ``DiffusionModule``'s, which configure the student's kernel, preconditioning and training):
        teacher: any model spec (``path.ckpt``, ``optimal:``, ``edm:FILE``, ``diffusers:...``; ``teachers.load_teacher``).
        student: the student's architecture (an ``ARCHS`` name) and ``student_kwargs`` its network settings.
        steps: the students' step counts, each half the previous; the first student distils ``2 * steps[0]``
            teacher steps.  ``steps_per_stage``: optimiser steps per halving (``trainer.max_steps`` = their total).
        save_steps: the students written to ``students_dir`` (default ``<default_root_dir>/students``; all stages).
        weighting: ``truncated_snr`` (max(SNR, 1)) or ``snr_plus_one``.
        init_from_teacher: None: the teacher's weights when it is a compatible suite checkpoint, else scratch;
            True: required (one sentence otherwise); False: from scratch.  An ``init_from`` checkpoint wins.
        stage_lr_decay: ``linear`` (to 0 within each stage, as Salimans & Ho) or ``constant``.
    """

    arch = "progressive"
    public_path = "lightning_repro.module.ProgressiveDistillation"

    def __init__(self, teacher: str = "optimal:", student: str = "ddpmpp", student_kwargs: dict | None = None,
                 steps: list[int] = (64, 32, 16, 8, 4, 2, 1), steps_per_stage: int = 1000,
                 save_steps: list[int] | None = None, weighting: str = "truncated_snr",
                 init_from_teacher: bool | None = None, stage_lr_decay: str = "linear",
                 students_dir: str | None = None, kernel: str = "edm", **kwargs):
        self.stage_steps, self.saved_steps = check_halving(steps, save_steps)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}.")
        if stage_lr_decay not in ("linear", "constant"):
            raise ValueError(f"stage_lr_decay must be 'linear' or 'constant', got {stage_lr_decay!r}.")
        if isinstance(steps_per_stage, bool) or int(steps_per_stage) < 1:
            raise ValueError(f"steps_per_stage must be a positive integer, got {steps_per_stage!r}.")
        if kwargs.get("lr_decay", "constant") != "constant":
            raise ValueError("ProgressiveDistillation anneals the learning rate within each stage (stage_lr_decay); "
                             "leave lr_decay at 'constant'.")
        self.student_cls = _student_class(student)
        super().__init__(kernel=kernel, **kwargs)
        grid_kernel_kwargs(self.kernel, self.kernel.sigma_min)  # one sentence now for a kernel that cannot record
        self.__dict__["_teacher"] = None  # the frozen teacher of the current stage (kept out of the module tree)
        self.teacher_provenance: dict[str, Any] = {}
        self.stages_done = 0  # stages whose student is final (the current stage's index)
        self._resume: dict[str, Any] | None = None
        self._grids: dict[tuple[int, str], Tensor] = {}

    # -- the student network and its preset ----------------------------------------------------------------
    def student_hparams(self) -> dict[str, Any]:
        """The student preset's constructor arguments (its kernel, preconditioning, data shape, network)."""
        return dict(kernel=self.hparams.kernel, kernel_kwargs=dict(self.hparams.kernel_kwargs or {}),
                    precond=self.precond_name, image_shape=list(self.image_shape), num_classes=self.num_classes,
                    **dict(self.hparams.student_kwargs or {}))

    def build_net(self) -> nn.Module:
        preset = self.student_cls(**self.student_hparams())  # a throwaway preset: its network and settings
        self._net_cfg = dict(getattr(preset, "_net_cfg", {}))  # what check_compatible compares with a teacher
        return preset.model.net

    def same_network(self, arch: Any, class_name: str) -> bool:
        """This procedure's own checkpoints (resuming), or a checkpoint of the student's preset (the teacher)."""
        cls = self.student_cls
        if (arch, class_name) in ((self.arch, type(self).__qualname__), (cls.arch, cls.__qualname__)):
            return True
        return cls.arch in cls.network_aliases and cls.network_aliases.get(arch) == class_name

    def check_compatible(self, meta: dict[str, Any], path: str, what: str = "init_from") -> None:
        """``FineTuning.check_compatible`` against the student's network; a checkpoint of this procedure (resuming)
        must also distil into the same student preset."""
        if meta.get("arch") == self.arch:
            hp = meta.get("hparams") or {}
            if str(hp.get("student")).lower() != str(self.hparams.student).lower():
                raise ValueError(f"{what} {path} distils into a {hp.get('student')!r} student, but this run's student "
                                 f"is {self.hparams.student!r}; resuming needs the same student.")
            meta = {**meta, "hparams": {**hp, **(meta.get("student_net") or {})}}
        super().check_compatible(meta, path, what)

    def run_config(self, dm=None) -> dict[str, Any]:
        return {**super().run_config(dm), "student_net": dict(self._net_cfg)}  # what resuming compares

    # -- grids -----------------------------------------------------------------------------------------------
    def sigmas(self, steps: int, device=None) -> Tensor:
        """The progressive grid of ``steps`` steps on this kernel's range (float64; rho: the EDM kernel's, else 7,
        the rho of ``grids.get_sigmas("karras")``)."""
        key = (int(steps), str(device))
        if key not in self._grids:
            k = self.kernel
            self._grids[key] = progressive_sigmas(int(steps), k.sigma_min, k.sigma_max, self.rho).to(device)
        return self._grids[key]

    @property
    def rho(self) -> float:
        return float(self.kernel.rho) if isinstance(self.kernel, EDMKernel) else 7.0

    @property
    def student_steps(self) -> int:
        """The step count of the current stage's student."""
        return self.stage_steps[min(self.stages_done, len(self.stage_steps) - 1)]

    def sample(self, seeds, labels=None, sampler: str | None = None, steps: int | None = None, **kw) -> Tensor:
        """DDIM on the progressive grid (default: the current student's step count); other samplers as usual."""
        if (sampler or "ddim") not in ("ddim", "euler") or "grid" in kw:
            return super().sample(seeds, labels, sampler, steps, **kw)
        grid = self.sigmas(int(steps or self.student_steps))
        low = float(grid[-2]) if len(grid) > 2 else None  # the Karras grid down to sigma_min_K is the progressive one
        return super().sample(seeds, labels, "ddim", len(grid) - 1, grid="karras", sigma_min=low, rho=self.rho, **kw)

    # -- training ----------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        x0, labels = batch
        labels = labels if self.num_classes else None
        K = self.student_steps
        student, teacher = self.sigmas(K, x0.device), self.sigmas(2 * K, x0.device)
        rank, world = self.rank_and_world()
        b, g = x0.shape[0], self.step_generator(self.global_step, x0.device)
        rows = slice(rank * b, (rank + 1) * b)  # draws made for the global batch: DDP follows one process
        i = torch.randint(0, K, (b * world,), generator=g, device=x0.device)[rows]
        noise = torch.randn((b * world, *x0.shape[1:]), generator=g, device=x0.device, dtype=x0.dtype)[rows]
        if self.hparams.label_dropout > 0 and labels is not None:
            drop = torch.rand(b * world, generator=g, device=x0.device)[rows] < self.hparams.label_dropout
            labels = torch.where(drop, torch.full_like(labels, -1), labels)
        sigma, sigma_mid, sigma_next = student[i], teacher[2 * i + 1], student[i + 1]
        z = x0 + sigma.view(-1, 1, 1, 1).to(x0.dtype) * noise
        with torch.no_grad():
            target = distillation_target(self._teacher, z, sigma, sigma_mid, sigma_next, labels)
        with self.seeded_rng(self.dropout_seed(self.global_step, rank), x0.device):
            D = self.denoise(z, sigma, labels)
        w = distillation_weight(sigma, self.hparams.weighting).float().view(-1, 1, 1, 1)
        loss = (w * (D.float() - target.float()) ** 2).mean()
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/student_steps", float(K))
        return loss

    def lr_factor(self, step: int) -> float:
        """Warm-up and ``stage_lr_decay`` within each stage (Salimans & Ho: linear to 0 over every halving)."""
        per = int(self.hparams.steps_per_stage)
        local, warm = step % per, int(self.hparams.warmup_steps)
        factor = min(1.0, (local + 1) / warm) if warm > 0 else 1.0
        return factor * (1.0 - local / per if self.hparams.stage_lr_decay == "linear" else 1.0)

    # -- stages --------------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()  # init_from, if given
        total = len(self.stage_steps) * int(self.hparams.steps_per_stage)
        if int(self.trainer.max_steps) != total:
            raise ValueError(f"ProgressiveDistillation trains {len(self.stage_steps)} stage(s) of steps_per_stage "
                             f"{self.hparams.steps_per_stage} steps: set trainer.max_steps to {total} "
                             f"(got {self.trainer.max_steps}).")
        resume = self._resume or {}  # --ckpt_path: the stage, its teacher and the first teacher's provenance
        self.stages_done = int(resume.get("stages_done", 0))
        if resume.get("teacher") is not None:
            self._set_teacher(resume["teacher"])
            self.teacher_provenance = dict(resume.get("teacher_provenance") or {})
        else:
            self._load_teacher()
        if self._resume is None and not self.hparams.get("init_from"):  # init_from, if given, wins
            self._init_from_teacher()

    def _load_teacher(self) -> None:
        from .teachers import load_teacher

        t = load_teacher(self.hparams.teacher, self.image_shape, self.num_classes, data=self.data_kwargs(),
                         device=self.device)
        self.__dict__["_teacher"] = t.denoiser
        self.teacher_provenance = dict(t.provenance)

    def _init_from_teacher(self) -> None:
        """The first student starts as the teacher when the teacher is a compatible suite checkpoint."""
        want, path = self.hparams.init_from_teacher, self.teacher_provenance.get("path")
        reason = None
        if want is False:
            reason = "init_from_teacher is false"
        elif self.teacher_provenance.get("kind") != "checkpoint" or not path:
            reason = f"the teacher {self.hparams.teacher} is not a lightning_repro checkpoint"
        else:
            try:
                self.check_compatible(load_checkpoint(path)[CKPT_KEY], str(path))
            except ValueError as err:
                reason = str(err).rstrip(".")
        if reason is not None and want:
            raise ValueError(f"init_from_teacher: the first student cannot start from the teacher: {reason}.")
        if reason is None:
            self.load_init_weights(path)
        if self._trainer is None or self.trainer.is_global_zero:
            how = f"from the teacher's weights ({path})" if reason is None else f"from scratch ({reason})"
            print(f"progressive distillation: the first student ({self.stage_steps[0]} steps, teacher "
                  f"{2 * self.stage_steps[0]} DDIM steps) starts {how}.", flush=True)

    def _set_teacher(self, state: dict[str, Tensor] | None = None) -> None:
        """The frozen teacher of a stage after the first: the student (EMA) of the stage before."""
        teacher = copy.deepcopy(self.ema)
        if state is not None:
            teacher.load_state_dict(state)
        self.__dict__["_teacher"] = teacher.requires_grad_(False).eval()

    def on_train_batch_start(self, batch, batch_idx):
        self._advance_to(self.global_step // int(self.hparams.steps_per_stage))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.global_step >= len(self.stage_steps) * int(self.hparams.steps_per_stage):
            self._advance_to(len(self.stage_steps))  # the last stage ends with the last step

    def _advance_to(self, stage: int) -> None:
        """Finish stages until ``stage`` is the current one: write their students, hand each to the next stage
        as teacher and initialisation, and reset the optimiser state."""
        while self.stages_done < min(stage, len(self.stage_steps)):
            steps = self.stage_steps[self.stages_done]
            if steps in self.saved_steps and self.trainer.is_global_zero:
                self.write_student(self.students_path(steps), steps)
            self.stages_done += 1
            if self.stages_done < len(self.stage_steps):
                self._set_teacher()
                with torch.no_grad():
                    self.model.load_state_dict(self.ema.state_dict())  # the student starts as its teacher
                for opt in self.trainer.optimizers:
                    opt.state.clear()

    # -- the students' checkpoints -----------------------------------------------------------------------------
    def students_path(self, steps: int) -> Path:
        folder = self.hparams.students_dir or os.path.join(self.trainer.default_root_dir, "students")
        return Path(folder) / f"student_{steps:04d}steps.ckpt"

    def student_checkpoint(self, steps: int) -> dict[str, Any]:
        """A checkpoint of the student preset holding the current student, recording its DDIM sampler and grid."""
        cls, grid = self.student_cls, self.sigmas(steps)
        kw = dict(self.hparams.kernel_kwargs or {})
        if steps > 1:  # its Karras grid of ``steps`` steps is then the progressive grid (grid_kernel_kwargs)
            kw.update(grid_kernel_kwargs(self.kernel, float(grid[-2])))
        hparams = {**self.student_hparams(), "kernel_kwargs": kw, "val_sampler": "ddim", "val_steps": steps,
                   "seed": int(self.hparams.seed)}
        state = {f"{part}.{k}": v.detach().cpu().clone() for part in ("model", "ema")
                 for k, v in getattr(self, part).state_dict().items()}
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        grid_name = "native" if isinstance(self.kernel, EDMKernel) else "karras"  # EDM's native grid is Karras's
        meta = {"class_path": cls.class_path(), "hparams": hparams, "kernel": get_kernel(hparams["kernel"], **kw).config(),
                **self.run_config(dm), "arch": cls.arch,
                "sampling": {"sampler": "ddim", "steps": steps, "grid": grid_name},
                "distillation": {"method": "progressive", "teacher": self.hparams.teacher,
                                 "teacher_provenance": self.teacher_provenance, "teacher_steps": 2 * steps,
                                 "first_teacher_steps": 2 * self.stage_steps[0], "global_step": self.global_step,
                                 "sigmas": [float(s) for s in grid]}}
        for key in ("trainable", "student_net"):
            meta.pop(key, None)
        return {"state_dict": state, CKPT_KEY: meta, "global_step": self.global_step}

    def write_student(self, path: str | os.PathLike, steps: int) -> Path:
        ckpt = self.student_checkpoint(steps)
        atomic_write(path, lambda tmp: torch.save(ckpt, tmp))
        print(f"progressive distillation: wrote the {steps}-step student -> {path}", flush=True)
        return Path(path)

    # -- resuming ------------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        teacher = self._teacher if self.stages_done > 0 else None
        checkpoint["progressive"] = {"stages_done": self.stages_done, "teacher_provenance": self.teacher_provenance,
                                     "teacher": None if teacher is None else {
                                         k: v.detach().cpu() for k, v in teacher.state_dict().items()}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._resume = checkpoint.get("progressive")
