"""Model recovery (Zhang et al., ICML 2024, Sec. 3.2.1, Case 2): a student trained on a teacher's samples
reproduces the teacher.

For every training-set size N:

* **teacher**  trained on subset A = the first N images of the ``subset_seed`` permutation of the source;
* **student**  the same architecture trained on N of the teacher's own samples (the ``generated`` data
               source: deterministic Heun samples of the teacher's EMA denoiser at seeds
               ``generated.seeds_start`` ... ``+ N - 1``, default 1,000,000 on, cached in a ``.npz`` next to
               the teacher's checkpoint); these seeds must be disjoint from the evaluation seeds (checked);
* **baseline** the same architecture trained on a *different* subset B of the same size N, disjoint from A:
               the source's images that are not in A are written (uint8, with labels, in permutation order)
               to ``<out>/data/complement_<hash>.npz`` and the baseline takes N of them (``npz`` source,
               same ``subset_seed``); so A and B never share an image, and B comes from the same distribution.

Student and baseline are initialised with the same weight seed (``train.seed + 1``), the teacher with
``train.seed``, so both differ from the teacher in their initial weights and their training data only.

All three are then compared with the real ``evaluate.py --pair`` path (``lightning_repro.evaluation.main``):
RP(teacher, student) and RP(teacher, baseline) from the same evaluation seeds (Sec. 2.1), MAE, and GL of each
model against its own training set (``--gl``).  The paper's claim: the student recovers the teacher,
RP(teacher, student) > RP(teacher, baseline).

Command::

    python -m lightning_repro.studies.recovery --config configs/experiments/recovery.yaml [--out DIR] [--quick]

writes ``DIR/recovery.csv`` (one row per N: ``rp_teacher_student``, ``rp_teacher_baseline``, MAEs, mean
similarities, GLs), ``DIR/recovery.png`` (for each N the teacher / student / baseline samples of the same
seeds, one row each; with several N also RP vs N), ``DIR/eval/N<N>_{student,baseline}/`` (``results.json``,
``pair.png`` and the cached samples of each ``evaluate.py --pair`` run), checkpoints
``DIR/checkpoints/{teacher,student,baseline}_N<N>_<hash>.ckpt`` (the hash covers each run's training
configuration, the student's includes the teacher's; a rerun skips finished trainings) and a W&B run in
group ``recovery``.

Scale.  CPU defaults (``configs/experiments/recovery.yaml``): 8 x 8 digits, N = 512; the single-token DiT (patch
8, hidden 128, depth 3; ~1M parameters), EDM kernel with training noise ln(sigma) ~ N(0.5, 1), 2,000 steps of
batch 256, EMA half-life 25% of training; teacher and baseline trained at once (``workers: 2``, one thread each),
then the student; 256 evaluation seeds 0-255, Heun 18 steps, pixel descriptor (threshold 0.97). N = 512 is past
the memorization regime (the teacher's GL is ~0.9: 91% of its samples have no training image above the threshold),
so the student cannot succeed by copying the same training images.  Measured (2026-11-27): N = 512: RP(teacher,
student) = 0.61, RP(teacher, baseline) = 0.31 (MAE 15.5 vs 19.8; GL teacher 0.91); N = 256: 0.54 vs 0.12 (GL
teacher 0.54).  3 min 42 s wall (measured from scratch on an otherwise idle 2-core machine, 2026-11-27; the same
numbers as on a loaded machine: the study is deterministic).

Full scale, as the paper: ``data.source: cifar10``; an EDM U-Net / DiT at the paper's widths; N in the
generalization regime (e.g. 2^14 - 2^15); ``generated.seeds_start: 1000000`` (the student's N samples);
``sample.seeds: 10000``; ``metrics.descriptor: sscd`` (threshold 0.6); one GPU per training (``workers: 1,
threads: null``).
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import (
    DIGITS_DIT,
    DIGITS_TRAIN,
    TrainJob,
    config_key,
    format_table,
    log,
    log_study_to_wandb,
    module_kwargs_from,
    prepare_output,
    run_training_jobs,
    save_figure,
    source_image_shape,
    study_job,
    study_main,
    write_csv,
)

__all__ = [
    "DEFAULTS",
    "QUICK",
    "QUICK_ARCH",
    "COLUMNS",
    "run_key",
    "evaluation_seeds",
    "generated_seeds",
    "write_complement",
    "jobs",
    "run",
    "plot",
    "main",
]

DEFAULTS: dict[str, Any] = {
    "out": "outputs/recovery",
    "threads": 1,
    "workers": 2,
    "device": "auto",
    "data": {"source": "digits", "source_kwargs": {}, "subset_seed": 0, "batch_size": 256},
    "sizes": [512],
    "kernel": "edm",
    "arch": copy.deepcopy(DIGITS_DIT),
    "train": copy.deepcopy(DIGITS_TRAIN),
    "generated": {"seeds_start": 1_000_000, "sampler": "heun", "steps": 18, "guidance": 1.0},
    "sample": {"seeds": 256, "sampler": "heun", "steps": 18},
    "metrics": {"descriptor": "pixel", "threshold": None},
    "wandb": True,
}

#: ``--quick``: a tiny network, one small N, a few steps (for tests; the numbers mean nothing).
QUICK: dict[str, Any] = {
    "workers": 1,
    "sizes": [16],
    "data": {"batch_size": 16},
    "train": {"max_steps": 3, "warmup_steps": 0},
    "generated": {"steps": 4},
    "sample": {"seeds": 8, "steps": 4},
}
QUICK_ARCH: dict[str, Any] = {
    "class_path": "DiT",
    "init_args": {"patch_size": 4, "hidden_size": 16, "depth": 1, "num_heads": 1},
}

COLUMNS = [
    "N",
    "rp_teacher_student",
    "rp_teacher_baseline",
    "mae_teacher_student",
    "mae_teacher_baseline",
    "sim_teacher_student",
    "sim_teacher_baseline",
    "gl_teacher",
    "gl_student",
    "gl_baseline",
    "n_seeds",
    "eval_seeds",
    "student_seeds",
    "threshold",
    "descriptor",
    "arch",
    "steps",
]




def run_key(role: str, n: int, cfg: dict[str, Any]) -> str:
    """Eight hex digits of the SHA-256 of everything that determines the ``role`` model at size ``n`` (the
    student's covers the teacher's and the generated samples' settings)."""
    base = {"arch": cfg["arch"], "N": n, "kernel": cfg["kernel"], "train": cfg["train"], "data": cfg["data"]}
    if role == "teacher":
        return config_key(base)
    if role == "student":
        return config_key({"role": role, "teacher": run_key("teacher", n, cfg), "generated": cfg["generated"], **base})
    if role == "baseline":
        return config_key({"role": role, **base})
    raise ValueError(f"unknown role {role!r}; expected teacher, student or baseline.")


def evaluation_seeds(cfg: dict[str, Any]) -> list[int]:
    """``sample.seeds``: an int n (seeds 0..n-1) or a seed string such as ``"0-255"``."""
    from ..sampling import parse_seeds

    seeds = cfg["sample"]["seeds"]
    if isinstance(seeds, bool) or (isinstance(seeds, int) and seeds < 1):
        raise ValueError(f"sample.seeds must be a positive integer or a seed string, got {seeds!r}.")
    return list(range(seeds)) if isinstance(seeds, int) else parse_seeds(str(seeds))


def generated_seeds(n: int, cfg: dict[str, Any]) -> list[int]:
    """The student's training seeds ``seeds_start .. seeds_start + n - 1``; raises if they meet the evaluation seeds."""
    start = cfg["generated"]["seeds_start"]
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"generated.seeds_start must be a non-negative integer, got {start!r}.")
    seeds = list(range(start, start + n))
    ev = evaluation_seeds(cfg)
    overlap = sorted(set(seeds) & set(ev))
    if overlap:
        raise ValueError(
            f"the student's training seeds {start}-{start + n - 1} overlap the evaluation seeds "
            f"({len(overlap)} shared, e.g. {overlap[0]}); set generated.seeds_start above {max(ev)}."
        )
    return seeds


