"""Fig. 5 of Zhang et al. (ICML 2024): in the generalization regime, on a mixture of low-rank Gaussians
(Eq. 2), the score of a trained diffusion model approaches the true closed-form score (Prop. 2) as the
number of training samples grows.

For every mixture ``(K, d)`` (K components of rank d in R^n, ``theory.LowRankMoG``, bases fixed by
``mog_seed``) and every training-set size N, a small denoiser is trained on N samples of the mixture (data
source ``mog``: one draw of ``max(sizes)`` samples, nested subsets of size N) for a fixed number of steps,
then scored with ``theory.score_error``:

    score_error = E_{sigma, x_0, n} || s_theta(x_0 + sigma n, sigma) - grad log p_sigma(x_0 + sigma n) ||^2,

``s_theta = (D_theta(x, sigma) - x) / sigma^2`` from the EMA denoiser, ``x_0`` fresh draws of the mixture
(not the training set), ``ln sigma ~ N(-1.2, 1.2^2)`` (EDM's training distribution; ``eval.sigmas`` can
fix a list instead), with one seeded generator so every model sees the same draws.  Per-sigma errors at
``eval.per_sigma`` are written as extra columns, and so is the score error of the *optimal denoiser of
the N training samples* (``EmpiricalOptimalDenoiser``, Prop. 1): the error of a model that memorised
perfectly, the reference the trained model must beat to generalize.

Command::

    python -m lightning_repro.studies.mog_generalization --config configs/experiments/fig5_mog.yaml \
        [--out DIR] [--quick]

writes ``DIR/fig5.csv`` (one row per (K, d, N)), ``DIR/fig5.png`` (score error vs N, log-log, one line per
(K, d); dashed: the empirical optimal denoiser) and checkpoints ``DIR/checkpoints/K<K>_d<d>_N<N>_<hash>.ckpt``
(the hash covers the training configuration), so a rerun skips every finished training.  ``--quick``
uses tiny settings for tests.

Scale.  CPU defaults (``configs/experiments/fig5_mog.yaml``): n = 1 x 8 x 8 = 64, (K, d) in {(2, 4), (4, 2)},
N in {16, 32, 64, 128, 256, 1024, 4096}, a DiT with one 8 x 8 patch (a single token, i.e. a transformer MLP:
the subspaces are random dense directions, with no local structure for a convolution to exploit), EDM
kernel, 1,500 steps of batch 256, two trainings at once (``workers: 2``), score error on 4,096 draws:
12-15 minutes on 2 CPU cores (15 min measured with other jobs on the machine).  A first run with the tiny
EDM U-Net (16 channels, batch 128, N = 64 ... 4096) showed the same fall with a floor 1.5-2x higher
(4.6e3 / 3.9e3 at N = 4096 against 2.1e3 / 2.6e3) and slower training (144-220 s against 86-131 s per run).

What to expect.  The error is dominated by small sigma (it grows like 1/sigma^2 for a fixed denoiser
error).  At small N the model memorises (its score points at training samples, like the empirical optimal
denoiser's) and the error is large; it falls steeply once N is large enough to pin down the K subspaces of
rank d, then levels off at the network's approximation floor for a fixed number of steps (measured: a
10x fall from N = 16 to N = 256, then flat within +-4%; the error at sigma = 1 and 5 keeps falling up to
N = 1024).

Full scale (one GPU): a larger ambient dimension (``shape: [3, 16, 16]`` or ``[3, 32, 32]``), more mixtures
(``K`` in {2, 5, 10}, ``d`` in {2, 5, 10}), ``sizes`` 2^4 ... 2^16, the EDM U-Net at ``model_channels: 64,
channel_mult: [1, 2, 2]`` or a DiT-S with patch 4, trained to convergence (``train.max_steps`` in the tens of
thousands), ``eval.num_samples: 65536``; ``workers: 1, threads: null``.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import (
    DIGITS_DIT,
    TrainJob,
    config_key,
    format_table,
    load_study_config,
    load_trained,
    log,
    log_study_to_wandb,
    module_kwargs_from,
    prepare_output,
    run_training_jobs,
    save_figure,
    study_job,
    write_csv,
)

__all__ = ["DEFAULTS", "QUICK", "COLUMNS", "columns", "jobs", "run_key", "run", "plot", "main"]

DEFAULTS: dict[str, Any] = {
    "out": "outputs/fig5",
    "wandb": True,
    "threads": 1,
    "workers": 1,
    "device": "auto",
    "shape": [1, 8, 8],
    "mixtures": [[2, 4], [4, 2]],
    "mog_seed": 0,
    "scale": None,
    "sizes": [16, 32, 64, 128, 256, 1024, 4096],
    "subset_seed": 0,
    "kernel": "edm",
    "arch": copy.deepcopy(DIGITS_DIT),
    "train": {
        "max_steps": 1500,
        "batch_size": 256,
        "lr": 2e-3,
        "warmup_steps": 100,
        "ema_halflife_kimg": 20.0,
        "ema_rampup_ratio": 0.05,
        "seed": 0,
        "kernel_kwargs": {},
        "trainer": {},
    },
    "eval": {
        "num_samples": 4096,
        "sigmas": None,
        "per_sigma": [0.05, 0.2, 1.0, 5.0],
        "seed": 12345,
        "batch_size": 1024,
    },
}

#: ``--quick``: one tiny network, two mixtures, two sizes, a few steps (for tests; the numbers mean nothing).
QUICK: dict[str, Any] = {
    "workers": 1,
    "sizes": [16, 64],
    "arch": {
        "class_path": "EDM",
        "init_args": {
            "model_channels": 8,
            "channel_mult": [1],
            "num_blocks": 1,
            "attn_resolutions": [],
            "dropout": 0.0,
        },
    },
    "train": {"max_steps": 3, "batch_size": 16, "warmup_steps": 0},
    "eval": {"num_samples": 64, "per_sigma": [0.5]},
}

BASE_COLUMNS = ["K", "d", "N", "score_error", "score_error_empirical", "steps", "params", "train_seconds"]


def columns(per_sigma: list[float]) -> list[str]:
    """CSV columns: the base ones, then ``score_error_sigma<s>`` for every ``eval.per_sigma`` value."""
    return BASE_COLUMNS[:5] + [f"score_error_sigma{s:g}" for s in per_sigma] + BASE_COLUMNS[5:]


COLUMNS = columns(DEFAULTS["eval"]["per_sigma"])


def _check(cfg: dict) -> list[tuple[int, int]]:
    sizes = cfg["sizes"]
    if not isinstance(sizes, list) or not sizes or any(not isinstance(n, int) or n < 1 for n in sizes):
        raise ValueError(f"sizes must be a non-empty list of positive integers, got {sizes!r}.")
    mix = cfg["mixtures"]
    if (
        not isinstance(mix, list)
        or not mix
        or any(
            not isinstance(m, (list, tuple)) or len(m) != 2 or not all(isinstance(v, int) for v in m)
            for m in mix
        )
    ):
        raise ValueError(f"mixtures must be a non-empty list of [K, d] integer pairs, got {mix!r}.")
    return [(int(k), int(d)) for k, d in mix]


def run_key(K: int, d: int, n: int, cfg: dict) -> str:
    """Eight hex digits of the SHA-256 of everything that determines a trained model."""
    return config_key({
            "K": K,
            "d": d,
            "N": n,
            "max_N": max(cfg["sizes"]),
            "shape": cfg["shape"],
            "mog_seed": cfg["mog_seed"],
            "scale": cfg["scale"],
            "subset_seed": cfg["subset_seed"],
            "kernel": cfg["kernel"],
            "arch": cfg["arch"],
            "train": cfg["train"],
        })


def _score_errors(den, mog, ev: dict, device: torch.device) -> dict[str, float]:
    from ..theory import score_error

    def err(sigmas):
        g = torch.Generator().manual_seed(int(ev["seed"]))
        return score_error(
            den,
            mog,
            num_samples=int(ev["num_samples"]),
            sigmas=sigmas,
            generator=g,
            batch_size=int(ev["batch_size"]),
            device=device,
        )

    out = {"score_error": err(ev["sigmas"])}
    for s in ev["per_sigma"]:
        out[f"score_error_sigma{s:g}"] = err([float(s)])
    return out


def _source_kwargs(cfg: dict[str, Any], K: int, d: int) -> dict[str, Any]:
    extra = {} if cfg["scale"] is None else {"scale": float(cfg["scale"])}
    return dict(
        num_samples=max(cfg["sizes"]),
        shape=[int(v) for v in cfg["shape"]],
        num_components=K,
        rank=d,
        seed=int(cfg["mog_seed"]),
        **extra,
    )


def jobs(cfg: dict[str, Any]) -> list[TrainJob]:
    """One ``TrainJob`` per ((K, d), N), checkpoint ``<out>/checkpoints/K<K>_d<d>_N<N>_<run_key>.ckpt``."""
    tr = cfg["train"]
    module_kwargs = module_kwargs_from(cfg["kernel"], tr)
    shape = tuple(int(v) for v in cfg["shape"])
    out = []
    for K, d in _check(cfg):
        for n in sorted(cfg["sizes"]):
            data_kwargs = dict(
                source="mog",
                size=n,
                subset_seed=int(cfg["subset_seed"]),
                batch_size=int(tr["batch_size"]),
                source_kwargs=_source_kwargs(cfg, K, d),
            )
            ckpt = Path(cfg["out"]) / "checkpoints" / f"K{K}_d{d}_N{n}_{run_key(K, d, n, cfg)}.ckpt"
            out.append(study_job(cfg, f"K={K} d={d} N={n}", cfg["arch"], shape, module_kwargs, data_kwargs, ckpt))
    return out


def run(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Train (or load) every (K, d, N), score it against the closed form; write ``fig5.csv`` / ``fig5.png``."""
    from ..data import SubsetDataModule
    from ..theory import EmpiricalOptimalDenoiser, LowRankMoG

    mixtures = _check(cfg)
    out, device = prepare_output(cfg)
    shape = tuple(int(v) for v in cfg["shape"])
    sizes = sorted(cfg["sizes"])
    tr, ev = cfg["train"], cfg["eval"]
    cols = columns(ev["per_sigma"])
    t_start = time.time()
    log(
        f"fig5: (K, d) in {mixtures}, n = {math.prod(shape)} {shape}, N in {sizes}, {tr['max_steps']} steps of "
        f"batch {tr['batch_size']} each, score error on {ev['num_samples']} draws -> {out}"
    )
    all_jobs = jobs(cfg)
    run_training_jobs(all_jobs, int(cfg.get("workers", 1)), log=log)

    log("scoring against the closed-form MoG score ...")
    rows: list[dict[str, Any]] = []
    it = iter(all_jobs)
    for K, d in mixtures:
        extra = {} if cfg["scale"] is None else {"scale": float(cfg["scale"])}
        mog = LowRankMoG(shape, K, d, seed=int(cfg["mog_seed"]), device=device, **extra)
        for n in sizes:
            job = next(it)
            t0 = time.time()
            module, meta = load_trained(job)
            den = module.ema.to(device).eval().requires_grad_(False)
            errs = _score_errors(den, mog, ev, device)
            images = SubsetDataModule(**{**job.data_kwargs}).images
            empirical = EmpiricalOptimalDenoiser(images, device=device)
            emp = _score_errors(empirical, mog, {**ev, "per_sigma": []}, device)["score_error"]
            row = {
                "K": K,
                "d": d,
                "N": n,
                **errs,
                "score_error_empirical": emp,
                "steps": int(meta.get("steps", job.max_steps)),
                "params": sum(p.numel() for p in den.parameters()),
                "train_seconds": float(meta.get("train_seconds", float("nan"))),
            }
            rows.append(row)
            log(
                f"  K={K} d={d} N={n}: score error {row['score_error']:.4g} (empirical optimal denoiser: {emp:.4g}) "
                f"({time.time() - t0:.0f}s)"
            )
            write_csv(rows, out / "fig5.csv", cols)  # partial results survive an interruption
    csv_path = write_csv(rows, out / "fig5.csv", cols)
    png_path = plot(rows, out / "fig5.png", shape)
    log(format_table(rows, cols[: len(cols) - 3]))
    trend = ", ".join(
        f"(K={K}, d={d}): {_err(rows, K, d, sizes[0]):.3g}->{_err(rows, K, d, sizes[-1]):.3g}"
        for K, d in mixtures
    )
    log_study_to_wandb("fig5_mog", cfg, rows, cols, {"plot": png_path},
                       {f"score_error_K{K}_d{d}_N{sizes[-1]}": _err(rows, K, d, sizes[-1]) for K, d in mixtures})
    log(
        f"fig5 done in {time.time() - t_start:.0f}s: score error N {sizes[0]}->{sizes[-1]}: {trend} | "
        f"{csv_path} | {png_path}"
    )
    return rows


