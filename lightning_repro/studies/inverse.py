"""Fig. 10 / App. F of Zhang et al. (ICML 2024): reproducibility in inverse problems solved with deterministic
diffusion posterior sampling (DPS; Chung et al. 2023, ``sampling.sample_dps``).

Observations ``y = A(x)`` of *held-out* images (not in the training subset) are made with the paper's centred
inpainting masks, "easy" and "hard", scaled to the image size (``sampling.operators``).  Every model -- trained
networks and/or ``optimal``, the optimal denoiser of the subset (Prop. 1) -- solves the same (seed, observation)
pairs: seed ``k`` gives the start ``x_T`` for observation ``k``, with no random draw after it.  Scored per mask:
per pair of models ``rp``, ``mean_similarity`` and ``mae`` of the two reconstructions; per model ``dc`` (RMS of
``y - A(x_hat)`` over the observed pixels), ``mae_gt`` / ``rp_gt`` against the truth and ``copy_rate``.

Writes ``DIR/inverse.csv`` (mask x model pair), ``DIR/inverse_models.csv`` (mask x model), ``DIR/inverse.png``,
``DIR/reconstructions_<mask>.png`` (columns: observation, each model, truth) and ``DIR/checkpoints/``.  Sizes,
measured results and the full-scale settings: ``configs/studies/inverse.yaml``.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..evaluation import scoring as score
from .outputs import finish, format_table, log, save_figure, write_csv
from .protocol import Study, config_key, positive_int
from .steps import StudySetup, setup_study, subset_kwargs, trained_denoiser
from .training import TrainJob, module_kwargs_from, run_training_jobs, study_job

__all__ = ["STUDY", "QUICK", "COLUMNS", "MODEL_COLUMNS", "OPTIMAL", "jobs", "run_key", "held_out_images", "solve",
           "run", "plot", "main"]

#: a model entry with this value is the optimal denoiser of the training subset
OPTIMAL = "optimal"

#: ``--quick``: one tiny network and the optimal denoiser, a few steps (for tests; the numbers mean nothing).
QUICK: dict[str, Any] = {
    "workers": 1,
    "data": {"size": 16, "batch_size": 16},
    "train": {"max_steps": 3, "warmup_steps": 0},
    "inverse": {"observations": 6, "steps": 4, "figure_rows": 6},
    "models": {
        "dit": {"class_path": "DiT", "init_args": {"patch_size": 4, "hidden_size": 16, "depth": 1, "num_heads": 1}},
        "optimal": OPTIMAL,
    },
}

COLUMNS = ["mask", "masked_fraction", "model_a", "model_b", "rp", "mean_similarity", "mae", "dc_a", "dc_b",
           "threshold", "descriptor", "observations"]
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
    positive_int(inv["observations"], "inverse.observations")
    if inv["solver"] not in DPS_SOLVERS:
        raise ValueError(f"inverse.solver must be one of {list(DPS_SOLVERS)}, got {inv['solver']!r}.")
    if inv["schedule"] not in DPS_SCHEDULES:
        raise ValueError(f"inverse.schedule must be one of {list(DPS_SCHEDULES)}, got {inv['schedule']!r}.")


def jobs(cfg: dict[str, Any], image_shape: tuple[int, ...]) -> list[TrainJob]:
    """One ``TrainJob`` per trained model, checkpoint ``<out>/checkpoints/<name>_N<N>_<run_key>.ckpt``."""
    module_kwargs = module_kwargs_from(cfg["kernel"], cfg["train"])
    n = cfg["data"]["size"]
    return [study_job(cfg, name, spec, image_shape, module_kwargs, subset_kwargs(cfg["data"], n),
                      Path(cfg["out"]) / "checkpoints" / f"{name}_N{n}_{run_key(spec, cfg)}.ckpt")
            for name, spec in cfg["models"].items() if not _is_optimal(spec)]


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


def _denoisers(cfg: dict, train_jobs: list[TrainJob], train_images: Tensor, device) -> dict[str, tuple]:
    """name -> (denoiser, kernel): the trained models' EMA denoisers and the optimal denoiser of the subset."""
    from ..kernels import get_kernel
    from ..theory import EmpiricalOptimalDenoiser

    by_name = {j.name: j for j in train_jobs}
    out = {}
    for name, spec in cfg["models"].items():
        if _is_optimal(spec):
            out[name] = (EmpiricalOptimalDenoiser(train_images, device=device), get_kernel(cfg["kernel"]))
        else:
            out[name] = trained_denoiser(by_name[name], device)[:2]
    return out


