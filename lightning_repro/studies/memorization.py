"""Fig. 4 of Zhang et al. (ICML 2024): in the memorization regime diffusion models reproduce the optimal
denoiser of the empirical distribution (Prop. 1, ``EmpiricalOptimalDenoiser``).

For every architecture and training-set size N (nested subsets) a model is trained, then sampled with the
deterministic sampler from the *same* seeds as the optimal denoiser of its N training images, and scored:
``rp_vs_optimal`` (RP, Sec. 2.1, seed by seed), ``gl`` (against its own subset), ``same_nn_vs_optimal`` (the
fraction of seeds whose two samples have the same nearest training image, threshold-free), ``gl_optimal``
(~0: its samples are copies), ``mean_sim_vs_optimal`` and ``mae_vs_optimal`` (0-255 units).

Writes ``DIR/fig4.csv`` (one row per architecture and N), ``DIR/fig4.png`` (RP and GL vs N, log2 N axis),
``DIR/samples/<arch>_N<N>.png`` (rows alternate optimal denoiser / model, same seeds) and
``DIR/checkpoints/<arch>_N<N>_<hash>.ckpt``.  Sizes, recipe, measured results and the full-scale settings:
``configs/studies/fig4_memorization.yaml``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from ..evaluation import scoring as score
from .outputs import finish, log, n_axis, save_figure, write_csv
from .protocol import Study, config_key
from .steps import (
    StudySetup,
    check_seed_count,
    check_sizes,
    sample_seeds,
    save_interleaved,
    setup_study,
    source_image_shape,
    subset_kwargs,
    trained_denoiser,
)
from .training import TrainJob, module_kwargs_from, run_training_jobs, study_job

__all__ = ["STUDY", "QUICK", "COLUMNS", "jobs", "run_key", "run", "plot", "main"]

#: ``--quick``: tiny networks, two sizes, a few steps (for tests; the numbers mean nothing).
QUICK: dict[str, Any] = {
    "workers": 1,
    "sizes": [8, 16],
    "data": {"batch_size": 16},
    "train": {"max_steps": 3, "warmup_steps": 0},
    "sample": {"seeds": 8, "steps": 4},
    "archs": {
        "dit": {"class_path": "DiT", "init_args": {"patch_size": 4, "hidden_size": 16, "depth": 1, "num_heads": 1}},
        "edm": {"class_path": "EDM", "init_args": {"model_channels": 8, "channel_mult": [1], "num_blocks": 1,
                                                   "attn_resolutions": [], "dropout": 0.0}},
    },
}

COLUMNS = ["arch", "N", "rp_vs_optimal", "gl", "same_nn_vs_optimal", "gl_optimal", "mean_sim_vs_optimal",
           "mae_vs_optimal", "threshold", "descriptor", "steps", "params", "train_seconds"]


def run_key(arch_spec: dict, n: int, cfg: dict) -> str:
    """Eight hex digits of the SHA-256 of everything that determines a trained model."""
    return config_key({"arch": arch_spec, "N": n, "kernel": cfg["kernel"], "train": cfg["train"], "data": cfg["data"]})


def _check(cfg: dict) -> list[int]:
    if not isinstance(cfg["archs"], dict) or not cfg["archs"]:
        raise ValueError("archs must be a non-empty mapping of name -> {class_path, init_args}.")
    check_seed_count(cfg["sample"]["seeds"])
    return check_sizes(cfg["sizes"])


def jobs(cfg: dict[str, Any], image_shape: tuple[int, ...]) -> list[TrainJob]:
    """One ``TrainJob`` per (N, architecture), checkpoint ``<out>/checkpoints/<arch>_N<N>_<run_key>.ckpt``."""
    module_kwargs = module_kwargs_from(cfg["kernel"], cfg["train"])
    out = []
    for n in sorted(cfg["sizes"]):
        for name, spec in cfg["archs"].items():
            ckpt = Path(cfg["out"]) / "checkpoints" / f"{name}_N{n}_{run_key(spec, n, cfg)}.ckpt"
            out.append(study_job(cfg, f"{name} N={n}", spec, image_shape, module_kwargs,
                                 subset_kwargs(cfg["data"], n), ckpt))
    return out


def _score_size(st: StudySetup, n: int, size_jobs: dict[str, TrainJob], cfg: dict) -> list[dict[str, Any]]:
    """Sample every model of size ``n`` and the optimal denoiser of its subset (once per kernel), score them."""
    from ..data import SubsetDataModule
    from ..theory import EmpiricalOptimalDenoiser

    train_images = SubsetDataModule(**subset_kwargs(cfg["data"], n)).images
    optimal = EmpiricalOptimalDenoiser(train_images, device=st.device)
    train_feats, shape = st.descriptor(train_images), tuple(train_images.shape[1:])
    opt_cache: dict[str, tuple[Any, Any]] = {}
    rows = []
    for name, job in size_jobs.items():
        t0 = time.time()
        den, kernel, meta = trained_denoiser(job, st.device)
        x_model = sample_seeds(den, kernel, st.seeds, shape, st)
        if kernel.name not in opt_cache:  # the optimal denoiser sampled on this kernel's grid
            x = sample_seeds(optimal, kernel, st.seeds, shape, st)
            opt_cache[kernel.name] = (x, st.descriptor(x))
        x_opt, f_opt = opt_cache[kernel.name]
        f_model, thr = st.descriptor(x_model), st.threshold
        same_nn = optimal.nearest(x_model.to(st.device)) == optimal.nearest(x_opt.to(st.device))
        rows.append({
            "arch": name, "N": n, "rp_vs_optimal": score.rp(f_model, f_opt, thr),
            "gl": score.gl(f_model, train_feats, thr), "same_nn_vs_optimal": float(same_nn.float().mean()),
            "gl_optimal": score.gl(f_opt, train_feats, thr),
            "mean_sim_vs_optimal": score.mean_similarity(f_model, f_opt), "mae_vs_optimal": score.mae(x_model, x_opt),
            "threshold": thr, "descriptor": st.descriptor_name, "steps": int(meta.get("steps", job.max_steps)),
            "params": sum(p.numel() for p in den.parameters()),
            "train_seconds": float(meta.get("train_seconds", float("nan"))),
        })
        save_interleaved(st.out / "samples" / f"{name}_N{n}.png", [x_opt, x_model], 32)
        r = rows[-1]
        log(f"  {name} N={n}: RP(model, optimal)={r['rp_vs_optimal']:.3f}  GL={r['gl']:.3f}  "
            f"same NN={r['same_nn_vs_optimal']:.3f}  GL(optimal)={r['gl_optimal']:.3f}  ({time.time() - t0:.0f}s)")
    return rows


def run(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Train (or load) every (arch, N), sample, score; write ``fig4.csv`` / ``fig4.png``; return the rows."""
    sizes = _check(cfg)
    st = setup_study(cfg)
    t_start = time.time()
    log(f"fig4: {len(cfg['archs'])} architectures x N in {sizes} on {cfg['data']['source']}, "
        f"{cfg['train']['max_steps']} steps each, {len(st.seeds)} seeds ({st.sampler}, {st.steps} steps), "
        f"{st.descriptor_name} descriptor threshold {st.threshold} -> {st.out}")
    all_jobs = jobs(cfg, source_image_shape(cfg["data"]))
    run_training_jobs(all_jobs, cfg["workers"])
    log(f"sampling {len(st.seeds)} seeds per model and per optimal denoiser, scoring ...")
    rows: list[dict[str, Any]] = []
    for n in sizes:
        size_jobs = {name: j for name, j in zip(cfg["archs"], [j for j in all_jobs if j.data_kwargs["size"] == n])}
        rows += _score_size(st, n, size_jobs, cfg)
        write_csv(rows, st.out / "fig4.csv", COLUMNS)  # partial results survive an interruption
    png = plot(rows, st.out / "fig4.png", st.threshold, st.descriptor_name)
    summary = {f"{r['arch']}_N{r['N']}_rp_vs_optimal": r["rp_vs_optimal"] for r in rows}
    csv_path = finish(STUDY.name, cfg, rows, COLUMNS, "fig4.csv", {"plot": png}, summary, COLUMNS[:8])
    trend = ", ".join(f"{a['arch']}: RP {a['rp_vs_optimal']:.2f}->{b['rp_vs_optimal']:.2f}, GL {a['gl']:.2f}->"
                      f"{b['gl']:.2f}" for a, b in zip([r for r in rows if r["N"] == sizes[0]],
                                                       [r for r in rows if r["N"] == sizes[-1]]))
    log(f"fig4 done in {time.time() - t_start:.0f}s: N {sizes[0]}->{sizes[-1]}: {trend} | {csv_path} | {png}")
    return rows


