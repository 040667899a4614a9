"""Command line: ``python train.py fit --config configs/train/<name>.yaml`` (LightningCLI).

Adds to Lightning's CLI (https://lightning.ai/docs/pytorch/stable/cli/lightning_cli.html):

* the data module's image shape and classes are linked into the model (``data.conditional`` decides),
  ``seed_everything`` into the model's training-noise seed;
* ``checkpoint``: periodic checkpoints every K steps plus ``last.ckpt`` under
  ``<default_root_dir>/checkpoints`` (so ``--ckpt_path last`` finds them whatever the logger);
* ``final_samples``: at the end of ``fit`` the EMA model samples a grid and its path is printed;
* ``--ckpt_path FILE`` resumes the *configured* model (Lightning would adopt the checkpoint's hyperparameters,
  another architecture included): the file must be a readable lightning_repro checkpoint that fits it;
* ``config.yaml`` is written atomically (temp file + rename): a full disk leaves no partial file;
* bad input (a bad option value, an unreadable file, a folder that cannot be written) is one ``error:`` line.
* W&B is the default logger; with no API key it runs offline, never prompts and never uploads
  checkpoints; the run config carries ``arch, kernel, size, subset_seed, seed`` and the W&B group is the
  experiment name (the config file's stem unless ``--trainer.logger.init_args.group`` says otherwise).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from argparse import ArgumentError
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from .checkpoints import load_checkpoint
from .data import SubsetDataModule
from .diffusion_module import DiffusionModule
from .files import atomic_write
from .kernels import get_kernel
from .presets import ARCHS, RENAMED

__all__ = ["ReproCLI", "TRAINER_DEFAULTS", "ReproWandbLogger", "RunCheckpoint", "FinalSamples", "AtomicSaveConfig", "main",
           "wandb_offline", "write_atomic"]


def wandb_offline() -> bool:
    """True unless W&B credentials are available (``WANDB_API_KEY`` or a netrc entry for api.wandb.ai)."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    try:
        return "api.wandb.ai" not in netrc.read_text()
    except OSError:
        return True


class ReproWandbLogger(WandbLogger):
    """W&B logger that goes offline by itself when there are no credentials (and then uploads no model)."""

    def __init__(self, project: str = "lightning_repro", group: str | None = None, name: str | None = None,
                 save_dir: str | None = None, offline: bool | None = None, log_model: bool | str = False,
                 tags: list[str] | None = None, **kwargs):
        if offline is None:
            offline = wandb_offline()
        if offline:
            os.environ["WANDB_MODE"] = "offline"
            log_model = False
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_CONSOLE", "off")
        save_dir = save_dir or os.environ.get("WANDB_DIR") or "."
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(project=project, group=group, name=name, save_dir=save_dir, offline=offline,
                         log_model=log_model, tags=tags, **kwargs)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose default folder is ``<default_root_dir>/checkpoints`` for every logger."""

    def setup(self, trainer, pl_module, stage):
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        super().setup(trainer, pl_module, stage)


class FinalSamples(Callback):
    """At the end of ``fit``: sample ``num_samples`` fixed seeds with the EMA model, save a grid, print a summary."""

    def __init__(self, num_samples: int = 64, sampler: str = "heun", steps: int = 18, enabled: bool = True):
        self.num_samples, self.sampler, self.steps, self.enabled = num_samples, sampler, steps, enabled
        self._t0 = time.time()
        self.grid_path: Path | None = None

    def on_fit_start(self, trainer, pl_module):
        self._t0 = time.time()

    def on_fit_end(self, trainer, pl_module: DiffusionModule):
        if not self.enabled or not trainer.is_global_zero:
            return
        from .viz import save_grid

        seeds = list(range(self.num_samples))
        labels = None
        if pl_module.num_classes:
            labels = torch.tensor([s % pl_module.num_classes for s in seeds], device=pl_module.device)
        was_training = pl_module.training
        pl_module.eval()
        images = pl_module.sample(seeds, labels=labels, sampler=self.sampler, steps=self.steps)
        pl_module.train(was_training)
        self.grid_path = save_grid(images, Path(trainer.default_root_dir) / "samples" / "final.png",
                                   nrow=10 if pl_module.num_classes == 10 else None)
        loss = trainer.callback_metrics.get("train/loss")
        ckpt = next((cb.last_model_path for cb in trainer.checkpoint_callbacks if cb.last_model_path), "")
        cfg = pl_module.run_config(getattr(trainer, "datamodule", None))
        print(f"done: arch={cfg['arch']} kernel={cfg['kernel']} size={cfg.get('size')} steps={trainer.global_step} "
              f"loss={float(loss) if loss is not None else float('nan'):.4f} time={time.time() - self._t0:.0f}s | "
              f"samples: {self.grid_path} | checkpoint: {ckpt}", flush=True)


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``files.atomic_write``: ``write(tmp)`` then rename; on failure nothing is left and the ``OSError`` names ``path``."""
    atomic_write(path, write)


