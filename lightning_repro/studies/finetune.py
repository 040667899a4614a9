"""Fig. 11 / App. G of Zhang et al. (ICML 2024): reproducibility of attention-only fine-tuning.

A model pretrained on one data set (the paper: CIFAR-100) is fine-tuned on subsets of size N of another (CIFAR-10),
training only its attention layers (``DiffusionModule(init_from=..., trainable=None)``: the family's
``attention_patterns``), and compared with the same architecture trained *from scratch* on the same subset.  Both
are sampled from the same seeds with the deterministic EDM Heun sampler and scored (pixel descriptor on digits):

* ``rp_ft_vs_scratch``       RP(fine-tuned, from scratch), seed by seed: the paper's finding is that the two agree
                             (model reproducibility survives fine-tuning), in the memorization regime (small N, both
                             copy training images) and in the generalization regime (large N);
* ``rp_ft_vs_optimal``, ``rp_scratch_vs_optimal``   RP of each against the optimal denoiser of the subset
                             (``EmpiricalOptimalDenoiser``, Prop. 1): ~1 while a model memorizes;
* ``gl_ft``, ``gl_scratch``  GL of each against the subset (and ``gl_optimal``, ~0: the optimal denoiser copies);
* ``same_nn_ft_vs_scratch``  threshold-free: the fraction of seeds whose two samples have the same nearest
                             training image (L2); ``mae_ft_vs_scratch`` (0-255 units);
* ``rp_ft_vs_pretrained``    RP(fine-tuned, the pretrained model before fine-tuning): low when fine-tuning moved
                             the samples to the new data (a check that the attention layers alone can do it);
* ``trainable_params`` / ``total_params`` of the fine-tuned model.

Small-scale stand-in (CPU defaults, ``configs/experiments/fig11_finetune.yaml``): 8 x 8 digits, pretrain on
classes 0-4 (all ~900 images), fine-tune / train from scratch on nested subsets of classes 5-9 with N = 16, 64,
256; a DiT with patch 4 (4 tokens of 4 x 4 pixels, so attention mixes image regions; the single-token DiT of
Fig. 4 would attend over one token, where attention is only its value / output projections), width 96, depth 3,
4 heads (558k parameters, of which the attention layers are 111k = 20%); EDM kernel with training noise
ln(sigma) ~ N(0.5, 1), batch 128, lr 2e-3 (fine-tuning 5e-3: with 2e-3 the attention-only model memorized N = 16
less, RP(fine-tuned, optimal) 0.46 against 0.62, and RP(fine-tuned, scratch) was 0.68 / 0.46 / 0.71 against
0.74 / 0.54 / 0.75), EMA half-life 25% of training; pretraining 3,000 steps, from scratch 1,500 steps,
fine-tuning 1,500 steps; 256 seeds, Heun 18 steps; two trainings at once (``workers: 2``, one thread each).

Measured with these defaults (5 min 9 s wall, measured from scratch on an otherwise idle 2-core machine,
2026-11-27): RP(fine-tuned, scratch) = 0.74 / 0.54 / 0.75 at N = 16 / 64 / 256 (same nearest training image 0.70 /
0.53 / 0.53), RP(fine-tuned, optimal) = 0.62 / 0.03 / 0.00 against 0.74 / 0.22 / 0.00 from scratch, GL fine-tuned
0.27 / 0.96 / 1.00 against 0.04 / 0.70 / 1.00 from scratch, RP(fine-tuned, pretrained) = 0.  So the two models
agree most in the memorization (N = 16) and generalization (N = 256) regimes and least in between, where the
fine-tuned model already produces new images and the model from scratch still partly memorizes: with 20% of its
parameters trainable (the rest pretrained on other digits) the fine-tuned model memorizes less, i.e. its
transition comes at smaller N (whether from its smaller capacity or its prior is not separated here;
``finetune.trainable: ["*"]`` is the control).

Command::

    python -m lightning_repro.studies.finetune --config configs/experiments/fig11_finetune.yaml [--out DIR] [--quick]

writes ``DIR/fig11.csv`` (one row per N), ``DIR/fig11.png`` (RP vs N and GL vs N, log2 N axis), sample grids
``DIR/samples/N<N>.png`` (rows in threes: optimal denoiser, from scratch, fine-tuned; same seeds) and
``DIR/samples/pretrained.png``, checkpoints ``DIR/checkpoints/{pretrain,scratch_N<N>,finetune_N<N>}_<hash>.ckpt``
(the hash covers everything that determines the training, the fine-tunes' includes the pretrained checkpoint's, so
a rerun skips finished trainings and a changed configuration trains anew), and a W&B run (group ``fig11``).

The same fine-tuning from the training CLI::

    python train.py fit --config configs/experiments/digits_dit.yaml --data.classes '[5,6,7,8,9]' \\
        --data.size 64 --model.init_args.init_from PRETRAINED.ckpt [--model.init_args.trainable '["*"]']

Full scale, as the paper (one GPU per run, ``workers: 1, threads: null``): ``data.source: cifar10`` for the
target with the model pretrained on CIFAR-100 -- set ``data.pretrain_source: cifar100``,
``data.pretrain_classes: null``, ``data.target_classes: null`` (all classes of each), ``pretrain.size: null``;
``sizes: [64, 256, 1024, 4096, 16384, 50000]``; the paper's DiT-S/2 (``patch_size: 2, hidden_size: 384, depth:
12, num_heads: 6``) or U-ViT-S/2 (``class_path: UViT``, ``patch_size: 2, embed_dim: 512, depth: 12, num_heads:
8``); ``data.batch_size: 512``; ``pretrain.max_steps`` and ``scratch.max_steps`` in the hundreds of thousands,
``finetune.max_steps`` a fraction of that; EDM's training defaults (``train.kernel_kwargs: {}``,
``ema_halflife_kimg: 500``, ``ema_rampup_ratio: 0.05``); ``sample.seeds: 10000``; ``metrics.descriptor: sscd``
(threshold 0.6).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import (
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

__all__ = ["DEFAULTS", "QUICK", "COLUMNS", "jobs", "run_key", "run", "plot", "main"]

DEFAULTS: dict[str, Any] = {
    "out": "outputs/fig11",
    "threads": 1,
    "workers": 2,
    "device": "auto",
    "wandb": True,
    "data": {
        "source": "digits",
        "pretrain_source": None,  # None: the same source as the target
        "source_kwargs": {},
        "pretrain_classes": [0, 1, 2, 3, 4],
        "target_classes": [5, 6, 7, 8, 9],
        "subset_seed": 0,
        "batch_size": 128,
    },
    "sizes": [16, 64, 256],
    "kernel": "edm",
    "arch": {
        "class_path": "DiT",
        "init_args": {"patch_size": 4, "hidden_size": 96, "depth": 3, "num_heads": 4},
    },
    "train": {
        "lr": 2e-3,
        "warmup_steps": 100,
        "ema_halflife_kimg": 1000.0,
        "ema_rampup_ratio": 0.25,
        "seed": 0,
        "kernel_kwargs": {"P_mean": 0.5, "P_std": 1.0},
        "trainer": {},
    },
    "pretrain": {"size": None, "max_steps": 3000},
    "scratch": {"max_steps": 1500},
    "finetune": {"max_steps": 1500, "lr": 5e-3, "warmup_steps": None, "trainable": None},
    "sample": {"seeds": 256, "sampler": "heun", "steps": 18},
    "metrics": {"descriptor": "pixel", "threshold": None},
}

#: ``--quick``: a tiny network, two sizes, a few steps (for tests; the numbers mean nothing).
QUICK: dict[str, Any] = {
    "workers": 1,
    "sizes": [8, 16],
    "arch": {"class_path": "DiT", "init_args": {"patch_size": 4, "hidden_size": 16, "depth": 1, "num_heads": 1}},
    "data": {"batch_size": 16},
    "train": {"warmup_steps": 0},
    "pretrain": {"size": 32, "max_steps": 3},
    "scratch": {"max_steps": 3},
    "finetune": {"max_steps": 3},
    "sample": {"seeds": 8, "steps": 4},
}

COLUMNS = [
    "N",
    "rp_ft_vs_scratch",
    "rp_ft_vs_optimal",
    "rp_scratch_vs_optimal",
    "gl_ft",
    "gl_scratch",
    "gl_optimal",
    "same_nn_ft_vs_scratch",
    "mae_ft_vs_scratch",
    "rp_ft_vs_pretrained",
    "trainable_params",
    "total_params",
    "ft_steps",
    "scratch_steps",
    "ft_seconds",
    "scratch_seconds",
    "threshold",
    "descriptor",
]
TABLE = COLUMNS[:10]


def run_key(kind: str, n: int | None, cfg: dict, extra: Any = None) -> str:
    """Eight hex digits of the SHA-256 of everything that determines one training (``kind``: pretrain / scratch /
    finetune; ``extra``: e.g. the pretrained checkpoint a fine-tune starts from)."""
    return config_key({"kind": kind, "N": n, "arch": cfg["arch"], "kernel": cfg["kernel"], "train": cfg["train"],
         "data": cfg["data"], "stage": cfg[kind], "extra": extra})


def _check(cfg: dict) -> None:
    sizes = cfg["sizes"]
    if not isinstance(sizes, list) or not sizes or any(not isinstance(n, int) or n < 1 for n in sizes):
        raise ValueError(f"sizes must be a non-empty list of positive integers, got {sizes!r}.")
    arch = cfg["arch"]
    if not isinstance(arch, dict) or "class_path" not in arch:
        raise ValueError(f"arch must be a mapping {{class_path, init_args}}, got {arch!r}.")
    seeds = cfg["sample"]["seeds"]
    if not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"sample.seeds must be a positive integer (seeds 0..seeds-1), got {seeds!r}.")
    for stage in ("pretrain", "scratch", "finetune"):
        steps = cfg[stage].get("max_steps")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"{stage}.max_steps must be a positive integer, got {steps!r}.")
    d = cfg["data"]
    pre, tgt = d.get("pretrain_classes"), d.get("target_classes")
    same_source = (d.get("pretrain_source") or d["source"]) == d["source"]
    if same_source and pre is not None and tgt is not None and set(pre) & set(tgt):
        raise ValueError(f"data.pretrain_classes {pre} and data.target_classes {tgt} overlap; fine-tuning is "
                         f"meant to move a model to data it has not seen.")


def _data_kwargs(cfg: dict, target: bool, size: int | None) -> dict[str, Any]:
    d = cfg["data"]
    return dict(
        source=d["source"] if target else (d.get("pretrain_source") or d["source"]),
        size=size,
        subset_seed=d["subset_seed"],
        batch_size=d["batch_size"],
        classes=d.get("target_classes") if target else d.get("pretrain_classes"),
        source_kwargs=d.get("source_kwargs") or {},
    )


def jobs(cfg: dict[str, Any], image_shape: tuple[int, ...]) -> tuple[TrainJob, list[TrainJob], list[TrainJob]]:
    """``(pretrain, [from scratch per N], [fine-tune per N])``; the fine-tunes start from the pretrain checkpoint."""
    ckdir = Path(cfg["out"]) / "checkpoints"
    base = module_kwargs_from(cfg["kernel"], cfg["train"])

    def job(name: str, ckpt: Path, module_kwargs: dict, data_kwargs: dict, steps: int) -> TrainJob:
        return study_job(cfg, name, cfg["arch"], image_shape, module_kwargs, data_kwargs, ckpt, max_steps=steps)

    pre_size = cfg["pretrain"].get("size")
    pre_ckpt = ckdir / f"pretrain_{run_key('pretrain', pre_size, cfg)}.ckpt"
    pretrain = job("pretrain", pre_ckpt, base, _data_kwargs(cfg, False, pre_size),
                   cfg["pretrain"]["max_steps"])
    ft = cfg["finetune"]
    scratch, finetune = [], []
    for n in sorted(cfg["sizes"]):
        scratch.append(job(f"scratch N={n}", ckdir / f"scratch_N{n}_{run_key('scratch', n, cfg)}.ckpt",
                           base, _data_kwargs(cfg, True, n), cfg["scratch"]["max_steps"]))
        ft_kwargs = module_kwargs_from(cfg["kernel"], cfg["train"], lr=ft.get("lr"),
                                       warmup_steps=ft.get("warmup_steps"))
        ft_kwargs.update(init_from=str(pre_ckpt), trainable=ft.get("trainable"))
        ft_ckpt = ckdir / f"finetune_N{n}_{run_key('finetune', n, cfg, pre_ckpt.name)}.ckpt"
        finetune.append(job(f"finetune N={n}", ft_ckpt, ft_kwargs, _data_kwargs(cfg, True, n), ft["max_steps"]))
    return pretrain, scratch, finetune


def run(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Pretrain, fine-tune and train from scratch (or load), sample, score; write ``fig11.csv`` / ``fig11.png``."""
    from ..data import SubsetDataModule
    from ..metrics import gl_score, mae_score, rp_score
    from ..sampling import sample
    from ..theory import EmpiricalOptimalDenoiser
    from ..viz import save_grid

    _check(cfg)
    st = setup_study(cfg)
    out, device, desc, thr, seeds = st.out, st.device, st.descriptor, st.threshold, st.seeds
    sampler, steps = st.sampler, st.steps
    d = cfg["data"]
    sizes = sorted(cfg["sizes"])
    t_start = time.time()
    log(
        f"fig11: {cfg['arch']['class_path']} pretrained on {d.get('pretrain_source') or d['source']} classes "
        f"{d.get('pretrain_classes')} ({cfg['pretrain']['max_steps']} steps), then per N in {sizes} of "
        f"{d['source']} classes {d.get('target_classes')}: attention-only fine-tuning ({cfg['finetune']['max_steps']} "
        f"steps) vs from scratch ({cfg['scratch']['max_steps']} steps); {len(seeds)} seeds ({sampler}, {steps} "
        f"steps), {cfg['metrics']['descriptor']} descriptor threshold {thr} -> {out}"
    )
    target = SubsetDataModule(**{**_data_kwargs(cfg, True, 1), "size": None})
    shape = target.image_shape
    if sizes[-1] > len(target.source):
        raise ValueError(f"sizes: N={sizes[-1]} is larger than the target data ({d['source']} classes "
                         f"{d.get('target_classes')}), which has {len(target.source)} images.")
    pretrain, scratch, finetune = jobs(cfg, shape)
    workers = int(cfg.get("workers", 1))
    run_training_jobs([pretrain, *scratch], workers, log=log)  # from-scratch runs need no pretrained model
    run_training_jobs(finetune, workers, log=log)

    log(f"sampling {len(seeds)} seeds per model and per optimal denoiser, scoring ...")
    pre_module, _ = load_trained(pretrain)
    kernel = pre_module.kernel
    x_pre = sample(pre_module.ema.to(device).eval(), kernel, seeds, shape, sampler=sampler, steps=steps, device=device)
    f_pre = desc(x_pre)
    save_grid(x_pre[: min(64, len(seeds))], out / "samples" / "pretrained.png", nrow=16)
    rows: list[dict[str, Any]] = []
    for n, job_s, job_f in zip(sizes, scratch, finetune):
        t0 = time.time()
        dm = SubsetDataModule(**_data_kwargs(cfg, True, n))
        optimal = EmpiricalOptimalDenoiser(dm.images, device=device)
        train_feats = desc(dm.images)
        x_opt = sample(optimal, kernel, seeds, shape, sampler=sampler, steps=steps, device=device)
        xs, metas, modules = {}, {}, {}
        for key, job in (("scratch", job_s), ("ft", job_f)):
            module, metas[key] = load_trained(job)
            modules[key] = module
            den = module.ema.to(device).eval().requires_grad_(False)
            xs[key] = sample(den, module.kernel, seeds, shape, sampler=sampler, steps=steps, device=device)
        f_opt, f_s, f_f = desc(x_opt), desc(xs["scratch"]), desc(xs["ft"])
        same_nn = (optimal.nearest(xs["ft"].to(device)) == optimal.nearest(xs["scratch"].to(device))).float().mean()
        trainable, total = modules["ft"].parameter_counts()
        row = {
            "N": n,
            "rp_ft_vs_scratch": rp_score(f_f, f_s, thr),
            "rp_ft_vs_optimal": rp_score(f_f, f_opt, thr),
            "rp_scratch_vs_optimal": rp_score(f_s, f_opt, thr),
            "gl_ft": gl_score(f_f, train_feats, thr),
            "gl_scratch": gl_score(f_s, train_feats, thr),
            "gl_optimal": gl_score(f_opt, train_feats, thr),
            "same_nn_ft_vs_scratch": float(same_nn),
            "mae_ft_vs_scratch": mae_score(xs["ft"], xs["scratch"])["mae_mean"],
            "rp_ft_vs_pretrained": rp_score(f_f, f_pre, thr),
            "trainable_params": trainable,
            "total_params": total,
            "ft_steps": int(metas["ft"].get("steps", job_f.max_steps)),
            "scratch_steps": int(metas["scratch"].get("steps", job_s.max_steps)),
            "ft_seconds": float(metas["ft"].get("train_seconds", float("nan"))),
            "scratch_seconds": float(metas["scratch"].get("train_seconds", float("nan"))),
            "threshold": thr,
            "descriptor": cfg["metrics"]["descriptor"],
        }
        rows.append(row)
        w = min(16, len(seeds))
        m = w * (min(32, len(seeds)) // w)
        triples = [x[i : i + w] for i in range(0, m, w) for x in (x_opt, xs["scratch"], xs["ft"])]
        save_grid(torch.cat(triples), out / "samples" / f"N{n}.png", nrow=w)
        log(
            f"  N={n}: RP(ft, scratch)={row['rp_ft_vs_scratch']:.3f}  RP(ft, optimal)={row['rp_ft_vs_optimal']:.3f}  "
            f"RP(scratch, optimal)={row['rp_scratch_vs_optimal']:.3f}  GL ft={row['gl_ft']:.3f} "
            f"scratch={row['gl_scratch']:.3f}  ({time.time() - t0:.0f}s)"
        )
        write_csv(rows, out / "fig11.csv", COLUMNS)  # partial results survive an interruption
    csv_path = write_csv(rows, out / "fig11.csv", COLUMNS)
    png_path = plot(rows, out / "fig11.png", thr, cfg["metrics"]["descriptor"])
    log("from-scratch vs fine-tuned RP/GL at each N:")
    log(format_table(rows, TABLE))
    log_study_to_wandb(
        "fig11", cfg, rows, COLUMNS,
        images={"figure": png_path, **{f"samples_N{n}": out / "samples" / f"N{n}.png" for n in sizes},
                "samples_pretrained": out / "samples" / "pretrained.png"},
        summary={f"rp_ft_vs_scratch_N{r['N']}": r["rp_ft_vs_scratch"] for r in rows},
    )
    a, b = rows[0], rows[-1]
    log(
        f"fig11 done in {time.time() - t_start:.0f}s: {a['trainable_params']:,} / {a['total_params']:,} parameters "
        f"fine-tuned; N {a['N']}->{b['N']}: RP(ft, scratch) {a['rp_ft_vs_scratch']:.2f}->{b['rp_ft_vs_scratch']:.2f}, "
        f"GL ft {a['gl_ft']:.2f}->{b['gl_ft']:.2f}, GL scratch {a['gl_scratch']:.2f}->{b['gl_scratch']:.2f} | "
        f"{csv_path} | {png_path}"
    )
    return rows


def plot(rows: list[dict[str, Any]], path: str | Path, threshold: float, descriptor: str) -> Path:
    """Two panels: RP vs N (fine-tuned vs scratch, each vs the optimal denoiser) and GL vs N, log2 N axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = sorted(rows, key=lambda r: r["N"])
    ns = [r["N"] for r in rs]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    panels = (
        (axes[0], "RP", [("rp_ft_vs_scratch", "fine-tuned vs scratch", "-"),
                         ("rp_ft_vs_optimal", "fine-tuned vs optimal", "--"),
                         ("rp_scratch_vs_optimal", "scratch vs optimal", ":")]),
        (axes[1], "GL", [("gl_ft", "fine-tuned", "-"), ("gl_scratch", "from scratch", "--"),
                         ("gl_optimal", "optimal denoiser", ":")]),
    )
    for ax, title, series in panels:
        for key, label, ls in series:
            ax.plot(ns, [r[key] for r in rs], marker="o", ls=ls, label=label)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("fine-tuning set size N")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Fig. 11: attention-only fine-tuning vs training from scratch ({descriptor} descriptor, "
                 f"threshold {threshold:g})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    return study_main(argv, "python -m lightning_repro.studies.finetune", __doc__, run, DEFAULTS, QUICK,
                      replace=("arch",), example_config="configs/experiments/fig11_finetune.yaml")


if __name__ == "__main__":
    main(sys.argv[1:])
