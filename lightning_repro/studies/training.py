"""The training runs of a study: ``TrainJob`` (everything needed to rebuild and train one model in another
process), ``run_training_jobs`` (skip finished checkpoints, train the rest one at a time or in a pool of spawned
worker processes) and the helpers that turn a study's ``train`` section into ``DiffusionModule`` keywords.

The pool dies with its parent: a SIGTERM to the study terminates the workers before it exits, and a worker that
finds its parent gone (SIGKILL, a crash) exits by itself, so a killed study never leaves trainings running.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..files import atomic_write
from .outputs import atomic_bytes, log
from .protocol import positive_int

__all__ = ["TrainJob", "study_job", "module_kwargs_from", "arch_class", "build_module", "set_threads",
           "run_training_jobs", "load_trained", "PARENT_POLL_SECONDS"]

#: how often a pool worker checks that the study that started it is still alive
PARENT_POLL_SECONDS = 0.2


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads`` when ``threads`` is a positive int (1 is fastest on a shared 2-core CPU)."""
    if threads is not None:
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer or null, got {threads!r}.")
        import torch

        torch.set_num_threads(threads)


def module_kwargs_from(kernel: str, train: Mapping[str, Any], **over: Any) -> dict[str, Any]:
    """``DiffusionModule`` keywords from a study's ``train`` section (kernel constants, AdamW lr and warm-up, EDM
    EMA, seed, ``lr_decay`` unless ``constant``), plus ``over`` (e.g. ``seed=...``, ``num_classes=...``; ``None`` values are left out)."""
    kw = dict(kernel=kernel, kernel_kwargs=train.get("kernel_kwargs") or {}, lr=train["lr"],
              warmup_steps=train["warmup_steps"], ema_halflife_kimg=train["ema_halflife_kimg"],
              ema_rampup_ratio=train["ema_rampup_ratio"], seed=train.get("seed", 0))
    if train.get("lr_decay", "constant") != "constant":  # the module's default is left out, so the checkpoint
        kw["lr_decay"] = train["lr_decay"]  # names of configs from before lr_decay existed stay the same
    kw.update({k: v for k, v in over.items() if v is not None})
    return kw


def arch_class(name: str) -> type:
    """``EDM`` / ``edm`` / ``lightning_repro.module.EDM`` (any preset of ``module.ARCHS``, a consistency model of
    ``consistency.CONSISTENCY_MODELS``, or a GAN / VAE baseline
    of ``baselines.BASELINES``: ``DCGAN``, ``VAE``) -> the class."""
    from ..baselines import BASELINES
    from ..consistency import CONSISTENCY_MODELS
    from ..module import ARCHS

    short = str(name).rsplit(".", 1)[-1]
    classes = {**ARCHS, **CONSISTENCY_MODELS, **BASELINES}
    for key, cls in classes.items():
        if short in (key, cls.__name__):
            return cls
    valid = (", ".join(sorted(c.__name__ for c in {**ARCHS, **BASELINES}.values())) + " (and the consistency models "
             + ", ".join(sorted(c.__name__ for c in CONSISTENCY_MODELS.values())) + ")")
    raise ValueError(f"unknown architecture {name!r}; valid architectures are: {valid}.")


def build_module(spec: Mapping[str, Any], image_shape: Sequence[int], **common: Any) -> Any:
    """A ``DiffusionModule`` from ``{"class_path": "EDM", "init_args": {...}}`` plus ``common`` keywords
    (kernel, lr, seed, ...; ``init_args`` win on conflicts)."""
    if not isinstance(spec, Mapping) or "class_path" not in spec:
        raise ValueError(
            f"an architecture entry must be a mapping with 'class_path' and 'init_args', got {spec!r}."
        )
    cls = arch_class(spec["class_path"])
    kwargs = {**common, **dict(spec.get("init_args") or {})}
    return cls(image_shape=tuple(int(v) for v in image_shape), **kwargs)


