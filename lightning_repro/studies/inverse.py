"""Fig. 10 / App. F of Zhang et al. (ICML 2024): reproducibility in inverse problems solved with deterministic
diffusion posterior sampling (DPS; Chung et al. 2023).

Observations ``y = A(x)`` are made from *held-out* images (not in the training subset) with a centred-square
inpainting operator, the paper's "easy" (16 x 16 of 32 x 32, 25%) and "hard" (25 x 25, 61%) masks scaled to
the image size (``sampling.operators``: 4 x 4 and 6 x 6 on 8 x 8 digits).  Every model -- trained networks
and/or ``optimal``, the optimal denoiser of the training subset (Prop. 1) -- solves the same (seed,
observation) pairs with ``sampling.sample_dps`` (a deterministic Heun step of the PF-ODE plus the DPS
gradient ``-zeta * grad ||y - A(D(x, sigma))||`` through the denoiser; no random draw after ``x_T``): seed
``k`` gives the start ``x_T = sigma_max * z(k)`` for observation ``k``.  Scored, per mask:

* per pair of models: ``rp`` (pixel descriptor: P(similarity > threshold), seed by seed), ``mean_similarity``
  and ``mae`` (mean absolute difference, 0-255) of the two reconstructions;
* per model: ``dc`` (data consistency, the RMS of ``y - A(x_hat)`` over the observed pixels, [-1, 1] units),
  ``mae_gt`` / ``rp_gt`` against the ground truth, and ``copy_rate`` (fraction of reconstructions above the
  threshold with some training image: memorised answers).

The paper's finding: different models (and, in the memorization regime, the optimal denoiser) give nearly
the same reconstruction of the same observation from the same noise, more so for the easier problem.

Command::

    python -m lightning_repro.studies.inverse --config configs/experiments/inverse.yaml [--out DIR] [--quick]

writes ``DIR/inverse.csv`` (rows: mask kind x model pair), ``DIR/inverse_models.csv`` (mask kind x model),
``DIR/inverse.png`` (RP per pair and mask), ``DIR/reconstructions_<mask>.png`` (columns: observation, each
model's reconstruction, ground truth; one row per observation) and ``DIR/checkpoints/`` (a rerun skips
finished trainings).

Scale.  CPU defaults (``configs/experiments/inverse.yaml``): 8 x 8 digits, N = 1,024 training images (the 773
others supply the observations); single-token DiT and U-ViT (2,000 steps of batch 256, as the memorization
study) and the optimal denoiser; 32 held-out observations; Heun 18 steps; zeta 30 with the ``ode`` step
schedule (``sampling.dps``); pixel descriptor, threshold 0.97.  Measured (2026-11-27, 1 min 47 s wall from
scratch on an idle 2-core machine): RP(DiT, U-ViT) 0.81 (easy mask) and 0.69 (hard), RP(network, optimal) 0 (at
N = 1,024 the networks generalize, the optimal denoiser returns training images).

Full scale, as the paper: ``data.source: cifar10`` (observations from the test split or from images outside
the subset), the EDM U-Net / DiT-S/2 / U-ViT-S/2 of the memorization study trained on the subset,
``inverse.steps`` 100-1000, ``inverse.zeta`` tuned on a few observations, ``inverse.observations`` 1000+,
``metrics.descriptor: sscd`` (threshold 0.6); one GPU per training (``workers: 1, threads: null``).
"""

from __future__ import annotations

import copy
import itertools
import math
import sys
import time
from pathlib import Path
from typing import Any

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
    run_training_jobs,
    save_figure,
    setup_study,
    study_job,
    study_main,
    write_csv,
)

__all__ = [
    "DEFAULTS",
    "QUICK",
    "COLUMNS",
    "MODEL_COLUMNS",
    "OPTIMAL",
    "jobs",
    "run_key",
    "held_out_images",
    "solve",
    "run",
    "plot",
    "main",
]

#: a model entry with this value is the optimal denoiser of the training subset
OPTIMAL = "optimal"

