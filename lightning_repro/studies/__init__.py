"""Studies: the experiments of Zhang et al., "The Emergence of Reproducibility and Generalizability in
Diffusion Models" (ICML 2024), each a command that writes a CSV, a PNG and a W&B run.

* ``sweep``               Fig. 2: the memorization -> generalization phase transition over N x family x width x
                          seed (local resumable runner or W&B Sweeps agents); RP between families / widths, GL.
* ``baselines``           Fig. 3 / Sec. 2.3: two GANs and two VAEs (different seeds, same latent codes) do not
                          reproduce each other; two diffusion models do.
* ``memorization``        Fig. 4: in the memorization regime trained models reproduce the optimal denoiser
                          of the empirical distribution (Prop. 1); RP(model, optimal) falls and GL rises
                          as the training set grows.
* ``mog_generalization``  Fig. 5: on low-rank mixtures of Gaussians (Eq. 2) the score error of a trained
                          model against the closed-form score (Prop. 2) falls as the training set grows.
* ``recovery``            Sec. 3.2.1, Case 2: a student trained on a teacher's samples reproduces the teacher.
* ``hyperplane``          Fig. 7: maps of the noise plane through three seeds, coloured by the nearest anchor.
* ``conditional``         Fig. 8 / App. D: per-class RP between conditional models, and unconditional vs
                          conditional samples.
* ``inverse``             Fig. 10 / App. F: inpainting with deterministic DPS, RP between models (easy / hard mask).
* ``finetune``            Fig. 11 / App. G: attention-only fine-tuning vs training from scratch.

This module holds what the studies share: YAML configs with a ``--quick`` override, one training run per
result that is skipped when its checkpoint exists (``TrainJob``, ``run_training_jobs``, optionally several
at once in separate processes), atomic CSV / figure writers, and ``log_study_to_wandb`` (one W&B run per study
result, in the experiment's group, holding the table, the figures and a summary).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "load_study_config",
    "deep_merge",
    "arch_class",
    "build_module",
    "TrainJob",
    "run_training_jobs",
    "load_trained",
    "write_csv",
    "save_figure",
    "format_table",
    "set_threads",
    "log_study_to_wandb",
    "resolve_device",
    "StudySetup",
    "setup_study",
    "prepare_output",
    "study_job",
    "source_image_shape",
    "study_main",
    "log",
    "config_key",
    "module_kwargs_from",
    "DIGITS_DIT",
    "DIGITS_UVIT",
    "DIGITS_TRAIN",
]

#: The CPU recipe that learns the empirical optimal denoiser of 8 x 8 digits in minutes (``studies.memorization``):
#: single-token transformers (one 8 x 8 patch), EDM kernel with training noise ln(sigma) ~ N(0.5, 1), lr 2e-3 with
#: 100 warm-up steps, 2,000 steps, EMA over the last quarter of training.  Studies copy them into their DEFAULTS.
DIGITS_DIT: dict[str, Any] = {
    "class_path": "DiT", "init_args": {"patch_size": 8, "hidden_size": 128, "depth": 3, "num_heads": 4}}
DIGITS_UVIT: dict[str, Any] = {
    "class_path": "UViT", "init_args": {"patch_size": 8, "embed_dim": 128, "depth": 2, "num_heads": 4}}
DIGITS_TRAIN: dict[str, Any] = {
    "max_steps": 2000,
    "lr": 2e-3,
    "warmup_steps": 100,
    "ema_halflife_kimg": 1000.0,
    "ema_rampup_ratio": 0.25,
    "seed": 0,
    "kernel_kwargs": {"P_mean": 0.5, "P_std": 1.0},
    "trainer": {},
}


def config_key(obj: Any) -> str:
    """Eight hex digits of the SHA-256 of ``obj`` as sorted JSON: the name tag of a checkpoint, so that a changed
    training configuration trains anew and an unchanged one is found again."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def module_kwargs_from(kernel: str, train: Mapping[str, Any], **over: Any) -> dict[str, Any]:
    """``DiffusionModule`` keywords from a study's ``train`` section (kernel constants, AdamW lr and warm-up, EDM
    EMA, seed), plus ``over`` (e.g. ``seed=...``, ``num_classes=...``; ``None`` values are left out)."""
    kw = dict(kernel=kernel, kernel_kwargs=train.get("kernel_kwargs") or {}, lr=train["lr"],
              warmup_steps=train["warmup_steps"], ema_halflife_kimg=train["ema_halflife_kimg"],
              ema_rampup_ratio=train["ema_rampup_ratio"], seed=train.get("seed", 0))
    kw.update({k: v for k, v in over.items() if v is not None})
    return kw


