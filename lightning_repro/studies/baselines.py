"""Sec. 2.3 / Fig. 3 of Zhang et al. (ICML 2024): model reproducibility is particular to diffusion models.

Two models of each family are trained on the same data with different seeds (initial weights, batch order,
training draws) and sampled from the *same* seeds: two DCGANs (``baselines.DCGAN``, Radford et al. 2016) and two
VAEs (``baselines.VAE``, Kingma & Welling 2014) fed the same latent codes ``latent_codes(seeds, latent_dim)``, and
two diffusion models sampled with the deterministic sampler from ``seed_noise(seeds, image_shape)`` (with
``latent_dim = C * H * W`` a seed's code is exactly the flattened noise).  Per family the pair is scored seed by
seed: ``rp`` (Sec. 2.1), ``mean_similarity``, ``mae`` (0-255) and each model's GL against the training set
(``gl_a``, ``gl_b``: a high RP from copying training images would show as GL ~ 0).

Writes ``DIR/gan_vae_contrast.csv`` (one row per family), ``DIR/gan_vae_contrast.png`` (per family model seed a
over seed b, same seed per column; RP bars), ``DIR/samples/<family>.png``,
``DIR/checkpoints/<family>_seed<s>_<hash>.ckpt`` and a W&B run.  Sizes, measured results and the full-scale
settings: ``configs/studies/gan_vae_contrast.yaml``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..evaluation import scoring as score
from .outputs import finish, log, save_figure
from .protocol import Study, config_key, positive_int
from .steps import (
    StudySetup,
    check_seed_count,
    sample_seeds,
    save_interleaved,
    setup_study,
    subset_kwargs,
    trained_denoiser,
)
from .training import TrainJob, arch_class, run_training_jobs, study_job

__all__ = ["STUDY", "QUICK", "COLUMNS", "jobs", "run_key", "run", "plot", "main"]

STUDY_NAME = "gan_vae_contrast"

#: ``--quick``: tiny networks, 64 images, a few steps (for tests; the numbers mean nothing).
QUICK: dict[str, Any] = {
    "workers": 1,
    "data": {"size": 64},
    "sample": {"seeds": 8, "steps": 4},
    "families": {
        "gan": {"label": "GAN", "class_path": "DCGAN", "init_args": {"base_channels": 4}, "steps": 2,
                "batch_size": 16},
        "vae": {"label": "VAE", "class_path": "VAE", "init_args": {"base_channels": 4}, "steps": 2, "batch_size": 16},
        "diffusion": {"label": "diffusion", "class_path": "DiT", "steps": 2, "batch_size": 16,
                      "init_args": {"patch_size": 4, "hidden_size": 16, "depth": 1, "num_heads": 1, "kernel": "edm"}},
    },
}

COLUMNS = ["family", "label", "rp", "mean_similarity", "mae", "gl_a", "gl_b", "seed_a", "seed_b", "threshold",
           "descriptor", "num_seeds", "iterations", "params", "train_seconds"]


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
    positive_int(cfg["latent_dim"], "latent_dim")
    fams = cfg["families"]
    if not isinstance(fams, dict) or not fams:
        raise ValueError("families must be a non-empty mapping of name -> {class_path, init_args, steps, batch_size}.")
    for name, fam in fams.items():
        if not isinstance(fam, dict) or "class_path" not in fam:
            raise ValueError(f"families.{name} must be a mapping with class_path, init_args, steps and batch_size.")
        arch_class(fam["class_path"])  # unknown class -> one sentence
        for key in ("steps", "batch_size"):
            positive_int(fam.get(key), f"families.{name}.{key}")
    check_seed_count(cfg["sample"]["seeds"])


def jobs(cfg: dict[str, Any], image_shape: tuple[int, ...]) -> list[TrainJob]:
    """One ``TrainJob`` per (family, model seed), checkpoint ``<out>/checkpoints/<family>_seed<s>_<run_key>.ckpt``.

    The model seed sets the initial weights, the training draws and the batch order (``data_seed``).  A GAN
    iteration is two Lightning steps (``DCGAN.optimizer_steps_per_batch``), so ``max_steps`` is scaled by it.
    """
    out = []
    for name, fam in cfg["families"].items():
        cls = arch_class(fam["class_path"])
        spec = {"class_path": fam["class_path"], "init_args": dict(fam.get("init_args") or {})}
        per_batch = int(getattr(cls, "optimizer_steps_per_batch", 1))
        for s in cfg["seeds"]:
            module_kwargs = {"seed": int(s), **({"latent_dim": int(cfg["latent_dim"])} if _is_baseline(cls) else {})}
            data_kwargs = subset_kwargs(cfg["data"], cfg["data"].get("size"), batch_size=int(fam["batch_size"]),
                                        data_seed=int(s))
            ckpt = Path(cfg["out"]) / "checkpoints" / f"{name}_seed{s}_{run_key(fam, s, cfg)}.ckpt"
            out.append(study_job(cfg, f"{name} seed={s}", spec, image_shape, module_kwargs, data_kwargs, ckpt,
                                 train=fam, max_steps=int(fam["steps"]) * per_batch))
    return out


def _samples(job: TrainJob, st: StudySetup, shape: tuple[int, ...]):
    """``(images in [-1, 1], sidecar record, parameter count)`` of one trained model for the study's seeds."""
    from ..baselines import load_baseline

    if _is_baseline(arch_class(job.arch["class_path"])):
        module = load_baseline(job.ckpt, st.device)
        return module.sample(st.seeds), job.meta(), sum(p.numel() for p in module.parameters())
    den, kernel, meta = trained_denoiser(job, st.device)
    return sample_seeds(den, kernel, st.seeds, shape, st), meta, sum(p.numel() for p in den.parameters())


