"""Noise-hyperplane maps (Zhang et al., ICML 2024, Fig. 7): different diffusion models map a whole plane of
initial noises to images the same way.

Three seeds give noises ``z1, z2, z3 = seed_noise(plane.seeds)`` (D = C x H x W values each).  They span the
plane of noises

    z(a, b) = z1 + a (z2 - z1) + b (z3 - z1),        a, b in [-margin, 1 + margin],

so ``z(0, 0) = z1``, ``z(1, 0) = z2``, ``z(0, 1) = z3`` (the triangle of the three anchors, with a margin
around it).  An R x R grid of (a, b) (``plane.resolution``, equally spaced, a along the horizontal axis) is
taken, and every grid noise is rescaled to the norm sqrt(D): a convex combination of Gaussian draws is
shorter than a typical draw (e.g. the triangle's centre has norm ~ sqrt(D / 3)), and the rescaled point
stays on the sphere where N(0, I) draws concentrate, i.e. a typical initial noise.  The anchors are
rescaled the same way (they keep their direction; with ``margin: 0`` the grid's corners (0, 0), (1, 0) and
(0, 1) are exactly the anchors' noises).  See ``plane_grid``.

Each model samples every grid noise and the three anchor noises with the same deterministic sampler
(``sampling.sample_from_noise``: ``x_T = kernel.prior_scale * z``, EDM Heun 18 steps).  Each grid image is
labelled by its nearest of that model's three anchor images (descriptor cosine similarity; the pixel
descriptor on 8 x 8 digits), which gives one coloured map per model.  ``agreement(A, B)`` is the fraction of
grid points on which two models give the same label: the paper's claim is that different models (and, in
the memorization regime, the optimal denoiser of the empirical distribution, Prop. 1) draw nearly the same
map.

Models (``models``: name -> entry): ``optimal`` (the ``EmpiricalOptimalDenoiser`` of the training subset,
sampled on the first other model's kernel, else ``kernel``), a checkpoint path or ``{checkpoint: PATH}`` (a
trained unconditional ``DiffusionModule``; its EMA denoiser), or ``{class_path, init_args}`` (an architecture
the study trains on the training subset with ``train``, via ``TrainJob``; a rerun skips finished trainings).

Command::

    python -m lightning_repro.studies.hyperplane --config configs/experiments/hyperplane.yaml [--out DIR] [--quick]

writes ``DIR/hyperplane.png`` (one column per model: its map with the anchors marked, its three anchor images,
and a mosaic of its samples on a coarse sub-grid of the plane), ``DIR/hyperplane.csv`` (one row per pair of
models: agreement), ``DIR/labels.npz`` (every model's R x R labels and the grid coordinates), checkpoints
``DIR/checkpoints/<name>_N<N>_<hash>.ckpt`` and a W&B run in group ``hyperplane``.

Scale.  CPU defaults (``configs/experiments/hyperplane.yaml``): 8 x 8 digits, N = 64 training images (the
memorization regime, where the optimal denoiser is the reference); the single-token DiT (patch 8, hidden 128,
depth 3) and U-ViT (patch 8, width 128, depth 2), 2,000 steps of batch 256 (trained at once, ``workers: 2``),
plus ``optimal``; R = 32 (1,024 + 3 samples per model), margin 0.25, seeds 0, 1, 2.  Measured
(2026-11-27): agreement DiT|U-ViT 0.96, DiT|optimal 0.87, U-ViT|optimal 0.86 at N = 64; with ``size: 1024``
(generalization regime) DiT|U-ViT 0.92 but DiT|optimal 0.77, U-ViT|optimal 0.70: the two networks still draw
the same map while leaving the empirical optimal denoiser's.  2 min 26 s wall (measured from scratch on an
otherwise idle 2-core machine).

Full scale, as the paper: ``data.source: cifar10``, N = 2^6 (memorization) or 2^15 (generalization); models
at the paper's widths (or ``{checkpoint: ...}`` of trained ones); ``plane.resolution: 64``;
``metrics.descriptor: sscd``.
"""

from __future__ import annotations

import copy
import itertools
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import (
    DIGITS_DIT,
    DIGITS_TRAIN,
    DIGITS_UVIT,
    TrainJob,
    config_key,
    format_table,
    load_trained,
    log,
    log_study_to_wandb,
    module_kwargs_from,
    prepare_output,
    run_training_jobs,
    save_figure,
    study_job,
    study_main,
    write_csv,
)