def log(msg: str) -> None:
    """A study's progress line (flushed at once, so it interleaves with progress bars correctly)."""
    print(msg, flush=True)


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; any other name as ``torch.device``."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class StudySetup:
    """What every sampling study reads from its config: output folder, device, descriptor and threshold, seeds."""

    out: Path
    device: torch.device
    descriptor: Any
    threshold: float
    seeds: list[int]
    sampler: str
    steps: int


def prepare_output(cfg: Mapping[str, Any]) -> tuple[Path, torch.device]:
    """Torch threads (``threads``), the output folder (``out``, created) and the device (``device``) of a study."""
    set_threads(cfg.get("threads"))
    out = Path(str(cfg["out"]))
    out.mkdir(parents=True, exist_ok=True)
    return out, resolve_device(cfg.get("device", "auto"))


def setup_study(cfg: Mapping[str, Any]) -> StudySetup:
    """Threads, output folder, device, the descriptor (``metrics.descriptor``) with its threshold
    (``metrics.threshold``, null = the descriptor's calibrated default) and the sampling settings (``sample.seeds``:
    seeds 0..S-1)."""
    from ..metrics import get_descriptor

    out, device = prepare_output(cfg)
    metrics = cfg.get("metrics") or {}
    desc = get_descriptor(metrics.get("descriptor", "pixel"))
    thr = metrics.get("threshold")
    smp = cfg.get("sample") or {}
    n = smp.get("seeds", 0)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"sample.seeds must be a positive integer (seeds 0..seeds-1), got {n!r}.")
    return StudySetup(out, device, desc,
                      float(desc.default_threshold if thr is None else thr), list(range(n)),
                      str(smp.get("sampler", "heun")), int(smp.get("steps", 18)))


def source_image_shape(data: Mapping[str, Any]) -> tuple[int, ...]:
    """C, H, W of the images of a study's ``data`` section (its source and ``source_kwargs``)."""
    from ..data import SubsetDataModule

    dm = SubsetDataModule(source=data["source"], size=1, source_kwargs=data.get("source_kwargs") or {})
    return tuple(int(v) for v in dm.image_shape)


def study_main(
    argv: Sequence[str] | None,
    prog: str,
    doc: str | None,
    run: Callable[[dict[str, Any]], Any],
    defaults: Mapping[str, Any],
    quick: Mapping[str, Any] | None = None,
    replace: Sequence[str] = (),
    example_config: str | None = None,
    add_arguments: Callable[[Any], None] | None = None,
    dispatch: Callable[[dict[str, Any], Any], Any] | None = None,
) -> Any:
    """The command line every study shares: ``--config FILE [--out DIR] [--quick]``, then ``run(cfg)``.

    ``add_arguments(parser)`` adds a study's own flags and ``dispatch(cfg, args)`` (if given) replaces ``run``.
    Bad input (``ValueError`` / ``FileNotFoundError``) exits with one line ``error: ...`` and no traceback.
    """
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=(doc or "").strip().split("\n")[0])
    p.add_argument("--config", default=None, help=f"YAML file{f' (e.g. {example_config})' if example_config else ''}")
    p.add_argument("--out", default=None, help="output folder (default: the config's 'out')")
    p.add_argument("--quick", action="store_true", help="tiny settings (for tests; the numbers mean nothing)")
    if add_arguments is not None:
        add_arguments(p)
    args = p.parse_args(None if argv is None else list(argv))
    try:
        cfg = load_study_config(args.config, defaults, quick if args.quick else None, args.out, replace=replace)
        return dispatch(cfg, args) if dispatch is not None else run(cfg)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``override`` merged in (nested dicts merged key by key, other values replaced)."""
    out = copy.deepcopy(dict(base))
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_study_config(
    path: str | os.PathLike | None,
    defaults: Mapping[str, Any],
    quick: Mapping[str, Any] | None = None,
    out: str | os.PathLike | None = None,
    replace: Sequence[str] = (),
) -> dict[str, Any]:
    """``defaults`` <- the YAML file at ``path`` <- ``quick`` overrides (if given) <- ``out``.

    With ``quick`` and no ``out`` the output folder is the config's with ``_quick`` appended.

    Mappings are merged key by key, except the top-level keys in ``replace`` (e.g. a study's list of
    architectures), which the file replaces as a whole.  Top-level keys of the file that ``defaults`` does
    not know raise ``ValueError`` (a typo would otherwise be ignored silently).
    """
    import yaml

    cfg = copy.deepcopy(dict(defaults))
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist.")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, Mapping):
            raise ValueError(
                f"config file {path} must hold a YAML mapping of options, got {type(loaded).__name__}."
            )
        unknown = sorted(set(loaded) - set(defaults))
        if unknown:
            raise ValueError(
                f"config file {path} has unknown keys {unknown}; valid keys are {sorted(defaults)}."
            )
        cfg = deep_merge(cfg, loaded)
        cfg.update({k: copy.deepcopy(loaded[k]) for k in replace if k in loaded})
    if quick:
        cfg = deep_merge(cfg, quick)
        cfg.update({k: copy.deepcopy(quick[k]) for k in replace if k in quick})
        cfg["out"] = f"{cfg['out']}_quick"  # never mix quick results into a full run's folder
    if out is not None:
        cfg["out"] = str(out)
    return cfg


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads`` when ``threads`` is a positive int (1 is fastest on a shared 2-core CPU)."""
    if threads is not None:
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer or null, got {threads!r}.")
        torch.set_num_threads(threads)


