"""Fig. 11 / App. G of Zhang et al. (ICML 2024): reproducibility of attention-only fine-tuning.

A model pretrained on one data set (the paper: CIFAR-100) is fine-tuned on subsets of size N of another
(CIFAR-10), training only its attention layers (``DiffusionModule(init_from=..., trainable=None)``: the family's
``attention_patterns``), and compared with the same architecture trained *from scratch* on the same subset.  Both
are sampled from the same seeds and scored: ``rp_ft_vs_scratch`` (the paper: the two agree, in the memorization
and in the generalization regime), ``rp_ft_vs_optimal`` / ``rp_scratch_vs_optimal`` (against the optimal denoiser
of the subset, Prop. 1), ``gl_ft`` / ``gl_scratch`` / ``gl_optimal``, ``same_nn_ft_vs_scratch`` (same nearest
training image, threshold-free), ``mae_ft_vs_scratch``, ``rp_ft_vs_pretrained`` (low when fine-tuning moved the
samples to the new data) and the fine-tuned model's ``trainable_params`` / ``total_params``.

Writes ``DIR/fig11.csv`` (one row per N), ``DIR/fig11.png`` (RP and GL vs N), ``DIR/samples/N<N>.png`` (rows in
threes: optimal, from scratch, fine-tuned), ``DIR/samples/pretrained.png``,
``DIR/checkpoints/{pretrain,scratch_N<N>,finetune_N<N>}_<hash>.ckpt`` and a W&B run (group ``fig11``).  The same
fine-tuning from the training CLI::

    python train.py fit --config configs/train/digits_dit.yaml --data.classes '[5,6,7,8,9]' \\
        --data.size 64 --model.init_args.init_from PRETRAINED.ckpt [--model.init_args.trainable '["*"]']

Sizes (a digits stand-in for CIFAR-100 -> CIFAR-10), measured results and the full-scale settings:
``configs/studies/fig11_finetune.yaml``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from ..evaluation import scoring as score
from .outputs import finish, log, n_axis, save_figure, write_csv
from .protocol import Study, config_key, positive_int
from .steps import (
    StudySetup,
    check_seed_count,
    check_sizes,
    sample_seeds,
    save_interleaved,
    setup_study,
    subset_kwargs,
    trained_denoiser,
)
from .training import TrainJob, load_trained, module_kwargs_from, run_training_jobs, study_job

__all__ = ["STUDY", "QUICK", "COLUMNS", "jobs", "run_key", "run", "plot", "main"]

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

COLUMNS = ["N", "rp_ft_vs_scratch", "rp_ft_vs_optimal", "rp_scratch_vs_optimal", "gl_ft", "gl_scratch",
           "gl_optimal", "same_nn_ft_vs_scratch", "mae_ft_vs_scratch", "rp_ft_vs_pretrained", "trainable_params",
           "total_params", "ft_steps", "scratch_steps", "ft_seconds", "scratch_seconds", "threshold", "descriptor"]
TABLE = COLUMNS[:10]


def run_key(kind: str, n: int | None, cfg: dict, extra: Any = None) -> str:
    """Eight hex digits of the SHA-256 of everything that determines one training (``kind``: pretrain / scratch /
    finetune; ``extra``: e.g. the pretrained checkpoint a fine-tune starts from)."""
    return config_key({"kind": kind, "N": n, "arch": cfg["arch"], "kernel": cfg["kernel"], "train": cfg["train"],
         "data": cfg["data"], "stage": cfg[kind], "extra": extra})


def _check(cfg: dict) -> None:
    check_sizes(cfg["sizes"])
    arch = cfg["arch"]
    if not isinstance(arch, dict) or "class_path" not in arch:
        raise ValueError(f"arch must be a mapping {{class_path, init_args}}, got {arch!r}.")
    check_seed_count(cfg["sample"]["seeds"])
    for stage in ("pretrain", "scratch", "finetune"):
        positive_int(cfg[stage].get("max_steps"), f"{stage}.max_steps")
    d = cfg["data"]
    pre, tgt = d.get("pretrain_classes"), d.get("target_classes")
    same_source = (d.get("pretrain_source") or d["source"]) == d["source"]
    if same_source and pre is not None and tgt is not None and set(pre) & set(tgt):
        raise ValueError(f"data.pretrain_classes {pre} and data.target_classes {tgt} overlap; fine-tuning is "
                         f"meant to move a model to data it has not seen.")


def _data_kwargs(cfg: dict, target: bool, size: int | None) -> dict[str, Any]:
    d = cfg["data"]
    return subset_kwargs({**d, "source": d["source"] if target else (d.get("pretrain_source") or d["source"])}, size,
                         classes=d.get("target_classes") if target else d.get("pretrain_classes"))


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


def _score_size(n: int, job_s: TrainJob, job_f: TrainJob, kernel, pre_feats, st: StudySetup, cfg) -> dict:
    """Sample the two models of size ``n`` and the optimal denoiser of the subset (on the pretrained kernel)."""
    from ..data import SubsetDataModule
    from ..theory import EmpiricalOptimalDenoiser

    images = SubsetDataModule(**_data_kwargs(cfg, True, n)).images
    shape, thr = tuple(images.shape[1:]), st.threshold
    optimal = EmpiricalOptimalDenoiser(images, device=st.device)
    train_feats, x_opt = st.descriptor(images), sample_seeds(optimal, kernel, st.seeds, shape, st)
    xs, metas = {}, {}
    for key, job in (("scratch", job_s), ("ft", job_f)):
        den, k, metas[key] = trained_denoiser(job, st.device)
        xs[key] = sample_seeds(den, k, st.seeds, shape, st)
    f_opt, f_s, f_f = st.descriptor(x_opt), st.descriptor(xs["scratch"]), st.descriptor(xs["ft"])
    same_nn = optimal.nearest(xs["ft"].to(st.device)) == optimal.nearest(xs["scratch"].to(st.device))
    trainable, total = load_trained(job_f)[0].parameter_counts()
    save_interleaved(st.out / "samples" / f"N{n}.png", [x_opt, xs["scratch"], xs["ft"]], 32)
    return {"N": n, "rp_ft_vs_scratch": score.rp(f_f, f_s, thr), "rp_ft_vs_optimal": score.rp(f_f, f_opt, thr),
            "rp_scratch_vs_optimal": score.rp(f_s, f_opt, thr), "gl_ft": score.gl(f_f, train_feats, thr),
            "gl_scratch": score.gl(f_s, train_feats, thr), "gl_optimal": score.gl(f_opt, train_feats, thr),
            "same_nn_ft_vs_scratch": float(same_nn.float().mean()), "mae_ft_vs_scratch": score.mae(xs["ft"],
                                                                                                   xs["scratch"]),
            "rp_ft_vs_pretrained": score.rp(f_f, pre_feats, thr), "trainable_params": trainable,
            "total_params": total, "ft_steps": int(metas["ft"].get("steps", job_f.max_steps)),
            "scratch_steps": int(metas["scratch"].get("steps", job_s.max_steps)),
            "ft_seconds": float(metas["ft"].get("train_seconds", float("nan"))),
            "scratch_seconds": float(metas["scratch"].get("train_seconds", float("nan"))),
            "threshold": thr, "descriptor": st.descriptor_name}


def _train(cfg: dict, st: StudySetup) -> tuple[TrainJob, list[TrainJob], list[TrainJob]]:
    """Pretrain and the from-scratch runs first (they need no pretrained model), then the fine-tunes."""
    from ..data import SubsetDataModule

    d, sizes = cfg["data"], sorted(cfg["sizes"])
    target = SubsetDataModule(**{**_data_kwargs(cfg, True, 1), "size": None})
    if sizes[-1] > len(target.source):
        raise ValueError(f"sizes: N={sizes[-1]} is larger than the target data ({d['source']} classes "
                         f"{d.get('target_classes')}), which has {len(target.source)} images.")
    pretrain, scratch, finetune = jobs(cfg, target.image_shape)
    run_training_jobs([pretrain, *scratch], cfg["workers"])
    run_training_jobs(finetune, cfg["workers"])
    return pretrain, scratch, finetune


def run(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Pretrain, fine-tune and train from scratch (or load), sample, score; write ``fig11.csv`` / ``fig11.png``."""
    _check(cfg)
    st, d, sizes, t_start = setup_study(cfg), cfg["data"], sorted(cfg["sizes"]), time.time()
    log(f"fig11: {cfg['arch']['class_path']} pretrained on {d.get('pretrain_source') or d['source']} classes "
        f"{d.get('pretrain_classes')} ({cfg['pretrain']['max_steps']} steps), then per N in {sizes} of "
        f"{d['source']} classes {d.get('target_classes')}: attention-only fine-tuning ({cfg['finetune']['max_steps']} "
        f"steps) vs from scratch ({cfg['scratch']['max_steps']} steps); {len(st.seeds)} seeds ({st.sampler}, "
        f"{st.steps} steps), {st.descriptor_name} descriptor threshold {st.threshold} -> {st.out}")
    pretrain, scratch, finetune = _train(cfg, st)
    log(f"sampling {len(st.seeds)} seeds per model and per optimal denoiser, scoring ...")
    den, kernel, _ = trained_denoiser(pretrain, st.device)
    x_pre = sample_seeds(den, kernel, st.seeds, pretrain.image_shape, st)
    save_interleaved(st.out / "samples" / "pretrained.png", [x_pre], 64)
    rows: list[dict[str, Any]] = []
    for n, job_s, job_f in zip(sizes, scratch, finetune):
        t0 = time.time()
        rows.append(r := _score_size(n, job_s, job_f, kernel, st.descriptor(x_pre), st, cfg))
        log(f"  N={n}: RP(ft, scratch)={r['rp_ft_vs_scratch']:.3f}  RP(ft, optimal)={r['rp_ft_vs_optimal']:.3f}  "
            f"RP(scratch, optimal)={r['rp_scratch_vs_optimal']:.3f}  GL ft={r['gl_ft']:.3f} "
            f"scratch={r['gl_scratch']:.3f}  ({time.time() - t0:.0f}s)")
        write_csv(rows, st.out / "fig11.csv", COLUMNS)  # partial results survive an interruption
    png = plot(rows, st.out / "fig11.png", st.threshold, st.descriptor_name)
    log("from-scratch vs fine-tuned RP/GL at each N:")
    images = {"figure": png, **{f"samples_N{n}": st.out / "samples" / f"N{n}.png" for n in sizes},
              "samples_pretrained": st.out / "samples" / "pretrained.png"}
    summary = {f"rp_ft_vs_scratch_N{r['N']}": r["rp_ft_vs_scratch"] for r in rows}
    csv_path = finish("fig11", cfg, rows, COLUMNS, "fig11.csv", images, summary, TABLE)  # W&B group of earlier runs
    a, b = rows[0], rows[-1]
    log(f"fig11 done in {time.time() - t_start:.0f}s: {a['trainable_params']:,} / {a['total_params']:,} parameters "
        f"fine-tuned; N {a['N']}->{b['N']}: RP(ft, scratch) {a['rp_ft_vs_scratch']:.2f}->{b['rp_ft_vs_scratch']:.2f}, "
        f"GL ft {a['gl_ft']:.2f}->{b['gl_ft']:.2f}, GL scratch {a['gl_scratch']:.2f}->{b['gl_scratch']:.2f} | "
        f"{csv_path} | {png}")
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
        n_axis(ax, title, "fine-tuning set size N", legend_size=8)
    fig.suptitle(f"Fig. 11: attention-only fine-tuning vs training from scratch ({descriptor} descriptor, "
                 f"threshold {threshold:g})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


STUDY = Study(name="fig11_finetune", module="finetune", paper="Fig. 11", title="attention-only fine-tuning",
              run=run, columns=COLUMNS, quick=QUICK, replace=("arch",), jobs=jobs, score=_score_size, plot=plot)


main = STUDY.main  # main(["--config", FILE, "--out", DIR, "--quick"]) -> the CSV rows


if __name__ == "__main__":
    main(sys.argv[1:])