def _score_family(name: str, fam: dict, pair: list[TrainJob], st: StudySetup, shape, train_feats, cfg) -> tuple:
    """The row of one family's pair of models and its two sample rows (the first 16 seeds)."""
    (x_a, meta_a, params), (x_b, meta_b, _) = (_samples(j, st, shape) for j in pair)
    f_a, f_b, thr = st.descriptor(x_a), st.descriptor(x_b), st.threshold
    per_batch = int(getattr(arch_class(fam["class_path"]), "optimizer_steps_per_batch", 1))
    seconds = [float(m.get("train_seconds", float("nan"))) for m in (meta_a, meta_b)]
    row = {"family": name, "label": str(fam.get("label", name)), "rp": score.rp(f_a, f_b, thr),
           "mean_similarity": score.mean_similarity(f_a, f_b), "mae": score.mae(x_a, x_b),
           "gl_a": score.gl(f_a, train_feats, thr), "gl_b": score.gl(f_b, train_feats, thr),
           "seed_a": cfg["seeds"][0], "seed_b": cfg["seeds"][1], "threshold": thr, "descriptor": st.descriptor_name,
           "num_seeds": len(st.seeds), "iterations": int(meta_a.get("steps", pair[0].max_steps)) // per_batch,
           "params": int(params), "train_seconds": seconds[0] + seconds[1]}
    save_interleaved(st.out / "samples" / f"{name}.png", [x_a, x_b], 64)
    log(f"  {row['label']}: RP={row['rp']:.3f}  mean similarity={row['mean_similarity']:.3f}  "
        f"MAE={row['mae']:.1f}  GL={row['gl_a']:.2f}/{row['gl_b']:.2f}")
    w = min(16, len(st.seeds))
    return row, torch.cat([x_a[:w], x_b[:w]])


def run(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Train (or load) the model pairs, sample them from the same seeds, score RP; write CSV / PNG; return rows."""
    from ..data import SubsetDataModule

    _check(cfg)
    st, d, t_start = setup_study(cfg), cfg["data"], time.time()
    dm = SubsetDataModule(**subset_kwargs(d, d.get("size"), batch_size=None))
    shape, train_feats = dm.image_shape, st.descriptor(dm.images)
    log(f"{STUDY_NAME}: {', '.join(cfg['families'])} pairs (model seeds {cfg['seeds'][0]}, {cfg['seeds'][1]}) on "
        f"{d['source']} (N={len(dm.indices)}), {len(st.seeds)} sample seeds, {st.descriptor_name} descriptor "
        f"threshold {st.threshold} -> {st.out}")
    all_jobs = jobs(cfg, shape)
    run_training_jobs(all_jobs, cfg["workers"])
    log(f"sampling {len(st.seeds)} seeds per model (same latent codes / initial noise per seed), scoring ...")
    rows, grids = [], {}
    for i, (name, fam) in enumerate(cfg["families"].items()):
        row, grids[name] = _score_family(name, fam, all_jobs[2 * i : 2 * i + 2], st, shape, train_feats, cfg)
        rows.append(row)
    png = plot(rows, grids, st.out / f"{STUDY_NAME}.png", st.threshold, st.descriptor_name)
    summary = {f"rp_{r['family']}": r["rp"] for r in rows} | {f"mean_similarity_{r['family']}": r["mean_similarity"]
                                                              for r in rows}
    csv_path = finish(STUDY_NAME, cfg, rows, COLUMNS, f"{STUDY_NAME}.csv", {"figure": png}, summary, COLUMNS[1:7])
    three = "  ".join(f"RP({r['label']}, {r['label']})={r['rp']:.3f}" for r in rows)
    log(f"{STUDY_NAME} done in {time.time() - t_start:.0f}s: {three} | {csv_path} | {png}")
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


STUDY = Study(name=STUDY_NAME, module="baselines", paper="Fig. 3", title="GAN / VAE / diffusion RP", run=run,
              columns=COLUMNS, quick=QUICK, replace=("families",), jobs=jobs, score=_score_family, plot=plot)


main = STUDY.main  # main(["--config", FILE, "--out", DIR, "--quick"]) -> the CSV rows


if __name__ == "__main__":
    main(sys.argv[1:])
