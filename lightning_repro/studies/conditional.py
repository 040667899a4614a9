"""Fig. 8 / App. D of Zhang et al. (ICML 2024): reproducibility of class-conditional diffusion models.

Several class-conditional models (different architectures) and one unconditional model are trained on the
same data.  Every seed ``s`` of ``S`` is sampled with the deterministic EDM Heun sampler under *every* class
``c`` (plain conditional sampling, guidance 1.0), from the same noise ``z(s)``, and scored:

* class check        the label of each conditional sample's nearest training image (pixel L2,
                     ``EmpiricalOptimalDenoiser.nearest``) equals the requested class: the accuracy of a
                     1-NN "classifier" over the training set (no classifier network needed);
* conditional RP     per class ``c``: RP between two conditional models' samples ``x_A(z(s), c)`` and
                     ``x_B(z(s), c)`` over seeds (``metrics.ConditionalReproducibilityScore``; Sec. 4.1);
* uncond vs cond     for each seed, the unconditional sample ``x_U(z(s))`` is compared with a conditional
                     model's sample of "the class it resembles", ``x_A(z(s), c(s))``.  The choice made here:
                     ``c(s)`` = the label of the nearest training image (pixel L2) of ``x_U(z(s))`` -- it needs
                     no access to the conditional samples, so it does not favour a match.  Also reported:
                     ``agree_best_class``, how often ``c(s)`` is the class whose conditional sample is most
                     similar to ``x_U(z(s))``, and ``rp_best_class``, the RP under that best class (an upper
                     bound; the paper's observation is that the unconditional sample reappears in one of the
                     class-conditional samples of the same noise).

Command::

    python -m lightning_repro.studies.conditional --config configs/experiments/conditional.yaml \
        [--out DIR] [--quick]

writes ``DIR/conditional_rp.csv`` (rows: model pairs and uncond-vs-cond comparisons; columns: overall RP
and RP per class), ``DIR/conditional_models.csv`` (class accuracy per model), ``DIR/conditional.png``
(per-class RP and class accuracy), grids ``DIR/grids/<model>.png`` in the paper's layout (rows = seeds,
first column the unconditional sample of that seed, then one column per class) and checkpoints
``DIR/checkpoints/<model>_<hash>.ckpt`` (a rerun skips finished trainings).

Scale.  CPU defaults (``configs/experiments/conditional.yaml``): all 1,797 8 x 8 digits (10 classes); conditional
single-token DiT and U-ViT (one 8 x 8 patch, label embedding; 2,000 steps of batch 256) and a conditional
16-channel EDM DDPM++ U-Net (1,500 steps of batch 64), an unconditional single-token DiT; 64 seeds x 10 classes,
Heun 18 steps; pixel descriptor, threshold 0.97; two trainings at once (3 min 39 s wall, measured from scratch on
an otherwise idle 2-core machine, 2026-11-27).  Measured: class accuracy 0.98-0.99 for all three; RP per class
0.94-1.0 between DiT and U-ViT (overall 0.97) and 0.69-0.98 between the U-Net and either transformer (0.79);
unconditional DiT vs the conditional sample of the class it resembles 0.69 (DiT), 0.67 (U-ViT), 0.47 (U-Net), the
resembled class being the best-matching class for 81-89% of the seeds.

Full scale, as the paper: ``data.source: cifar10``; the EDM U-Net at the paper's width (``model_channels
128, channel_mult [2, 2, 2], num_blocks 4, attn_resolutions [16]``), DiT-S/2 and U-ViT-S/2, trained
conditionally (``label_dropout: 0.1`` in ``init_args`` to also allow guidance), plus the unconditional
U-Net; hundreds of thousands of steps of batch 512 with EDM's defaults; ``sample.seeds: 1000`` or more;
``metrics.descriptor: sscd`` (threshold 0.6); one GPU per training (``workers: 1, threads: null``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import (
    TrainJob,
    config_key,
    deep_merge,
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
    "jobs",
    "run_key",
    "nearest_labels",
    "resembled_class",
    "select_by_class",
    "run",
    "plot",
    "main",
]

_SINGLE_TOKEN_DIT = {"patch_size": 8, "hidden_size": 128, "depth": 3, "num_heads": 4}
_SINGLE_TOKEN_UVIT = {"patch_size": 8, "embed_dim": 128, "depth": 2, "num_heads": 4}
_SMALL_EDM = {"model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0}

DEFAULTS: dict[str, Any] = {
    "out": "outputs/conditional",
    "threads": 1,
    "workers": 2,
    "device": "auto",
    "wandb": True,
    "data": {
        "source": "digits",
        "source_kwargs": {},
        "classes": None,
        "size": None,
        "subset_seed": 0,
        "batch_size": 256,
    },
    "kernel": "edm",
    # name -> {class_path, init_args, conditional (default true), train: overrides of ``train`` for this model}
    "models": {
        "edm": {
            "class_path": "EDM",
            "init_args": _SMALL_EDM,
            "conditional": True,
            "train": {"max_steps": 1500, "batch_size": 64},
        },
        "dit": {"class_path": "DiT", "init_args": _SINGLE_TOKEN_DIT, "conditional": True},
        "uvit": {"class_path": "UViT", "init_args": _SINGLE_TOKEN_UVIT, "conditional": True},
        "uncond_dit": {"class_path": "DiT", "init_args": _SINGLE_TOKEN_DIT, "conditional": False},
    },
    "train": {
        "max_steps": 2000,
        "batch_size": None,  # null: data.batch_size
        "lr": 2e-3,
        "warmup_steps": 100,
        "ema_halflife_kimg": 1000.0,
        "ema_rampup_ratio": 0.25,
        "seed": 0,
        "kernel_kwargs": {"P_mean": 0.5, "P_std": 1.0},
        "trainer": {},
    },
    "sample": {"seeds": 64, "sampler": "heun", "steps": 18, "guidance": 1.0, "grid_seeds": 16},
    "metrics": {"descriptor": "pixel", "threshold": None, "min_class_accuracy": 0.9},
}

#: ``--quick``: tiny networks, a few steps, 8 seeds (for tests; the numbers mean nothing).
QUICK: dict[str, Any] = {
    "workers": 1,
    "data": {"size": 200, "batch_size": 16},
    "train": {"max_steps": 3, "warmup_steps": 0},
    "sample": {"seeds": 8, "steps": 4, "grid_seeds": 8},
}
QUICK_MODELS: dict[str, Any] = {
    "dit": {
        "class_path": "DiT",
        "init_args": {"patch_size": 4, "hidden_size": 16, "depth": 1, "num_heads": 1},
        "conditional": True,
    },
    "edm": {
        "class_path": "EDM",
        "init_args": {
            "model_channels": 8, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0
        },
        "conditional": True,
    },
    "uncond": {
        "class_path": "DiT",
        "init_args": {"patch_size": 4, "hidden_size": 16, "depth": 1, "num_heads": 1},
        "conditional": False,
    },
}

MODEL_COLUMNS = ["model", "conditional", "class_accuracy", "params", "steps", "train_seconds", "final_loss"]


def _model_train(cfg: dict, spec: dict) -> dict:
    """The global ``train`` options with the model's own ``train`` overrides merged in."""
    return deep_merge(cfg["train"], spec.get("train") or {})


