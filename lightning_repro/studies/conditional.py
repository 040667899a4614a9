"""Fig. 8 / App. D of Zhang et al. (ICML 2024): reproducibility of class-conditional diffusion models.

Several class-conditional models (different architectures) and unconditional ones are trained on the same data.
Every seed ``s`` is sampled with the deterministic sampler under *every* class ``c`` (guidance 1.0) from the
same noise ``z(s)``, and scored:

* class check     the label of each conditional sample's nearest training image (pixel L2) equals the requested
                  class: the accuracy of a 1-NN "classifier" over the training set;
* conditional RP  per class: RP between two conditional models' samples ``x_A(z(s), c)``, ``x_B(z(s), c)``
                  (``metrics.ConditionalReproducibilityScore``, Sec. 4.1);
* uncond vs cond  the unconditional sample ``x_U(z(s))`` against a conditional model's sample of the class it
                  resembles, ``c(s)`` = the label of ``x_U(z(s))``'s nearest training image (chosen without looking
                  at the conditional samples); also ``agree_best_class`` (how often ``c(s)`` is the best-matching
                  class) and ``rp_best_class`` (the RP under that best class, an upper bound).

Writes ``DIR/conditional_rp.csv`` (model pairs and uncond-vs-cond rows; overall and per-class RP),
``DIR/conditional_models.csv`` (class accuracy), ``DIR/conditional.png``, ``DIR/grids/<model>.png`` (rows = seeds;
the unconditional sample, then one column per class) and ``DIR/checkpoints/``.  Sizes, measured results and the
full-scale settings: ``configs/studies/conditional.yaml``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..evaluation import scoring as score
from .outputs import finish, format_table, log, save_figure, write_csv
from .protocol import Study, config_key, deep_merge
from .steps import StudySetup, check_seed_count, sample_seeds, setup_study, subset_kwargs, trained_denoiser
from .training import TrainJob, module_kwargs_from, run_training_jobs, study_job

__all__ = ["STUDY", "QUICK", "MODEL_COLUMNS", "rp_columns", "jobs", "run_key", "nearest_labels", "resembled_class",
           "select_by_class", "run", "plot", "main"]

#: ``--quick``: tiny networks, a few steps, 8 seeds (for tests; the numbers mean nothing).
QUICK: dict[str, Any] = {
    "workers": 1,
    "data": {"size": 200, "batch_size": 16},
    "train": {"max_steps": 3, "warmup_steps": 0},
    "sample": {"seeds": 8, "steps": 4, "grid_seeds": 8},
    "models": {
        "dit": {"class_path": "DiT", "init_args": {"patch_size": 4, "hidden_size": 16, "depth": 1, "num_heads": 1},
                "conditional": True},
        "edm": {"class_path": "EDM", "init_args": {"model_channels": 8, "channel_mult": [1], "num_blocks": 1,
                                                   "attn_resolutions": [], "dropout": 0.0}, "conditional": True},
        "uncond": {"class_path": "DiT", "init_args": {"patch_size": 4, "hidden_size": 16, "depth": 1, "num_heads": 1},
                   "conditional": False},
    },
}

MODEL_COLUMNS = ["model", "conditional", "class_accuracy", "params", "steps", "train_seconds", "final_loss"]


def rp_columns(classes: list[int]) -> list[str]:
    """Columns of ``conditional_rp.csv``: the comparison, overall RP, RP per class, the uncond-vs-cond extras."""
    return (["comparison", "model_a", "model_b", "overall", "mean_similarity"] + [f"class_{c}" for c in classes]
            + ["agree_best_class", "rp_best_class", "threshold", "descriptor"])


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
    check_seed_count(cfg["sample"]["seeds"])
    if float(cfg["sample"].get("guidance", 1.0)) != 1.0:
        raise ValueError("sample.guidance must be 1.0: the models are trained without label dropout (no null class).")


def _data_kwargs(cfg: dict, conditional: bool, batch_size: int | None = None) -> dict[str, Any]:
    d = cfg["data"]
    return subset_kwargs(d, d["size"], batch_size=int(batch_size or d["batch_size"]), conditional=bool(conditional),
                         classes=d.get("classes"))


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
def _sample_models(cfg: dict, jobs_: list[TrainJob], st: StudySetup, dm) -> tuple[dict[str, Tensor], list[dict]]:
    """Conditional models under every class, (S, C, *shape); unconditional ones once per seed; the model rows."""
    num_classes, shape, names = dm.source.num_classes, dm.image_shape, list(cfg["models"])
    seed_grid = [s for s in st.seeds for _ in range(num_classes)]  # (seed, class) pairs, seed-major
    label_grid = [c for _ in st.seeds for c in range(num_classes)]
    samples, model_rows = {}, []
    for job, name in zip(jobs_, names):
        t0 = time.time()
        den, kernel, meta = trained_denoiser(job, st.device)
        cond = bool(cfg["models"][name].get("conditional", True))
        if cond:
            x = sample_seeds(den, kernel, seed_grid, shape, st, labels=label_grid,
                             guidance=float(cfg["sample"].get("guidance", 1.0)))
            samples[name] = x.reshape(len(st.seeds), num_classes, *shape)
            pred = nearest_labels(x, dm.images, dm.labels)
            acc = float((pred == torch.tensor(label_grid)).float().mean())
        else:
            samples[name], acc = sample_seeds(den, kernel, st.seeds, shape, st), float("nan")
        model_rows.append({"model": name, "conditional": cond, "class_accuracy": acc,
                           "params": sum(p.numel() for p in den.parameters()),
                           "steps": int(meta.get("steps", job.max_steps)),
                           "train_seconds": float(meta.get("train_seconds", float("nan"))),
                           "final_loss": float(meta.get("final_loss", float("nan")))})
        log(f"  {name}: " + (f"class accuracy {acc:.3f}" if cond else "unconditional") + f" ({time.time() - t0:.0f}s)")
    return samples, model_rows


def _per_class_row(kind: str, a: str, b: str, fa: Tensor, fb: Tensor, labels: Tensor, classes: list[int],
                   st: StudySetup) -> dict[str, Any]:
    res = score.conditional_rp(fa, fb, labels, len(classes), st.threshold)
    row = {"comparison": kind, "model_a": a, "model_b": b, "overall": float(res["overall"]),
           "mean_similarity": score.mean_similarity(fa, fb), "threshold": st.threshold,
           "descriptor": st.descriptor_name}
    row.update({f"class_{c}": float(v) for c, v in zip(classes, res["per_class"].tolist())})
    row.update({f"count_{c}": int(v) for c, v in zip(classes, res["counts"].tolist())})
    return row


def _rp_rows(samples: dict[str, Tensor], cond: list[str], uncond: list[str], st: StudySetup, dm) -> list[dict]:
    """Per-class RP of every pair of conditional models, then every unconditional model against each of them."""
    classes, shape, n_seeds = list(range(dm.source.num_classes)), dm.image_shape, len(st.seeds)
    feats = {n: st.descriptor(x.reshape(-1, *shape)) for n, x in samples.items()}
    labels = torch.tensor([c for _ in st.seeds for c in classes])
    rows = [_per_class_row("cond_vs_cond", a, b, feats[a], feats[b], labels, classes, st)
            for i, a in enumerate(cond) for b in cond[i + 1 :]]
    for u in uncond:
        c_u = resembled_class(samples[u], dm.images, dm.labels)
        for a in cond:
            fa = feats[a].reshape(n_seeds, len(classes), -1)
            sims = (fa * feats[u].unsqueeze(1)).sum(-1)  # (S, C) similarity to each class's sample
            row = _per_class_row("uncond_vs_cond", u, a, feats[u], select_by_class(fa, c_u), c_u, classes, st)
            row["agree_best_class"] = float((sims.argmax(1) == c_u).float().mean())
            row["rp_best_class"] = float((sims.max(1).values > st.threshold).float().mean())
            rows.append(row)
        counts = torch.bincount(c_u, minlength=len(classes)).tolist()
        log(f"  {u}: classes its samples resemble (nearest training image): {dict(zip(classes, counts))}")
    return rows


def _save_grids(samples: dict[str, Tensor], cond: list[str], uncond: list[str], out: Path, g: int, shape):
    """Per conditional model: rows = seeds, columns = [the first unconditional model's sample] + classes."""
    from ..viz import save_grid

    paths = {}
    for a in cond:
        cols = ([samples[uncond[0]][:g].unsqueeze(1)] if uncond else []) + [samples[a][:g]]
        tiles = torch.cat(cols, dim=1)  # (g, ncol, *shape)
        paths[f"grid_{a}"] = save_grid(tiles.reshape(-1, *shape), out / "grids" / f"{a}.png", nrow=tiles.shape[1])
    return paths


def run(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Train (or load) every model, sample seeds x classes, score; write the CSVs, figure and grids."""
    from ..data import SubsetDataModule

    _check(cfg)
    st, t_start = setup_study(cfg), time.time()
    dm = SubsetDataModule(**_data_kwargs(cfg, True))
    classes = list(range(dm.source.num_classes))
    cond = [n for n, spec in cfg["models"].items() if spec.get("conditional", True)]
    uncond = [n for n in cfg["models"] if n not in cond]
    log(f"conditional: {len(cond)} conditional + {len(uncond)} unconditional model(s) on {cfg['data']['source']} "
        f"(N={len(dm.images)}, {len(classes)} classes), {len(st.seeds)} seeds x {len(classes)} classes "
        f"({st.sampler}, {st.steps} steps), {st.descriptor_name} threshold {st.threshold} -> {st.out}")
    all_jobs = jobs(cfg, dm.image_shape, len(classes))
    run_training_jobs(all_jobs, cfg["workers"])
    log(f"sampling {len(st.seeds)} seeds x {len(classes)} classes per conditional model ...")
    samples, model_rows = _sample_models(cfg, all_jobs, st, dm)
    rows = _rp_rows(samples, cond, uncond, st, dm)
    grids = _save_grids(samples, cond, uncond, st.out, min(int(cfg["sample"].get("grid_seeds", 16)), len(st.seeds)),
                        dm.image_shape)
    models_csv = write_csv(model_rows, st.out / "conditional_models.csv", MODEL_COLUMNS)
    png = plot(rows, model_rows, classes, st.out / "conditional.png", st.threshold, st.descriptor_name)
    _report(cfg, rows, model_rows, classes, bool(uncond))
    summary = _summary(rows, model_rows)
    csv_path = finish(STUDY.name, cfg, rows, rp_columns(classes), "conditional_rp.csv", {"figure": png, **grids},
                      summary, table=())
    acc_txt = ", ".join(f"{r['model']} {r['class_accuracy']:.3f}" for r in model_rows if r["conditional"])
    log(f"conditional done in {time.time() - t_start:.0f}s: class accuracy {acc_txt}; mean RP cond-vs-cond "
        f"{summary['mean_rp_cond_vs_cond']:.3f}, uncond-vs-cond {summary['mean_rp_uncond_vs_cond']:.3f} | "
        f"{csv_path} | {models_csv} | {png} | {st.out / 'grids'}")
    return rows


def _report(cfg: dict, rows: list[dict], model_rows: list[dict], classes: list[int], has_uncond: bool) -> None:
    """The tables of the log, and a warning naming the models that fail the class check."""
    log(format_table(model_rows, MODEL_COLUMNS[:3] + ["steps", "train_seconds"]))
    log(format_table(rows, ["comparison", "model_a", "model_b", "overall"] + [f"class_{c}" for c in classes]))
    if has_uncond:
        log(format_table([r for r in rows if r["comparison"] == "uncond_vs_cond"],
                         ["model_a", "model_b", "overall", "agree_best_class", "rp_best_class"]))
    min_acc = float(cfg["metrics"].get("min_class_accuracy", 0.9))
    low = [r["model"] for r in model_rows if r["conditional"] and not r["class_accuracy"] >= min_acc]
    if low:
        log(f"warning: class accuracy below {min_acc:g} for {', '.join(low)} (the class check fails for them)")


def _summary(rows: list[dict], model_rows: list[dict]) -> dict[str, float]:
    cc = [r["overall"] for r in rows if r["comparison"] == "cond_vs_cond"]
    uc = [r["overall"] for r in rows if r["comparison"] == "uncond_vs_cond"]
    return {
        "min_class_accuracy": min((r["class_accuracy"] for r in model_rows if r["conditional"]), default=float("nan")),
        "mean_rp_cond_vs_cond": sum(cc) / len(cc) if cc else float("nan"),
        "mean_rp_uncond_vs_cond": sum(uc) / len(uc) if uc else float("nan"),
    }


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


STUDY = Study(name="conditional", module="conditional", paper="Fig. 8", title="conditional reproducibility",
              run=run, columns=rp_columns([]), quick=QUICK, replace=("models",), jobs=jobs, score=_rp_rows, plot=plot)


main = STUDY.main  # main(["--config", FILE, "--out", DIR, "--quick"]) -> the CSV rows


if __name__ == "__main__":
    main(sys.argv[1:])