def arch_class(name: str) -> type:
    """``EDM`` / ``edm`` / ``lightning_repro.module.EDM`` (any preset of ``module.ARCHS``, or a GAN / VAE baseline
    of ``baselines.BASELINES``: ``DCGAN``, ``VAE``) -> the class."""
    from ..baselines import BASELINES
    from ..module import ARCHS

    short = str(name).rsplit(".", 1)[-1]
    for key, cls in {**ARCHS, **BASELINES}.items():
        if short in (key, cls.__name__):
            return cls
    valid = ", ".join(sorted(c.__name__ for c in {**ARCHS, **BASELINES}.values()))
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


def study_job(
    cfg: Mapping[str, Any],
    name: str,
    arch: Mapping[str, Any],
    image_shape: Sequence[int],
    module_kwargs: Mapping[str, Any],
    data_kwargs: Mapping[str, Any],
    ckpt: str | os.PathLike,
    train: Mapping[str, Any] | None = None,
    max_steps: int | None = None,
    **extra: Any,
) -> TrainJob:
    """A study's ``TrainJob``: steps and Trainer options from its ``train`` section (default ``cfg["train"]``;
    ``max_steps`` overrides), torch threads from ``cfg["threads"]``; ``extra`` (e.g. ``wandb``) as given."""
    train = cfg["train"] if train is None else train
    steps = train["max_steps"] if max_steps is None else max_steps
    return TrainJob(name, arch, tuple(int(v) for v in image_shape), dict(module_kwargs), dict(data_kwargs),
                    str(ckpt), int(steps), dict(train.get("trainer") or {}), cfg.get("threads"), **extra)


def _train_job(job: TrainJob) -> dict[str, Any]:
    """Train one job (in this process) and write its checkpoint atomically; returns its sidecar record."""
    import lightning as L

    from ..data import SubsetDataModule

    set_threads(job.threads)
    if not isinstance(job.max_steps, int) or job.max_steps < 1:
        raise ValueError(f"train.max_steps must be a positive integer, got {job.max_steps!r}.")
    L.seed_everything(int(job.module_kwargs.get("seed", 0)), verbose=False)  # the initial weights
    module = build_module(job.arch, job.image_shape, **job.module_kwargs)
    dm = SubsetDataModule(**job.data_kwargs)
    ckpt = Path(job.ckpt)
    kw = dict(
        max_steps=job.max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=job.progress_bar,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=str(ckpt.parent),
        accelerator="auto",
        devices=1,
    )
    kw.update(job.trainer_kwargs or {})
    if job.wandb is not None:
        from ..cli import ReproWandbLogger

        os.environ.setdefault("WANDB_DIR", str(ckpt.parent))
        logger = ReproWandbLogger(group=job.wandb.get("group"), name=job.wandb.get("name", job.name),
                                  save_dir=str(ckpt.parent))
        logger.log_hyperparams({**module.run_config(dm), **dict(job.wandb.get("config") or {})})
        kw["logger"] = logger
    quiet = logging.getLogger("lightning.pytorch")  # "GPU available: ...", tips: noise in a study's output
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    t0 = time.time()
    try:
        trainer = L.Trainer(**kw)
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*(num_workers|does not have many workers|eval mode|LeafSpec|no `validation_step`).*"
            )
            trainer.fit(module, datamodule=dm)
    finally:
        quiet.setLevel(level)
    loss = trainer.callback_metrics.get("train/loss")
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    tmp = ckpt.with_name(f".{ckpt.name}.tmp{os.getpid()}")
    trainer.save_checkpoint(tmp, weights_only=True)
    os.replace(tmp, ckpt)
    meta = {
        "name": job.name,
        "steps": int(trainer.global_step),
        "train_seconds": round(time.time() - t0, 1),
        "final_loss": float(loss) if loss is not None else float("nan"),
    }
    _atomic_bytes(job.meta_path, json.dumps(meta).encode())
    if job.wandb is not None:
        trainer.logger.experiment.summary.update(meta)
        trainer.logger.experiment.finish()
    return meta