@dataclass
class TrainJob:
    """One training run of a study: everything needed to rebuild and train it in another process.

    ``arch`` is ``{"class_path": ..., "init_args": {...}}``, ``module_kwargs`` the common ``DiffusionModule``
    keywords (kernel, lr, ...), ``data_kwargs`` the ``SubsetDataModule`` keywords; the checkpoint goes to
    ``ckpt`` and a sidecar ``ckpt.with_suffix(".json")`` records the training time and final loss.
    """

    name: str
    arch: dict[str, Any]
    image_shape: tuple[int, ...]
    module_kwargs: dict[str, Any]
    data_kwargs: dict[str, Any]
    ckpt: str
    max_steps: int
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None
    progress_bar: bool = True
    #: ``{"group": ..., "name": ..., "config": {...}}``: log the training to a W&B run of that group (offline without
    #: credentials; under a ``wandb agent`` it becomes the sweep's run); None: no logger.
    wandb: dict[str, Any] | None = None

    @property
    def meta_path(self) -> Path:
        return Path(self.ckpt).with_suffix(".json")

    def done(self) -> bool:
        return Path(self.ckpt).is_file()

    def meta(self) -> dict[str, Any]:
        """The sidecar record (steps, train_seconds, final_loss) of a finished job; ``{}`` if there is none."""
        return json.loads(self.meta_path.read_text()) if self.meta_path.is_file() else {}

    @property
    def identity(self) -> str:
        """SHA-256 of what decides the trained model (architecture, image shape, module and data keywords, steps,
        Trainer options), not where it is written or logged: equal jobs of two studies train the same model."""
        keep = {"arch": self.arch, "image_shape": list(self.image_shape), "module_kwargs": self.module_kwargs,
                "data_kwargs": self.data_kwargs, "max_steps": self.max_steps, "trainer_kwargs": self.trainer_kwargs}
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()


def study_job(cfg: Mapping[str, Any], name: str, arch: Mapping[str, Any], image_shape: Sequence[int],
              module_kwargs: Mapping[str, Any], data_kwargs: Mapping[str, Any], ckpt: str | os.PathLike,
              train: Mapping[str, Any] | None = None, max_steps: int | None = None, **extra: Any) -> TrainJob:
    """A study's ``TrainJob``: steps and Trainer options from its ``train`` section (default ``cfg["train"]``;
    ``max_steps`` overrides), torch threads from ``cfg["threads"]``; ``extra`` (e.g. ``wandb``) as given."""
    train = cfg["train"] if train is None else train
    steps = train["max_steps"] if max_steps is None else max_steps
    return TrainJob(name, dict(arch), tuple(int(v) for v in image_shape), dict(module_kwargs), dict(data_kwargs),
                    str(ckpt), int(steps), dict(train.get("trainer") or {}), cfg.get("threads"), **extra)


def _trainer_kwargs(job: TrainJob) -> dict[str, Any]:
    kw = dict(max_steps=job.max_steps, logger=False, enable_checkpointing=False, enable_model_summary=False,
              enable_progress_bar=job.progress_bar, limit_val_batches=0, num_sanity_val_steps=0,
              default_root_dir=str(Path(job.ckpt).parent), accelerator="auto", devices=1)
    kw.update(job.trainer_kwargs or {})
    return kw


def _wandb_logger(job: TrainJob, module, dm):
    from ..cli import ReproWandbLogger

    ckdir = str(Path(job.ckpt).parent)
    os.environ.setdefault("WANDB_DIR", ckdir)
    logger = ReproWandbLogger(group=job.wandb.get("group"), name=job.wandb.get("name", job.name), save_dir=ckdir)
    logger.log_hyperparams({**module.run_config(dm), **dict(job.wandb.get("config") or {})})
    return logger


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """No "GPU available: ..." lines, tips or data-loader warnings in a study's output."""
    quiet = logging.getLogger("lightning.pytorch")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*(num_workers|does not have many workers|eval mode|LeafSpec|no `validation_step`).*"
            )
            yield
    finally:
        quiet.setLevel(level)


def _train_job(job: TrainJob) -> dict[str, Any]:
    """Train one job (in this process) and write its checkpoint atomically; returns its sidecar record."""
    import lightning as L

    from ..data import SubsetDataModule

    set_threads(job.threads)
    positive_int(job.max_steps, "train.max_steps")
    L.seed_everything(int(job.module_kwargs.get("seed", 0)), verbose=False)  # the initial weights
    module = build_module(job.arch, job.image_shape, **job.module_kwargs)
    dm = SubsetDataModule(**job.data_kwargs)
    kw = _trainer_kwargs(job)
    if job.wandb is not None:
        kw["logger"] = _wandb_logger(job, module, dm)
    t0 = time.time()
    with _quiet_lightning():
        trainer = L.Trainer(**kw)
        trainer.fit(module, datamodule=dm)
    loss = trainer.callback_metrics.get("train/loss")
    atomic_write(job.ckpt, lambda tmp: trainer.save_checkpoint(tmp, weights_only=True))
    meta = {"name": job.name, "steps": int(trainer.global_step), "train_seconds": round(time.time() - t0, 1),
            "final_loss": float(loss) if loss is not None else float("nan"), "identity": job.identity}
    atomic_bytes(job.meta_path, json.dumps(meta).encode())
    if job.wandb is not None:
        trainer.logger.experiment.summary.update(meta)
        trainer.logger.experiment.finish()
    return meta


