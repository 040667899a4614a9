"""The one protocol every study follows: a ``Study`` names its YAML defaults (``configs/studies/<name>.yaml``, the
only place they live), its ``--quick`` overrides, its CSV columns, its training jobs, its ``run`` (train, sample,
score, write) and its plot; ``Study.main`` is the command line they share.

A config is the study's YAML <- the ``--config`` file <- the quick overrides <- ``--out``; mappings merge key by key
except a study's ``replace`` keys (e.g. its list of architectures), which a later layer replaces whole.  Checkpoint
names carry ``config_key`` of what determines the training, so a rerun finds them and a change retrains.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Study", "CONFIG_DIR", "MOVED_CONFIGS", "config_key", "deep_merge", "load_study_config", "read_yaml",
           "positive_int"]

#: the study configs (``configs/studies/<name>.yaml`` of the repository)
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "studies"

#: where the study configs used to be -> their name in ``configs/studies``
MOVED_CONFIGS = {
    **{f"experiments/{n}.yaml": n for n in ("fig4_memorization", "fig5_mog", "gan_vae_contrast", "recovery",
                                             "hyperplane", "inverse", "conditional", "fig11_finetune")},
    "sweeps/phase_transition.yaml": "phase_transition",
}


#: options added after checkpoints were first named, at the value that behaves as before their time: such an entry
#: does not enter a ``config_key`` (a config that spells out the old behaviour finds the runs made before it)
NEUTRAL_OPTIONS = {"lr_decay": "constant"}


def _without_neutral(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _without_neutral(v) for k, v in obj.items()
                if not (k in NEUTRAL_OPTIONS and v == NEUTRAL_OPTIONS[k])}
    return obj


def config_key(obj: Any) -> str:
    """Eight hex digits of the SHA-256 of ``obj`` as sorted JSON, ``NEUTRAL_OPTIONS`` left out: the name tag of a
    checkpoint, so that a changed training configuration trains anew and an unchanged one is found again."""
    return hashlib.sha256(json.dumps(_without_neutral(obj), sort_keys=True, default=str).encode()).hexdigest()[:8]


def positive_int(value: Any, key: str, note: str = "") -> int:
    """``value`` if it is a positive integer (not a bool); else one sentence naming the option ``key``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive integer{note}, got {value!r}.")
    return value


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``override`` merged in (nested dicts merged key by key, other values replaced)."""
    out = copy.deepcopy(dict(base))
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _missing(path: Path) -> FileNotFoundError:
    tail = "/".join(path.parts[-2:])
    if tail in MOVED_CONFIGS and path.parent.parent.name == "configs":
        return FileNotFoundError(f"config file {path} moved to configs/studies/{MOVED_CONFIGS[tail]}.yaml.")
    return FileNotFoundError(f"config file {path} does not exist.")


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a YAML file; one sentence if the file is missing (or moved) or holds something else."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, Mapping):
        raise ValueError(f"config file {path} must hold a YAML mapping of options, got {type(loaded).__name__}.")
    return dict(loaded)


def load_study_config(path: str | os.PathLike | None, defaults: Mapping[str, Any],
                      quick: Mapping[str, Any] | None = None, out: str | os.PathLike | None = None,
                      replace: Sequence[str] = ()) -> dict[str, Any]:
    """``defaults`` <- the YAML file at ``path`` <- ``quick`` overrides (if given) <- ``out``.

    With ``quick`` and no ``out`` the output folder is the config's with ``_quick`` appended.  Top-level keys
    of the file that ``defaults`` does not know raise ``ValueError`` (a typo would otherwise be ignored).
    """
    cfg = copy.deepcopy(dict(defaults))
    layers = []
    if path is not None:
        loaded = read_yaml(path)
        unknown = sorted(set(loaded) - set(defaults))
        if unknown:
            raise ValueError(f"config file {path} has unknown keys {unknown}; valid keys are {sorted(defaults)}.")
        layers.append(loaded)
    if quick:
        layers.append(quick)
    for layer in layers:
        cfg = deep_merge(cfg, layer)
        cfg.update({k: copy.deepcopy(layer[k]) for k in replace if k in layer})
    if quick:
        cfg["out"] = f"{cfg['out']}_quick"  # never mix quick results into a full run's folder
    if out is not None:
        cfg["out"] = str(out)
    return cfg


@dataclass(frozen=True)
class Study:
    """One of the paper's experiments as a command: ``python -m lightning_repro.studies.<module>``."""

    name: str                      # its config (configs/studies/<name>.yaml) and its W&B group
    module: str                    # lightning_repro.studies.<module>
    paper: str                     # where in Zhang et al. (ICML 2024), e.g. "Fig. 4"
    title: str                     # what it shows, one line (the README's study index)
    run: Callable[[dict[str, Any]], Any]                # train, sample, score, write; returns the CSV rows
    columns: Sequence[str]         # the main CSV's columns
    quick: Mapping[str, Any] = field(default_factory=dict)  # --quick: tiny settings (for tests)
    replace: tuple[str, ...] = ()  # top-level keys a config replaces whole instead of merging
    jobs: Callable[..., Any] | None = None               # cfg, ... -> its TrainJobs
    score: Callable[..., Any] | None = None              # the step that scores one unit of results (rows)
    plot: Callable[..., Any] | None = None               # rows, path, ... -> the PNG
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None  # the study's own flags
    dispatch: Callable[[dict[str, Any], argparse.Namespace], Any] | None = None  # replaces run when given

    @property
    def config_path(self) -> Path:
        return CONFIG_DIR / f"{self.name}.yaml"

    @property
    def command(self) -> str:
        return f"python -m lightning_repro.studies.{self.module} --config configs/studies/{self.name}.yaml"

    def defaults(self) -> dict[str, Any]:
        """The study's shipped YAML: every key a config may set, with its default."""
        if not self.config_path.is_file():
            raise FileNotFoundError(f"the defaults of study {self.name}, {self.config_path}, are missing.")
        return read_yaml(self.config_path)

    def load_config(self, path: str | os.PathLike | None = None, quick: bool = False,
                    out: str | os.PathLike | None = None) -> dict[str, Any]:
        """The defaults <- ``path`` <- the quick overrides (``quick``) <- ``out``."""
        return load_study_config(path, self.defaults(), self.quick if quick else None, out, self.replace)

    def main(self, argv: Sequence[str] | None = None) -> Any:
        """``--config FILE [--out DIR] [--quick]`` (plus the study's own flags), then ``run(cfg)``; bad input
        (``ValueError`` / ``FileNotFoundError``) exits with one line ``error: ...`` and no traceback."""
        p = argparse.ArgumentParser(prog=f"python -m lightning_repro.studies.{self.module}",
                                    description=f"{self.paper} of Zhang et al. (ICML 2024): {self.title}")
        p.add_argument("--config", default=None, help=f"YAML file (default: configs/studies/{self.name}.yaml)")
        p.add_argument("--out", default=None, help="output folder (default: the config's 'out')")
        p.add_argument("--quick", action="store_true", help="tiny settings (for tests; the numbers mean nothing)")
        if self.add_arguments is not None:
            self.add_arguments(p)
        args = p.parse_args(None if argv is None else list(argv))
        try:
            cfg = self.load_config(args.config, args.quick, args.out)
            return self.dispatch(cfg, args) if self.dispatch is not None else self.run(cfg)
        except (ValueError, FileNotFoundError) as err:
            raise SystemExit(f"error: {err}") from None
