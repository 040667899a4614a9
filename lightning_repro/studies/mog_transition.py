"""Sec. 3.2.1 (Case 1) of Zhang et al. (ICML 2024), carried to both ends: on a low-rank mixture of Gaussians (Eq. 2,
``theory.LowRankMoG``) a diffusion model moves, as its training set grows, from the *memorisation* closed form, the
optimal denoiser of its N samples (Prop. 1, ``theory.EmpiricalOptimalDenoiser``), to the *generalisation* closed
form, the mixture's own posterior mean (Prop. 2, ``LowRankMoG.denoise``).

For every size N (nested subsets of one draw of the ``mog`` source) and family (a DDPM++ U-Net, a multi-token DiT)
one model is trained; every model and both closed forms are sampled from the *same* seeds with the deterministic
sampler, and every pair is scored seed by seed (Sec. 2.1): RP(model, empirical optimal) should fall with N,
RP(model, MoG) rise, RP(U-Net, DiT) be high at both ends; RP(empirical optimal, MoG) is what the two exact answers
share (the baseline), and GL is against the N training samples.  ``mog_pixel_calibration`` repeats the checks behind
the pixel descriptor's threshold (``metrics.descriptors.pixel_calibration``) on draws of the mixture.

Writes ``DIR/mog_transition.csv`` (one row per N and compared pair ``a``, ``b``), ``DIR/mog_transition.png``,
``DIR/calibration.json``, ``DIR/samples/N<N>.png`` (rows: empirical optimal, each model, MoG), ``DIR/samples/N<N>.pt``
(the samples, by name) and ``DIR/checkpoints/<arch>_N<N>_<hash>.ckpt``.  Sizes, recipe and measured results:
``configs/studies/mog_transition.yaml``.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..evaluation import scoring as score
from .outputs import atomic_bytes, finish, log, n_axis, save_figure, save_tensor, write_csv
from .protocol import Study, config_key, positive_int
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

__all__ = ["STUDY", "QUICK", "COLUMNS", "EMPIRICAL", "MOG", "mixture", "mog_pixel_calibration", "jobs", "arch_steps",
           "run_key", "crossings", "run", "plot", "main"]

#: the names of the two closed forms in the CSV (``a`` / ``b``) and in ``samples/N<N>.pt``
EMPIRICAL, MOG = "empirical_optimal", "mog_closed_form"

#: ``--quick``: tiny networks, a rank-2 mixture (so the two closed forms meet by N = 512), a few steps (for tests;
#: the numbers of the models mean nothing).
QUICK: dict[str, Any] = {
    "workers": 1,
    "sizes": [8, 512],
    "data": {"batch_size": 16, "source_kwargs": {"num_samples": 512, "rank": 2}},
    "train": {"max_steps": 3, "warmup_steps": 0},
    "sample": {"seeds": 32, "steps": 6},
    "calibration": {"num_samples": 256},
    "archs": {
        "unet": {"class_path": "DDPMpp", "init_args": {"model_channels": 8, "channel_mult": [1], "num_blocks": 1,
                                                       "attn_resolutions": [], "dropout": 0.0}},
        "dit": {"class_path": "DiT", "init_args": {"patch_size": 4, "hidden_size": 16, "depth": 1, "num_heads": 1}},
    },
}

COLUMNS = ["N", "a", "b", "rp", "mean_sim", "mae", "gl_a", "gl_b", "threshold", "descriptor", "steps", "params",
           "train_seconds"]

#: the ``mog`` source options that fix the mixture (the rest, e.g. ``scale``, ``weights``, go to ``LowRankMoG``)
MIXTURE_KEYS = ("num_samples", "shape", "num_components", "rank", "seed")


def mixture(data: dict[str, Any], device: torch.device | str | None = None):
    """The ``LowRankMoG`` the ``mog`` source of ``data`` draws its samples from (its bases, weights and scale)."""
    from ..data.sources import mog_mixture

    if data.get("source") != "mog":
        raise ValueError(f"mog_transition needs data.source: mog (its closed-form denoiser is the mixture's), got "
                         f"{data.get('source')!r}.")
    kw = dict(data.get("source_kwargs") or {})
    missing = [k for k in MIXTURE_KEYS if k not in kw]
    if missing:
        raise ValueError(f"data.source_kwargs must name {', '.join(MIXTURE_KEYS)} (the mixture); missing {missing}.")
    return mog_mixture(**kw, device=device)


def _check(cfg: dict[str, Any]) -> list[int]:
    if not isinstance(cfg["archs"], dict) or not cfg["archs"]:
        raise ValueError("archs must be a non-empty mapping of name -> {class_path, init_args[, max_steps]}.")
    for name, spec in cfg["archs"].items():
        if isinstance(spec, dict) and spec.get("max_steps") is not None:
            positive_int(spec["max_steps"], f"archs.{name}.max_steps")
    clash = sorted({EMPIRICAL, MOG} & set(cfg["archs"]))
    if clash:
        raise ValueError(f"archs may not be named {clash}: those are the names of the closed forms.")
    check_seed_count(cfg["sample"]["seeds"])
    positive_int(cfg["calibration"]["num_samples"], "calibration.num_samples")
    sizes = check_sizes(cfg["sizes"])
    mixture(cfg["data"])
    pool = cfg["data"]["source_kwargs"]["num_samples"]
    if sizes[-1] > pool:
        raise ValueError(f"sizes go up to {sizes[-1]} but data.source_kwargs.num_samples draws only {pool} samples.")
    return sizes


def mog_pixel_calibration(mog, descriptor, threshold: float, num_samples: int = 2000, seed: int = 0,
                          stds: tuple[float, ...] = (0.05, 0.1)) -> dict[str, float]:
    """The checks behind ``PixelDescriptor.default_threshold`` on ``num_samples`` draws of ``mog``, through
    ``descriptor`` (as the scores see them: clamped to [-1, 1]).

    ``distinct_max`` / ``distinct_frac_above``: the most similar *other* draw (its largest value / the fraction of
    draws with one above ``threshold``); per noise std s (N(0, s^2) per pixel): ``noise_<s>_min`` and
    ``noise_<s>_frac_above`` (copies still above ``threshold``) and ``eer_<s>``, the threshold (0.001 grid) at which
    the fraction of copies at or below it equals the fraction of draws with a distinct neighbour above it.
    """
    g = torch.Generator().manual_seed(int(seed))
    x = mog.sample(int(num_samples), generator=g)
    f = descriptor(x).double()
    sim = f @ f.T
    nn_sim = sim.fill_diagonal_(-2.0).max(dim=1).values
    out = {"num_samples": int(num_samples), "threshold": float(threshold), "distinct_max": float(nn_sim.max()),
           "distinct_frac_above": float((nn_sim > threshold).double().mean())}
    grid = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)
    for s in stds:
        copy = (descriptor(x + s * torch.randn(x.shape, generator=g)).double() * f).sum(1)
        missed = (copy[None] <= grid[:, None]).double().mean(1)
        false = (nn_sim[None] > grid[:, None]).double().mean(1)
        out |= {f"noise_{s:g}_min": float(copy.min()), f"noise_{s:g}_frac_above": float((copy > threshold).double()
                                                                                        .mean()),
                f"eer_{s:g}": float(grid[(missed - false).abs().argmin()])}
    return out


def run_key(arch_spec: dict, n: int, cfg: dict) -> str:
    """Eight hex digits of the SHA-256 of everything that determines a trained model."""
    return config_key({"arch": arch_spec, "N": n, "kernel": cfg["kernel"], "train": cfg["train"], "data": cfg["data"]})


def jobs(cfg: dict[str, Any], image_shape: tuple[int, ...]) -> list[TrainJob]:
    """One ``TrainJob`` per (N, architecture), checkpoint ``<out>/checkpoints/<arch>_N<N>_<run_key>.ckpt``."""
    module_kwargs = module_kwargs_from(cfg["kernel"], cfg["train"], lr_decay=cfg["train"].get("lr_decay"))
    out, steps = [], arch_steps(cfg)
    for n in sorted(cfg["sizes"]):
        for name, spec in cfg["archs"].items():
            ckpt = Path(cfg["out"]) / "checkpoints" / f"{name}_N{n}_{run_key(spec, n, cfg)}.ckpt"
            net = {k: v for k, v in spec.items() if k != "max_steps"}
            out.append(study_job(cfg, f"{name} N={n}", net, image_shape, module_kwargs,
                                 subset_kwargs(cfg["data"], n), ckpt, max_steps=steps[name]))
    return out


def arch_steps(cfg: dict[str, Any]) -> dict[str, int]:
    """Training steps per architecture: its own ``max_steps`` if it names one, else ``train.max_steps``."""
    return {name: int(spec.get("max_steps") or cfg["train"]["max_steps"]) for name, spec in cfg["archs"].items()}


def _pairs(archs: list[str]) -> list[tuple[str, str]]:
    """Each model against both closed forms, every two models, and the closed forms against each other."""
    return ([(a, b) for a in archs for b in (EMPIRICAL, MOG)] + list(itertools.combinations(archs, 2))
            + [(EMPIRICAL, MOG)])


def _score_size(st: StudySetup, n: int, size_jobs: dict[str, TrainJob], cfg: dict, kernel,
                x_mog: torch.Tensor) -> list[dict[str, Any]]:
    """Sample every model of size ``n`` and the empirical optimal denoiser of its subset; score every pair."""
    from ..data import SubsetDataModule
    from ..theory import EmpiricalOptimalDenoiser

    train_images = SubsetDataModule(**subset_kwargs(cfg["data"], n)).images
    shape = tuple(train_images.shape[1:])
    x = {EMPIRICAL: sample_seeds(EmpiricalOptimalDenoiser(train_images, device=st.device), kernel, st.seeds, shape,
                                 st).cpu()}
    meta: dict[str, dict[str, Any]] = {}
    for name, job in size_jobs.items():
        den, k, m = trained_denoiser(job, st.device)
        x[name] = sample_seeds(den, k, st.seeds, shape, st).cpu()
        meta[name] = {"steps": int(m.get("steps", job.max_steps)), "params": sum(p.numel() for p in den.parameters()),
                      "train_seconds": float(m.get("train_seconds", float("nan")))}
    x[MOG] = x_mog
    feats = {k: score.featurize(st.descriptor, v) for k, v in x.items()}
    train = score.featurize(st.descriptor, train_images)
    gl = {k: score.generalization(f, train, st.threshold, k)["gl"] for k, f in feats.items()}
    rows = []
    for a, b in _pairs(list(size_jobs)):
        s = score.score_pair(feats[a], feats[b], st.threshold, (a, b))
        rows.append({"N": n, "a": a, "b": b, "rp": s["rp"], "mean_sim": s["mean_similarity"], "mae": s["mae_mean"],
                     "gl_a": gl[a], "gl_b": gl[b], "threshold": st.threshold, "descriptor": st.descriptor_name,
                     **meta.get(a, {})})
    save_interleaved(st.out / "samples" / f"N{n}.png", list(x.values()), 32)
    save_tensor({"seeds": torch.tensor(st.seeds), **x}, st.out / "samples" / f"N{n}.pt")
    return rows


def _rp(rows: list[dict[str, Any]], a: str, b: str) -> dict[int, float]:
    return {r["N"]: r["rp"] for r in rows if (r["a"], r["b"]) == (a, b)}


def _beyond_chance(emp: float, mog: float, num_seeds: int | None) -> bool:
    """mog > emp by more than two standard errors of the difference of two proportions over ``num_seeds`` seeds
    (a plain ``mog > emp`` when the count is not given): one seed of 256 (0.000 vs 0.004) is not a crossing."""
    if num_seeds is None:
        return mog > emp
    return mog - emp > 2 * math.sqrt((emp * (1 - emp) + mog * (1 - mog)) / num_seeds)


def crossings(rows: list[dict[str, Any]], num_seeds: int | None = None) -> dict[str, int | None]:
    """Per model, the smallest N at which RP(model, MoG) exceeds RP(model, empirical optimal) beyond chance on
    ``num_seeds`` seeds (``_beyond_chance``); None if it never does."""
    out: dict[str, int | None] = {}
    for a in dict.fromkeys(r["a"] for r in rows if r["b"] == EMPIRICAL and r["a"] != MOG):
        emp, mog = _rp(rows, a, EMPIRICAL), _rp(rows, a, MOG)
        out[a] = next((n for n in sorted(emp) if _beyond_chance(emp[n], mog[n], num_seeds)), None)
    return out


def _at(rows: list[dict[str, Any]], a: str, n: int) -> str:
    return f"N = {n} ({_rp(rows, a, EMPIRICAL)[n]:.3f} vs {_rp(rows, a, MOG)[n]:.3f})"


def _crossing_text(rows: list[dict[str, Any]], cross: dict[str, int | None]) -> str:
    """Where each model's RP vs the MoG first exceeds its RP vs the empirical optimal, with both values there."""
    sizes = sorted({r["N"] for r in rows})
    parts = []
    for a, n in cross.items():
        if n is None:
            parts.append(f"{a}: RP vs the MoG never exceeds RP vs the empirical optimal beyond chance (2 standard "
                         f"errors) up to {_at(rows, a, sizes[-1])}")
        elif n == sizes[0]:
            parts.append(f"{a}: RP vs the MoG exceeds RP vs the empirical optimal (beyond chance) already at {_at(rows, a, n)}")
        else:
            parts.append(f"{a}: RP vs the MoG exceeds RP vs the empirical optimal (beyond chance) between "
                         f"{_at(rows, a, sizes[sizes.index(n) - 1])} and {_at(rows, a, n)}")
    return "; ".join(parts)


