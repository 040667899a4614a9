"""Sec. 2.3 / Fig. 3 of Zhang et al. (ICML 2024): model reproducibility is particular to diffusion models.

Two models of each family are trained on the same data with different seeds (initial weights, batch order,
training draws) and sampled from the *same* seeds:

* ``gan``        two DCGANs (``baselines.DCGAN``: Radford et al. 2016, non-saturating loss), each fed the
                 latent codes ``latent_codes(seeds, latent_dim)`` (generator in eval mode);
* ``vae``        two VAEs (``baselines.VAE``: Kingma & Welling 2014), each decoding the same codes (decoder mean);
* ``diffusion``  two diffusion models (single-token DiT, EDM kernel), sampled with the deterministic EDM Heun
                 sampler from ``seed_noise(seeds, image_shape)``.

With ``latent_dim = C * H * W`` (64 for 8 x 8 digits, the default) the GAN / VAE code of a seed is exactly the
flattened initial noise the diffusion models of that seed start from.  For each family the study scores the
pair seed by seed: ``rp`` = RP = P(<f(x_a), f(x_b)> > threshold) (Sec. 2.1), ``mean_similarity`` (the mean of
<f(x_a), f(x_b)>), ``mae`` (mean absolute pixel difference, 0-255), and each model's GL against the training
set (``gl_a``, ``gl_b``: a high RP from copying training images would show as GL ~ 0); ``train_seconds`` is
the pair's total.  The paper (Fig. 3,
CIFAR-10, SSCD) reports high RP for diffusion models and low RP for GANs and VAEs.

Descriptor and threshold: on 8 x 8 digits the study uses ``PixelDescriptor`` (centred, L2-normalised pixels)
at its calibrated threshold 0.97 (see ``studies/memorization.py`` and ``metrics/descriptors.py``); at full
scale ``metrics.descriptor: sscd`` (threshold 0.6, the paper's).

Command::

    python -m lightning_repro.studies.baselines --config configs/experiments/gan_vae_contrast.yaml \
        [--out DIR] [--quick]

prints the three RP numbers and a table and writes ``DIR/gan_vae_contrast.csv`` (one row per family),
``DIR/gan_vae_contrast.png`` (for each family two rows of samples, model seed a over model seed b, same
seeds per column; and a bar chart of RP and mean similarity), ``DIR/samples/<family>.png`` and checkpoints
``DIR/checkpoints/<family>_seed<s>_<hash>.ckpt`` (the hash covers the run's configuration: a rerun skips
finished trainings).  ``--quick`` uses tiny settings for tests.  The W&B run ``gan_vae_contrast`` gets the
table, the figure and the three numbers.

Scale.  CPU defaults (``configs/experiments/gan_vae_contrast.yaml``): all 1,797 8 x 8 digits; DCGAN with
``base_channels 64, extra_layers 1`` (1,500 iterations of batch 128); VAE with ``base_channels 32``,
Gaussian likelihood (std 0.2), beta 1 (1,500 steps of batch 128); single-token DiT (``patch_size 8,
hidden_size 128, depth 3, num_heads 4``, EDM kernel with ln(sigma) ~ N(0.5, 1), 2,000 steps of batch 256,
EMA half-life 25% of training); 256 seeds; two trainings at once (``workers: 2``, one thread each).

Measured (these defaults): 3 min 21 s wall (measured from scratch on an otherwise idle 2-core machine,
2026-11-27).  Result: RP(GAN, GAN) = 0.000 (mean similarity 0.52), RP(VAE, VAE) = 0.000 (0.60), RP(diffusion,
diffusion) = 0.867 (0.98, MAE 8 / 255) with GL 0.94-0.95 for both diffusion models, i.e. they agree on *new*
images, not on copies of training digits; GAN and VAE samples are new too (GL ~1) but unrelated across training
seeds.  The DCGAN samples are recognisable but noisy digits, the VAE's blurry ones (decoder means), as expected at
this scale.

Full scale, as the paper (one GPU per run, ``workers: 1, threads: null``): ``data.source: cifar10``;
``latent_dim: 100`` (the GAN / VAE codes then differ from the diffusion noise, which has 3,072 entries; the
comparison is only ever within a family); DCGAN ``base_channels: 64`` (64-128-256 channels, ~100k iterations
of batch 128); VAE ``base_channels: 64``; the diffusion pair the paper's EDM U-Net (``class_path: EDM,
model_channels: 64, channel_mult: [2, 2, 2], num_blocks: 4, attn_resolutions: [16]``, EDM defaults, hundreds
of thousands of steps of batch 512); ``sample.seeds: 10000``; ``metrics.descriptor: sscd``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import (
    TrainJob,
    arch_class,
    config_key,
    format_table,
    load_trained,
    log,
    log_study_to_wandb,
    run_training_jobs,
    save_figure,
    setup_study,
    study_job,
    study_main,
    write_csv,
)

__all__ = ["DEFAULTS", "QUICK", "QUICK_FAMILIES", "COLUMNS", "jobs", "run_key", "run", "plot", "main"]

STUDY = "gan_vae_contrast"

DEFAULTS: dict[str, Any] = {
    "out": "outputs/gan_vae_contrast",
    "wandb": True,
    "threads": 1,
    "workers": 1,
    "device": "auto",
    "data": {"source": "digits", "source_kwargs": {}, "size": None, "subset_seed": 0},
    "seeds": [0, 1],
    "latent_dim": 64,
    "families": {
        "gan": {
            "label": "GAN",
            "class_path": "DCGAN",
            "init_args": {"base_channels": 64, "extra_layers": 1, "lr": 2e-4, "betas": [0.5, 0.999]},
            "steps": 1500,
            "batch_size": 128,
        },
        "vae": {
            "label": "VAE",
            "class_path": "VAE",
            "init_args": {"base_channels": 32, "beta": 1.0, "likelihood": "gaussian", "obs_sigma": 0.2, "lr": 1e-3},
            "steps": 1500,
            "batch_size": 128,
        },
        "diffusion": {
            "label": "diffusion",
            "class_path": "DiT",
            "init_args": {
                "patch_size": 8,
                "hidden_size": 128,
                "depth": 3,
                "num_heads": 4,
                "kernel": "edm",
                "kernel_kwargs": {"P_mean": 0.5, "P_std": 1.0},
                "lr": 2e-3,
                "warmup_steps": 100,
                "ema_halflife_kimg": 1000.0,
                "ema_rampup_ratio": 0.25,
            },
            "steps": 2000,
            "batch_size": 256,
        },
    },
    "sample": {"seeds": 256, "sampler": "heun", "steps": 18},
    "metrics": {"descriptor": "pixel", "threshold": None},
}

#: ``--quick``: tiny networks, 64 images, a few steps (for tests; the numbers mean nothing).
QUICK: dict[str, Any] = {
    "workers": 1,
    "data": {"size": 64},
    "sample": {"seeds": 8, "steps": 4},
}
QUICK_FAMILIES: dict[str, Any] = {
    "gan": {"label": "GAN", "class_path": "DCGAN", "init_args": {"base_channels": 4}, "steps": 2, "batch_size": 16},
    "vae": {"label": "VAE", "class_path": "VAE", "init_args": {"base_channels": 4}, "steps": 2, "batch_size": 16},
    "diffusion": {
        "label": "diffusion",
        "class_path": "DiT",
        "init_args": {"patch_size": 4, "hidden_size": 16, "depth": 1, "num_heads": 1, "kernel": "edm"},
        "steps": 2,
        "batch_size": 16,
    },
}

COLUMNS = [
    "family",
    "label",
    "rp",
    "mean_similarity",
    "mae",
    "gl_a",
    "gl_b",
    "seed_a",
    "seed_b",
    "threshold",
    "descriptor",
    "num_seeds",
    "iterations",
    "params",
    "train_seconds",
]


def _is_baseline(cls: type) -> bool:
    from ..baselines import BASELINES

    return cls in BASELINES.values()


def run_key(family: dict, seed: int, cfg: dict) -> str:
    """Eight hex digits of the SHA-256 of everything that determines a trained model."""
    spec = {k: family[k] for k in ("class_path", "init_args", "steps", "batch_size")}
    return config_key({"family": spec, "seed": seed, "latent_dim": cfg["latent_dim"], "data": cfg["data"]})


def _check(cfg: dict) -> None:
    seeds = cfg["seeds"]
    if (
        not isinstance(seeds, list)
        or len(seeds) != 2
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)
        or seeds[0] == seeds[1]
    ):
        raise ValueError(f"seeds must be a list of two different non-negative integers (the pair), got {seeds!r}.")
    ld = cfg["latent_dim"]
    if isinstance(ld, bool) or not isinstance(ld, int) or ld < 1:
        raise ValueError(f"latent_dim must be a positive integer, got {ld!r}.")
    fams = cfg["families"]
    if not isinstance(fams, dict) or not fams:
        raise ValueError("families must be a non-empty mapping of name -> {class_path, init_args, steps, batch_size}.")
    for name, fam in fams.items():
        if not isinstance(fam, dict) or "class_path" not in fam:
            raise ValueError(f"families.{name} must be a mapping with class_path, init_args, steps and batch_size.")
        arch_class(fam["class_path"])  # unknown class -> one sentence
        for key in ("steps", "batch_size"):
            v = fam.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"families.{name}.{key} must be a positive integer, got {v!r}.")
    n = cfg["sample"]["seeds"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"sample.seeds must be a positive integer (seeds 0..seeds-1), got {n!r}.")


def jobs(cfg: dict[str, Any], image_shape: tuple[int, ...]) -> list[TrainJob]:
    """One ``TrainJob`` per (family, model seed), checkpoint ``<out>/checkpoints/<family>_seed<s>_<run_key>.ckpt``.

    The model seed sets the initial weights, the training draws and the batch order (``data_seed``).  A GAN
    iteration is two Lightning steps (``DCGAN.optimizer_steps_per_batch``), so ``max_steps`` is scaled by it.
    """
    d = cfg["data"]
    out = []
    for name, fam in cfg["families"].items():
        cls = arch_class(fam["class_path"])
        spec = {"class_path": fam["class_path"], "init_args": dict(fam.get("init_args") or {})}
        per_batch = int(getattr(cls, "optimizer_steps_per_batch", 1))
        for s in cfg["seeds"]:
            module_kwargs: dict[str, Any] = {"seed": int(s)}
            if _is_baseline(cls):
                module_kwargs["latent_dim"] = int(cfg["latent_dim"])
            data_kwargs = dict(
                source=d["source"],
                size=d.get("size"),
                subset_seed=d["subset_seed"],
                batch_size=int(fam["batch_size"]),
                source_kwargs=d.get("source_kwargs") or {},
                data_seed=int(s),
            )
            ckpt = Path(cfg["out"]) / "checkpoints" / f"{name}_seed{s}_{run_key(fam, s, cfg)}.ckpt"
            out.append(
                study_job(cfg, f"{name} seed={s}", spec, image_shape, module_kwargs, data_kwargs, ckpt, train=fam,
                          max_steps=int(fam["steps"]) * per_batch)
            )
    return out


def _samples(job: TrainJob, seeds: list[int], shape: tuple[int, ...], cfg: dict, device: torch.device):
    """``(images in [-1, 1], sidecar record, parameter count)`` of one trained model for ``seeds``."""
    from ..baselines import load_baseline
    from ..sampling import sample

    if _is_baseline(arch_class(job.arch["class_path"])):
        module = load_baseline(job.ckpt, device)
        meta = json.loads(job.meta_path.read_text()) if job.meta_path.is_file() else {}
        x = module.sample(seeds)
        return x, meta, sum(p.numel() for p in module.parameters())
    module, meta = load_trained(job)
    den = module.ema.to(device).eval().requires_grad_(False)
    smp = cfg["sample"]
    x = sample(den, module.kernel, seeds, shape, sampler=smp["sampler"], steps=int(smp["steps"]), device=device)
    return x, meta, sum(p.numel() for p in den.parameters())


def run(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Train (or load) the model pairs, sample them from the same seeds, score RP; write CSV / PNG; return rows."""
    from ..data import SubsetDataModule
    from ..metrics import gl_score, mae_score, paired_similarity, rp_score
    from ..viz import save_grid

    _check(cfg)
    st = setup_study(cfg)
    out, device, desc, thr = st.out, st.device, st.descriptor, st.threshold
    seeds = list(range(cfg["sample"]["seeds"]))
    d = cfg["data"]
    sa, sb = cfg["seeds"]
    t_start = time.time()
    dm = SubsetDataModule(source=d["source"], size=d.get("size"), subset_seed=d["subset_seed"],
                          source_kwargs=d.get("source_kwargs") or {})
    shape = dm.image_shape
    train_feats = desc(dm.images)
    log(
        f"{STUDY}: {', '.join(cfg['families'])} pairs (model seeds {sa}, {sb}) on {d['source']} "
        f"(N={len(dm.indices)}), {len(seeds)} sample seeds, {cfg['metrics']['descriptor']} descriptor "
        f"threshold {thr} -> {out}"
    )
    all_jobs = jobs(cfg, shape)
    run_training_jobs(all_jobs, int(cfg.get("workers", 1)), log=log)

    log(f"sampling {len(seeds)} seeds per model (same latent codes / initial noise per seed), scoring ...")
    rows: list[dict[str, Any]] = []
    grids: dict[str, torch.Tensor] = {}
    for i, (name, fam) in enumerate(cfg["families"].items()):
        job_a, job_b = all_jobs[2 * i], all_jobs[2 * i + 1]
        x_a, meta_a, params = _samples(job_a, seeds, shape, cfg, device)
        x_b, meta_b, _ = _samples(job_b, seeds, shape, cfg, device)
        f_a, f_b = desc(x_a), desc(x_b)
        per_batch = int(getattr(arch_class(fam["class_path"]), "optimizer_steps_per_batch", 1))
        row = {
            "family": name,
            "label": str(fam.get("label", name)),
            "rp": rp_score(f_a, f_b, thr),
            "mean_similarity": float(paired_similarity(f_a, f_b).mean()),
            "mae": mae_score(x_a, x_b)["mae_mean"],
            "gl_a": gl_score(f_a, train_feats, thr),
            "gl_b": gl_score(f_b, train_feats, thr),
            "seed_a": sa,
            "seed_b": sb,
            "threshold": thr,
            "descriptor": cfg["metrics"]["descriptor"],
            "num_seeds": len(seeds),
            "iterations": int(meta_a.get("steps", job_a.max_steps)) // per_batch,
            "params": int(params),
            "train_seconds": float(meta_a.get("train_seconds", float("nan")))
            + float(meta_b.get("train_seconds", float("nan"))),
        }
        rows.append(row)
        w = min(16, len(seeds))
        grids[name] = torch.cat([x_a[:w], x_b[:w]])
        m = w * (min(64, len(seeds)) // w)
        pairs = [x[j : j + w] for j in range(0, m, w) for x in (x_a, x_b)]
        save_grid(torch.cat(pairs), out / "samples" / f"{name}.png", nrow=w)
        log(
            f"  {row['label']}: RP={row['rp']:.3f}  mean similarity={row['mean_similarity']:.3f}  "
            f"MAE={row['mae']:.1f}  GL={row['gl_a']:.2f}/{row['gl_b']:.2f}"
        )
    csv_path = write_csv(rows, out / f"{STUDY}.csv", COLUMNS)
    png_path = plot(rows, grids, out / f"{STUDY}.png", thr, cfg["metrics"]["descriptor"])
    log(format_table(rows, COLUMNS[1:7]))
    three = "  ".join(f"RP({r['label']}, {r['label']})={r['rp']:.3f}" for r in rows)
    log_study_to_wandb(STUDY, cfg, rows, COLUMNS, {"figure": png_path},
                       {f"rp_{r['family']}": r["rp"] for r in rows}
                       | {f"mean_similarity_{r['family']}": r["mean_similarity"] for r in rows})
    log(f"{STUDY} done in {time.time() - t_start:.0f}s: {three} | {csv_path} | {png_path}")
    return rows


def plot(rows: list[dict[str, Any]], grids: dict[str, torch.Tensor], path: str | Path, threshold: float,
         descriptor: str) -> Path:
    """Left: per family, two rows of samples (model seed a over seed b, same seed per column); right: RP bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..viz import make_grid

    n = len(rows)
    fig = plt.figure(figsize=(11, 1.25 * n + 0.9))
    gs = fig.add_gridspec(n, 2, width_ratios=[4.2, 1.3], wspace=0.15)
    for i, r in enumerate(rows):
        x = grids[r["family"]]
        w = len(x) // 2
        img = make_grid(x, nrow=w)
        h = x.shape[-1] * max(1, 32 // x.shape[-1])  # make_grid's upscaled tile size (pad 1)
        ax = fig.add_subplot(gs[i, 0])
        ax.imshow(img, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([1 + h / 2, 2 + 1.5 * h], [f"seed {r['seed_a']}", f"seed {r['seed_b']}"], fontsize=8)
        ax.set_title(f"{r['label']}: RP = {r['rp']:.2f}, mean similarity {r['mean_similarity']:.2f}", fontsize=9)
    ax = fig.add_subplot(gs[:, 1])
    xs = torch.arange(n).float()
    ax.bar(xs - 0.2, [r["rp"] for r in rows], width=0.4, label="RP")
    ax.bar(xs + 0.2, [r["mean_similarity"] for r in rows], width=0.4, label="mean similarity")
    ax.set_xticks(xs.tolist(), [r["label"] for r in rows], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.axhline(threshold, color="grey", ls="--", lw=0.8)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("same seeds, two training seeds", fontsize=9)
    fig.suptitle(
        f"Sec. 2.3 / Fig. 3: reproducibility of GANs, VAEs and diffusion models ({descriptor} descriptor, "
        f"threshold {threshold:g})",
        fontsize=10,
    )
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    return study_main(argv, "python -m lightning_repro.studies.baselines", __doc__, run, DEFAULTS,
                      {**QUICK, "families": QUICK_FAMILIES}, replace=("families",),
                      example_config="configs/experiments/gan_vae_contrast.yaml")


if __name__ == "__main__":
    main(sys.argv[1:])