DEFAULTS: dict[str, Any] = {
    "out": "outputs/inverse",
    "threads": 1,
    "workers": 2,
    "device": "auto",
    "wandb": True,
    "data": {"source": "digits", "source_kwargs": {}, "size": 1024, "subset_seed": 0, "batch_size": 256},
    "kernel": "edm",
    "models": {
        "dit": copy.deepcopy(DIGITS_DIT),
        "uvit": copy.deepcopy(DIGITS_UVIT),
        "optimal": OPTIMAL,
    },
    "train": copy.deepcopy(DIGITS_TRAIN),
    "inverse": {
        "masks": ["easy", "hard"],
        "observations": 32,
        "seed_offset": 0,
        "solver": "heun",
        "steps": 18,
        "zeta": 30.0,
        "schedule": "ode",
        "batch_size": 256,
        "figure_rows": 8,
    },
    "metrics": {"descriptor": "pixel", "threshold": None},
}

#: ``--quick``: one tiny network and the optimal denoiser, a few steps (for tests; the numbers mean nothing).
QUICK: dict[str, Any] = {
    "workers": 1,
    "data": {"size": 16, "batch_size": 16},
    "train": {"max_steps": 3, "warmup_steps": 0},
    "inverse": {"observations": 6, "steps": 4, "figure_rows": 6},
}
QUICK_MODELS: dict[str, Any] = {
    "dit": {"class_path": "DiT", "init_args": {"patch_size": 4, "hidden_size": 16, "depth": 1, "num_heads": 1}},
    "optimal": OPTIMAL,
}

COLUMNS = [
    "mask",
    "masked_fraction",
    "model_a",
    "model_b",
    "rp",
    "mean_similarity",
    "mae",
    "dc_a",
    "dc_b",
    "threshold",
    "descriptor",
    "observations",
]
MODEL_COLUMNS = ["mask", "model", "dc", "mae_gt", "rp_gt", "copy_rate", "seconds", "nfe"]


def run_key(spec: dict, cfg: dict) -> str:
    """Eight hex digits of the SHA-256 of everything that determines a trained model."""
    return config_key({"arch": spec, "kernel": cfg["kernel"], "train": cfg["train"], "data": cfg["data"]})


def _is_optimal(spec: Any) -> bool:
    return isinstance(spec, str) and spec.lower() == OPTIMAL


def _check(cfg: dict) -> None:
    from ..sampling.dps import DPS_SCHEDULES, DPS_SOLVERS

    models = cfg["models"]
    if not isinstance(models, dict) or len(models) < 2:
        raise ValueError("models must map at least two names to {class_path, init_args} or 'optimal'.")
    for name, spec in models.items():
        if not _is_optimal(spec) and not (isinstance(spec, dict) and "class_path" in spec):
            raise ValueError(f"models.{name} must be 'optimal' or a mapping with 'class_path' and 'init_args'.")
    inv = cfg["inverse"]
    if not isinstance(inv["masks"], list) or not inv["masks"]:
        raise ValueError(
            f"inverse.masks must be a non-empty list of 'easy', 'hard' or integer sides, got {inv['masks']!r}."
        )
    k = inv["observations"]
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"inverse.observations must be a positive integer, got {k!r}.")
    if inv["solver"] not in DPS_SOLVERS:
        raise ValueError(f"inverse.solver must be one of {list(DPS_SOLVERS)}, got {inv['solver']!r}.")
    if inv["schedule"] not in DPS_SCHEDULES:
        raise ValueError(f"inverse.schedule must be one of {list(DPS_SCHEDULES)}, got {inv['schedule']!r}.")


def _data_kwargs(cfg: dict) -> dict[str, Any]:
    d = cfg["data"]
    return dict(
        source=d["source"],
        size=d["size"],
        subset_seed=d["subset_seed"],
        batch_size=d["batch_size"],
        source_kwargs=d.get("source_kwargs") or {},
    )


def jobs(cfg: dict[str, Any], image_shape: tuple[int, ...]) -> list[TrainJob]:
    """One ``TrainJob`` per trained model, checkpoint ``<out>/checkpoints/<name>_N<N>_<run_key>.ckpt``."""
    tr = cfg["train"]
    module_kwargs = module_kwargs_from(cfg["kernel"], tr)
    out = []
    n = cfg["data"]["size"]
    for name, spec in cfg["models"].items():
        if _is_optimal(spec):
            continue
        ckpt = Path(cfg["out"]) / "checkpoints" / f"{name}_N{n}_{run_key(spec, cfg)}.ckpt"
        out.append(
            study_job(cfg, name, spec, image_shape, module_kwargs, _data_kwargs(cfg), ckpt)
        )
    return out