def run_key(name: str, spec: dict, cfg: dict) -> str:
    """Eight hex digits of the SHA-256 of everything that determines a trained model."""
    return config_key({
            "arch": {k: spec.get(k) for k in ("class_path", "init_args")},
            "conditional": bool(spec.get("conditional", True)),
            "kernel": cfg["kernel"],
            "train": _model_train(cfg, spec),
            "data": cfg["data"],
        })


def _check(cfg: dict) -> None:
    models = cfg["models"]
    if not isinstance(models, dict) or not models:
        raise ValueError("models must be a non-empty mapping of name -> {class_path, init_args, conditional}.")
    for name, spec in models.items():
        if not isinstance(spec, dict) or "class_path" not in spec:
            raise ValueError(f"models.{name} must be a mapping with 'class_path' and 'init_args'.")
        unknown = sorted(set(spec) - {"class_path", "init_args", "conditional", "train"})
        if unknown:
            raise ValueError(
                f"models.{name} has unknown keys {unknown}; valid keys are class_path, init_args, conditional, train."
            )
    if not any(spec.get("conditional", True) for spec in models.values()):
        raise ValueError("models must hold at least one conditional model (conditional: true).")
    seeds = cfg["sample"]["seeds"]
    if not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"sample.seeds must be a positive integer (seeds 0..seeds-1), got {seeds!r}.")
    if float(cfg["sample"].get("guidance", 1.0)) != 1.0:
        raise ValueError("sample.guidance must be 1.0: the models are trained without label dropout (no null class).")


