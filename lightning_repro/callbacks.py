"""The live reproducibility monitor: RP / GL of the EMA model during training (Zhang et al., ICML 2024, Sec. 2-3).

Every ``every_n_steps`` optimiser steps ``ReproducibilityMonitor`` samples fixed seeds with the EMA denoiser
(deterministic Heun on the kernel's grid of ``val_steps`` levels, from ``x_T = prior_scale * seed_noise``), as
``evaluate.py`` does, and scores them with ``evaluation.scoring``: RP and mean similarity against a reference
(default the optimal denoiser of the training subset, Prop. 1), GL and the memorised fraction against the subset.
``subset_statistics`` gives the numbers used to pick an EDM noise range: sigma_data (Karras et al. 2022, Sec. 5),
the largest pairwise distance (sigma_max, Song & Ermon 2020, Technique 1) and the nearest-neighbour distances.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

__all__ = ["ReproducibilityMonitor", "subset_statistics", "MONITOR_KEYS"]

#: the columns of ``monitor.csv`` (after ``step``), logged as ``monitor/<key>``
MONITOR_KEYS = ("rp", "mean_similarity", "gl", "memorized")


@torch.no_grad()
def subset_statistics(images: Tensor, chunk: int = 1024) -> dict[str, float]:
    """sigma_data (pixel std), largest pairwise distance and nearest-neighbour distances (min / median / max).

    ``images``: N x C x H x W float (the suite's [-1, 1] scale); distances are Euclidean over all pixels, computed
    in float64 in row chunks on the images' device (memory O(chunk x N)).
    """
    y = images.detach().reshape(images.shape[0], -1).to(torch.float64)
    n = y.shape[0]
    if n < 2:
        raise ValueError(f"subset statistics need at least 2 training images, got {n}.")
    sq = (y * y).sum(1)
    far, near = torch.zeros((), dtype=torch.float64, device=y.device), []
    for a in range(0, n, chunk):
        d2 = (sq[a : a + chunk, None] + sq[None, :] - 2.0 * y[a : a + chunk] @ y.T).clamp_min_(0.0)
        far = torch.maximum(far, d2.max())
        rows = torch.arange(a, min(a + chunk, n), device=y.device)
        d2[rows - a, rows] = float("inf")  # an image is not its own neighbour
        near.append(d2.min(1).values)
    nn_dist = torch.cat(near).sqrt()
    return {
        "num_images": n,
        "sigma_data": float(y.std(unbiased=False)),
        "max_pairwise_distance": float(far.sqrt()),
        "nn_distance_min": float(nn_dist.min()),
        "nn_distance_median": float(torch.quantile(nn_dist, 0.5)),
        "nn_distance_max": float(nn_dist.max()),
    }


def _stats_line(s: dict[str, float]) -> str:
    return (f"subset statistics (N={s['num_images']}, [-1, 1] pixels): sigma_data={s['sigma_data']:.4f} | "
            f"largest pairwise distance={s['max_pairwise_distance']:.4f} (sigma_max rule, Song & Ermon 2020) | "
            f"nearest-neighbour distance min={s['nn_distance_min']:.4f} median={s['nn_distance_median']:.4f} "
            f"max={s['nn_distance_max']:.4f}")


class ReproducibilityMonitor(Callback):
    """Every K steps: RP / mean similarity of the EMA model against a reference, GL / memorised fraction.

    Args:
        every_n_steps: period in optimiser steps (also measured at the last step of ``fit``).
        seeds: number of seeds (0..seeds-1) or a seed text (``"0-63"``, as ``evaluate.py --seeds``).
        reference: ``optimal`` or ``optimal:`` (the optimal denoiser of ``trainer.datamodule``'s subset) or a spec that
            ``evaluation.resolve_model`` takes (a checkpoint path, ``optimal:<data spec>``, a sample folder).
        descriptor: ``pixel`` | ``sscd``; None: ``evaluation.choose_descriptor`` (pixel below 32 px / grey).
        threshold: similarity threshold; None: the descriptor's calibrated default.
        steps: noise levels of the Heun grid; None: the module's ``val_steps``.
        batch_size: seeds per sampling batch (256, as ``evaluate.py``, so the samples are the same).
        statistics: print / log ``subset_statistics`` at the start of fit (O(N^2 D) on the module's device: instant
            for digits, a GPU matter for all 50,000 CIFAR-10 images).
        plot: write ``monitor.png`` and ``monitor.csv`` into ``default_root_dir`` at the end of fit.

    Under DDP every rank samples and scores all seeds identically (``featurize`` deals its chunks to the ranks
    and gathers them, so every rank must take part); rank 0 writes the files.
    """

    def __init__(self, every_n_steps: int = 250, seeds: int | str = 64, reference: str = "optimal",
                 descriptor: str | None = None, threshold: float | None = None, steps: int | None = None,
                 batch_size: int = 256, statistics: bool = True, plot: bool = True):
        from .sampling import parse_seeds

        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"ReproducibilityMonitor: every_n_steps must be an integer >= 1, got {every_n_steps!r}.")
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            if seeds < 1:
                raise ValueError(f"ReproducibilityMonitor: seeds must be >= 1 (or a seed text), got {seeds}.")
            seeds = f"0-{seeds - 1}"
        self.seeds: list[int] = parse_seeds(seeds)
        self.every_n_steps, self.reference, self.steps, self.batch_size = every_n_steps, reference, steps, batch_size
        self.descriptor_name, self.threshold = descriptor, threshold
        self.statistics_enabled, self.plot = statistics, plot
        self.history: list[dict[str, float]] = []
        self.statistics: dict[str, float] | None = None
        self.seconds = 0.0  # time spent measuring (reference samples included)
        self._ready = False

    # -- set-up -------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "images"):
            raise ValueError("ReproducibilityMonitor needs the trainer's data module to be a SubsetDataModule "
                             "(its training images are the reference's and GL's training set).")
        if self.statistics_enabled:
            self.statistics = subset_statistics(dm.images.to(pl_module.device))
            if trainer.is_global_zero:
                print(_stats_line(self.statistics), flush=True)
            if trainer.logger is not None:
                trainer.logger.log_hyperparams({f"subset/{k}": v for k, v in self.statistics.items()})
        self._ready = False

    def _setup(self, trainer, pl_module) -> None:
        """Descriptor, described training set and the reference's samples: once per fit (cached)."""
        from .evaluation.scoring import choose_descriptor, featurize
        from .metrics import get_descriptor

        t0 = time.perf_counter()
        name, _ = choose_descriptor(self.descriptor_name, pl_module.image_shape)
        self._descriptor = get_descriptor(name)
        self._tau = float(self.threshold if self.threshold is not None else self._descriptor.default_threshold)
        dm = trainer.datamodule
        self._train_feats = featurize(self._descriptor, dm.images)
        self._ref_feats = featurize(self._descriptor, self._reference_images(dm, pl_module))
        self._ready = True
        self.seconds += time.perf_counter() - t0

    def _labels(self, pl_module) -> Tensor | None:
        """``seed % num_classes`` for a conditional model (``evaluate.py``'s default), else None."""
        if not pl_module.num_classes:
            return None
        return torch.as_tensor(self.seeds, dtype=torch.int64) % pl_module.num_classes

    def _sample(self, denoiser, kernel, pl_module) -> np.ndarray:
        from .data.sources import float_to_uint8
        from .sampling import SolverConfig, sample_seeds

        steps = int(self.steps or pl_module.hparams.val_steps)
        config = SolverConfig(sampler="heun", steps=steps, batch_size=self.batch_size)
        x = sample_seeds(denoiser, kernel, self.seeds, pl_module.image_shape, config, labels=self._labels(pl_module),
                         device=pl_module.device)
        return float_to_uint8(x)

    def _reference_images(self, dm, pl_module) -> np.ndarray:
        """uint8 N x H x W x C samples of the reference at the monitor's seeds."""
        if self.reference in ("optimal", "optimal:"):
            from .theory import EmpiricalOptimalDenoiser

            labels = dm.labels if pl_module.num_classes else None
            den = EmpiricalOptimalDenoiser(dm.images, labels, device=pl_module.device)
            return self._sample(den, pl_module.kernel, pl_module)
        from .evaluation import resolve_model

        ref = resolve_model(self.reference, data=pl_module.data_kwargs(dm))  # what mog: / optimal:?... mean
        if tuple(ref.image_shape) != tuple(pl_module.image_shape):
            raise ValueError(f"ReproducibilityMonitor: reference {self.reference} makes {ref.image_shape} images but "
                             f"the model makes {tuple(pl_module.image_shape)}; they must have one image shape.")
        if ref.stored is not None:
            return ref.stored.select(self.seeds, self.reference).images
        return self._sample(ref.denoiser(pl_module.device), ref.kernel(), pl_module)

    # -- measuring ------------------------------------------------------------------------------------------
    def measure(self, trainer, pl_module) -> dict[str, float]:
        """Sample the seeds with the EMA denoiser now and score them (``evaluation.scoring``)."""
        from .evaluation.scoring import featurize, generalization, score_pair

        if not self._ready:
            self._setup(trainer, pl_module)
        t0 = time.perf_counter()
        feats = featurize(self._descriptor, self._sample(pl_module.ema, pl_module.kernel, pl_module))
        pair = score_pair(feats, self._ref_feats, self._tau, names=("the EMA model", self.reference))
        gl = generalization(feats, self._train_feats, self._tau, "the EMA model")
        row = {"step": int(trainer.global_step), "rp": pair["rp"], "mean_similarity": pair["mean_similarity"],
               "gl": gl["gl"], "memorized": gl["memorized"]}
        self.history = [r for r in self.history if r["step"] != row["step"]] + [row]
        self.seconds += time.perf_counter() - t0
        return row

    def _log(self, trainer, pl_module, row: dict[str, float]) -> None:
        """To every logger at this step (W&B: a chart per key) and to the progress bar."""
        metrics = {f"monitor/{k}": float(row[k]) for k in MONITOR_KEYS}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=row["step"])
        for key in ("rp", "gl"):
            pl_module.log(f"monitor/{key}", metrics[f"monitor/{key}"], prog_bar=True, logger=False, on_step=True,
                          on_epoch=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = int(trainer.global_step)
        measured = self.history and self.history[-1]["step"] == step
        last = trainer.max_steps is not None and step >= trainer.max_steps > 0
        if step > 0 and not measured and (step % self.every_n_steps == 0 or last):
            row = self.measure(trainer, pl_module)
            self._log(trainer, pl_module, row)
            if trainer.is_global_zero and not trainer.progress_bar_callback:  # no bar shows it: one line per row
                print(f"monitor step {step}: " + " ".join(f"{k}={row[k]:.4f}" for k in MONITOR_KEYS), flush=True)

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or not self.history:
            return
        path = Path(trainer.default_root_dir) / "monitor.png"
        if self.plot:
            write_history(self.history, path, f"vs {self.reference} | {len(self.seeds)} seeds")
        print(f"monitor: {len(self.history)} measurement(s), {self.seconds:.1f}s | last: "
              + " ".join(f"{k}={self.history[-1][k]:.4f}" for k in MONITOR_KEYS) + f" | {path}", flush=True)

    # -- resuming (``--ckpt_path last`` keeps the curve) --------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


def write_history(history: list[dict[str, float]], png: Path, title: str = "") -> None:
    """``monitor.png`` (the curves against training steps) and ``monitor.csv`` beside it, both atomic."""
    from matplotlib.figure import Figure

    from .files import atomic_write_csv
    from .viz import save_figure

    atomic_write_csv(png.with_suffix(".csv"), ("step", *MONITOR_KEYS),
                     ((r["step"], *(repr(float(r[k])) for k in MONITOR_KEYS)) for r in history))
    fig = Figure(figsize=(6, 3.6), dpi=120)
    ax = fig.add_subplot()
    steps = [r["step"] for r in history]
    for key in MONITOR_KEYS:
        ax.plot(steps, [r[key] for r in history], marker="o", ms=3, label=key)
    ax.set(xlabel="training step", ylabel="score", ylim=(-0.02, 1.02), title=f"reproducibility monitor {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, png)