def run_training_jobs(jobs: Sequence[TrainJob], workers: int = 1, log: Callable[[str], None] = print) -> int:
    """Train every job whose checkpoint does not exist yet; returns how many were trained.

    ``workers > 1`` trains that many jobs at once in separate (spawned) processes, each with the job's
    ``threads`` (one thread per process is fastest on a small CPU: two 1-thread trainings on 2 cores beat
    one 2-thread training).  Finished checkpoints are skipped, so an interrupted study resumes.
    """
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}.")
    todo = [j for j in jobs if not j.done()]
    for j in jobs:
        if j.done():
            log(f"  {j.name}: checkpoint exists, skipping training ({Path(j.ckpt).name})")
    if not todo:
        return 0
    log(f"training {len(todo)} model(s) ({workers} at a time) ...")
    t0 = time.time()
    if workers == 1 or len(todo) == 1:
        for i, j in enumerate(todo, 1):
            log(f"[{i}/{len(todo)}] training {j.name} ({j.max_steps} steps)")
            meta = _train_job(j)
            log(
                f"  {j.name}: {meta['steps']} steps in {meta['train_seconds']:.0f}s, "
                f"final loss {meta['final_loss']:.4f}"
            )
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        todo = [replace(j, progress_bar=False) for j in todo]
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_train_job, j): j for j in todo}
            for i, fut in enumerate(as_completed(futures), 1):
                j = futures[fut]
                meta = fut.result()
                log(
                    f"[{i}/{len(todo)}] {j.name}: {meta['steps']} steps in {meta['train_seconds']:.0f}s, "
                    f"final loss {meta['final_loss']:.4f} ({time.time() - t0:.0f}s elapsed)"
                )
    return len(todo)


def load_trained(job: TrainJob) -> tuple[Any, dict[str, Any]]:
    """``(DiffusionModule in eval mode, sidecar record)`` of a finished job."""
    from ..module import module_from_checkpoint

    meta = json.loads(job.meta_path.read_text()) if job.meta_path.is_file() else {}
    return module_from_checkpoint(job.ckpt), meta


def _atomic_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, columns: Sequence[str]) -> Path:
    """Write ``rows`` (dicts) with the given column order to ``path`` atomically; floats with 6 significant digits."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return _atomic_bytes(Path(path), buf.getvalue().encode())


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return _atomic_bytes(Path(path), buf.getvalue())


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of ``rows`` (for the end of a study's output)."""

    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def log_study_to_wandb(
    study: str,
    cfg: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    images: Mapping[str, str | os.PathLike] | None = None,
    summary: Mapping[str, Any] | None = None,
    group: str | None = None,
) -> Path | None:
    """Log a study's table (``wandb.Table``), figures (``wandb.Image``) and summary to one W&B run.

    The run is named after the study, grouped by ``group`` (default: the study name, e.g. ``phase_transition``)
    so it sits beside the training runs of the same experiment in the W&B UI, and carries ``cfg`` as its
    config.  With no W&B credentials it is written offline under ``<cfg["out"]>/wandb`` (never blocks or
    prompts; ``wandb sync`` uploads it later).  ``cfg["wandb"]`` false (or ``WANDB_MODE=disabled``) skips it.
    Returns the run's local folder, or None when skipped.
    """
    if not cfg.get("wandb", True) or os.environ.get("WANDB_MODE", "").lower() == "disabled":
        return None
    import wandb

    from ..cli import wandb_offline

    out = Path(str(cfg.get("out", "."))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings = wandb.Settings(silent=True, console="off", mode="offline" if wandb_offline() else "online")
    config = {k: v for k, v in cfg.items() if k != "wandb"}
    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "lightning_repro"),
        group=group or study,
        name=study,
        job_type="study",
        config=json.loads(json.dumps(config, default=str)),
        dir=str(out),
        settings=settings,
        reinit="create_new",
    )
    try:
        cols = list(columns)
        table = wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])
        payload: dict[str, Any] = {f"{study}/table": table}
        for key, path in (images or {}).items():
            if path is not None and Path(path).is_file():
                payload[f"{study}/{key}"] = wandb.Image(str(path))
        run.log(payload)
        for k, v in (summary or {}).items():
            run.summary[k] = v
        return Path(run.dir).parent
    finally:
        run.finish()
        wandb.teardown()  # wait for the (offline) run file to be written completely before returning