# ---------------------------------------------------------------------------------------------- the pool
def _exit_with_parent(parent: int) -> None:
    """Watchdog of a pool worker: exit at once when the study that started it is gone (its parent changes)."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)


def _worker_init(parent: int) -> None:
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="exit-with-parent").start()


def _terminate_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through run_training_jobs, which terminates the pool


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While the pool runs, SIGTERM raises ``SystemExit`` in the parent (so ``finally`` terminates the workers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _terminate_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _train_in_pool(todo: list[TrainJob], workers: int, log: Callable[[str], None]) -> None:
    import multiprocessing as mp

    t0 = time.time()
    todo = [replace(j, progress_bar=False) for j in todo]
    with _sigterm_unwinds():
        pool = mp.get_context("spawn").Pool(min(workers, len(todo)), _worker_init, (os.getpid(),))
        try:
            for i, meta in enumerate(pool.imap_unordered(_train_job, todo), 1):
                log(f"[{i}/{len(todo)}] {meta['name']}: {meta['steps']} steps in {meta['train_seconds']:.0f}s, "
                    f"final loss {meta['final_loss']:.4f} ({time.time() - t0:.0f}s elapsed)")
            pool.close()
        finally:
            pool.terminate()  # after a failure, Ctrl-C or SIGTERM: no worker goes on training
            pool.join()


def run_training_jobs(jobs: Sequence[TrainJob], workers: int = 1, log: Callable[[str], None] = log) -> int:
    """Train every job whose checkpoint does not exist yet; returns how many were trained.

    ``workers > 1`` trains that many jobs at once in separate (spawned) processes, each with the job's
    ``threads`` (one thread per process is fastest on a small CPU: two 1-thread trainings on 2 cores beat
    one 2-thread training).  Finished checkpoints are skipped, so an interrupted study resumes.
    """
    positive_int(workers, "workers")
    for j in jobs:
        if j.done():
            log(f"  {j.name}: checkpoint exists, skipping training ({Path(j.ckpt).name})")
        elif (src := _trained_elsewhere(j)) is not None:
            _reuse(j, src)
            log(f"  {j.name}: the same training finished in another study, reusing {src}")
    todo = [j for j in jobs if not j.done()]
    if not todo:
        return 0
    log(f"training {len(todo)} model(s) ({workers} at a time) ...")
    if workers > 1 and len(todo) > 1:
        _train_in_pool(todo, workers, log)
        return len(todo)
    for i, j in enumerate(todo, 1):
        log(f"[{i}/{len(todo)}] training {j.name} ({j.max_steps} steps)")
        meta = _train_job(j)
        log(f"  {j.name}: {meta['steps']} steps in {meta['train_seconds']:.0f}s, final loss {meta['final_loss']:.4f}")
    return len(todo)


def _trained_elsewhere(job: TrainJob) -> Path | None:
    """The checkpoint of an identical job (``TrainJob.identity``) that a study beside this one finished: its
    sidecar under ``<parent of this study's folder>/*/checkpoints/``; None if there is none."""
    ckpt = Path(job.ckpt).resolve()
    if ckpt.parent.name != "checkpoints" or len(ckpt.parents) < 3:
        return None
    ident = job.identity
    for side in sorted(ckpt.parents[2].glob("*/checkpoints/*.json")):
        try:
            meta = json.loads(side.read_text())
        except (OSError, ValueError):
            continue
        other = side.with_suffix(".ckpt")
        if isinstance(meta, dict) and meta.get("identity") == ident and other.is_file() and other != ckpt:
            return other
    return None


def _reuse(job: TrainJob, src: Path) -> None:
    """Copy ``src`` and its sidecar to ``job``'s paths (the checkpoint last, atomically), naming the source."""
    meta = {**json.loads(src.with_suffix(".json").read_text()), "name": job.name, "reused_from": str(src)}
    atomic_bytes(job.meta_path, json.dumps(meta).encode())
    atomic_write(job.ckpt, lambda tmp: shutil.copyfile(src, tmp))


def load_trained(job: TrainJob) -> tuple[Any, dict[str, Any]]:
    """``(DiffusionModule in eval mode, sidecar record)`` of a finished job (for what the EMA denoiser does not
    carry, e.g. ``parameter_counts``; to sample, ``steps.trained_denoiser``)."""
    from ..module import module_from_checkpoint

    return module_from_checkpoint(job.ckpt), job.meta()
