"""Fig. 2 of Zhang et al. (ICML 2024): the memorization-to-generalization phase transition, as a sweep.

A grid over training-set size N (powers of two), network family, width and seed is trained (one model per grid
point, all on the same nested subsets), every model is sampled from the *same* seeds and scored (Sec. 2.1):
``family_pair`` (RP between two families of the same width, N and seed), ``width_pair`` (two widths of a family),
``seed_pair`` (two seeds) and, per ``model``, GL against its own subset and RP against the optimal denoiser of
that subset (Prop. 1).  The paper shows RP high at small N (copies of training images, GL ~ 0), a dip at
intermediate N, and high again at large N on new images (GL ~ 1).

Three ways to run the same grid (a grid point's checkpoint has one name whichever runs it, so they mix)::

    python -m lightning_repro.studies.sweep --config configs/studies/phase_transition.yaml   # local, resumable
    python -m lightning_repro.studies.sweep --config configs/studies/phase_transition.yaml \
        --emit-wandb outputs/phase_transition/wandb_sweep.yaml      # W&B Sweeps: one agent run per grid point
    python -m lightning_repro.studies.sweep --config configs/studies/phase_transition.yaml --aggregate-only

(``--train-point --family dit --width 128 --size 64 --seed 0`` is what each agent run executes.)  Writes
``DIR/phase_transition.csv`` (one row per model and per compared pair; column ``kind``), ``DIR/phase_transition.png``,
``DIR/samples/<point>.png``, ``DIR/checkpoints/<family>_w<width>_N<N>_s<seed>_<hash>.ckpt`` and W&B runs in group
``phase_transition`` (one per grid point, one with the table).  Sizes, measured results and the full-scale
settings: ``configs/studies/phase_transition.yaml``.
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..evaluation import scoring as score
from .outputs import atomic_bytes, finish, format_table, log, n_axis, save_figure, save_tensor, write_csv
from .protocol import Study, config_key
from .steps import (
    StudySetup,
    check_seed_count,
    sample_seeds,
    setup_study,
    source_image_shape,
    subset_kwargs,
    trained_denoiser,
)
from .training import TrainJob, module_kwargs_from, run_training_jobs, set_threads, study_job

__all__ = ["STUDY", "QUICK", "COLUMNS", "GridPoint", "grid_points", "point_job", "jobs", "wandb_sweep_config",
           "aggregate", "plot", "run", "main"]

#: ``--quick``: a 2 x 2 x 2 grid of tiny networks and a few steps (for tests; the numbers mean nothing).
QUICK: dict[str, Any] = {
    "workers": 1,
    "grid": {"size": [8, 16], "family": ["dit", "uvit"], "width": [8, 16], "seed": [0]},
    "families": {
        "dit": {"class_path": "DiT", "width_arg": "hidden_size",
                "init_args": {"patch_size": 8, "depth": 1, "num_heads": 1}},
        "uvit": {"class_path": "UViT", "width_arg": "embed_dim",
                 "init_args": {"patch_size": 8, "depth": 1, "num_heads": 1}},
    },
    "data": {"batch_size": 16},
    "train": {"max_steps": 3, "warmup_steps": 0, "wandb": False},
    "sample": {"seeds": 8, "steps": 4},
}

COLUMNS = ["kind", "N", "family", "width", "seed", "other", "rp", "mean_sim", "gl", "rp_vs_optimal",
           "threshold", "descriptor", "steps", "params", "train_seconds", "final_loss"]

GRID_KEYS = ("family", "width", "size", "seed")


class GridPoint(tuple):
    """``(family, width, size, seed)`` with names; ``str(point)`` is its file stem ``dit_w128_N64_s0``."""

    __slots__ = ()

    def __new__(cls, family: str, width: int, size: int, seed: int):
        return super().__new__(cls, (str(family), int(width), int(size), int(seed)))

    family = property(lambda self: self[0])
    width = property(lambda self: self[1])
    size = property(lambda self: self[2])
    seed = property(lambda self: self[3])

    def __str__(self) -> str:
        return f"{self.family}_w{self.width}_N{self.size}_s{self.seed}"


def _check(cfg: dict[str, Any]) -> None:
    grid = cfg["grid"]
    if not isinstance(grid, dict) or set(grid) != set(GRID_KEYS):
        raise ValueError(f"grid must be a mapping with exactly the keys {list(GRID_KEYS)}, got {grid!r}.")
    for key in GRID_KEYS:
        vals = grid[key]
        if not isinstance(vals, list) or not vals or len(set(map(str, vals))) != len(vals):
            raise ValueError(f"grid.{key} must be a non-empty list of distinct values, got {vals!r}.")
    for key in ("size", "width"):
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in grid[key]):
            raise ValueError(f"grid.{key} must hold positive integers, got {grid[key]!r}.")
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in grid["seed"]):
        raise ValueError(f"grid.seed must hold non-negative integers, got {grid['seed']!r}.")
    unknown = [f for f in grid["family"] if f not in cfg["families"]]
    if unknown:
        raise ValueError(f"grid.family has {unknown}, which families does not define; defined: "
                         f"{sorted(cfg['families'])}.")
    for name, fam in cfg["families"].items():
        if not isinstance(fam, dict) or "class_path" not in fam or "width_arg" not in fam:
            raise ValueError(f"families.{name} must be a mapping with class_path, width_arg and init_args.")
        div = fam.get("width_divisor", 1)
        if not isinstance(div, int) or isinstance(div, bool) or div < 1 or any(w % div for w in grid["width"]):
            raise ValueError(f"families.{name}.width_divisor must be a positive integer dividing every grid.width "
                             f"{grid['width']}, got {div!r}.")
    check_seed_count(cfg["sample"]["seeds"])


def grid_points(cfg: dict[str, Any]) -> list[GridPoint]:
    """Every grid point, smallest N first (so a killed local sweep has the cheap end of the curve)."""
    g = cfg["grid"]
    return [GridPoint(f, w, n, s) for n, f, w, s in itertools.product(sorted(g["size"]), g["family"],
                                                                       sorted(g["width"]), g["seed"])]


def _arch_spec(cfg: dict[str, Any], point: GridPoint) -> dict[str, Any]:
    fam = cfg["families"][point.family]
    width = point.width // int(fam.get("width_divisor", 1))  # e.g. a U-Net's channels for a transformer's width
    return {"class_path": fam["class_path"],
            "init_args": {**dict(fam.get("init_args") or {}), fam["width_arg"]: width}}


def run_key(cfg: dict[str, Any], point: GridPoint) -> str:
    """Eight hex digits of the SHA-256 of everything that determines the model of a grid point."""
    train = {k: v for k, v in cfg["train"].items() if k != "wandb"}
    return config_key({"arch": _arch_spec(cfg, point), "N": point.size, "seed": point.seed, "kernel": cfg["kernel"],
                       "train": train, "data": cfg["data"]})


def point_job(cfg: dict[str, Any], point: GridPoint, image_shape: tuple[int, ...]) -> TrainJob:
    """The ``TrainJob`` of one grid point; its checkpoint name is the same for the local runner and an agent."""
    tr = cfg["train"]
    module_kwargs = module_kwargs_from(cfg["kernel"], tr, seed=point.seed)
    ckpt = Path(cfg["out"]) / "checkpoints" / f"{point}_{run_key(cfg, point)}.ckpt"
    wb = None
    if tr.get("wandb", True) and cfg.get("wandb", True):
        wb = {"group": cfg["group"], "name": str(point),
              "config": {"family": point.family, "width": point.width, "study": "phase_transition"}}
    return study_job(cfg, str(point), _arch_spec(cfg, point), image_shape, module_kwargs,
                     subset_kwargs(cfg["data"], int(point.size)), ckpt, wandb=wb)


def jobs(cfg: dict[str, Any], image_shape: tuple[int, ...] | None = None) -> list[TrainJob]:
    shape = image_shape or source_image_shape(cfg["data"])
    return [point_job(cfg, p, shape) for p in grid_points(cfg)]


def wandb_sweep_config(cfg: dict[str, Any], config_path: str | None) -> dict[str, Any]:
    """A W&B Sweeps configuration (method ``grid``) whose runs each train one grid point.

    ``wandb agent`` runs ``command`` with ``${args}`` expanded to ``--family=dit --size=64 --width=128 --seed=0``
    (wandb's own flag format), which ``--train-point`` reads; the checkpoint lands where the local runner and
    ``--aggregate-only`` look for it.
    """
    cmd: list[str] = ["${env}", "${interpreter}", "-m", "lightning_repro.studies.sweep"]
    if config_path:
        cmd += ["--config", str(config_path)]
    cmd += ["--out", str(cfg["out"]), "--train-point", "${args}"]
    g = cfg["grid"]
    return {
        "name": str(cfg["group"]),
        "description": "Zhang et al. (ICML 2024) Fig. 2: RP / GL phase transition over N x family x width x seed",
        "program": "lightning_repro/studies/sweep.py",
        "method": "grid",
        "metric": {"name": "train/loss", "goal": "minimize"},
        "parameters": {k: {"values": list(g[k])} for k in GRID_KEYS},
        "command": cmd,
    }


def train_point(cfg: dict[str, Any], point: GridPoint) -> dict[str, Any]:
    """Train one grid point (skipped if its checkpoint exists); the entry point of a W&B agent run."""
    g = cfg["grid"]
    for key, val in zip(GRID_KEYS, point):
        if val not in g[key]:
            raise ValueError(f"--{key} {val} is not in the sweep's grid.{key} {g[key]}.")
    job = point_job(cfg, point, source_image_shape(cfg["data"]))
    run_training_jobs([job], 1)
    return {"point": str(point), "ckpt": job.ckpt}


# -- aggregation -----------------------------------------------------------------------------------------
def _samples(job: TrainJob, cfg: dict[str, Any], st: StudySetup, shape) -> tuple[torch.Tensor, dict[str, Any], int]:
    """The model's samples of seeds 0..S-1 (cached next to the checkpoint, keyed by the sampler settings)."""
    cache = Path(job.ckpt).with_name(f"{Path(job.ckpt).stem}_samples_{config_key(cfg['sample'])}.pt")
    den, kernel, meta = trained_denoiser(job, st.device)
    params = sum(p.numel() for p in den.parameters())
    if cache.is_file():
        return torch.load(cache, weights_only=True), meta, params
    x = sample_seeds(den, kernel, st.seeds, shape, st).cpu()
    save_tensor(x, cache)
    return x, meta, params


def _model_rows(cfg, st: StudySetup, n: int, points: list, all_jobs: dict, shape, feats: dict) -> list[dict]:
    """One ``model`` row per trained point of size ``n`` (GL, RP vs the optimal denoiser of the same N images);
    fills ``feats`` with every point's sample features."""
    from ..data import SubsetDataModule
    from ..kernels import get_kernel
    from ..theory import EmpiricalOptimalDenoiser
    from ..viz import save_grid

    images = SubsetDataModule(**subset_kwargs(cfg["data"], n, batch_size=1)).images
    train_feats, thr = st.descriptor(images), st.threshold
    kernel = get_kernel(cfg["kernel"], **(cfg["train"].get("kernel_kwargs") or {}))
    x_opt = sample_seeds(EmpiricalOptimalDenoiser(images, device=st.device), kernel, st.seeds, shape, st)
    opt_feats = st.descriptor(x_opt)
    rows = []
    for p in points:
        x, meta, params = _samples(all_jobs[p], cfg, st, shape)
        f = feats[p] = st.descriptor(x)
        rows.append({"threshold": thr, "descriptor": st.descriptor_name, "kind": "model", "N": n,
                     "family": p.family, "width": p.width, "seed": p.seed, "other": "",
                     "gl": score.gl(f, train_feats, thr), "rp_vs_optimal": score.rp(f, opt_feats, thr),
                     "steps": int(meta.get("steps", -1)), "params": params,
                     "train_seconds": float(meta.get("train_seconds", float("nan"))),
                     "final_loss": float(meta.get("final_loss", float("nan")))})
        save_grid(x[:64], st.out / "samples" / f"{p}.png", nrow=16)
    return rows


def _pair_rows(cfg, st: StudySetup, n: int, have: set, feats: dict) -> list[dict]:
    """The family, width and seed pairs of size ``n`` whose two points are both trained."""
    g = cfg["grid"]
    fams, widths, seeds = g["family"], sorted(g["width"]), g["seed"]
    pairs = [("family_pair", GridPoint(fa, w, n, sd), GridPoint(fb, w, n, sd), fb)
             for w, sd in itertools.product(widths, seeds) for fa, fb in itertools.combinations(fams, 2)]
    pairs += [("width_pair", GridPoint(fam, wa, n, sd), GridPoint(fam, wb, n, sd), f"w{wb}")
              for fam, sd in itertools.product(fams, seeds) for wa, wb in itertools.combinations(widths, 2)]
    pairs += [("seed_pair", GridPoint(fam, w, n, sa), GridPoint(fam, w, n, sb), f"s{sb}")
              for fam, w in itertools.product(fams, widths) for sa, sb in itertools.combinations(seeds, 2)]
    return [{"threshold": st.threshold, "descriptor": st.descriptor_name, "kind": kind, "N": a.size,
             "family": a.family, "width": a.width, "seed": a.seed, "other": other,
             "rp": score.rp(feats[a], feats[b], st.threshold), "mean_sim": score.mean_similarity(feats[a], feats[b])}
            for kind, a, b, other in pairs if a in have and b in have]


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean RP of the family pairs and mean GL of the models, by N."""
    def by_n(kind: str, key: str) -> dict[str, float]:
        acc: dict[int, list[float]] = {}
        for r in rows:
            if r["kind"] == kind:
                acc.setdefault(r["N"], []).append(r[key])
        return {str(k): sum(v) / len(v) for k, v in sorted(acc.items())}

    fam = by_n("family_pair", "rp")
    return {**({"rp_family_by_N": fam} if fam else {}), "gl_by_N": by_n("model", "gl")}


def aggregate(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Score every finished grid point and every compared pair; write the CSV, the plot and the W&B table."""
    _check(cfg)
    st = setup_study(cfg)
    shape = source_image_shape(cfg["data"])
    all_jobs = dict(zip(grid_points(cfg), jobs(cfg, shape)))
    missing = [str(p) for p, j in all_jobs.items() if not j.done()]
    if missing:
        log(f"  {len(missing)} grid point(s) not trained yet, left out: {', '.join(missing[:6])}"
            f"{' ...' if len(missing) > 6 else ''}")
    feats: dict[GridPoint, torch.Tensor] = {}
    rows: list[dict[str, Any]] = []
    for n in sorted(cfg["grid"]["size"]):
        points = [p for p in all_jobs if p.size == n and all_jobs[p].done()]
        if points:
            rows += _model_rows(cfg, st, n, points, all_jobs, shape, feats)
            rows += _pair_rows(cfg, st, n, set(points), feats)
            write_csv(rows, st.out / "phase_transition.csv", COLUMNS)  # partial results survive an interruption
    if not rows:
        raise ValueError(f"no grid point of {st.out} has been trained yet; run the sweep first.")
    png = plot(rows, st.out / "phase_transition.png", st.threshold, st.descriptor_name)
    log(format_table([r for r in rows if r["kind"] != "model"],
                     ["kind", "N", "family", "width", "seed", "other", "rp", "mean_sim"]))
    log(format_table([r for r in rows if r["kind"] == "model"],
                     ["N", "family", "width", "seed", "gl", "rp_vs_optimal", "train_seconds"]))
    summary = _summary(rows)
    csv_path = finish(STUDY.name, cfg, rows, COLUMNS, "phase_transition.csv", {"plot": png}, summary, table=(),
                      group=cfg["group"])
    rp_txt = " ".join(f"{n}:{v:.2f}" for n, v in summary.get("rp_family_by_N", {}).items())
    gl_txt = " ".join(f"{n}:{v:.2f}" for n, v in summary["gl_by_N"].items())
    log(f"phase transition: RP(families) by N {rp_txt or '-'} | GL by N {gl_txt} | {csv_path} | {png}")
    return rows


def plot(rows: list[dict[str, Any]], path: str | Path, threshold: float, descriptor: str) -> Path:
    """Two panels: RP vs N (family pairs, solid, one line per width; width pairs dashed) and GL vs N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rp, ax_gl) = plt.subplots(1, 2, figsize=(10, 3.8))

    def mean_curve(rs, key):
        by: dict[int, list[float]] = {}
        for r in rs:
            by.setdefault(r["N"], []).append(r[key])
        ns = sorted(by)
        return ns, [sum(by[n]) / len(by[n]) for n in ns]

    widths = sorted({r["width"] for r in rows})
    colours = {w: f"C{i}" for i, w in enumerate(widths)}
    fam_pairs = sorted({(r["family"], r["other"]) for r in rows if r["kind"] == "family_pair"})
    for w in widths:
        for fa, fb in fam_pairs:
            rs = [r for r in rows if r["kind"] == "family_pair" and r["width"] == w and r["family"] == fa
                  and r["other"] == fb]
            if rs:
                ax_rp.plot(*mean_curve(rs, "rp"), marker="o", color=colours[w], label=f"{fa} vs {fb}, width {w}")
    styles = ["--", ":", "-."]
    for i, fam in enumerate(sorted({r["family"] for r in rows if r["kind"] == "width_pair"})):
        rs = [r for r in rows if r["kind"] == "width_pair" and r["family"] == fam]
        others = sorted({r["other"] for r in rs})
        ax_rp.plot(*mean_curve(rs, "rp"), marker="s", ls=styles[i % 3], color="grey",
                   label=f"{fam}: width {rs[0]['width']} vs {', '.join(o[1:] for o in others)}")
    seed_rows = [r for r in rows if r["kind"] == "seed_pair"]
    if seed_rows:
        ax_rp.plot(*mean_curve(seed_rows, "rp"), marker="^", color="black", ls=":", label="seed vs seed")
    markers = ["o", "s", "^", "D"]
    for j, fam in enumerate(sorted({r["family"] for r in rows if r["kind"] == "model"})):
        for w in widths:
            rs = [r for r in rows if r["kind"] == "model" and r["family"] == fam and r["width"] == w]
            if rs:
                ax_gl.plot(*mean_curve(rs, "gl"), marker=markers[j % 4], color=colours[w], ls=["-", "--"][j % 2],
                           label=f"{fam}, width {w}")
    for ax, title in ((ax_rp, "RP between models (same seeds)"), (ax_gl, "GL (novelty vs own training set)")):
        n_axis(ax, title, legend_size=7)
    fig.suptitle(f"Fig. 2: memorization -> generalization ({descriptor} descriptor, threshold {threshold:g})",
                 fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def run(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Train every missing grid point (skipping finished ones), then aggregate."""
    _check(cfg)
    set_threads(cfg.get("threads"))
    t0 = time.time()
    all_jobs = jobs(cfg)
    g = cfg["grid"]
    log(f"phase transition sweep: {len(all_jobs)} runs (N {sorted(g['size'])} x family {g['family']} x width "
        f"{sorted(g['width'])} x seed {g['seed']}), {cfg['train']['max_steps']} steps each -> {cfg['out']}")
    run_training_jobs(all_jobs, cfg["workers"])
    rows = aggregate(cfg)
    log(f"sweep done in {time.time() - t0:.0f}s")
    return rows


def _add_arguments(p) -> None:
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--emit-wandb", metavar="FILE", default=None, help="write a W&B Sweeps YAML and exit")
    mode.add_argument("--train-point", action="store_true", help="train one grid point (a W&B agent's run)")
    mode.add_argument("--aggregate-only", action="store_true", help="score the finished grid points, train nothing")
    for key, typ in (("family", str), ("width", int), ("size", int), ("seed", int)):
        p.add_argument(f"--{key}", type=typ, default=None, help=f"grid point's {key} (with --train-point)")


def _dispatch(cfg: dict[str, Any], args) -> Any:
    _check(cfg)
    if args.emit_wandb:
        import yaml

        sweep = wandb_sweep_config(cfg, args.config)
        path = atomic_bytes(Path(args.emit_wandb), yaml.safe_dump(sweep, sort_keys=False).encode())
        log(f"wrote {path}: {len(grid_points(cfg))} runs (method grid); start it with `wandb sweep {path}` and one "
            f"`wandb agent <sweep id>` per GPU")
        return sweep
    if args.train_point:
        vals = [getattr(args, k) for k in GRID_KEYS]
        if any(v is None for v in vals):
            raise ValueError("--train-point needs --family, --width, --size and --seed.")
        return train_point(cfg, GridPoint(*vals))
    if args.aggregate_only:
        return aggregate(cfg)
    return run(cfg)


STUDY = Study(name="phase_transition", module="sweep", paper="Fig. 2",
              title="phase transition: RP between families / widths and GL vs N", run=run, columns=COLUMNS,
              quick=QUICK, replace=("families", "grid"), jobs=jobs, score=aggregate, plot=plot,
              add_arguments=_add_arguments, dispatch=_dispatch)


main = STUDY.main  # main(["--config", FILE, "--out", DIR, "--quick"]) -> the CSV rows


if __name__ == "__main__":
    main(sys.argv[1:])