def _calibrate(cfg: dict[str, Any], st: StudySetup, mog) -> dict[str, float]:
    cal = cfg["calibration"]
    rep = mog_pixel_calibration(mog, st.descriptor, st.threshold, int(cal["num_samples"]), int(cal["seed"]))
    atomic_bytes(st.out / "calibration.json", json.dumps(rep, indent=1).encode())
    log(f"pixel threshold {st.threshold:g} on {rep['num_samples']} draws of the mixture: copies under noise std "
        f"0.05 / 0.1 above it {rep['noise_0.05_frac_above']:.3f} / {rep['noise_0.1_frac_above']:.3f} (min "
        f"{rep['noise_0.05_min']:.3f} / {rep['noise_0.1_min']:.3f}); draws with a distinct draw above it "
        f"{rep['distinct_frac_above']:.3f} (max {rep['distinct_max']:.4f}); equal-error thresholds "
        f"{rep['eer_0.1']:.3f} (std 0.1) .. {rep['eer_0.05']:.3f} (std 0.05)")
    if not rep["eer_0.1"] <= st.threshold <= rep["eer_0.05"]:
        log(f"  note: {st.threshold:g} lies outside the equal-error range of this mixture; the scores still use it")
    return rep


def run(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Train (or load) every (arch, N), sample models and closed forms, score; write the CSV / PNG; return rows."""
    from ..kernels import get_kernel

    sizes = _check(cfg)
    st = setup_study(cfg)
    t_start = time.time()
    mog, shape = mixture(cfg["data"], st.device), source_image_shape(cfg["data"])
    steps = ", ".join(f"{a} {k}" for a, k in arch_steps(cfg).items())
    log(f"mog_transition: {mog!r}, {len(cfg['archs'])} architectures x N in {sizes}, training steps {steps}, "
        f"{len(st.seeds)} seeds ({st.sampler}, {st.steps} steps), {st.descriptor_name} descriptor threshold "
        f"{st.threshold:g} -> {st.out}")
    calibration = _calibrate(cfg, st, mog)
    all_jobs = jobs(cfg, shape)
    run_training_jobs(all_jobs, cfg["workers"])
    log(f"sampling {len(st.seeds)} seeds per model and per closed form, scoring ...")
    kernel = get_kernel(cfg["kernel"], **(cfg["train"].get("kernel_kwargs") or {}))
    x_mog = sample_seeds(mog, kernel, st.seeds, shape, st).cpu()  # the generalisation closed form: one for all N
    rows: list[dict[str, Any]] = []
    for n in sizes:
        t0 = time.time()
        rows += _score_size(st, n, {a: j for a, j in zip(cfg["archs"], [j for j in all_jobs
                                                                         if j.data_kwargs["size"] == n])},
                            cfg, kernel, x_mog)
        write_csv(rows, st.out / "mog_transition.csv", COLUMNS)  # partial results survive an interruption
        log(f"  N={n}: " + "  ".join(f"RP({r['a']}, {r['b']})={r['rp']:.3f}" for r in rows if r["N"] == n)
            + f"  ({time.time() - t0:.0f}s)")
    png = plot(rows, st.out / "mog_transition.png", st.threshold, st.descriptor_name, repr(mog))
    cross = crossings(rows, len(st.seeds))
    summary = {**{f"crossing_N_{a}": n for a, n in cross.items()}, "calibration": calibration}
    csv_path = finish(STUDY.name, cfg, rows, COLUMNS, "mog_transition.csv", {"plot": png}, summary, COLUMNS[:8])
    log(f"mog_transition done in {time.time() - t_start:.0f}s: {_crossing_text(rows, cross)} | {csv_path} | {png}")
    return rows


def plot(rows: list[dict[str, Any]], path: str | Path, threshold: float, descriptor: str, title: str = "") -> Path:
    """Left: RP vs N, per model against the empirical optimal (solid) and the MoG (dashed), between models (dotted)
    and between the closed forms (grey); right: GL vs N of every model and of the MoG closed form."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rp, ax_gl) = plt.subplots(1, 2, figsize=(10.4, 3.9))
    archs = [a for a in dict.fromkeys(r["a"] for r in rows) if a not in (EMPIRICAL, MOG)]

    def curve(ax, a, b, key="rp", **kw):
        rs = sorted((r for r in rows if (r["a"], r["b"]) == (a, b)), key=lambda r: r["N"])
        ax.plot([r["N"] for r in rs], [r[key] for r in rs], **kw)

    for i, a in enumerate(archs):
        curve(ax_rp, a, EMPIRICAL, marker="o", color=f"C{i}", label=f"{a} vs empirical optimal")
        curve(ax_rp, a, MOG, marker="s", ls="--", color=f"C{i}", label=f"{a} vs MoG closed form")
        curve(ax_gl, a, EMPIRICAL, "gl_a", marker="o", color=f"C{i}", label=a)
    for j, (a, b) in enumerate(itertools.combinations(archs, 2)):
        curve(ax_rp, a, b, marker="^", ls=":", color="black" if j == 0 else f"C{len(archs) + j}", label=f"{a} vs {b}")
    curve(ax_rp, EMPIRICAL, MOG, marker=".", color="grey", label="empirical optimal vs MoG")
    curve(ax_gl, EMPIRICAL, MOG, "gl_b", marker=".", ls="--", color="grey", label="MoG closed form")
    n_axis(ax_rp, "RP (same seeds)", legend_size=7)
    n_axis(ax_gl, "GL (novelty vs the N training samples)", legend_size=7)
    fig.suptitle(f"memorisation -> generalisation closed form on {title} ({descriptor}, threshold {threshold:g})",
                 fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


STUDY = Study(name="mog_transition", module="mog_transition", paper="Sec. 3.2.1",
              title="MoG: models move from the empirical optimal denoiser to the closed-form MoG denoiser", run=run,
              columns=COLUMNS, quick=QUICK, replace=("archs",), jobs=jobs, score=_score_size, plot=plot)


main = STUDY.main  # main(["--config", FILE, "--out", DIR, "--quick"]) -> the CSV rows


if __name__ == "__main__":
    main(sys.argv[1:])
