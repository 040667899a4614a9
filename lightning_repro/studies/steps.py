"""The steps every study takes between training and scoring: its output folder and device, the descriptor and
threshold it scores with, the ``SubsetDataModule`` keywords of a training subset, a trained model's EMA denoiser
(``module.load_denoiser``), the samples of a list of seeds (``sampling.sample``) and the sample grids it saves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .protocol import positive_int
from .training import TrainJob, set_threads

__all__ = ["resolve_device", "prepare_output", "StudySetup", "setup_study", "subset_kwargs", "source_image_shape",
           "trained_denoiser", "sample_seeds", "save_interleaved", "check_sizes", "check_seed_count"]


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; any other name as ``torch.device``."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def prepare_output(cfg: Mapping[str, Any]) -> tuple[Path, torch.device]:
    """Torch threads (``threads``), the output folder (``out``, created) and the device (``device``) of a study."""
    set_threads(cfg.get("threads"))
    out = Path(str(cfg["out"]))
    out.mkdir(parents=True, exist_ok=True)
    return out, resolve_device(cfg.get("device", "auto"))


def check_seed_count(n: Any, key: str = "sample.seeds") -> int:
    """``n`` as the number of seeds 0..n-1; one sentence unless it is a positive integer."""
    return positive_int(n, key, " (seeds 0..seeds-1)")


def check_sizes(sizes: Any, key: str = "sizes") -> list[int]:
    """``sizes`` sorted; one sentence unless it is a non-empty list of positive integers."""
    if not isinstance(sizes, list) or not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                                                       for n in sizes):
        raise ValueError(f"{key} must be a non-empty list of positive integers, got {sizes!r}.")
    return sorted(sizes)


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
    descriptor_name: str = "pixel"


def descriptor_trust(metrics: dict[str, Any]) -> dict[str, Any]:
    """``sha256`` / ``trust_unpinned`` for an SSCD descriptor from a study's ``metrics`` section (``sha256: HEX``,
    ``trust_descriptor: true``); the pixel descriptor has no weights file and takes neither."""
    if str(metrics.get("descriptor", "pixel")).lower() == "pixel":
        return {}
    kw: dict[str, Any] = {"trust_unpinned": bool(metrics.get("trust_descriptor", False))}
    if metrics.get("sha256"):
        kw["sha256"] = str(metrics["sha256"]).lower()
    return kw


def setup_study(cfg: Mapping[str, Any]) -> StudySetup:
    """Threads, output folder, device, the descriptor (``metrics.descriptor``) with its threshold
    (``metrics.threshold``, null = the descriptor's calibrated default) and the sampling settings (``sample.seeds``:
    seeds 0..S-1)."""
    from ..metrics import get_descriptor

    out, device = prepare_output(cfg)
    metrics = cfg.get("metrics") or {}
    name = metrics.get("descriptor", "pixel")
    desc = get_descriptor(name, **descriptor_trust(metrics))
    thr = metrics.get("threshold")
    smp = cfg.get("sample") or {}
    n = smp.get("seeds", 0)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"sample.seeds must be a positive integer (seeds 0..seeds-1), got {n!r}.")
    return StudySetup(out, device, desc, float(desc.default_threshold if thr is None else thr), list(range(n)),
                      str(smp.get("sampler", "heun")), int(smp.get("steps", 18)), str(name))


def subset_kwargs(data: Mapping[str, Any], size: int | None, **over: Any) -> dict[str, Any]:
    """``SubsetDataModule`` keywords of a study's ``data`` section for a training subset of ``size`` images
    (``over``: e.g. ``batch_size=``, ``classes=``, ``conditional=``, ``data_seed=``)."""
    kw = dict(source=data["source"], size=size, subset_seed=data["subset_seed"], batch_size=data.get("batch_size"),
              source_kwargs=data.get("source_kwargs") or {})
    kw.update(over)
    if kw["batch_size"] is None:
        del kw["batch_size"]
    return kw


def source_image_shape(data: Mapping[str, Any]) -> tuple[int, ...]:
    """C, H, W of the images of a study's ``data`` section (its source and ``source_kwargs``)."""
    from ..data import SubsetDataModule

    dm = SubsetDataModule(source=data["source"], size=1, source_kwargs=data.get("source_kwargs") or {})
    return tuple(int(v) for v in dm.image_shape)


def trained_denoiser(job: TrainJob, device: torch.device) -> tuple[Any, Any, dict[str, Any]]:
    """``(EMA denoiser on device, eval mode, no grad; its kernel; the job's sidecar record)`` of a finished job."""
    from ..module import load_denoiser

    den, kernel = load_denoiser(job.ckpt, device)
    return den, kernel, job.meta()


def sample_seeds(den, kernel, seeds: Sequence[int], shape: Sequence[int], setup: StudySetup, **kw: Any):
    """Samples of ``seeds`` with the study's sampler and steps (``kw``: labels, guidance, ...), in [-1, 1]."""
    from ..sampling import sample

    return sample(den, kernel, list(seeds), tuple(shape), sampler=setup.sampler, steps=setup.steps,
                  device=setup.device, **kw)


def save_interleaved(path: Path, images: Sequence[torch.Tensor], limit: int, width: int = 16) -> Path:
    """A grid of ``width`` columns whose rows take turns between ``images`` (same seeds per column), over the
    first ``limit`` seeds (rounded down to whole rows)."""
    from ..viz import save_grid

    n = len(images[0])
    w = min(width, n)
    m = w * (min(limit, n) // w)
    rows = [x[i : i + w] for i in range(0, m, w) for x in images]
    return save_grid(torch.cat(rows), path, nrow=w)