def _seed_text(seeds: list[int]) -> str:
    return f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else ",".join(map(str, seeds))


def write_complement(cfg: dict[str, Any], n: int) -> tuple[Path, int]:
    """Write the source's images that are NOT in the teacher's subset A (size ``n``) to an ``.npz`` (uint8 images,
    labels, their source indices; in permutation order) under ``<out>/data``; returns (path, number of images).

    Raises if fewer than ``n`` images remain (the baseline needs a disjoint subset B of the same size).
    """
    from ..data import SubsetDataModule
    from ..data.sources import float_to_uint8

    d = cfg["data"]
    dm = SubsetDataModule(source=d["source"], size=None, source_kwargs=d.get("source_kwargs") or {})
    src = dm.source
    from ..data.datamodule import subset_indices

    perm = subset_indices(src, None, d["subset_seed"])  # the whole permutation; A = perm[:n]
    rest = perm[n:]
    if len(rest) < n:
        raise ValueError(
            f"the {d['source']} source has {len(src)} images, so after the teacher's N={n} only {len(rest)} remain "
            f"for a disjoint baseline subset of the same size; use N <= {len(src) // 2}."
        )
    key = config_key({"data": d, "N": n})
    path = Path(cfg["out"]) / "data" / f"complement_N{n}_{key}.npz"
    if not path.is_file():
        arrays = {"images": float_to_uint8(src.images[rest]), "source_index": rest.numpy().astype(np.int64)}
        if src.labels is not None:
            arrays["labels"] = src.labels[rest].numpy().astype(np.int64)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        tmp.replace(path)
    return path.resolve(), len(rest)