def plot(rows: list[dict[str, Any]], path: str | Path, threshold: float, descriptor: str) -> Path:
    """Two panels, RP(model, optimal) vs N and GL vs N (log2 N axis), one line per architecture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    for key, ax, title in (("rp_vs_optimal", axes[0], "RP(model, optimal denoiser)"), ("gl", axes[1], "GL (model)")):
        for a in archs:
            rs = sorted((r for r in rows if r["arch"] == a), key=lambda r: r["N"])
            ax.plot([r["N"] for r in rs], [r[key] for r in rs], marker="o", label=a)
        if key == "gl":
            rs = sorted({r["N"]: r for r in rows}.values(), key=lambda r: r["N"])
            ax.plot([r["N"] for r in rs], [r["gl_optimal"] for r in rs], ls="--", color="grey",
                    label="optimal denoiser")
        n_axis(ax, title)
    fig.suptitle(f"Fig. 4: memorization regime ({descriptor} descriptor, threshold {threshold:g})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


STUDY = Study(name="fig4_memorization", module="memorization", paper="Fig. 4",
              title="memorization: RP vs the optimal denoiser, GL vs N", run=run, columns=COLUMNS, quick=QUICK,
              replace=("archs",), jobs=jobs, score=_score_size, plot=plot)


main = STUDY.main  # main(["--config", FILE, "--out", DIR, "--quick"]) -> the CSV rows


if __name__ == "__main__":
    main(sys.argv[1:])