def _score_mask(mask: str, op, truth: Tensor, denoisers: dict, st: StudySetup, cfg: dict, train_feats: Tensor):
    """Every model's reconstructions of ``op(truth)``: (pair rows, model rows, reconstructions by name)."""
    y, observed, thr, inv = op(truth), float(op.mask.sum()), st.threshold, cfg["inverse"]
    seeds = list(range(int(inv["seed_offset"]), int(inv["seed_offset"]) + len(truth)))
    recon, dc, model_rows = {}, {}, []
    for name, (den, kernel) in denoisers.items():
        t0 = time.time()
        x, stats = solve(den, kernel, seeds, y, op, inv, st.device)
        recon[name] = x
        dc[name] = float(((y - op(x)).flatten(1).pow(2).sum(1) / observed).sqrt().mean())
        fx = st.descriptor(x)
        model_rows.append({"mask": mask, "model": name, "dc": dc[name], "mae_gt": score.mae(x, truth),
                           "rp_gt": score.rp(fx, st.descriptor(truth), thr),
                           "copy_rate": 1.0 - score.gl(fx, train_feats, thr), "seconds": round(time.time() - t0, 1),
                           "nfe": int(stats.get("nfe", 0))})
        log(f"  {mask} mask, {name}: data consistency {dc[name]:.4f}, MAE to truth "
            f"{model_rows[-1]['mae_gt']:.1f} ({time.time() - t0:.0f}s)")
    feats = {n: st.descriptor(x) for n, x in recon.items()}
    rows = [{"mask": mask, "masked_fraction": 1.0 - op.observed_fraction, "model_a": a, "model_b": b,
             "rp": score.rp(feats[a], feats[b], thr), "mean_similarity": score.mean_similarity(feats[a], feats[b]),
             "mae": score.mae(recon[a], recon[b]), "dc_a": dc[a], "dc_b": dc[b], "threshold": thr,
             "descriptor": st.descriptor_name, "observations": len(truth)}
            for a, b in itertools.combinations(list(denoisers), 2)]
    return rows, model_rows, recon


def run(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Train (or load) the models, solve every (mask, seed, observation) with each model, score; write results."""
    from ..data import SubsetDataModule
    from ..sampling import InpaintingOperator
    from ..viz import save_grid

    _check(cfg)
    st, inv, t_start = setup_study(cfg), cfg["inverse"], time.time()
    dm = SubsetDataModule(**subset_kwargs(cfg["data"], cfg["data"]["size"]))
    shape, truth = dm.image_shape, held_out_images(dm, int(inv["observations"]))
    operators = {str(m): InpaintingOperator.centered(tuple(shape[-2:]), m) for m in inv["masks"]}  # checks sizes
    names = list(cfg["models"])
    log(f"inverse: {len(names)} models ({', '.join(names)}) x masks {list(operators)} on {cfg['data']['source']} "
        f"(N={len(dm.images)}), {len(truth)} held-out observations, DPS {inv['solver']} {inv['steps']} steps, "
        f"zeta {inv['zeta']} ({inv['schedule']}), {st.descriptor_name} threshold {st.threshold} -> {st.out}")
    train_jobs = jobs(cfg, shape)
    run_training_jobs(train_jobs, cfg["workers"])
    denoisers, train_feats = _denoisers(cfg, train_jobs, dm.images, st.device), st.descriptor(dm.images)
    rows, model_rows, figures = [], [], {}
    for mask, op in operators.items():
        pair_rows, m_rows, recon = _score_mask(mask, op, truth, denoisers, st, cfg, train_feats)
        rows, model_rows = rows + pair_rows, model_rows + m_rows
        r = min(int(inv.get("figure_rows", 8)), len(truth))
        cols = [op(truth)[:r]] + [recon[n][:r] for n in names] + [truth[:r]]
        figures[f"reconstructions_{mask}"] = save_grid(torch.stack(cols, dim=1).reshape(-1, *shape),
                                                       st.out / f"reconstructions_{mask}.png", nrow=len(cols))
        write_csv(rows, st.out / "inverse.csv", COLUMNS)  # partial results survive an interruption
    models_csv = write_csv(model_rows, st.out / "inverse_models.csv", MODEL_COLUMNS)
    png = plot(rows, st.out / "inverse.png", st.threshold, st.descriptor_name)
    log(format_table(model_rows, MODEL_COLUMNS[:6]))
    summary = {f"rp_{r['mask']}_{r['model_a']}_vs_{r['model_b']}": r["rp"] for r in rows}
    csv_path = finish(STUDY.name, cfg, rows, COLUMNS, "inverse.csv", {"figure": png, **figures}, summary,
                      ["mask", "model_a", "model_b", "rp", "mean_similarity", "mae", "dc_a", "dc_b"])
    txt = "; ".join(f"{m}: RP " + ", ".join(f"{r['model_a']}-{r['model_b']} {r['rp']:.2f}" for r in rows
                                            if r["mask"] == m) for m in operators)
    log(f"inverse done in {time.time() - t_start:.0f}s: {txt} | {csv_path} | {models_csv} | {png}")
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


STUDY = Study(name="inverse", module="inverse", paper="Fig. 10", title="inverse problems, deterministic DPS",
              run=run, columns=COLUMNS, quick=QUICK, replace=("models",), jobs=jobs, score=_score_mask, plot=plot)


main = STUDY.main  # main(["--config", FILE, "--out", DIR, "--quick"]) -> the CSV rows


if __name__ == "__main__":
    main(sys.argv[1:])