def jobs(cfg: dict[str, Any], n: int, image_shape: tuple[int, ...], complement: Path) -> dict[str, TrainJob]:
    """``{"teacher", "baseline", "student"}`` -> ``TrainJob`` for size ``n`` (the student's data is the teacher's
    samples, so it can only be trained once the teacher's checkpoint exists)."""
    tr, d = cfg["train"], cfg["data"]
    ckpts = Path(cfg["out"]).resolve() / "checkpoints"
    common = dict(subset_seed=d["subset_seed"], batch_size=d["batch_size"], size=n)
    teacher_ckpt = ckpts / f"teacher_N{n}_{run_key('teacher', n, cfg)}.ckpt"
    g = cfg["generated"]
    data = {
        "teacher": dict(source=d["source"], source_kwargs=d.get("source_kwargs") or {}, **common),
        "baseline": dict(source="npz", source_kwargs={"path": str(complement)}, **common),
        "student": dict(
            source="generated",
            source_kwargs={
                "checkpoint": str(teacher_ckpt),
                "seeds": _seed_text(generated_seeds(n, cfg)),
                "sampler": g["sampler"],
                "steps": int(g["steps"]),
                "guidance": float(g["guidance"]),
                "device": str(cfg.get("device", "auto")),
            },
            **common,
        ),
    }
    seeds = {"teacher": int(tr["seed"]), "student": int(tr["seed"]) + 1, "baseline": int(tr["seed"]) + 1}
    out = {}
    for role in ("teacher", "baseline", "student"):
        ckpt = teacher_ckpt if role == "teacher" else ckpts / f"{role}_N{n}_{run_key(role, n, cfg)}.ckpt"
        module_kwargs = module_kwargs_from(cfg["kernel"], tr, seed=seeds[role])
        out[role] = study_job(cfg, f"{role} N={n}", cfg["arch"], image_shape, module_kwargs, data[role], ckpt)
    return out


