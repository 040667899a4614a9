"""Model recovery (Zhang et al., ICML 2024, Sec. 3.2.1, Case 2): a student trained on a teacher's samples
reproduces the teacher.

For every size N: the **teacher** is trained on subset A (the first N images of the ``subset_seed``
permutation); the **student**, same architecture, on N of the teacher's own deterministic samples (the
``generated`` source, seeds from ``generated.seeds_start``, disjoint from the evaluation seeds: checked); the
**baseline**, same architecture, on a subset B of N images disjoint from A (the images not in A, written to
``<out>/data/complement_*.npz``).  Student and baseline share the weight seed ``train.seed + 1``, the teacher has
``train.seed``.  All three are compared through ``evaluate.py --pair`` (``lightning_repro.evaluation.main``):
RP(teacher, student) and RP(teacher, baseline) from the same seeds, MAE, and GL of each against its own data.
The paper's claim: RP(teacher, student) > RP(teacher, baseline).

Writes ``DIR/recovery.csv`` (one row per N), ``DIR/recovery.png`` (teacher / student / baseline samples of the
same seeds), ``DIR/eval/N<N>_{student,baseline}/`` (each ``--pair`` run), ``DIR/checkpoints/`` and a W&B run.
Sizes, measured results and the full-scale settings: ``configs/studies/recovery.yaml``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .outputs import finish, log, n_axis, save_figure, save_npz, write_csv
from .protocol import Study, config_key
from .steps import check_sizes, prepare_output, source_image_shape
from .training import TrainJob, module_kwargs_from, run_training_jobs, study_job

__all__ = ["STUDY", "QUICK", "COLUMNS", "run_key", "evaluation_seeds", "generated_seeds", "write_complement", "jobs",
           "run", "plot", "main"]

#: ``--quick``: a tiny network, one small N, a few steps (for tests; the numbers mean nothing).
QUICK: dict[str, Any] = {
    "workers": 1,
    "sizes": [16],
    "data": {"batch_size": 16},
    "train": {"max_steps": 3, "warmup_steps": 0},
    "generated": {"steps": 4},
    "sample": {"seeds": 8, "steps": 4},
    "arch": {"class_path": "DiT", "init_args": {"patch_size": 4, "hidden_size": 16, "depth": 1, "num_heads": 1}},
}

COLUMNS = ["N", "rp_teacher_student", "rp_teacher_baseline", "mae_teacher_student", "mae_teacher_baseline",
           "sim_teacher_student", "sim_teacher_baseline", "gl_teacher", "gl_student", "gl_baseline", "n_seeds",
           "eval_seeds", "student_seeds", "threshold", "descriptor", "arch", "steps"]


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
        save_npz(path, **arrays)
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
    sizes = check_sizes(cfg["sizes"])
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


def _train_all(cfg: dict[str, Any], sizes: list[int]) -> dict[int, dict[str, TrainJob]]:
    """Teachers and baselines first (in parallel), then the teachers' samples, then the students."""
    from ..data import get_source

    shape = source_image_shape(cfg["data"])
    all_jobs = {}
    for n in sizes:
        complement, n_rest = write_complement(cfg, n)
        all_jobs[n] = jobs(cfg, n, shape, complement)
        log(f"  N={n}: baseline subset B = {n} of the {n_rest} images not in A ({complement.name})")
    run_training_jobs([j[r] for j in all_jobs.values() for r in ("teacher", "baseline")], cfg["workers"])
    for n, j in all_jobs.items():
        t0 = time.time()
        src = get_source("generated", **j["student"].data_kwargs["source_kwargs"])
        log(f"  N={n}: {len(src)} teacher samples for the student ready ({time.time() - t0:.0f}s)")
    run_training_jobs([j["student"] for j in all_jobs.values()], cfg["workers"])
    return all_jobs