def _data_kwargs(cfg: dict, conditional: bool, batch_size: int | None = None) -> dict[str, Any]:
    d = cfg["data"]
    return dict(
        source=d["source"],
        size=d["size"],
        subset_seed=d["subset_seed"],
        batch_size=int(batch_size or d["batch_size"]),
        conditional=bool(conditional),
        classes=d.get("classes"),
        source_kwargs=d.get("source_kwargs") or {},
    )


def jobs(cfg: dict[str, Any], image_shape: tuple[int, ...], num_classes: int) -> list[TrainJob]:
    """One ``TrainJob`` per model, checkpoint ``<out>/checkpoints/<name>_<run_key>.ckpt``."""
    out = []
    for name, spec in cfg["models"].items():
        tr = _model_train(cfg, spec)
        cond = bool(spec.get("conditional", True))
        module_kwargs = module_kwargs_from(cfg["kernel"], tr, num_classes=num_classes if cond else 0)
        arch = {"class_path": spec["class_path"], "init_args": dict(spec.get("init_args") or {})}
        ckpt = Path(cfg["out"]) / "checkpoints" / f"{name}_{run_key(name, spec, cfg)}.ckpt"
        out.append(
            study_job(cfg, f"{name} ({'conditional' if cond else 'unconditional'})", arch, image_shape,
                      module_kwargs, _data_kwargs(cfg, cond, tr.get("batch_size")), ckpt, train=tr)
        )
    return out


# ---------------------------------------------------------------------------------------------- scoring helpers


def nearest_labels(images: Tensor, train_images: Tensor, train_labels: Tensor) -> Tensor:
    """Label of each image's nearest training image (pixel L2), (B,) int64: a 1-NN classifier."""
    from ..theory import EmpiricalOptimalDenoiser

    index = EmpiricalOptimalDenoiser(train_images).nearest(images.to(train_images))
    return torch.as_tensor(train_labels).reshape(-1)[index.cpu()].long()


def resembled_class(uncond_images: Tensor, train_images: Tensor, train_labels: Tensor) -> Tensor:
    """The class an unconditional sample resembles: the label of its nearest training image (pixel L2), (S,).

    This is the study's choice of which conditional sample (same seed) an unconditional sample is compared
    with; it looks only at the unconditional sample and the training set.
    """
    return nearest_labels(uncond_images, train_images, train_labels)


def select_by_class(cond_images: Tensor, classes: Tensor) -> Tensor:
    """``cond_images[s, classes[s]]`` for every seed ``s``: (S, C, *shape) samples by (seed, class) -> (S, *shape)."""
    classes = torch.as_tensor(classes).reshape(-1).long()
    if cond_images.shape[0] != classes.numel():
        raise ValueError(f"{classes.numel()} classes for {cond_images.shape[0]} seeds.")
    return cond_images[torch.arange(classes.numel()), classes]


# ---------------------------------------------------------------------------------------------- the study