def _check(cfg: dict[str, Any]) -> None:
    sizes = cfg["sizes"]
    if not isinstance(sizes, list) or not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                                                       for n in sizes):
        raise ValueError(f"sizes must be a non-empty list of positive integers, got {sizes!r}.")
    if not isinstance(cfg["arch"], dict) or "class_path" not in cfg["arch"]:
        raise ValueError("arch must be a mapping with class_path and init_args.")
    for n in sizes:
        generated_seeds(n, cfg)


def _evaluate_pair(a: str, b: str, out: Path, seeds: list[int], cfg: dict[str, Any], device: torch.device):
    from .. import evaluation as evaluate

    argv = ["--pair", a, b, "--seeds", _seed_text(seeds), "--sampler", str(cfg["sample"]["sampler"]),
            "--steps", str(int(cfg["sample"]["steps"])), "--descriptor", str(cfg["metrics"]["descriptor"]),
            "--gl", "--out", str(out), "--device", str(device), "--no-wandb", "--no-progress"]
    if cfg["metrics"]["threshold"] is not None:
        argv += ["--threshold", str(float(cfg["metrics"]["threshold"]))]
    try:
        return evaluate.main(argv)
    except SystemExit as err:  # evaluate printed its sentence; keep it as ours
        raise ValueError(str(err.code if isinstance(err.code, str) else err).removeprefix("error: ")) from None


