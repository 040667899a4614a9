"""Fig. 6 / Table 1 of Zhang et al. (ICML 2024) at laptop scale: diffusion models trained by *different procedures*
on the same data, sampled from the same seeds each with its own deterministic sampler, reproduce each other.

The models (``models`` of the config): EDM (the DDPM++ U-Net in the EDM variable, Heun), DDPM (discrete VP, DDIM),
consistency training (CT) and distillation (CD; Song et al. 2023, one step), progressive distillation (Salimans & Ho
2022; its DDIM students at several step counts are compared), the Multistage U-Net (Zhang et al. 2024), U-ViT and
DiT.  An ``init_args`` value ``"@name"`` is the checkpoint of model ``name``: the distillations' ``teacher`` (and CD's
``init_from``, the CM paper's initialisation), so those train once their teacher exists.  Every compared model is
sampled from seeds 0..S-1 (``sample`` of its entry, or the sampler its checkpoint records) and ``evaluate.py --matrix``
gives the RP and MAE matrices (heatmaps in the Fig. 6 layout, CSVs) and GL; an entry's ``curve_every`` keeps
intermediate checkpoints and scores RP(teacher, model) against training steps (the CT budget curve).

Writes ``DIR/fig6_models.csv`` (one row per compared model), ``DIR/matrix/{rp,mae}_matrix.{csv,png}``,
``DIR/fig6_samples.png``, ``DIR/curve.csv`` / ``DIR/curve.png``, ``DIR/samples/``, ``DIR/checkpoints/``, a W&B run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from .outputs import finish, log, save_figure, write_csv
from .protocol import Study, config_key, deep_merge
from .steps import check_seed_count, prepare_output, source_image_shape, subset_kwargs
from .training import TrainJob, arch_class, module_kwargs_from, run_training_jobs, study_job

__all__ = ["STUDY", "QUICK", "COLUMNS", "model_entries", "training_rounds", "jobs", "compared_models", "run", "plot",
           "main"]

_TINY_UNET = {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
#: ``--quick``: tiny networks, a few steps (for tests; the numbers mean nothing).
QUICK: dict[str, Any] = {
    "workers": 1,
    "size": 16,
    "data": {"batch_size": 16},
    "train": {"max_steps": 4, "warmup_steps": 0},
    "sample": {"seeds": 8},
    "models": {
        "edm": {"class_path": "DDPMpp", "init_args": _TINY_UNET, "sample": {"sampler": "heun", "steps": 4}},
        "ddpm": {"class_path": "DDPM", "init_args": {**_TINY_UNET, "kernel": "vp_discrete"},
                 "sample": {"sampler": "ddim", "steps": 4}},
        "ct": {"class_path": "CTDDPMpp", "init_args": {**_TINY_UNET, "s0": 4, "s1": 8}, "curve_every": 2},
        "cd": {"class_path": "CDDDPMpp", "init_args": {**_TINY_UNET, "teacher": "@edm", "init_from": "@edm",
                                                       "s1": 4, "mu0": 0.0}},
        "pd": {"class_path": "ProgressiveDistillation",
               "init_args": {"teacher": "@edm", "student": "ddpmpp", "student_kwargs": _TINY_UNET,
                             "steps": [2, 1], "save_steps": [2, 1], "steps_per_stage": 2},
               "train": {"lr_decay": "constant"}},
        "dit": {"class_path": "DiT", "init_args": {"patch_size": 4, "hidden_size": 16, "depth": 1, "num_heads": 1}},
    },
}

COLUMNS = ["model", "procedure", "class_path", "sampler", "steps", "train_steps", "train_seconds", "rp_vs_teacher",
           "mae_vs_teacher", "gl", "N", "n_seeds", "descriptor", "threshold"]


def model_entries(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``models`` checked: each a mapping with ``class_path``; every ``"@name"`` names another model; ``teacher``
    (the model the RP column compares with) is one of them."""
    models = cfg["models"]
    if not isinstance(models, dict) or not models:
        raise ValueError("models must be a non-empty mapping of name -> {class_path, init_args, ...}.")
    for name, e in models.items():
        if not isinstance(e, dict) or "class_path" not in e:
            raise ValueError(f"model {name!r} must be a mapping with class_path (and init_args), got {e!r}.")
        for key, dep in _refs(e).items():
            if dep not in models or dep == name:
                raise ValueError(f"model {name!r}: init_args.{key} = '@{dep}' names no other model; the models are: "
                                 f"{', '.join(models)}.")
    if cfg["teacher"] not in models:
        raise ValueError(f"teacher {cfg['teacher']!r} is not one of the models ({', '.join(models)}).")
    return models


