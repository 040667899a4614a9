"""Fig. 4 of Zhang et al. (ICML 2024): in the memorization regime diffusion models reproduce the optimal
denoiser of the empirical distribution.

For every architecture family and every training-set size N (nested subsets, ``SubsetDataModule``) a
model is trained, then sampled with the deterministic EDM Heun sampler from the *same* seeds as the
optimal denoiser of its N training images (Prop. 1, ``EmpiricalOptimalDenoiser``), and scored:

* ``rp_vs_optimal``  RP(model, optimal) = P(<f(x_model), f(x_optimal)> > threshold), seed by seed
                     (Sec. 2.1); the paper's Fig. 4 shows it ~1 at small N, falling as N grows;
* ``gl``             GL of the model's samples against its own training subset (1 - fraction of samples
                     whose nearest training image is above the threshold); ~0 at small N, rising;
* ``same_nn_vs_optimal``  a threshold-free check: the fraction of seeds whose model sample and optimal
                     sample have the same nearest training image (L2);
* ``gl_optimal``     GL of the optimal denoiser's own samples (a sanity check: ~0, they are copies);
* ``mean_sim_vs_optimal``, ``mae_vs_optimal`` (mean absolute pixel difference, 0-255 units).

Descriptor and threshold.  On 8 x 8 digits SSCD is meaningless, so the study uses ``PixelDescriptor``
(centred, L2-normalised pixels: the normalised correlation of two images) at its calibrated default
threshold 0.97 (``metrics.descriptors.PixelDescriptor``: a copy under pixel noise of std 0.05 scores
>= 0.995, but 11% of the digits have a *different* digit above 0.97, so GL on digits under-counts novelty
a little and RP between two different digits is occasionally 1).  ``metrics.threshold`` overrides it;
the value used is written to every CSV row.  At full scale use ``metrics.descriptor: sscd`` (threshold
0.6, the paper's).

Command::

    python -m lightning_repro.studies.memorization --config configs/experiments/fig4_memorization.yaml \
        [--out DIR] [--quick]

writes ``DIR/fig4.csv`` (one row per architecture and N), ``DIR/fig4.png`` (RP vs N and GL vs N, log2 N
axis, one line per family), sample grids ``DIR/samples/<arch>_N<N>.png`` (odd rows: optimal denoiser,
even rows: model, same seeds) and checkpoints ``DIR/checkpoints/<arch>_N<N>_<hash>.ckpt``, where the
hash covers the run's training configuration: a rerun skips every finished training (and a changed
configuration trains anew).  ``--quick`` uses tiny settings (two small N, a few steps) for tests.

Scale.  The CPU defaults (``configs/experiments/fig4_memorization.yaml``): 8 x 8 digits; N = 16, 64, 256,
1024; DiT and U-ViT with one 8 x 8 patch (a single token: transformer MLPs with adaLN / token conditioning,
~1M and ~0.6M parameters); 2,000 steps of batch 256, EDM kernel with training noise ln(sigma) ~ N(0.5, 1),
EMA half-life 25% of training; 256 seeds, Heun 18 steps; two trainings at once (``workers: 2``, one thread
each) on 2 CPU cores.

Measured while tuning (N = 16, 256 seeds; fraction of seeds whose sample has the same nearest training
image as the optimal denoiser's): the small EDM DDPM++ U-Net (16 channels, or 32 with attention at 4 x 4;
batch 64 up to 3,000 steps, or batch 256 for 500 steps; P_mean -1.2 / 0 / 0.5; EMA half-life 31 steps to
25% of training) plateaued at 0.6-0.7, and reached 0.86 at N = 4 in 1,500 steps, while the single-token
DiT / U-ViT reached 0.93-0.97 in 1,500 steps of batch 256.  Trained only at sigma = 2 (N = 16, batch 64),
the U-Net's relative squared error to the optimal denoiser was 0.16 after 1,500 steps against 0.09 for
the single-token DiT.  The choice of the training image is made at sigma ~ 1-5 (replacing the model by the
optimal denoiser below sigma = 5 / 3 / 1 in that U-Net's sampler recovers 94% / 88% / 63% of the optimal's
choices), so these errors send trajectories into other images' basins.  That the convolutional network learns the exact
softmax over training images more slowly is plausibly its locality / translation bias (cf. Kamb & Ganguli
2024, patch-mosaic denoisers); the paper reports that U-Nets trained at its scale (CIFAR-10, long
training) do reproduce the optimal denoiser at small N.

Full scale, as the paper (one GPU per run, ``workers: 1, threads: null``): ``data.source: cifar10``;
``sizes: [64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]`` (2^6 ... 2^15); the EDM U-Net at the
paper's width (``model_channels: 64, channel_mult: [2, 2, 2], num_blocks: 4, attn_resolutions: [16]``,
dropout 0.1), DiT-S/2 (``patch_size: 2, hidden_size: 384, depth: 12, num_heads: 6``) and U-ViT-S/2;
``data.batch_size: 512``; ``train.max_steps`` in the hundreds of thousands (EDM trains CIFAR-10 for
200 Mimg) with EDM's defaults (``kernel_kwargs: {}``, ``ema_halflife_kimg: 500``, ``ema_rampup_ratio:
0.05``); ``sample.seeds: 10000``; ``metrics.descriptor: sscd`` (threshold 0.6).
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch

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
    source_image_shape,
    study_job,
    study_main,
    write_csv,
)

__all__ = ["DEFAULTS", "QUICK", "COLUMNS", "jobs", "run_key", "run", "plot", "main"]

DEFAULTS: dict[str, Any] = {
    "out": "outputs/fig4",
    "wandb": True,
    "threads": 1,
    "workers": 1,
    "device": "auto",
    "data": {"source": "digits", "source_kwargs": {}, "subset_seed": 0, "batch_size": 256},
    "sizes": [16, 64, 256, 1024],
    "kernel": "edm",
    "archs": {
        "dit": copy.deepcopy(DIGITS_DIT),
        "uvit": copy.deepcopy(DIGITS_UVIT),
    },
    "train": copy.deepcopy(DIGITS_TRAIN),
    "sample": {"seeds": 256, "sampler": "heun", "steps": 18},
    "metrics": {"descriptor": "pixel", "threshold": None},
}

#: ``--quick``: tiny networks, two sizes, a few steps (for tests; the numbers mean nothing).
QUICK: dict[str, Any] = {
    "workers": 1,
    "sizes": [8, 16],
    "data": {"batch_size": 16},
    "train": {"max_steps": 3, "warmup_steps": 0},
    "sample": {"seeds": 8, "steps": 4},
}
QUICK_ARCHS: dict[str, Any] = {
    "dit": {
        "class_path": "DiT",
        "init_args": {"patch_size": 4, "hidden_size": 16, "depth": 1, "num_heads": 1},
    },
    "edm": {
        "class_path": "EDM",
        "init_args": {
            "model_channels": 8,
            "channel_mult": [1],
            "num_blocks": 1,
            "attn_resolutions": [],
            "dropout": 0.0,
        },
    },
}

COLUMNS = [
    "arch",
    "N",
    "rp_vs_optimal",
    "gl",
    "same_nn_vs_optimal",
    "gl_optimal",
    "mean_sim_vs_optimal",
    "mae_vs_optimal",
    "threshold",
    "descriptor",
    "steps",
    "params",
    "train_seconds",
]


def run_key(arch_spec: dict, n: int, cfg: dict) -> str:
    """Eight hex digits of the SHA-256 of everything that determines a trained model."""
    return config_key({"arch": arch_spec, "N": n, "kernel": cfg["kernel"], "train": cfg["train"], "data": cfg["data"]})


def _check(cfg: dict) -> None:
    sizes = cfg["sizes"]
    if not isinstance(sizes, list) or not sizes or any(not isinstance(n, int) or n < 1 for n in sizes):
        raise ValueError(f"sizes must be a non-empty list of positive integers, got {sizes!r}.")
    if not isinstance(cfg["archs"], dict) or not cfg["archs"]:
        raise ValueError("archs must be a non-empty mapping of name -> {class_path, init_args}.")
    seeds = cfg["sample"]["seeds"]
    if not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"sample.seeds must be a positive integer (seeds 0..seeds-1), got {seeds!r}.")


def jobs(cfg: dict[str, Any], image_shape: tuple[int, ...]) -> list[TrainJob]:
    """One ``TrainJob`` per (N, architecture), checkpoint ``<out>/checkpoints/<arch>_N<N>_<run_key>.ckpt``."""
    tr, d = cfg["train"], cfg["data"]
    module_kwargs = module_kwargs_from(cfg["kernel"], tr)
    out = []
    for n in sorted(cfg["sizes"]):
        data_kwargs = dict(
            source=d["source"],
            size=n,
            subset_seed=d["subset_seed"],
            batch_size=d["batch_size"],
            source_kwargs=d.get("source_kwargs") or {},
        )
        for name, spec in cfg["archs"].items():
            ckpt = Path(cfg["out"]) / "checkpoints" / f"{name}_N{n}_{run_key(spec, n, cfg)}.ckpt"
            out.append(study_job(cfg, f"{name} N={n}", spec, image_shape, module_kwargs, data_kwargs, ckpt))
    return out


def run(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Train (or load) every (arch, N), sample, score; write ``fig4.csv`` / ``fig4.png``; return the rows."""
    from ..data import SubsetDataModule
    from ..metrics import gl_score, mae_score, paired_similarity, rp_score
    from ..sampling import sample
    from ..theory import EmpiricalOptimalDenoiser
    from ..viz import save_grid

    _check(cfg)
    st = setup_study(cfg)
    out, device, desc, thr, seeds = st.out, st.device, st.descriptor, st.threshold, st.seeds
    sampler, steps = st.sampler, st.steps
    tr, d = cfg["train"], cfg["data"]
    sizes = sorted(cfg["sizes"])
    t_start = time.time()
    log(
        f"fig4: {len(cfg['archs'])} architectures x N in {sizes} on {d['source']}, {tr['max_steps']} steps each, "
        f"{len(seeds)} seeds ({sampler}, {steps} steps), {cfg['metrics']['descriptor']} descriptor threshold {thr} "
        f"-> {out}"
    )
    shape = source_image_shape(d)
    all_jobs = jobs(cfg, shape)
    run_training_jobs(all_jobs, int(cfg.get("workers", 1)), log=log)

    log(f"sampling {len(seeds)} seeds per model and per optimal denoiser, scoring ...")
    rows: list[dict[str, Any]] = []
    for n in sizes:
        dm = SubsetDataModule(
            source=d["source"],
            size=n,
            subset_seed=d["subset_seed"],
            batch_size=d["batch_size"],
            source_kwargs=d.get("source_kwargs") or {},
        )
        train_images = dm.images
        optimal = EmpiricalOptimalDenoiser(train_images, device=device)
        train_feats = desc(train_images)
        opt_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for job, name in zip([j for j in all_jobs if j.data_kwargs["size"] == n], cfg["archs"]):
            t0 = time.time()
            module, meta = load_trained(job)
            kernel = module.kernel
            den = module.ema.to(device).eval().requires_grad_(False)
            x_model = sample(den, kernel, seeds, shape, sampler=sampler, steps=steps, device=device)
            if kernel.name not in opt_cache:  # the optimal denoiser sampled on this kernel's grid
                x_opt = sample(optimal, kernel, seeds, shape, sampler=sampler, steps=steps, device=device)
                opt_cache[kernel.name] = (x_opt, desc(x_opt))
            x_opt, f_opt = opt_cache[kernel.name]
            f_model = desc(x_model)
            same_nn = (
                (optimal.nearest(x_model.to(device)) == optimal.nearest(x_opt.to(device))).float().mean()
            )
            row = {
                "arch": name,
                "N": n,
                "rp_vs_optimal": rp_score(f_model, f_opt, thr),
                "gl": gl_score(f_model, train_feats, thr),
                "same_nn_vs_optimal": float(same_nn),
                "gl_optimal": gl_score(f_opt, train_feats, thr),
                "mean_sim_vs_optimal": float(paired_similarity(f_model, f_opt).mean()),
                "mae_vs_optimal": mae_score(x_model, x_opt)["mae_mean"],
                "threshold": thr,
                "descriptor": cfg["metrics"]["descriptor"],
                "steps": int(meta.get("steps", job.max_steps)),
                "params": sum(p.numel() for p in den.parameters()),
                "train_seconds": float(meta.get("train_seconds", float("nan"))),
            }
            rows.append(row)
            w = min(16, len(seeds))
            m = w * (min(32, len(seeds)) // w)
            pairs = [x[i : i + w] for i in range(0, m, w) for x in (x_opt, x_model)]
            save_grid(torch.cat(pairs), out / "samples" / f"{name}_N{n}.png", nrow=w)
            log(
                f"  {name} N={n}: RP(model, optimal)={row['rp_vs_optimal']:.3f}  GL={row['gl']:.3f}  "
                f"same NN={row['same_nn_vs_optimal']:.3f}  GL(optimal)={row['gl_optimal']:.3f}  "
                f"({time.time() - t0:.0f}s)"
            )
            write_csv(rows, out / "fig4.csv", COLUMNS)  # partial results survive an interruption
    csv_path = write_csv(rows, out / "fig4.csv", COLUMNS)
    png_path = plot(rows, out / "fig4.png", thr, cfg["metrics"]["descriptor"])
    log(format_table(rows, COLUMNS[:8]))
    small = [r for r in rows if r["N"] == sizes[0]]
    large = [r for r in rows if r["N"] == sizes[-1]]
    summary = ", ".join(
        f"{a['arch']}: RP {a['rp_vs_optimal']:.2f}->{b['rp_vs_optimal']:.2f}, GL {a['gl']:.2f}->{b['gl']:.2f}"
        for a, b in zip(small, large)
    )
    log_study_to_wandb("fig4_memorization", cfg, rows, COLUMNS, {"plot": png_path},
                       {f"{r['arch']}_N{r['N']}_rp_vs_optimal": r["rp_vs_optimal"] for r in rows})
    log(
        f"fig4 done in {time.time() - t_start:.0f}s: N {sizes[0]}->{sizes[-1]}: {summary} | {csv_path} | {png_path}"
    )
    return rows


def plot(rows: list[dict[str, Any]], path: str | Path, threshold: float, descriptor: str) -> Path:
    """Two panels, RP(model, optimal) vs N and GL vs N (log2 N axis), one line per architecture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    for key, ax, title in (
        ("rp_vs_optimal", axes[0], "RP(model, optimal denoiser)"),
        ("gl", axes[1], "GL (model)"),
    ):
        for a in archs:
            rs = sorted((r for r in rows if r["arch"] == a), key=lambda r: r["N"])
            ax.plot([r["N"] for r in rs], [r[key] for r in rs], marker="o", label=a)
        if key == "gl":
            rs = sorted({r["N"]: r for r in rows}.values(), key=lambda r: r["N"])
            ax.plot(
                [r["N"] for r in rs],
                [r["gl_optimal"] for r in rs],
                ls="--",
                color="grey",
                label="optimal denoiser",
            )
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("training set size N")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"Fig. 4: memorization regime ({descriptor} descriptor, threshold {threshold:g})", fontsize=10
    )
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    return study_main(argv, "python -m lightning_repro.studies.memorization", __doc__, run, DEFAULTS,
                      {**QUICK, "archs": QUICK_ARCHS}, replace=("archs",),
                      example_config="configs/experiments/fig4_memorization.yaml")


if __name__ == "__main__":
    main(sys.argv[1:])
