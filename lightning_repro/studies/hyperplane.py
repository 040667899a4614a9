"""Noise-hyperplane maps (Zhang et al., ICML 2024, Fig. 7): different diffusion models map a whole plane of
initial noises to images the same way.

Three seeds give noises ``z1, z2, z3 = seed_noise(plane.seeds)``, which span the plane
``z(a, b) = z1 + a (z2 - z1) + b (z3 - z1)``, ``a, b in [-margin, 1 + margin]``.  An R x R grid of it (``plane_grid``)
is rescaled to the norm sqrt(D) of a typical N(0, I) draw (``rescale_to_sphere``: a convex combination of draws
is shorter), and so are the anchors.  Each model samples every grid noise and the three anchor noises with the
same deterministic sampler (``sampling.sample_from_noise``); each grid image is labelled by its nearest anchor
image (descriptor cosine), one coloured map per model; ``agreement(A, B)`` is the fraction of grid points with
the same label.  Models: ``optimal`` (the optimal denoiser of the subset, Prop. 1), a checkpoint path or any model
spec the evaluation takes (``edm:FILE.pkl``, ``uvit:`` / ``dit:FILE``, ``diffusers:DIR``, ``optimal:<data spec>``;
or ``{checkpoint: SPEC}``), or ``{class_path, init_args}`` (trained here on the subset).

Writes ``DIR/hyperplane.png`` (per model: its map, its anchor images, a mosaic of its samples),
``DIR/hyperplane.csv`` (agreement per pair of models), ``DIR/labels.npz`` and ``DIR/checkpoints/``.  Sizes,
measured results and the full-scale settings: ``configs/studies/hyperplane.yaml``.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .outputs import finish, log, save_figure, save_npz
from .protocol import Study, config_key, positive_int
from .steps import descriptor_trust, prepare_output, subset_kwargs, trained_denoiser
from .training import TrainJob, module_kwargs_from, run_training_jobs, study_job

__all__ = ["STUDY", "QUICK", "COLUMNS", "plane_grid", "rescale_to_sphere", "label_by_anchors", "agreement",
           "run_key", "jobs", "run", "plot", "main"]

#: ``--quick``: a tiny network and the optimal denoiser, a small grid, a few steps (for tests).
QUICK: dict[str, Any] = {
    "workers": 1,
    "size": 16,
    "data": {"batch_size": 16},
    "train": {"max_steps": 3, "warmup_steps": 0},
    "plane": {"resolution": 6},
    "sample": {"steps": 4},
    "models": {
        "dit": {"class_path": "DiT", "init_args": {"patch_size": 4, "hidden_size": 16, "depth": 1, "num_heads": 1}},
        "optimal": "optimal",
    },
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
        f"models.{name} must be 'optimal', a checkpoint path or model spec (e.g. edm:FILE.pkl; or "
        f"{{checkpoint: SPEC}}) or {{class_path: ..., init_args: ...}}, got {entry!r}."
    )


def _model_spec(entry: Any) -> str:
    return str(entry["checkpoint"] if isinstance(entry, dict) else entry).strip()


def _checkpoint_path(entry: Any) -> Path | None:
    """The suite checkpoint an entry names; None for a ``kind:`` model spec (``edm:``, ``diffusers:``, ...)."""
    from ..evaluation.references import REFERENCES

    spec = _model_spec(entry)
    kind, sep, _ = spec.partition(":")
    return None if sep and kind in REFERENCES else Path(spec).expanduser()


def jobs(cfg: dict[str, Any], image_shape: tuple[int, ...]) -> dict[str, TrainJob]:
    """One ``TrainJob`` per architecture entry of ``models``, on the training subset of size ``size``."""
    n = int(cfg["size"])
    module_kwargs, data_kwargs = module_kwargs_from(cfg["kernel"], cfg["train"]), subset_kwargs(cfg["data"], n)
    return {name: study_job(cfg, f"{name} N={n}", entry, image_shape, module_kwargs, data_kwargs,
                            Path(cfg["out"]) / "checkpoints" / f"{name}_N{n}_{run_key(entry, n, cfg)}.ckpt")
            for name, entry in cfg["models"].items() if _kind(name, entry) == "train"}


def _check(cfg: dict[str, Any]) -> None:
    positive_int(cfg["size"], "size", " (the training subset)")
    models = cfg["models"]
    if not isinstance(models, dict) or len(models) < 1:
        raise ValueError("models must be a non-empty mapping of name -> 'optimal' | checkpoint path | {class_path}.")
    for name, entry in models.items():
        path = _checkpoint_path(entry) if _kind(name, entry) == "checkpoint" else None
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"models.{name}: checkpoint {path} does not exist.")
    seeds = cfg["plane"]["seeds"]
    if (not isinstance(seeds, list) or len(seeds) != 3 or len(set(seeds)) != 3
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)):
        raise ValueError(f"plane.seeds must be three different non-negative integers, got {seeds!r}.")


def _checkpoint_denoiser(name: str, spec: str, shape, cfg: dict[str, Any], device) -> tuple[Any, Any]:
    """The denoiser and kernel of a given model spec (``evaluation.resolve_model``: a checkpoint's EMA denoiser, a
    published model, ...); one sentence unless it is an unconditional pixel-space model of ``shape``."""
    from ..evaluation.references import resolve_model

    data = subset_kwargs(cfg["data"], int(cfg["size"]), batch_size=None)  # what optimal:<no source> means
    try:
        ref = resolve_model(spec, data=data, kernel_spec={"name": cfg["kernel"], "kwargs": {}})
    except ValueError as err:
        raise ValueError(f"models.{name}: {err}") from None
    if tuple(ref.sample_shape) != tuple(ref.image_shape):
        raise ValueError(f"models.{name}: {spec} is a latent model; the plane maps are drawn in image space.")
    if tuple(ref.image_shape) != tuple(shape):
        raise ValueError(f"models.{name}: {spec} makes {tuple(ref.image_shape)} "
                         f"images but the training data {cfg['data']['source']} has {tuple(shape)}.")
    if ref.num_classes:
        raise ValueError(f"models.{name}: {spec} is class-conditional; the plane maps need unconditional models.")
    return ref.denoiser(torch.device(device)), ref.kernel()


def _denoisers(cfg: dict[str, Any], train_jobs: dict[str, TrainJob], images: Tensor, device) -> dict[str, tuple]:
    """name -> (denoiser, kernel); ``optimal`` is sampled on the first other model's kernel, else ``kernel``."""
    from ..kernels import get_kernel
    from ..theory import EmpiricalOptimalDenoiser

    out: dict[str, tuple[Any, Any]] = {}
    for name, entry in cfg["models"].items():
        kind = _kind(name, entry)
        if kind == "train":
            out[name] = trained_denoiser(train_jobs[name], device)[:2]
        elif kind == "checkpoint":
            spec = str(_checkpoint_path(entry) or _model_spec(entry))
            out[name] = _checkpoint_denoiser(name, spec, images.shape[1:], cfg, device)
    ref_kernel = next(iter(out.values()))[1] if out else get_kernel(cfg["kernel"])
    for name, entry in cfg["models"].items():
        if _kind(name, entry) == "optimal":
            out[name] = (EmpiricalOptimalDenoiser(images, device=device), ref_kernel)
    return {name: out[name] for name in cfg["models"]}