def _refs(entry: dict[str, Any]) -> dict[str, str]:
    """``{init arg: model name}`` of the entry's ``"@name"`` values."""
    return {k: v[1:] for k, v in (entry.get("init_args") or {}).items() if isinstance(v, str) and v.startswith("@")}


def training_rounds(models: dict[str, dict[str, Any]]) -> list[list[str]]:
    """The models in rounds: each round only needs checkpoints of earlier rounds (one sentence for a cycle)."""
    done: list[str] = []
    rounds = []
    while len(done) < len(models):
        ready = [n for n in models if n not in done and set(_refs(models[n]).values()) <= set(done)]
        if not ready:
            left = [n for n in models if n not in done]
            raise ValueError(f"the models {', '.join(left)} need each other's checkpoints ('@name' cycle).")
        rounds.append(ready)
        done += ready
    return rounds


def _writes_students(entry: dict[str, Any]) -> bool:
    """Whether the entry is a progressive distillation (any name ``arch_class`` takes), whose students are compared."""
    from ..progressive import ProgressiveDistillation

    return issubclass(arch_class(entry["class_path"]), ProgressiveDistillation)


def _train_section(cfg: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """The common ``train`` section with the entry's own ``train`` merged in; a progressive distillation's steps
    default to ``steps_per_stage`` x its number of halvings."""
    tr = deep_merge(cfg["train"], entry.get("train") or {})
    ia = entry.get("init_args") or {}
    if _writes_students(entry) and "max_steps" not in (entry.get("train") or {}):
        tr["max_steps"] = int(ia.get("steps_per_stage", 1000)) * len(ia.get("steps", (64, 32, 16, 8, 4, 2, 1)))
    return tr


def jobs(cfg: dict[str, Any], image_shape: tuple[int, ...]) -> dict[str, TrainJob]:
    """One ``TrainJob`` per model, checkpoint ``<out>/checkpoints/<name>_N<N>_<key>.ckpt``; a key covers the keys of
    the models it references, so a retrained teacher retrains its students."""
    models = model_entries(cfg)
    ckpts, keys, out = Path(cfg["out"]).resolve() / "checkpoints", {}, {}
    n = cfg["size"]
    for name in [m for r in training_rounds(models) for m in r]:
        e, tr = models[name], _train_section(cfg, models[name])
        refs = _refs(e)
        keys[name] = config_key({"model": {k: v for k, v in e.items() if k != "sample"}, "N": n, "train": tr,
                                 "kernel": cfg["kernel"], "data": cfg["data"], "refs": {d: keys[d] for d in refs.values()}})
        ckpt = ckpts / f"{name}_N{n or 'all'}_{keys[name]}.ckpt"
        arch = {"class_path": e["class_path"],
                "init_args": {**(e.get("init_args") or {}), **{k: str(out[d].ckpt) for k, d in refs.items()}}}
        if _writes_students(e):
            arch["init_args"]["students_dir"] = str(ckpt.with_suffix("")) + "_students"
        trainer = _curve_trainer(e, ckpt)
        out[name] = study_job(cfg, name, arch, image_shape, module_kwargs_from(cfg["kernel"], tr),
                              subset_kwargs(cfg["data"], n), ckpt, train={**tr, "trainer": {**tr.get("trainer", {}),
                                                                                            **trainer}})
    return out


def _curve_trainer(entry: dict[str, Any], ckpt: Path) -> dict[str, Any]:
    """Trainer keywords that keep a checkpoint every ``curve_every`` steps (``<ckpt stem>_curve/step=K.ckpt``)."""
    every = entry.get("curve_every")
    if not every:
        return {}
    from lightning.pytorch.callbacks import ModelCheckpoint

    keep = ModelCheckpoint(dirpath=str(ckpt.with_suffix("")) + "_curve", filename="{step}", every_n_train_steps=int(every),
                           save_top_k=-1, save_weights_only=True, auto_insert_metric_name=True)
    return {"enable_checkpointing": True, "callbacks": [keep]}


def compared_models(cfg: dict[str, Any], all_jobs: dict[str, TrainJob]) -> dict[str, dict[str, Any]]:
    """Label -> ``{"ckpt", "sample": {sampler, steps} or {} (its recorded sampler), "job"}``: every model, a
    progressive distillation replaced by its saved students (``<name><K>``, DDIM at K steps)."""
    out = {}
    for name, job in all_jobs.items():
        e = cfg["models"][name]
        if _writes_students(e):
            for path in sorted(Path(job.arch["init_args"]["students_dir"]).glob("student_*steps.ckpt"), reverse=True):
                k = int(path.stem.removeprefix("student_").removesuffix("steps"))
                out[f"{name}{k}"] = {"ckpt": str(path), "sample": {}, "job": job}
        else:
            out[name] = {"ckpt": job.ckpt, "sample": dict(e.get("sample") or {}), "job": job}
    return out


# ---------------------------------------------------------------------------------------------- sampling, scoring
def _evaluate(argv: list[str]) -> dict[str, Any]:
    from .. import evaluation

    try:
        return evaluation.main([*argv, "--no-progress"])
    except SystemExit as err:  # evaluate printed its sentence; keep it as ours
        raise ValueError(str(err.code if isinstance(err.code, str) else err).removeprefix("error: ")) from None


def _sample(ckpt: str, sample: dict[str, Any], out: Path, seeds: str, device: str) -> Path:
    """``evaluate.py sample`` of ``ckpt`` at ``seeds`` into ``out`` (its own sampler unless ``sample`` names one);
    shards of the same checkpoint and settings are reused, others regenerated."""
    argv = ["sample", str(ckpt), "--seeds", seeds, "--out", str(out), "--device", device]
    for key in ("sampler", "steps", "grid"):
        if sample.get(key) is not None:
            argv += [f"--{key}", str(sample[key])]
    try:
        _evaluate(argv)
    except ValueError as err:  # the study's own cache of another checkpoint or sampler: regenerate it
        if "--overwrite" not in str(err):
            raise
        log(f"  {out.name}: the cached samples are of another run; sampling anew")
        _evaluate([*argv, "--overwrite"])
    return out


def _metrics_args(cfg: dict[str, Any]) -> list[str]:
    m = cfg["metrics"]
    argv = ["--descriptor", str(m["descriptor"])]
    return argv + (["--threshold", str(float(m["threshold"]))] if m.get("threshold") is not None else [])


def _sampled_with(folder: Path) -> tuple[str, int]:
    from ..evaluation import load_samples

    p = load_samples(str(folder)).provenance
    return str(p.get("sampler")), int(p.get("steps") or 0)


def _curve(cfg: dict[str, Any], name: str, job: TrainJob, teacher_samples: Path, seeds: str, device: str):
    """RP / MAE of the teacher against every kept checkpoint of ``name`` (``curve_every``), then the final one."""
    folder = Path(str(Path(job.ckpt).with_suffix("")) + "_curve")
    points = sorted((int(p.stem.split("=")[1]), p) for p in folder.glob("step=*.ckpt"))
    points = [(k, p) for k, p in points if k < job.max_steps] + [(job.max_steps, Path(job.ckpt))]
    rows = []
    for step, path in points:
        smp = _sample(str(path), dict(cfg["models"][name].get("sample") or {}),
                      Path(cfg["out"]) / "samples" / "curve" / f"{name}_step{step}", seeds, device)
        res = _evaluate(["--pair", str(teacher_samples), str(smp), "--out",
                         str(Path(cfg["out"]) / "eval" / f"curve_{name}_step{step}"), "--no-wandb", *_metrics_args(cfg)])
        rows.append({"model": name, "step": step, "rp_vs_teacher": float(res["rp"]),
                     "mae_vs_teacher": float(res["mae_mean"]), "similarity": float(res["mean_similarity"])})
    return rows


def _rows(cfg, models: dict[str, dict[str, Any]], res: dict[str, Any], folders: dict[str, Path]) -> list[dict]:
    """One row per compared model: its procedure, sampler, training, and RP / MAE against the teacher, GL."""
    labels, t = list(models), list(models).index(cfg["teacher"])
    rows = []
    for i, label in enumerate(labels):
        job, meta = models[label]["job"], models[label]["job"].meta()
        sampler, steps = _sampled_with(folders[label])
        rows.append({"model": label, "procedure": _procedure(job.arch["class_path"]),
                     "class_path": str(job.arch["class_path"]), "sampler": sampler, "steps": steps,
                     "train_steps": meta.get("steps"), "train_seconds": meta.get("train_seconds"),
                     "rp_vs_teacher": float(res["rp"][t][i]), "mae_vs_teacher": float(res["mae_mean"][t][i]),
                     "gl": float(res["gl"][i]) if res.get("gl") else float("nan"), "N": cfg["size"] or "all",
                     "n_seeds": int(res["n"]), "descriptor": res["descriptor"], "threshold": float(res["threshold"])})
    return rows


def _procedure(class_path: str) -> str:
    short = str(class_path).rsplit(".", 1)[-1]
    return {"CT": "consistency training", "CD": "consistency distillation"}.get(short[:2], {
        "ProgressiveDistillation": "progressive distillation", "Multistage": "multistage"}.get(short, "denoising"))


def _check(cfg: dict[str, Any]) -> None:
    model_entries(cfg)
    check_seed_count(cfg["sample"]["seeds"])
    if cfg["size"] is not None and (isinstance(cfg["size"], bool) or not isinstance(cfg["size"], int)
                                    or cfg["size"] < 1):
        raise ValueError(f"size must be a positive integer or null (all images), got {cfg['size']!r}.")


def run(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Train the models round by round, sample each with its sampler, the RP / MAE matrices, the curves."""
    _check(cfg)
    out, device = prepare_output(cfg)
    t0, seeds = time.time(), f"0-{int(cfg['sample']['seeds']) - 1}"
    all_jobs = jobs(cfg, source_image_shape(cfg["data"]))
    rounds = training_rounds(cfg["models"])
    log(f"fig6: {len(all_jobs)} trainings in {len(rounds)} round(s) ({' | '.join(', '.join(r) for r in rounds)}) on "
        f"{cfg['data']['source']} N={cfg['size'] or 'all'}; teacher {cfg['teacher']}; seeds {seeds} -> {out}")
    for names in rounds:
        run_training_jobs([all_jobs[n] for n in names], cfg["workers"])
    models = compared_models(cfg, all_jobs)
    folders = {label: _sample(m["ckpt"], m["sample"], out / "samples" / label, seeds, str(device))
               for label, m in models.items()}
    res = _evaluate(["--matrix", *map(str, folders.values()), "--gl", "--out", str(out / "matrix"), "--no-wandb",
                     *_metrics_args(cfg)])
    rows = _rows(cfg, models, res, folders)
    curve = [p for name, e in cfg["models"].items() if e.get("curve_every")
             for p in _curve(cfg, name, all_jobs[name], folders[cfg["teacher"]], seeds, str(device))]
    images = {"rp_matrix": out / "matrix" / "rp_matrix.png", "mae_matrix": out / "matrix" / "mae_matrix.png",
              "samples": plot(rows, folders, out / "fig6_samples.png")}
    if curve:
        write_csv(curve, out / "curve.csv", list(curve[0]))
        images["curve"] = plot_curve(curve, cfg["teacher"], out / "curve.png")
    summary = {f"{r['model']}/{k}": r[k] for r in rows for k in ("rp_vs_teacher", "mae_vs_teacher", "gl")}
    csv_path = finish(STUDY.name, cfg, rows, COLUMNS, "fig6_models.csv", images, summary, COLUMNS[:10])
    pairs = ", ".join(f"RP({cfg['teacher']}, {r['model']})={r['rp_vs_teacher']:.3f}" for r in rows
                      if r["model"] != cfg["teacher"])
    log(f"fig6 done in {time.time() - t0:.0f}s: {pairs} | {res['descriptor']}@{res['threshold']:g}, "
        f"{res['n']} seeds | {csv_path} | {images['rp_matrix']}")
    return rows


def plot(rows: list[dict[str, Any]], folders: dict[str, Path], path: str | Path, k: int = 16) -> Path:
    """The first ``k`` seeds of every model, one row each (same seed in the same column), RP vs teacher on the left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from ..evaluation import load_samples
    from ..viz import make_grid

    first = None
    images = []
    for r in rows:
        s = load_samples(str(folders[r["model"]]))
        first = first or sorted(s.seeds)[:k]
        images.append(s.select(first, r["model"]).float_images())
    fig, ax = plt.subplots(figsize=(0.5 * len(first) + 2.5, 0.5 * len(rows) + 0.8), layout="constrained")
    ax.imshow(make_grid(torch.cat(images), nrow=len(first)))
    h = images[0].shape[-2] * max(1, 32 // images[0].shape[-1]) + 1
    ax.set_yticks([1 + h * (i + 0.5) for i in range(len(rows))],
                  [f"{r['model']} ({r['sampler']} {r['steps']}) RP {r['rp_vs_teacher']:.2f}" for r in rows], fontsize=7)
    ax.set_xticks([])
    ax.set_title(f"seeds {first[0]}..{first[-1]}: every model from the same noise", fontsize=9)
    return save_figure(fig, path)


def plot_curve(curve: list[dict[str, Any]], teacher: str, path: str | Path) -> Path:
    """RP against the teacher over training steps, one line per ``curve_every`` model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name in dict.fromkeys(p["model"] for p in curve):
        pts = [p for p in curve if p["model"] == name]
        ax.plot([p["step"] for p in pts], [p["rp_vs_teacher"] for p in pts], marker="o", label=name)
    ax.set(xlabel="training step", ylabel=f"RP against {teacher}", ylim=(-0.02, 1.02), title="RP over training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _add_arguments(p) -> None:
    p.add_argument("--size", type=int, default=None,
                   help="training-set size N (default: the config's size; null = all images, the generalization "
                        "regime; e.g. 16 for the memorization regime)")


def _dispatch(cfg: dict[str, Any], args) -> list[dict[str, Any]]:
    if args.size is not None:
        cfg["size"] = args.size
        if args.out is None:
            cfg["out"] = f"{cfg['out']}_N{args.size}"
    return run(cfg)


STUDY = Study(name="fig6_procedures", module="procedures", paper="Fig. 6",
              title="models of different training procedures reproduce each other", run=run, columns=COLUMNS,
              quick=QUICK, replace=("models",), jobs=jobs, plot=plot, add_arguments=_add_arguments, dispatch=_dispatch)


main = STUDY.main  # main(["--config", FILE, "--out", DIR, "--quick", "--size", N]) -> the CSV rows


if __name__ == "__main__":
    main(sys.argv[1:])