def run(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Train (or load) every model, sample seeds x classes, score; write the CSVs, figure and grids."""
    from ..data import SubsetDataModule
    from ..metrics import ConditionalReproducibilityScore, paired_similarity
    from ..sampling import sample
    from ..viz import save_grid

    _check(cfg)
    st = setup_study(cfg)
    out, device, desc, thr = st.out, st.device, st.descriptor, st.threshold
    smp = cfg["sample"]
    seeds = list(range(int(smp["seeds"])))
    sampler, steps = smp["sampler"], int(smp["steps"])
    t_start = time.time()

    dm = SubsetDataModule(**_data_kwargs(cfg, True))
    train_images, train_labels = dm.images, dm.labels
    num_classes, shape = dm.source.num_classes, dm.image_shape
    classes = list(range(num_classes))
    names = list(cfg["models"])
    cond_names = [n for n in names if cfg["models"][n].get("conditional", True)]
    uncond_names = [n for n in names if n not in cond_names]
    log(
        f"conditional: {len(cond_names)} conditional + {len(uncond_names)} unconditional model(s) on "
        f"{cfg['data']['source']} (N={len(train_images)}, {num_classes} classes), {len(seeds)} seeds x "
        f"{num_classes} classes ({sampler}, {steps} steps), {cfg['metrics']['descriptor']} threshold {thr} -> {out}"
    )
    all_jobs = jobs(cfg, shape, num_classes)
    run_training_jobs(all_jobs, int(cfg.get("workers", 1)), log=log)

    # -- sample: conditional models under every class, unconditional ones once per seed
    log(f"sampling {len(seeds)} seeds x {num_classes} classes per conditional model ...")
    seed_grid = [s for s in seeds for _ in classes]  # (seed, class) pairs, seed-major
    label_grid = [c for _ in seeds for c in classes]
    samples: dict[str, Tensor] = {}  # conditional: (S, C, *shape); unconditional: (S, *shape)
    model_rows: list[dict[str, Any]] = []
    for job, name in zip(all_jobs, names):
        t0 = time.time()
        module, meta = load_trained(job)
        den = module.ema.to(device).eval().requires_grad_(False)
        cond = name in cond_names
        if cond:
            x = sample(den, module.kernel, seed_grid, shape, sampler=sampler, steps=steps, labels=label_grid,
                       guidance=float(smp.get("guidance", 1.0)), device=device)
            samples[name] = x.reshape(len(seeds), num_classes, *shape)
            pred = nearest_labels(x, train_images, train_labels)
            acc = float((pred == torch.tensor(label_grid)).float().mean())
        else:
            samples[name] = sample(den, module.kernel, seeds, shape, sampler=sampler, steps=steps, device=device)
            acc = float("nan")
        model_rows.append(
            {
                "model": name,
                "conditional": cond,
                "class_accuracy": acc,
                "params": sum(p.numel() for p in den.parameters()),
                "steps": int(meta.get("steps", job.max_steps)),
                "train_seconds": float(meta.get("train_seconds", float("nan"))),
                "final_loss": float(meta.get("final_loss", float("nan"))),
            }
        )
        log(f"  {name}: " + (f"class accuracy {acc:.3f}" if cond else "unconditional") + f" ({time.time() - t0:.0f}s)")

    # -- scores
    feats = {n: desc(x.reshape(-1, *shape)) for n, x in samples.items()}
    rp_columns = ["comparison", "model_a", "model_b", "overall", "mean_similarity"] + [f"class_{c}" for c in classes]
    rp_columns += ["agree_best_class", "rp_best_class", "threshold", "descriptor"]
    rows: list[dict[str, Any]] = []

    def per_class_row(kind: str, a: str, b: str, fa: Tensor, fb: Tensor, labels: Tensor) -> dict[str, Any]:
        metric = ConditionalReproducibilityScore(num_classes, threshold=thr)
        metric.update(fa, fb, labels)
        res = metric.compute()
        row = {
            "comparison": kind,
            "model_a": a,
            "model_b": b,
            "overall": float(res["overall"]),
            "mean_similarity": float(paired_similarity(fa, fb).mean()),
            "threshold": thr,
            "descriptor": cfg["metrics"]["descriptor"],
        }
        row.update({f"class_{c}": float(v) for c, v in zip(classes, res["per_class"].tolist())})
        row.update({f"count_{c}": int(v) for c, v in zip(classes, res["counts"].tolist())})
        return row

    labels_t = torch.tensor(label_grid)
    for i, a in enumerate(cond_names):
        for b in cond_names[i + 1 :]:
            rows.append(per_class_row("cond_vs_cond", a, b, feats[a], feats[b], labels_t))
    resembled: dict[str, Tensor] = {}
    for u in uncond_names:
        resembled[u] = c_u = resembled_class(samples[u], train_images, train_labels)
        for a in cond_names:
            fa = feats[a].reshape(len(seeds), num_classes, -1)
            sims = (fa * feats[u].unsqueeze(1)).sum(-1)  # (S, C) similarity to each class's sample
            best = sims.argmax(1)
            row = per_class_row("uncond_vs_cond", u, a, feats[u], select_by_class(fa, c_u), c_u)
            row["agree_best_class"] = float((best == c_u).float().mean())
            row["rp_best_class"] = float((sims.max(1).values > thr).float().mean())
            rows.append(row)
        counts = torch.bincount(c_u, minlength=num_classes).tolist()
        log(f"  {u}: classes its samples resemble (nearest training image): {dict(zip(classes, counts))}")

    # -- grids: rows = seeds, columns = [first unconditional sample] + classes
    g = min(int(smp.get("grid_seeds", 16)), len(seeds))
    grid_paths: dict[str, Path] = {}
    for a in cond_names:
        cols = [samples[uncond_names[0]][:g].unsqueeze(1)] if uncond_names else []
        cols.append(samples[a][:g])
        tiles = torch.cat(cols, dim=1)  # (g, ncol, *shape)
        grid_paths[a] = save_grid(tiles.reshape(-1, *shape), out / "grids" / f"{a}.png", nrow=tiles.shape[1])

    csv_path = write_csv(rows, out / "conditional_rp.csv", rp_columns)
    models_csv = write_csv(model_rows, out / "conditional_models.csv", MODEL_COLUMNS)
    png_path = plot(rows, model_rows, classes, out / "conditional.png", thr, cfg["metrics"]["descriptor"])
    log(format_table(model_rows, MODEL_COLUMNS[:3] + ["steps", "train_seconds"]))
    log(format_table(rows, ["comparison", "model_a", "model_b", "overall"] + [f"class_{c}" for c in classes]))
    if uncond_names:
        log(format_table([r for r in rows if r["comparison"] == "uncond_vs_cond"],
                          ["model_a", "model_b", "overall", "agree_best_class", "rp_best_class"]))
    min_acc = float(cfg["metrics"].get("min_class_accuracy", 0.9))
    low = [r["model"] for r in model_rows if r["conditional"] and not r["class_accuracy"] >= min_acc]
    if low:
        log(f"warning: class accuracy below {min_acc:g} for {', '.join(low)} (the class check fails for them)")
    acc_txt = ", ".join(f"{r['model']} {r['class_accuracy']:.3f}" for r in model_rows if r["conditional"])
    cc = [r["overall"] for r in rows if r["comparison"] == "cond_vs_cond"]
    uc = [r["overall"] for r in rows if r["comparison"] == "uncond_vs_cond"]
    summary = {
        "min_class_accuracy": min((r["class_accuracy"] for r in model_rows if r["conditional"]), default=float("nan")),
        "mean_rp_cond_vs_cond": sum(cc) / len(cc) if cc else float("nan"),
        "mean_rp_uncond_vs_cond": sum(uc) / len(uc) if uc else float("nan"),
    }
    images = {"figure": png_path, **{f"grid_{a}": p for a, p in grid_paths.items()}}
    log_study_to_wandb("conditional", cfg, rows, rp_columns, images=images, summary=summary)
    log(
        f"conditional done in {time.time() - t_start:.0f}s: class accuracy {acc_txt}; mean RP cond-vs-cond "
        f"{summary['mean_rp_cond_vs_cond']:.3f}, uncond-vs-cond {summary['mean_rp_uncond_vs_cond']:.3f} | {csv_path} | "
        f"{models_csv} | {png_path} | {out / 'grids'}"
    )
    return rows


def plot(
    rows: list[dict[str, Any]],
    model_rows: list[dict[str, Any]],
    classes: list[int],
    path: str | Path,
    threshold: float,
    descriptor: str,
) -> Path:
    """Left: per-class RP, one line per comparison; right: class accuracy of each conditional model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [2.2, 1]})
    for r in rows:
        style = "-" if r["comparison"] == "cond_vs_cond" else "--"
        label = f"{r['model_a']} vs {r['model_b']}"
        axes[0].plot(classes, [r[f"class_{c}"] for c in classes], style, marker="o", label=label)
    axes[0].set_xticks(classes)
    axes[0].set_ylim(-0.03, 1.03)
    axes[0].set_xlabel("class")
    axes[0].set_ylabel("RP")
    axes[0].set_title("per-class RP (dashed: unconditional vs conditional)")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    cond = [r for r in model_rows if r["conditional"]]
    axes[1].bar([r["model"] for r in cond], [r["class_accuracy"] for r in cond], color="tab:green")
    axes[1].axhline(0.9, color="grey", ls="--", lw=1)
    axes[1].set_ylim(0, 1.03)
    axes[1].set_title("class accuracy (1-NN label)")
    fig.suptitle(f"Fig. 8: conditional reproducibility ({descriptor} descriptor, threshold {threshold:g})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    return study_main(argv, "python -m lightning_repro.studies.conditional", __doc__, run, DEFAULTS,
                      {**QUICK, "models": QUICK_MODELS}, replace=("models",),
                      example_config="configs/experiments/conditional.yaml")


if __name__ == "__main__":
    main(sys.argv[1:])