def _map(name: str, den, kernel, anchors: Tensor, grid: Tensor, desc, cfg: dict, device) -> tuple:
    """One model's (labels R x R, anchor images, grid images R x R x shape), logging the anchor counts."""
    from ..sampling import sample_from_noise

    t0, sm, res, shape = time.time(), cfg["sample"], grid.shape[0], anchors.shape[1:]
    kw = dict(sampler=sm["sampler"], steps=int(sm["steps"]), batch_size=int(sm["batch_size"]), device=device)
    x_anchor = sample_from_noise(den, kernel, anchors, **kw)
    x = sample_from_noise(den, kernel, grid.reshape(res * res, *shape), **kw)
    fa = desc(x_anchor)
    labels = label_by_anchors(desc(x), fa).reshape(res, res)
    sims, thr = (fa @ fa.T).double(), float(desc.default_threshold)
    close = [(i + 1, j + 1, float(sims[i, j])) for i, j in itertools.combinations(range(3), 2) if sims[i, j] > thr]
    counts = torch.bincount(labels.reshape(-1), minlength=3).tolist()
    log(f"  {name}: {res * res + 3} samples in {time.time() - t0:.0f}s; grid points per anchor {counts}"
        + "".join(f"; warning: anchors {i} and {j} are nearly the same image (similarity {s:.3f})"
                  for i, j, s in close))
    return labels, x_anchor, x.reshape(res, res, *shape)