__all__ = [
    "DEFAULTS",
    "QUICK",
    "QUICK_MODELS",
    "COLUMNS",
    "plane_grid",
    "rescale_to_sphere",
    "label_by_anchors",
    "agreement",
    "run_key",
    "jobs",
    "run",
    "plot",
    "main",
]

DEFAULTS: dict[str, Any] = {
    "out": "outputs/hyperplane",
    "threads": 1,
    "workers": 2,
    "device": "auto",
    "data": {"source": "digits", "source_kwargs": {}, "subset_seed": 0, "batch_size": 256},
    "size": 64,
    "kernel": "edm",
    "models": {
        "dit": copy.deepcopy(DIGITS_DIT),
        "uvit": copy.deepcopy(DIGITS_UVIT),
        "optimal": "optimal",
    },
    "train": copy.deepcopy(DIGITS_TRAIN),
    "plane": {"seeds": [0, 1, 2], "resolution": 32, "margin": 0.25},
    "sample": {"sampler": "heun", "steps": 18, "batch_size": 256},
    "metrics": {"descriptor": "pixel"},
    "wandb": True,
}

#: ``--quick``: a tiny network and the optimal denoiser, a small grid, a few steps (for tests).
QUICK: dict[str, Any] = {
    "workers": 1,
    "size": 16,
    "data": {"batch_size": 16},
    "train": {"max_steps": 3, "warmup_steps": 0},
    "plane": {"resolution": 6},
    "sample": {"steps": 4},
}
QUICK_MODELS: dict[str, Any] = {
    "dit": {"class_path": "DiT", "init_args": {"patch_size": 4, "hidden_size": 16, "depth": 1, "num_heads": 1}},
    "optimal": "optimal",
}

COLUMNS = ["model_a", "model_b", "agreement", "resolution", "margin", "seeds", "N", "descriptor", "sampler", "steps"]

_COLOURS = ["#d62728", "#1f77b4", "#2ca02c"]  # anchor 1, 2, 3




# ---------------------------------------------------------------------------------------------- geometry
def rescale_to_sphere(z: Tensor) -> Tensor:
    """Each row of ``z`` (B, *shape) rescaled to the norm sqrt(D), D = prod(shape): a typical N(0, I) draw's."""
    flat = z.reshape(z.shape[0], -1).double()
    d = flat.shape[1]
    norms = flat.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("a plane point has zero noise (the three anchor noises are linearly dependent).")
    return (flat * (math.sqrt(d) / norms)).to(z.dtype).reshape(z.shape)


def plane_grid(anchors: Tensor, resolution: int, margin: float = 0.25) -> tuple[Tensor, Tensor]:
    """The R x R grid of noises on the plane of ``anchors`` = (z1, z2, z3) stacked, (3, *shape).

    Returns ``(noise, coords)``: ``noise[i, j] = rescale(z1 + coords[j] (z2 - z1) + coords[i] (z3 - z1))`` of
    shape (R, R, *shape), every point rescaled to the norm sqrt(D) (``rescale_to_sphere``), and ``coords`` =
    ``linspace(-margin, 1 + margin, R)`` (float64).  Row index i is b (vertical axis), column index j is a.
    """
    if anchors.ndim < 2 or anchors.shape[0] != 3:
        raise ValueError(f"anchors must stack three noises, shape (3, *image_shape), got {tuple(anchors.shape)}.")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 2:
        raise ValueError(f"plane.resolution must be an integer >= 2, got {resolution!r}.")
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not 0 <= margin < 10:
        raise ValueError(f"plane.margin must be a number in [0, 10), got {margin!r}.")
    z1, z2, z3 = anchors.double().unbind(0)
    coords = torch.linspace(-float(margin), 1.0 + float(margin), resolution, dtype=torch.float64)
    if margin == 0:  # exact end points, so the corners are exactly the anchors
        coords[0], coords[-1] = 0.0, 1.0
    a = coords.view(1, resolution, *([1] * z1.ndim))
    b = coords.view(resolution, 1, *([1] * z1.ndim))
    grid = z1 + a * (z2 - z1) + b * (z3 - z1)  # (R, R, *shape)
    flat = rescale_to_sphere(grid.reshape(resolution * resolution, *z1.shape))
    return flat.reshape(resolution, resolution, *z1.shape).to(anchors.dtype), coords