def _err(rows, K, d, n) -> float:
    return next(r["score_error"] for r in rows if (r["K"], r["d"], r["N"]) == (K, d, n))


def plot(rows: list[dict[str, Any]], path: str | Path, shape=None) -> Path:
    """Left: score error vs N (log-log), one line per (K, d), dashed: the empirical optimal denoiser.
    Right (when the rows hold per-sigma errors): the error at each fixed sigma, one colour per sigma,
    one line style per (K, d)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixes = list(dict.fromkeys((r["K"], r["d"]) for r in rows))
    per_sigma = [k for k in rows[0] if k.startswith("score_error_sigma")] if rows else []
    fig, axes = plt.subplots(
        1, 2 if per_sigma else 1, figsize=(10.4 if per_sigma else 5.2, 3.8), squeeze=False
    )
    ax = axes[0, 0]
    for i, (K, d) in enumerate(mixes):
        rs = sorted((r for r in rows if (r["K"], r["d"]) == (K, d)), key=lambda r: r["N"])
        c = f"C{i}"
        ax.plot(
            [r["N"] for r in rs],
            [r["score_error"] for r in rs],
            marker="o",
            color=c,
            label=f"model, K={K}, d={d}",
        )
        ax.plot(
            [r["N"] for r in rs],
            [r["score_error_empirical"] for r in rs],
            ls="--",
            marker=".",
            color=c,
            alpha=0.6,
            label=f"empirical optimal, K={K}, d={d}",
        )
    ax.set_ylabel(r"$E_{\sigma, x}\,\|s_\theta - \nabla \log p_\sigma\|^2$")
    n = f"n = {math.prod(shape)}" if shape is not None else ""
    ax.set_title(f"score error, ln sigma ~ N(-1.2, 1.2^2) ({n})", fontsize=10)
    if per_sigma:
        ax2 = axes[0, 1]
        styles = ["-", "--", ":", "-."]
        for i, (K, d) in enumerate(mixes):
            rs = sorted((r for r in rows if (r["K"], r["d"]) == (K, d)), key=lambda r: r["N"])
            for j, key in enumerate(per_sigma):
                ax2.plot(
                    [r["N"] for r in rs],
                    [r[key] for r in rs],
                    marker=".",
                    color=f"C{j + 2}",
                    ls=styles[i % len(styles)],
                    label=f"sigma={key[len('score_error_sigma') :]}, K={K}, d={d}",
                )
        ax2.set_title("score error at fixed sigma (model)", fontsize=10)
    for i, a in enumerate(axes[0]):
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xlabel("training set size N")
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=6.5, **({"loc": "center left", "bbox_to_anchor": (1.0, 0.5)} if i else {}))
    fig.suptitle("Fig. 5: trained model vs closed-form score of a low-rank MoG", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(
        prog="python -m lightning_repro.studies.mog_generalization", description=__doc__.split("\n")[0]
    )
    p.add_argument("--config", default=None, help="YAML file (e.g. configs/experiments/fig5_mog.yaml)")
    p.add_argument("--out", default=None, help="output folder (default: the config's 'out')")
    p.add_argument("--quick", action="store_true", help="tiny settings (for tests)")
    args = p.parse_args(argv)
    try:
        cfg = load_study_config(
            args.config, DEFAULTS, QUICK if args.quick else None, args.out, replace=("arch",)
        )
        return run(cfg)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
