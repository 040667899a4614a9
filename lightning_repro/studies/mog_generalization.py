"""Fig. 5 of Zhang et al. (ICML 2024): on a mixture of low-rank Gaussians (Eq. 2, ``theory.LowRankMoG``) the score
of a trained diffusion model approaches the closed-form score (Prop. 2) as the training set grows.

For every mixture ``(K, d)`` (bases fixed by ``mog_seed``) and size N (the ``mog`` source: one draw of
``max(sizes)`` samples, nested subsets) a denoiser is trained and scored with ``theory.score_error``:

    score_error = E_{sigma, x_0, n} || s_theta(x_0 + sigma n, sigma) - grad log p_sigma(x_0 + sigma n) ||^2,

``s_theta = (D_theta(x, sigma) - x) / sigma^2`` of the EMA denoiser, ``x_0`` fresh draws of the mixture,
``ln sigma ~ N(-1.2, 1.2^2)`` (or the fixed ``eval.sigmas``), one seeded generator for every model; plus the error
at each ``eval.per_sigma`` and that of the optimal denoiser of the N samples (Prop. 1: perfect memorization).

Writes ``DIR/fig5.csv`` (one row per (K, d, N)), ``DIR/fig5.png`` (score error vs N, log-log) and
``DIR/checkpoints/K<K>_d<d>_N<N>_<hash>.ckpt``.  Sizes, measured results and the full-scale settings:
``configs/studies/fig5_mog.yaml``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .outputs import finish, log, save_figure, write_csv
from .protocol import Study, config_key
from .steps import check_sizes, prepare_output, trained_denoiser
from .training import TrainJob, module_kwargs_from, run_training_jobs, study_job

__all__ = ["STUDY", "QUICK", "BASE_COLUMNS", "columns", "jobs", "run_key", "run", "plot", "main"]

#: ``--quick``: one tiny network, two mixtures, two sizes, a few steps (for tests; the numbers mean nothing).
QUICK: dict[str, Any] = {
    "workers": 1,
    "sizes": [16, 64],
    "arch": {"class_path": "EDM", "init_args": {"model_channels": 8, "channel_mult": [1], "num_blocks": 1,
                                                "attn_resolutions": [], "dropout": 0.0}},
    "train": {"max_steps": 3, "batch_size": 16, "warmup_steps": 0},
    "eval": {"num_samples": 64, "per_sigma": [0.5]},
}

BASE_COLUMNS = ["K", "d", "N", "score_error", "score_error_empirical", "steps", "params", "train_seconds"]


def columns(per_sigma: list[float]) -> list[str]:
    """CSV columns: the base ones, then ``score_error_sigma<s>`` for every ``eval.per_sigma`` value."""
    return BASE_COLUMNS[:5] + [f"score_error_sigma{s:g}" for s in per_sigma] + BASE_COLUMNS[5:]


def _check(cfg: dict) -> list[tuple[int, int]]:
    check_sizes(cfg["sizes"])
    mix = cfg["mixtures"]
    if not isinstance(mix, list) or not mix or any(
            not isinstance(m, (list, tuple)) or len(m) != 2 or not all(isinstance(v, int) for v in m) for m in mix):
        raise ValueError(f"mixtures must be a non-empty list of [K, d] integer pairs, got {mix!r}.")
    return [(int(k), int(d)) for k, d in mix]


def run_key(K: int, d: int, n: int, cfg: dict) -> str:
    """Eight hex digits of the SHA-256 of everything that determines a trained model."""
    return config_key({"K": K, "d": d, "N": n, "max_N": max(cfg["sizes"]), "shape": cfg["shape"],
                       "mog_seed": cfg["mog_seed"], "scale": cfg["scale"], "subset_seed": cfg["subset_seed"],
                       "kernel": cfg["kernel"], "arch": cfg["arch"], "train": cfg["train"]})


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
            data_kwargs = dict(source="mog", size=n, subset_seed=int(cfg["subset_seed"]),
                               batch_size=int(tr["batch_size"]), source_kwargs=_source_kwargs(cfg, K, d))
            ckpt = Path(cfg["out"]) / "checkpoints" / f"K{K}_d{d}_N{n}_{run_key(K, d, n, cfg)}.ckpt"
            out.append(study_job(cfg, f"K={K} d={d} N={n}", cfg["arch"], shape, module_kwargs, data_kwargs, ckpt))
    return out


def _score_job(job: TrainJob, K: int, d: int, n: int, mog, cfg: dict, device: torch.device) -> dict[str, Any]:
    """The score errors of one trained model and of the optimal denoiser of its N training samples."""
    from ..data import SubsetDataModule
    from ..theory import EmpiricalOptimalDenoiser

    ev = cfg["eval"]
    den, _, meta = trained_denoiser(job, device)
    errs = _score_errors(den, mog, ev, device)
    empirical = EmpiricalOptimalDenoiser(SubsetDataModule(**job.data_kwargs).images, device=device)
    emp = _score_errors(empirical, mog, {**ev, "per_sigma": []}, device)["score_error"]
    return {"K": K, "d": d, "N": n, **errs, "score_error_empirical": emp,
            "steps": int(meta.get("steps", job.max_steps)), "params": sum(p.numel() for p in den.parameters()),
            "train_seconds": float(meta.get("train_seconds", float("nan")))}


def run(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Train (or load) every (K, d, N), score it against the closed form; write ``fig5.csv`` / ``fig5.png``."""
    from ..theory import LowRankMoG

    mixtures = _check(cfg)
    out, device = prepare_output(cfg)
    shape, sizes, tr, ev = tuple(int(v) for v in cfg["shape"]), sorted(cfg["sizes"]), cfg["train"], cfg["eval"]
    cols, t_start = columns(ev["per_sigma"]), time.time()
    log(f"fig5: (K, d) in {mixtures}, n = {math.prod(shape)} {shape}, N in {sizes}, {tr['max_steps']} steps of "
        f"batch {tr['batch_size']} each, score error on {ev['num_samples']} draws -> {out}")
    all_jobs = jobs(cfg)
    run_training_jobs(all_jobs, cfg["workers"])
    log("scoring against the closed-form MoG score ...")
    rows: list[dict[str, Any]] = []
    it = iter(all_jobs)
    for K, d in mixtures:
        extra = {} if cfg["scale"] is None else {"scale": float(cfg["scale"])}
        mog = LowRankMoG(shape, K, d, seed=int(cfg["mog_seed"]), device=device, **extra)
        for n in sizes:
            t0 = time.time()
            rows.append(_score_job(next(it), K, d, n, mog, cfg, device))
            log(f"  K={K} d={d} N={n}: score error {rows[-1]['score_error']:.4g} (empirical optimal denoiser: "
                f"{rows[-1]['score_error_empirical']:.4g}) ({time.time() - t0:.0f}s)")
            write_csv(rows, out / "fig5.csv", cols)  # partial results survive an interruption
    png = plot(rows, out / "fig5.png", shape)
    summary = {f"score_error_K{K}_d{d}_N{sizes[-1]}": _err(rows, K, d, sizes[-1]) for K, d in mixtures}
    csv_path = finish(STUDY.name, cfg, rows, cols, "fig5.csv", {"plot": png}, summary, cols[: len(cols) - 3])
    trend = ", ".join(f"(K={K}, d={d}): {_err(rows, K, d, sizes[0]):.3g}->{_err(rows, K, d, sizes[-1]):.3g}"
                      for K, d in mixtures)
    log(f"fig5 done in {time.time() - t_start:.0f}s: score error N {sizes[0]}->{sizes[-1]}: {trend} | "
        f"{csv_path} | {png}")
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
    fig, axes = plt.subplots(1, 2 if per_sigma else 1, figsize=(10.4 if per_sigma else 5.2, 3.8), squeeze=False)
    ax = axes[0, 0]
    for i, (K, d) in enumerate(mixes):
        rs = sorted((r for r in rows if (r["K"], r["d"]) == (K, d)), key=lambda r: r["N"])
        ns = [r["N"] for r in rs]
        ax.plot(ns, [r["score_error"] for r in rs], marker="o", color=f"C{i}", label=f"model, K={K}, d={d}")
        ax.plot(ns, [r["score_error_empirical"] for r in rs], ls="--", marker=".", color=f"C{i}", alpha=0.6,
                label=f"empirical optimal, K={K}, d={d}")
    ax.set_ylabel(r"$E_{\sigma, x}\,\|s_\theta - \nabla \log p_\sigma\|^2$")
    n = f"n = {math.prod(shape)}" if shape is not None else ""
    ax.set_title(f"score error, ln sigma ~ N(-1.2, 1.2^2) ({n})", fontsize=10)
    if per_sigma:
        ax2 = axes[0, 1]
        styles = ["-", "--", ":", "-."]
        for i, (K, d) in enumerate(mixes):
            rs = sorted((r for r in rows if (r["K"], r["d"]) == (K, d)), key=lambda r: r["N"])
            for j, key in enumerate(per_sigma):
                ax2.plot([r["N"] for r in rs], [r[key] for r in rs], marker=".", color=f"C{j + 2}",
                         ls=styles[i % len(styles)], label=f"sigma={key[len('score_error_sigma') :]}, K={K}, d={d}")
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


STUDY = Study(name="fig5_mog", module="mog_generalization", paper="Fig. 5", title="MoG score error vs N", run=run,
              columns=BASE_COLUMNS, quick=QUICK, replace=("arch",), jobs=jobs, score=_score_job, plot=plot)


main = STUDY.main  # main(["--config", FILE, "--out", DIR, "--quick"]) -> the CSV rows


if __name__ == "__main__":
    main(sys.argv[1:])