def label_by_anchors(feats: Tensor, anchor_feats: Tensor) -> Tensor:
    """Index (0, 1, 2, ...) of the most similar anchor feature (cosine of L2-normalised features) for each row."""
    if feats.ndim != 2 or anchor_feats.ndim != 2 or feats.shape[1] != anchor_feats.shape[1]:
        raise ValueError(
            f"features must be (B, F) and (K, F), got {tuple(feats.shape)} and {tuple(anchor_feats.shape)}."
        )
    return (feats.double() @ anchor_feats.double().T).argmax(dim=1)


def agreement(labels_a: Tensor | np.ndarray, labels_b: Tensor | np.ndarray) -> float:
    """Fraction of grid points where two models' labels agree."""
    la, lb = torch.as_tensor(np.asarray(labels_a)).reshape(-1), torch.as_tensor(np.asarray(labels_b)).reshape(-1)
    if la.shape != lb.shape or la.numel() == 0:
        raise ValueError(f"label maps must have the same non-zero size, got {la.numel()} and {lb.numel()}.")
    return float((la == lb).double().mean())


# ---------------------------------------------------------------------------------------------- models
def run_key(spec: dict, n: int, cfg: dict[str, Any]) -> str:
    """Eight hex digits of the SHA-256 of everything that determines a trained model."""
    return config_key({"arch": spec, "N": n, "kernel": cfg["kernel"], "train": cfg["train"], "data": cfg["data"]})


def _kind(name: str, entry: Any) -> str:
    if entry == "optimal":
        return "optimal"
    if (isinstance(entry, dict) and "checkpoint" in entry) or (isinstance(entry, str) and entry.strip()):
        return "checkpoint"
    if isinstance(entry, dict) and "class_path" in entry:
        return "train"
    raise ValueError(
        f"models.{name} must be 'optimal', a checkpoint path (or {{checkpoint: PATH}}) or "
        f"{{class_path: ..., init_args: ...}}, got {entry!r}."
    )


def _checkpoint_path(entry: Any) -> Path:
    return Path(str(entry["checkpoint"] if isinstance(entry, dict) else entry)).expanduser()


def jobs(cfg: dict[str, Any], image_shape: tuple[int, ...]) -> dict[str, TrainJob]:
    """One ``TrainJob`` per architecture entry of ``models``, on the training subset of size ``size``."""
    tr, d, n = cfg["train"], cfg["data"], int(cfg["size"])
    module_kwargs = module_kwargs_from(cfg["kernel"], tr)
    data_kwargs = dict(source=d["source"], size=n, subset_seed=d["subset_seed"], batch_size=d["batch_size"],
                       source_kwargs=d.get("source_kwargs") or {})
    out = {}
    for name, entry in cfg["models"].items():
        if _kind(name, entry) == "train":
            ckpt = Path(cfg["out"]) / "checkpoints" / f"{name}_N{n}_{run_key(entry, n, cfg)}.ckpt"
            out[name] = study_job(cfg, f"{name} N={n}", entry, image_shape, module_kwargs, data_kwargs, ckpt)
    return out


def _check(cfg: dict[str, Any]) -> None:
    n = cfg["size"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"size must be a positive integer (the training subset), got {n!r}.")
    models = cfg["models"]
    if not isinstance(models, dict) or len(models) < 1:
        raise ValueError("models must be a non-empty mapping of name -> 'optimal' | checkpoint path | {class_path}.")
    for name, entry in models.items():
        if _kind(name, entry) == "checkpoint" and not _checkpoint_path(entry).is_file():
            raise FileNotFoundError(f"models.{name}: checkpoint {_checkpoint_path(entry)} does not exist.")
    seeds = cfg["plane"]["seeds"]
    if (not isinstance(seeds, list) or len(seeds) != 3 or len(set(seeds)) != 3
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)):
        raise ValueError(f"plane.seeds must be three different non-negative integers, got {seeds!r}.")