def held_out_images(dm, count: int) -> Tensor:
    """``count`` images of the source that are *not* in ``dm``'s training subset: positions N, N+1, ... of the
    subset's permutation (so they never enter any nested subset of size <= N)."""
    from ..data.datamodule import subset_indices

    source = dm.source
    perm = subset_indices(source, None, dm.subset_seed, dm.class_balanced)
    n = len(dm.indices)
    if n + count > len(perm):
        raise ValueError(
            f"inverse.observations={count} held-out images are needed but the {dm.source_name} source has only "
            f"{len(perm) - n} images outside the training subset of {n}."
        )
    return source.images[perm[n : n + count]]


def solve(
    denoiser, kernel, seeds: list[int], y: Tensor, operator, inv: dict, device: torch.device
) -> tuple[Tensor, dict]:
    """Deterministic DPS reconstructions (clamped to [-1, 1], on the CPU) of observations ``y`` from ``seeds``."""
    from ..sampling import get_sigmas, sample_dps, seed_noise

    sigmas = get_sigmas("native", int(inv["steps"]), kernel)
    bs = int(inv.get("batch_size", 256))
    shape = tuple(y.shape[1:])
    out, stats = [], {}
    for i in range(0, len(seeds), bs):
        x_T = kernel.prior_scale * seed_noise(seeds[i : i + bs], shape, device=device)
        x = sample_dps(denoiser, x_T, sigmas, y[i : i + bs].to(device), operator, zeta=float(inv["zeta"]),
                       solver=inv["solver"], schedule=inv["schedule"], stats=stats)
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out), stats