def run(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Train (or load) teacher, baseline and student for every N, evaluate both pairs, write CSV / PNG / W&B."""
    from ..data import get_source
    from ..evaluation import load_samples

    _check(cfg)
    out, device = prepare_output(cfg)
    d, g = cfg["data"], cfg["generated"]
    sizes = sorted(cfg["sizes"])
    ev_seeds = evaluation_seeds(cfg)
    t_start = time.time()
    log(
        f"recovery: teacher / student (on {g['sampler']} samples of the teacher, seeds from {g['seeds_start']}) / "
        f"baseline (disjoint data) for N in {sizes} on {d['source']}, {cfg['train']['max_steps']} steps each; "
        f"evaluation seeds {_seed_text(ev_seeds)} -> {out}"
    )
    shape = source_image_shape(d)
    all_jobs = {}
    for n in sizes:
        complement, n_rest = write_complement(cfg, n)
        all_jobs[n] = jobs(cfg, n, shape, complement)
        log(f"  N={n}: baseline subset B = {n} of the {n_rest} images not in A ({complement.name})")
    # teachers and baselines first (in parallel), then the teachers' samples, then the students
    run_training_jobs([j[r] for j in all_jobs.values() for r in ("teacher", "baseline")], int(cfg["workers"]),
                      log=log)
    for n, j in all_jobs.items():
        t0 = time.time()
        src = get_source("generated", **j["student"].data_kwargs["source_kwargs"])
        log(f"  N={n}: {len(src)} teacher samples for the student ready ({time.time() - t0:.0f}s)")
    run_training_jobs([j["student"] for j in all_jobs.values()], int(cfg["workers"]), log=log)

    rows: list[dict[str, Any]] = []
    grids: dict[int, dict[str, torch.Tensor]] = {}
    k = min(16, len(ev_seeds))
    for n, j in all_jobs.items():
        res = {}
        for role in ("student", "baseline"):
            log(f"evaluate.py --pair teacher {role} (N={n}) ...")
            res[role] = _evaluate_pair(j["teacher"].ckpt, j[role].ckpt, out / "eval" / f"N{n}_{role}", ev_seeds,
                                       cfg, device)
        rs, rb = res["student"], res["baseline"]
        rows.append({
            "N": n,
            "rp_teacher_student": float(rs["rp"]),
            "rp_teacher_baseline": float(rb["rp"]),
            "mae_teacher_student": float(rs["mae_mean"]),
            "mae_teacher_baseline": float(rb["mae_mean"]),
            "sim_teacher_student": float(rs["mean_similarity"]),
            "sim_teacher_baseline": float(rb["mean_similarity"]),
            "gl_teacher": float(rs["gl_a"]),
            "gl_student": float(rs["gl_b"]),
            "gl_baseline": float(rb["gl_b"]),
            "n_seeds": int(rs["n"]),
            "eval_seeds": _seed_text(ev_seeds),
            "student_seeds": j["student"].data_kwargs["source_kwargs"]["seeds"],
            "threshold": float(rs["threshold"]),
            "descriptor": rs["descriptor"],
            "arch": str(cfg["arch"]["class_path"]),
            "steps": int(cfg["train"]["max_steps"]),
        })
        first = ev_seeds[:k]
        grids[n] = {
            "teacher": load_samples(rs["samples_a"]).select(first, "teacher samples").float_images(),
            "student": load_samples(rs["samples_b"]).select(first, "student samples").float_images(),
            "baseline": load_samples(rb["samples_b"]).select(first, "baseline samples").float_images(),
        }
        write_csv(rows, out / "recovery.csv", COLUMNS)
    csv_path = write_csv(rows, out / "recovery.csv", COLUMNS)
    png_path = plot(rows, grids, out / "recovery.png")
    log(format_table(rows, COLUMNS[:10]))
    summary = {f"N{r['N']}/{c}": r[c] for r in rows for c in COLUMNS[1:10]}
    log_study_to_wandb("recovery", cfg, rows, COLUMNS, {"recovery": png_path}, summary)
    text = ", ".join(
        f"N={r['N']}: RP(teacher, student)={r['rp_teacher_student']:.3f} vs RP(teacher, baseline)="
        f"{r['rp_teacher_baseline']:.3f}" for r in rows
    )
    log(f"recovery done in {time.time() - t_start:.0f}s: {text} | {csv_path} | {png_path}")
    return rows


def plot(rows: list[dict[str, Any]], grids: dict[int, dict[str, torch.Tensor]], path: str | Path) -> Path:
    """For every N: teacher / student / baseline samples of the same seeds (one row each), RPs in the title;
    with several N a last panel of RP vs N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..viz import make_grid

    panels = len(grids) + (1 if len(rows) > 1 else 0)
    k = max(1, max(g["teacher"].shape[0] for g in grids.values()))
    fig, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 1.1 + 6.0 * 3 / k), squeeze=False,
                             layout="constrained")
    axes = axes[0]
    for ax, r in zip(axes, rows):
        gr = grids[r["N"]]
        k = gr["teacher"].shape[0]
        ax.imshow(make_grid(torch.cat([gr["teacher"], gr["student"], gr["baseline"]]), nrow=k))
        h = gr["teacher"].shape[-2] * max(1, 32 // gr["teacher"].shape[-1]) + 1
        ax.set_yticks([1 + h * (i + 0.5) for i in range(3)], ["teacher", "student", "baseline"])
        ax.set_xticks([])
        ax.set_title(
            f"N={r['N']}: RP(teacher, student)={r['rp_teacher_student']:.2f}, "
            f"RP(teacher, baseline)={r['rp_teacher_baseline']:.2f}",
            fontsize=9,
        )
    if len(rows) > 1:
        ax = axes[-1]
        ns = [r["N"] for r in rows]
        ax.plot(ns, [r["rp_teacher_student"] for r in rows], marker="o", label="RP(teacher, student)")
        ax.plot(ns, [r["rp_teacher_baseline"] for r in rows], marker="s", label="RP(teacher, baseline)")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("training set size N")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(
        f"Model recovery (Sec. 3.2.1): same seeds, {r0['descriptor']} descriptor, threshold {r0['threshold']:g}",
        fontsize=10,
    )
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """``python -m lightning_repro.studies.recovery --config FILE [--out DIR] [--quick]``; returns the CSV rows."""
    return study_main(
        argv,
        "python -m lightning_repro.studies.recovery",
        __doc__,
        run,
        DEFAULTS,
        {**QUICK, "arch": QUICK_ARCH},
        replace=("arch", "sizes"),
        example_config="configs/experiments/recovery.yaml",
    )


if __name__ == "__main__":
    main(sys.argv[1:])