class _AtomicSaveParser:
    """The CLI's parser, whose ``save`` goes through ``write_atomic``."""

    def __init__(self, parser):
        self._parser = parser

    def __getattr__(self, name):
        return getattr(self._parser, name)

    def save(self, cfg, path, **kwargs):
        write_atomic(path, lambda tmp: self._parser.save(cfg, tmp, **{**kwargs, "overwrite": True}))


class AtomicSaveConfig(SaveConfigCallback):
    """Lightning's ``config.yaml`` writer, atomic: a full disk or a kill leaves the old file or none, never a part."""

    def __init__(self, parser, config, *args, **kwargs):
        super().__init__(_AtomicSaveParser(parser), config, *args, **kwargs)


def _check_resume_file(path: str | os.PathLike) -> None:
    """One sentence unless ``path`` is a readable lightning_repro checkpoint (tensors mapped, not read)."""
    try:
        load_checkpoint(path, mmap=True)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--ckpt_path: {err}") from None
    except ValueError as err:
        raise ValueError(f"--ckpt_path: {err}") from None


class ReproCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.every_n_train_steps": 1000, "checkpoint.save_last": True,
                             "checkpoint.save_top_k": -1, "checkpoint.filename": "step_{step:07d}",
                             "checkpoint.auto_insert_metric_name": False})
        parser.add_lightning_class_args(FinalSamples, "final_samples")
        parser.link_arguments("data.image_shape", "model.init_args.image_shape", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("seed_everything", "model.init_args.seed",
                              compute_fn=lambda s: int(s) if not isinstance(s, bool) else 0)

    def before_instantiate_classes(self):
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        init = cfg.model.get("init_args") if hasattr(cfg.model, "get") else None
        if init is not None and init.get("kernel") is not None:  # one sentence instead of a validation dump
            get_kernel(init.kernel, **(init.get("kernel_kwargs") or {}))
        root = cfg.trainer.default_root_dir or os.getcwd()
        _make_root(root)
        os.environ.setdefault("WANDB_DIR", str(root))
        if "checkpoint" in cfg and cfg.checkpoint.dirpath is None:  # fixed before fit so --ckpt_path last finds it
            cfg.checkpoint.dirpath = os.path.join(str(root), "checkpoints")
        logger = cfg.trainer.logger
        if logger is not None and not isinstance(logger, bool) and hasattr(logger, "init_args"):
            init = logger.init_args
            if "group" in init and init.group is None:
                files = cfg.get("config") or []
                init.group = Path(str(files[-1])).stem if files else "default"

    def _parse_ckpt_path(self) -> None:
        """Check an explicit ``--ckpt_path`` file; unlike Lightning's version, adopt none of its hyperparameters:
        the configuration stays what is trained and ``DiffusionModule.on_load_checkpoint`` checks the file fits it."""
        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub else None
        if path and str(path) not in ("last", "best", "hpc") and not str(path).startswith("registry"):
            _check_resume_file(path)

    def before_fit(self):
        cb = self.trainer.checkpoint_callback
        if self.config[self.subcommand].get("ckpt_path") == "last" and cb is not None and cb.dirpath:
            last = Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
            if last.is_file():
                _check_resume_file(last)
        logger = self.trainer.logger
        if logger is not None:
            logger.log_hyperparams(self.model.run_config(self.datamodule))


def _make_root(root: str | os.PathLike) -> None:
    """Create ``--trainer.default_root_dir`` (one sentence if it cannot be created or written to)."""
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        at = f" (at {err.filename})" if err.filename and str(err.filename) != str(root) else ""
        raise ValueError(f"--trainer.default_root_dir {root} cannot be created: {err.strerror or err}{at}.") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise ValueError(f"--trainer.default_root_dir {root} is not writable.")


def _check_arch(argv: list[str]) -> None:
    """One clear sentence for an unknown ``--model`` (jsonargparse's own message is a page of usage)."""
    from .consistency import CONSISTENCY_MODELS

    names = {c.__name__ for c in ARCHS.values()} - set(RENAMED)  # the old names are accepted, not advertised
    consistency = {c.__name__ for c in CONSISTENCY_MODELS.values()}
    for i, a in enumerate(argv):
        val = None
        if a in ("--model", "--model.class_path") and i + 1 < len(argv):
            val = argv[i + 1]
        elif a.startswith(("--model=", "--model.class_path=")):
            val = a.split("=", 1)[1]
        if val is not None and not val.startswith(("{", "[")) and not val.endswith((".yaml", ".yml", ".json")):
            short = val.rsplit(".", 1)[-1]
            if short not in names | consistency | set(RENAMED) and short.lower() not in ARCHS:
                raise SystemExit(f"error: unknown architecture {val!r}; valid architectures are: "
                                 f"{', '.join(sorted(names))} (e.g. --model DDPMpp), and the consistency models "
                                 f"{', '.join(sorted(consistency))}.")


#: training configs that moved from configs/experiments to configs/train (the EDM preset is now DDPMpp)
MOVED_CONFIGS = {"digits_edm": "digits_ddpmpp", "digits_edm_vp": "digits_ddpmpp_vp", "digits_edm_cond": "digits_ddpmpp_cond",
                 "digits_ddpm_ve": "digits_ddpm_ve", "digits_uvit": "digits_uvit", "digits_dit": "digits_dit",
                 "cifar10_edm_vp": "cifar10_ddpmpp_vp", "cifar10_edm64_vp": "cifar10_ddpmpp64_vp"}


def _check_moved_configs(argv: list[str]) -> None:
    """One sentence naming the new path for a ``--config`` of a training config that moved to ``configs/train``."""
    for i, a in enumerate(argv):
        val = argv[i + 1] if a == "--config" and i + 1 < len(argv) else a.split("=", 1)[1] if a.startswith(
            "--config=") else None
        if val is None or Path(val).exists():
            continue
        path = Path(val)
        if path.parent.name == "experiments" and path.stem in MOVED_CONFIGS:
            new = path.parent.parent / "train" / f"{MOVED_CONFIGS[path.stem]}.yaml"
            raise SystemExit(f"error: {val} moved to {new} (training configs live in configs/train; the EDM preset "
                             f"is now DDPMpp).")


#: the Trainer's defaults under the CLI (a config or the command line overrides them)
TRAINER_DEFAULTS = {
    "logger": {"class_path": "lightning_repro.cli.ReproWandbLogger"},
    "max_steps": 1000,
    "val_check_interval": 500,
    "check_val_every_n_epoch": None,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 10,
}


def main(argv: list[str] | None = None, run: bool = True) -> ReproCLI | None:
    """Run the CLI on ``argv`` (default: the command line); ``run=False`` only builds the model, data module and
    trainer from ``argv`` without a subcommand (as ``LightningCLI(run=False)``)."""
    _check_moved_configs(sys.argv[1:] if argv is None else argv)
    _check_arch(sys.argv[1:] if argv is None else argv)
    torch.set_float32_matmul_precision("high")
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")  # the EMA copy is eval on purpose
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    try:
        return ReproCLI(
            DiffusionModule,
            SubsetDataModule,
            subclass_mode_model=True,
            seed_everything_default=0,
            trainer_defaults=dict(TRAINER_DEFAULTS),
            save_config_callback=AtomicSaveConfig,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False},
            args=argv,
            run=run,
        )
    except (ValueError, FileNotFoundError, ArgumentError) as err:  # bad input: one sentence, no stack trace
        raise SystemExit(f"error: {_condense(str(err))}") from None
    except OSError as err:  # a file or folder the run cannot use; one with no path to name keeps its traceback
        if err.filename is None:
            raise
        raise SystemExit(f"error: {err.filename}: {err.strerror or err}.") from None


def _condense(message: str) -> str:
    """The sentence that matters in a jsonargparse validation dump (the model's own error, if any)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.startswith("- ") and "Expected a <class 'NoneType'>" not in ln:
            return _with_reason(lines, i, ln[2:])
    return _with_reason(lines, 0, lines[0]) if lines else "invalid arguments (see --help)."


def _with_reason(lines: list[str], i: int, text: str) -> str:
    """``text`` (line ``i``) followed by the lines it introduces (``Parser key "lr":`` -> ``Expected a float ...``)."""
    while text.endswith(":") and i + 1 < len(lines) and not lines[i + 1].startswith("- "):
        i += 1
        text = f"{text} {lines[i]}"
    return text


if __name__ == "__main__":
    main()