def _score_size(cfg: dict[str, Any], n: int, j: dict[str, TrainJob], ev_seeds: list[int], out: Path, device):
    """The row of size ``n`` (both ``--pair`` evaluations) and its sample grids (the first 16 seeds)."""
    from ..evaluation import load_samples

    res = {}
    for role in ("student", "baseline"):
        log(f"evaluate.py --pair teacher {role} (N={n}) ...")
        res[role] = _evaluate_pair(j["teacher"].ckpt, j[role].ckpt, out / "eval" / f"N{n}_{role}", ev_seeds, cfg,
                                   device)
    rs, rb = res["student"], res["baseline"]
    row = {"N": n, "rp_teacher_student": float(rs["rp"]), "rp_teacher_baseline": float(rb["rp"]),
           "mae_teacher_student": float(rs["mae_mean"]), "mae_teacher_baseline": float(rb["mae_mean"]),
           "sim_teacher_student": float(rs["mean_similarity"]), "sim_teacher_baseline": float(rb["mean_similarity"]),
           "gl_teacher": float(rs["gl_a"]), "gl_student": float(rs["gl_b"]), "gl_baseline": float(rb["gl_b"]),
           "n_seeds": int(rs["n"]), "eval_seeds": _seed_text(ev_seeds),
           "student_seeds": j["student"].data_kwargs["source_kwargs"]["seeds"], "threshold": float(rs["threshold"]),
           "descriptor": rs["descriptor"], "arch": str(cfg["arch"]["class_path"]),
           "steps": int(cfg["train"]["max_steps"])}
    first = ev_seeds[: min(16, len(ev_seeds))]
    grid = {name: load_samples(path).select(first, f"{name} samples").float_images()
            for name, path in (("teacher", rs["samples_a"]), ("student", rs["samples_b"]),
                               ("baseline", rb["samples_b"]))}
    return row, grid


def run(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Train (or load) teacher, baseline and student for every N, evaluate both pairs, write CSV / PNG / W&B."""
    _check(cfg)
    out, device = prepare_output(cfg)
    g, sizes, ev_seeds, t_start = cfg["generated"], sorted(cfg["sizes"]), evaluation_seeds(cfg), time.time()
    log(f"recovery: teacher / student (on {g['sampler']} samples of the teacher, seeds from {g['seeds_start']}) / "
        f"baseline (disjoint data) for N in {sizes} on {cfg['data']['source']}, {cfg['train']['max_steps']} steps "
        f"each; evaluation seeds {_seed_text(ev_seeds)} -> {out}")
    all_jobs = _train_all(cfg, sizes)
    rows: list[dict[str, Any]] = []
    grids: dict[int, dict[str, torch.Tensor]] = {}
    for n, j in all_jobs.items():
        row, grids[n] = _score_size(cfg, n, j, ev_seeds, out, device)
        rows.append(row)
        write_csv(rows, out / "recovery.csv", COLUMNS)
    png = plot(rows, grids, out / "recovery.png")
    summary = {f"N{r['N']}/{c}": r[c] for r in rows for c in COLUMNS[1:10]}
    csv_path = finish(STUDY.name, cfg, rows, COLUMNS, "recovery.csv", {"recovery": png}, summary, COLUMNS[:10])
    text = ", ".join(f"N={r['N']}: RP(teacher, student)={r['rp_teacher_student']:.3f} vs RP(teacher, baseline)="
                     f"{r['rp_teacher_baseline']:.3f}" for r in rows)
    log(f"recovery done in {time.time() - t_start:.0f}s: {text} | {csv_path} | {png}")
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
        n_axis(ax, "RP vs N", legend_size=8)
    r0 = rows[0]
    fig.suptitle(
        f"Model recovery (Sec. 3.2.1): same seeds, {r0['descriptor']} descriptor, threshold {r0['threshold']:g}",
        fontsize=10,
    )
    return save_figure(fig, path)


STUDY = Study(name="recovery", module="recovery", paper="Sec. 3.2.1", title="model recovery from a teacher's samples",
              run=run, columns=COLUMNS, quick=QUICK, replace=("arch", "sizes"), jobs=jobs, score=_score_size, plot=plot)


main = STUDY.main  # main(["--config", FILE, "--out", DIR, "--quick"]) -> the CSV rows


if __name__ == "__main__":
    main(sys.argv[1:])