def run(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Train / load every model, sample the plane, label, compare; write PNG / CSV / labels.npz / W&B."""
    from ..data import SubsetDataModule
    from ..kernels import get_kernel
    from ..metrics import get_descriptor
    from ..module import load_denoiser
    from ..sampling import sample_from_noise, seed_noise
    from ..theory import EmpiricalOptimalDenoiser

    _check(cfg)
    out, device = prepare_output(cfg)
    d, pl, sm = cfg["data"], cfg["plane"], cfg["sample"]
    n, res, margin = int(cfg["size"]), pl["resolution"], pl["margin"]
    t_start = time.time()
    dm = SubsetDataModule(source=d["source"], size=n, subset_seed=d["subset_seed"],
                          source_kwargs=d.get("source_kwargs") or {})
    shape = dm.image_shape
    anchors = rescale_to_sphere(seed_noise(pl["seeds"], shape))
    grid, coords = plane_grid(seed_noise(pl["seeds"], shape), res, margin)
    log(
        f"hyperplane: models {list(cfg['models'])} on {d['source']} N={n}; plane of seeds {pl['seeds']}, "
        f"{res}x{res} grid, a, b in [{0 - margin:g}, {1 + margin:g}], {sm['sampler']} {sm['steps']} steps -> {out}"
    )
    train_jobs = jobs(cfg, shape)
    run_training_jobs(list(train_jobs.values()), int(cfg.get("workers", 1)), log=log)

    desc = get_descriptor(cfg["metrics"]["descriptor"])
    thr = float(desc.default_threshold)
    denoisers: dict[str, tuple[Any, Any]] = {}
    for name, entry in cfg["models"].items():
        kind = _kind(name, entry)
        if kind == "train":
            module, _ = load_trained(train_jobs[name])
            denoisers[name] = (module.ema.to(device).eval().requires_grad_(False), module.kernel)
        elif kind == "checkpoint":
            path = _checkpoint_path(entry)
            den, kernel = load_denoiser(path, device)
            if tuple(den.checkpoint_meta["image_shape"]) != tuple(shape):
                raise ValueError(f"models.{name}: {path} makes {tuple(den.checkpoint_meta['image_shape'])} "
                                 f"images but the training data {d['source']} has {tuple(shape)}.")
            if den.checkpoint_meta.get("num_classes"):
                raise ValueError(f"models.{name}: {path} is class-conditional; the plane maps need "
                                 "unconditional models.")
            denoisers[name] = (den, kernel)
    ref_kernel = next(iter(denoisers.values()))[1] if denoisers else get_kernel(cfg["kernel"])
    for name, entry in cfg["models"].items():
        if _kind(name, entry) == "optimal":
            denoisers[name] = (EmpiricalOptimalDenoiser(dm.images, device=device), ref_kernel)

    flat = grid.reshape(res * res, *shape)
    labels: dict[str, Tensor] = {}
    anchor_images: dict[str, Tensor] = {}
    images: dict[str, Tensor] = {}
    for name in cfg["models"]:
        t0 = time.time()
        den, kernel = denoisers[name]
        kw = dict(sampler=sm["sampler"], steps=int(sm["steps"]), batch_size=int(sm["batch_size"]), device=device)
        x_anchor = sample_from_noise(den, kernel, anchors, **kw)
        x = sample_from_noise(den, kernel, flat, **kw)
        fa = desc(x_anchor)
        labels[name] = label_by_anchors(desc(x), fa).reshape(res, res)
        anchor_images[name], images[name] = x_anchor, x.reshape(res, res, *shape)
        sims = (fa @ fa.T).double()
        close = [(i + 1, j + 1, float(sims[i, j])) for i, j in itertools.combinations(range(3), 2) if sims[i, j] > thr]
        counts = torch.bincount(labels[name].reshape(-1), minlength=3).tolist()
        log(f"  {name}: {res * res + 3} samples in {time.time() - t0:.0f}s; grid points per anchor {counts}"
             + "".join(f"; warning: anchors {i} and {j} are nearly the same image (similarity {s:.3f})"
                       for i, j, s in close))

    names = list(cfg["models"])
    rows = []
    for a, b in itertools.combinations(names, 2):
        rows.append({"model_a": a, "model_b": b, "agreement": agreement(labels[a], labels[b]), "resolution": res,
                     "margin": float(margin), "seeds": ",".join(map(str, pl["seeds"])), "N": n,
                     "descriptor": cfg["metrics"]["descriptor"], "sampler": sm["sampler"], "steps": int(sm["steps"])})
    csv_path = write_csv(rows, out / "hyperplane.csv", COLUMNS)
    npz = out / "labels.npz"
    tmp = npz.with_name(".labels.npz.tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, coords=coords.numpy(), names=np.asarray(names),
                 **{f"labels_{k}": v.numpy().astype(np.int64) for k, v in labels.items()})
    tmp.replace(npz)
    png_path = plot(names, labels, anchor_images, images, coords, out / "hyperplane.png", n, pl["seeds"])
    if rows:
        log(format_table(rows, COLUMNS[:3]))
    summary = {f"agreement/{r['model_a']}|{r['model_b']}": r["agreement"] for r in rows}
    log_study_to_wandb("hyperplane", cfg, rows, COLUMNS, {"hyperplane": png_path}, summary)
    text = ", ".join(f"{r['model_a']}|{r['model_b']} {r['agreement']:.3f}" for r in rows) or "one model, no pairs"
    log(f"hyperplane done in {time.time() - t_start:.0f}s: agreement {text} | {csv_path} | {png_path}")
    return rows


def plot(names: list[str], labels: dict[str, Tensor], anchor_images: dict[str, Tensor], images: dict[str, Tensor],
         coords: Tensor, path: str | Path, n: int, seeds: list[int], mosaic: int = 8) -> Path:
    """One column per model: the label map (anchors marked, triangle drawn), its three anchor images, and a
    ``mosaic`` x ``mosaic`` sub-grid of its samples across the plane (same orientation as the map)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from ..viz import make_grid

    m = len(names)
    fig, axes = plt.subplots(3, m, figsize=(3.3 * m, 8.4), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1, 3]})
    lo, hi = float(coords[0]), float(coords[-1])
    step = (hi - lo) / (len(coords) - 1)
    ext = (lo - step / 2, hi + step / 2, lo - step / 2, hi + step / 2)
    cmap = ListedColormap(_COLOURS)
    res = len(coords)
    pick = sorted(set(np.linspace(0, res - 1, min(mosaic, res)).round().astype(int).tolist()))
    for col, name in enumerate(names):
        ax = axes[0, col]
        ax.imshow(labels[name].numpy(), origin="lower", extent=ext, cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
        ax.plot([0, 1, 0, 0], [0, 0, 1, 0], color="k", lw=0.8, alpha=0.7)
        for k, (x, y) in enumerate([(0, 0), (1, 0), (0, 1)]):
            ax.scatter([x], [y], marker="*", s=160, c=_COLOURS[k], edgecolors="k", linewidths=0.8, zorder=3)
            ax.annotate(f"z{k + 1}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("a", fontsize=8)
        if col == 0:
            ax.set_ylabel("b", fontsize=8)
        ax.tick_params(labelsize=7)
        ax = axes[1, col]
        ax.imshow(make_grid(anchor_images[name], nrow=3, pad=2))
        ax.set_xticks([])
        ax.set_yticks([])
        for k in range(3):
            ax.text((k + 0.5) / 3, -0.08, f"z{k + 1}", color=_COLOURS[k], transform=ax.transAxes, ha="center",
                    va="top", fontsize=8, fontweight="bold")
        ax = axes[2, col]
        sub = images[name][pick][:, pick].flip(0)  # rows top-to-bottom = b descending (as the map)
        ax.imshow(make_grid(sub.reshape(-1, *sub.shape[2:]), nrow=len(pick)))
        ax.set_xticks([])
        ax.set_yticks([])
        if col == 0:
            ax.set_ylabel(f"samples ({len(pick)}x{len(pick)} sub-grid)", fontsize=8)
    fig.suptitle(f"Fig. 7: noise hyperplane of seeds {seeds} (N={n}); colour = nearest anchor image", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """``python -m lightning_repro.studies.hyperplane --config FILE [--out DIR] [--quick]``; returns the CSV rows."""
    return study_main(
        argv,
        "python -m lightning_repro.studies.hyperplane",
        __doc__,
        run,
        DEFAULTS,
        {**QUICK, "models": QUICK_MODELS},
        replace=("models",),
        example_config="configs/experiments/hyperplane.yaml",
    )


if __name__ == "__main__":
    main(sys.argv[1:])