def run(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Train (or load) the models, solve every (mask, seed, observation) with each model, score; write results."""
    from ..data import SubsetDataModule
    from ..kernels import get_kernel
    from ..metrics import gl_score, mae_score, paired_similarity, rp_score
    from ..sampling import InpaintingOperator
    from ..theory import EmpiricalOptimalDenoiser
    from ..viz import save_grid

    _check(cfg)
    st = setup_study(cfg)
    out, device, desc, thr = st.out, st.device, st.descriptor, st.threshold
    inv = cfg["inverse"]
    t_start = time.time()

    dm = SubsetDataModule(**_data_kwargs(cfg))
    train_images, shape = dm.images, dm.image_shape
    truth = held_out_images(dm, int(inv["observations"]))
    seeds = list(range(int(inv["seed_offset"]), int(inv["seed_offset"]) + len(truth)))
    operators = {str(m): InpaintingOperator.centered(tuple(shape[-2:]), m) for m in inv["masks"]}  # checks sizes
    names = list(cfg["models"])
    log(
        f"inverse: {len(names)} models ({', '.join(names)}) x masks {list(operators)} on {cfg['data']['source']} "
        f"(N={len(train_images)}), {len(truth)} held-out observations, DPS {inv['solver']} {inv['steps']} steps, "
        f"zeta {inv['zeta']} ({inv['schedule']}), {cfg['metrics']['descriptor']} threshold {thr} -> {out}"
    )
    all_jobs = jobs(cfg, shape)
    run_training_jobs(all_jobs, int(cfg.get("workers", 1)), log=log)

    denoisers: dict[str, tuple[Any, Any]] = {}
    by_name = {j.name: j for j in all_jobs}
    for name, spec in cfg["models"].items():
        if _is_optimal(spec):
            denoisers[name] = (EmpiricalOptimalDenoiser(train_images, device=device), get_kernel(cfg["kernel"]))
        else:
            module, _ = load_trained(by_name[name])
            denoisers[name] = (module.ema.to(device).eval().requires_grad_(False), module.kernel)

    train_feats = desc(train_images)
    rows: list[dict[str, Any]] = []
    model_rows: list[dict[str, Any]] = []
    fig_paths: dict[str, Path] = {}
    for mask, op in operators.items():
        y = op(truth)
        observed = float(op.mask.sum())
        recon: dict[str, Tensor] = {}
        dc: dict[str, float] = {}
        for name, (den, kernel) in denoisers.items():
            t0 = time.time()
            x, st = solve(den, kernel, seeds, y, op, inv, device)
            recon[name] = x
            dc[name] = float(((y - op(x)).flatten(1).pow(2).sum(1) / observed).sqrt().mean())
            fx = desc(x)
            model_rows.append({
                "mask": mask,
                "model": name,
                "dc": dc[name],
                "mae_gt": mae_score(x, truth)["mae_mean"],
                "rp_gt": rp_score(fx, desc(truth), thr),
                "copy_rate": 1.0 - gl_score(fx, train_feats, thr),
                "seconds": round(time.time() - t0, 1),
                "nfe": int(st.get("nfe", 0)),
            })
            log(f"  {mask} mask, {name}: data consistency {dc[name]:.4f}, MAE to truth "
                 f"{model_rows[-1]['mae_gt']:.1f} ({time.time() - t0:.0f}s)")
        feats = {n: desc(x) for n, x in recon.items()}
        for a, b in itertools.combinations(names, 2):
            rows.append({
                "mask": mask,
                "masked_fraction": 1.0 - op.observed_fraction,
                "model_a": a,
                "model_b": b,
                "rp": rp_score(feats[a], feats[b], thr),
                "mean_similarity": float(paired_similarity(feats[a], feats[b]).mean()),
                "mae": mae_score(recon[a], recon[b])["mae_mean"],
                "dc_a": dc[a],
                "dc_b": dc[b],
                "threshold": thr,
                "descriptor": cfg["metrics"]["descriptor"],
                "observations": len(truth),
            })
        r = min(int(inv.get("figure_rows", 8)), len(truth))
        cols = [y[:r]] + [recon[n][:r] for n in names] + [truth[:r]]
        tiles = torch.stack(cols, dim=1).reshape(-1, *shape)
        fig_paths[mask] = save_grid(tiles, out / f"reconstructions_{mask}.png", nrow=len(cols))
        write_csv(rows, out / "inverse.csv", COLUMNS)  # partial results survive an interruption

    csv_path = write_csv(rows, out / "inverse.csv", COLUMNS)
    models_csv = write_csv(model_rows, out / "inverse_models.csv", MODEL_COLUMNS)
    png_path = plot(rows, out / "inverse.png", thr, cfg["metrics"]["descriptor"])
    log(format_table(rows, ["mask", "model_a", "model_b", "rp", "mean_similarity", "mae", "dc_a", "dc_b"]))
    log(format_table(model_rows, MODEL_COLUMNS[:6]))
    summary = {f"rp_{r['mask']}_{r['model_a']}_vs_{r['model_b']}": r["rp"] for r in rows}
    images = {"figure": png_path, **{f"reconstructions_{m}": p for m, p in fig_paths.items()}}
    log_study_to_wandb("inverse", cfg, rows, COLUMNS, images=images, summary=summary)
    txt = "; ".join(
        f"{m}: RP " + ", ".join(f"{r['model_a']}-{r['model_b']} {r['rp']:.2f}" for r in rows if r["mask"] == m)
        for m in operators
    )
    log(f"inverse done in {time.time() - t_start:.0f}s: {txt} | {csv_path} | {models_csv} | {png_path}")
    return rows


def plot(rows: list[dict[str, Any]], path: str | Path, threshold: float, descriptor: str) -> Path:
    """Grouped bars: RP of each model pair, one group per mask kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masks = list(dict.fromkeys(r["mask"] for r in rows))
    pairs = list(dict.fromkeys((r["model_a"], r["model_b"]) for r in rows))
    fig, ax = plt.subplots(figsize=(1.5 + 1.6 * len(masks) * max(1, len(pairs)) / 2, 3.4))
    width = 0.8 / max(1, len(pairs))
    for j, (a, b) in enumerate(pairs):
        vals = [next((r["rp"] for r in rows if r["mask"] == m and (r["model_a"], r["model_b"]) == (a, b)), math.nan)
                for m in masks]
        ax.bar([i + (j - (len(pairs) - 1) / 2) * width for i in range(len(masks))], vals, width, label=f"{a} vs {b}")
    labels = [f"{m} ({next(r['masked_fraction'] for r in rows if r['mask'] == m):.0%} masked)" for m in masks]
    ax.set_xticks(range(len(masks)), labels)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("RP")
    ax.legend(fontsize=7)
    ax.set_title(f"Fig. 10: deterministic DPS inpainting ({descriptor}, threshold {threshold:g})", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    return study_main(argv, "python -m lightning_repro.studies.inverse", __doc__, run, DEFAULTS,
                      {**QUICK, "models": QUICK_MODELS}, replace=("models",),
                      example_config="configs/experiments/inverse.yaml")


if __name__ == "__main__":
    main(sys.argv[1:])