def run(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Train / load every model, sample the plane, label, compare; write PNG / CSV / labels.npz / W&B."""
    from ..data import SubsetDataModule
    from ..metrics import get_descriptor
    from ..sampling import seed_noise

    _check(cfg)
    out, device = prepare_output(cfg)
    pl, sm, n, t_start = cfg["plane"], cfg["sample"], int(cfg["size"]), time.time()
    res, margin = pl["resolution"], pl["margin"]
    dm = SubsetDataModule(**subset_kwargs(cfg["data"], n, batch_size=None))
    shape = dm.image_shape
    anchors = rescale_to_sphere(seed_noise(pl["seeds"], shape))
    grid, coords = plane_grid(seed_noise(pl["seeds"], shape), res, margin)
    log(f"hyperplane: models {list(cfg['models'])} on {cfg['data']['source']} N={n}; plane of seeds {pl['seeds']}, "
        f"{res}x{res} grid, a, b in [{0 - margin:g}, {1 + margin:g}], {sm['sampler']} {sm['steps']} steps -> {out}")
    train_jobs = jobs(cfg, shape)
    run_training_jobs(list(train_jobs.values()), cfg["workers"])
    desc = get_descriptor(cfg["metrics"]["descriptor"], **descriptor_trust(cfg["metrics"]))
    names = list(cfg["models"])
    maps = {name: _map(name, den, kernel, anchors, grid, desc, cfg, device)
            for name, (den, kernel) in _denoisers(cfg, train_jobs, dm.images, device).items()}
    labels = {name: m[0] for name, m in maps.items()}
    rows = [{"model_a": a, "model_b": b, "agreement": agreement(labels[a], labels[b]), "resolution": res,
             "margin": float(margin), "seeds": ",".join(map(str, pl["seeds"])), "N": n,
             "descriptor": cfg["metrics"]["descriptor"], "sampler": sm["sampler"], "steps": int(sm["steps"])}
            for a, b in itertools.combinations(names, 2)]
    save_npz(out / "labels.npz", coords=coords.numpy(), names=np.asarray(names),
             **{f"labels_{k}": v.numpy().astype(np.int64) for k, v in labels.items()})
    png = plot(names, labels, {k: m[1] for k, m in maps.items()}, {k: m[2] for k, m in maps.items()}, coords,
               out / "hyperplane.png", n, pl["seeds"])
    summary = {f"agreement/{r['model_a']}|{r['model_b']}": r["agreement"] for r in rows}
    csv_path = finish(STUDY.name, cfg, rows, COLUMNS, "hyperplane.csv", {"hyperplane": png}, summary,
                      COLUMNS[:3] if rows else ())
    text = ", ".join(f"{r['model_a']}|{r['model_b']} {r['agreement']:.3f}" for r in rows) or "one model, no pairs"
    log(f"hyperplane done in {time.time() - t_start:.0f}s: agreement {text} | {csv_path} | {png}")
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


STUDY = Study(name="hyperplane", module="hyperplane", paper="Fig. 7", title="noise-hyperplane maps", run=run,
              columns=COLUMNS, quick=QUICK, replace=("models",), jobs=jobs, score=_map, plot=plot)


main = STUDY.main  # main(["--config", FILE, "--out", DIR, "--quick"]) -> the CSV rows


if __name__ == "__main__":
    main(sys.argv[1:])
