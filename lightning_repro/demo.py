"""The README's main job: model reproducibility on the embedded digits, end to end, on a laptop CPU.

Zhang et al. (ICML 2024), Sec. 2-3 in miniature: two *different* families -- the DDPM++ U-Net (``DDPMpp``) and
a multi-token DiT (2x2 patches on 8x8 digits: 16 tokens) -- are trained on a small nested subset of the digits
(memorization regime) and on all 1,797 of them (generalization regime) with the live ``ReproducibilityMonitor``,
every model is sampled from the same seeds with the deterministic EDM Heun sampler, and ``evaluate.py --matrix``
scores the two families and the optimal denoiser of the subset (Prop. 1) against each other:

* RP   the fraction of seeds whose two samples are near-copies of each other (the suite's default descriptor for
       8x8 grey images, pixel: normalised correlation of centred pixels, at its calibrated threshold 0.97),
* null the same RP between the two families on *different* seeds (seed k against seed k+1): chance agreement,
       next to its expected value where both copy training images (sum over images of the product of the two
       families' copy frequencies: ~1/N for N images, not 0),
* GL   per model, the fraction of samples that are *not* near-copies of a training image of its subset.

The paper's claim: at small N both families memorise (GL ~ 0) and converge to the optimal denoiser (RP against it
high, so RP between them high); at large N they generate new digits (GL ~ 1) and still agree with each other.

    python -m lightning_repro.demo [--out runs/demo] [--sizes 16 1797] [--steps N] [--seeds 0-255]

Training recipes: ``configs/train/demo_ddpmpp.yaml`` and ``configs/train/demo_dit.yaml`` (their comments say why).
Trainings go through the same CLI as ``train.py`` (checkpoints, W&B offline logging, sample grids, the monitor's
``monitor.png``), two at a time with one CPU thread each (``--parallel``, ``--threads``), and are skipped when their
``last.ckpt`` exists; samples are cached by ``evaluate.py``.  Ends with a table, ``DIR/monitor.png`` (every model's
RP against the optimal denoiser over training) and a one-line summary of what it showed.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "train"

#: the two families: training config and steps (at batch 128 their steps cost about the same, and the two trainings
#: of one size run side by side, so equal steps cost no extra wall time)
FAMILIES = {"ddpmpp": (CONFIGS / "demo_ddpmpp.yaml", 3200), "dit": (CONFIGS / "demo_dit.yaml", 3200)}


def train_command(family: str, size: int, steps: int, root: Path, batch_size: int | None, monitor_every: int,
                  compile: bool = False) -> list[str]:
    """The ``train.py fit`` command line of one demo model (its recipe is the family's config; ``batch_size``
    None keeps the config's)."""
    batch = ["--data.batch_size", str(batch_size)] if batch_size else []
    return [sys.executable, "-m", "lightning_repro.cli", "fit", "--config", str(FAMILIES[family][0]),
            "--data.size", str(size), *batch, "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", str(steps), "--checkpoint.every_n_train_steps", str(steps),
            "--trainer.callbacks.every_n_steps", str(monitor_every),
            "--model.init_args.warmup_steps", str(min(100, steps // 10)),  # the recipe's 100, shorter for toy runs
            "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.group", "demo",
            "--trainer.enable_progress_bar", "false", *(["--model.init_args.compile", "true"] if compile else [])]


def train_all(jobs: list[tuple[str, int, int, Path]], batch_size: int | None, parallel: int, threads: int,
              monitor_every: int, compile: bool = False) -> None:
    """Run the trainings not finished yet, ``parallel`` at a time (one CPU thread each by default)."""
    todo = [j for j in jobs if not (j[3] / "checkpoints" / "last.ckpt").is_file()]
    for job in jobs:
        if job not in todo:
            print(f"[demo] {job[0]} N={job[1]}: reusing {job[3] / 'checkpoints' / 'last.ckpt'}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    running: list[tuple[subprocess.Popen, str, Path]] = []
    while todo or running:
        while todo and len(running) < parallel:
            fam, n, steps, root = todo.pop(0)
            root.mkdir(parents=True, exist_ok=True)
            log = root / "train.log"
            print(f"[demo] training {fam} on N={n} digits for {steps} steps (log: {log})", flush=True)
            with open(log, "w") as fh:
                proc = subprocess.Popen(train_command(fam, n, steps, root, batch_size, monitor_every, compile),
                                        stdout=fh, stderr=subprocess.STDOUT, env=env)
            running.append((proc, f"{fam} N={n}", log))
        time.sleep(0.5)
        for item in list(running):
            proc, name, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            lines = log.read_text(errors="replace").splitlines()
            if proc.returncode != 0:
                for other, _, _ in running:
                    other.kill()
                tail = "\n".join(lines[-5:])
                raise SystemExit(f"error: training {name} failed (exit {proc.returncode}); see {log}:\n{tail}")
            done = [ln for ln in lines if ln.startswith("done:")]
            print(f"[demo] {name}: {done[-1] if done else 'finished'}", flush=True)


def null_baseline(out: Path, ckpts: list[Path], seeds: str) -> tuple[float, float]:
    """RP between the two families on different seeds (seed k of A against seed k+1 of B), from the cached
    samples of the ``--matrix`` run: the agreement two unrelated samplings reach by chance; and its expected value
    where both copy training images (``scoring.copy_chance``: ~1/N for N images, not 0)."""
    from .evaluation import SamplingOptions, choose_descriptor, featurize, resolve_models
    from .evaluation.scoring import copy_chance, rp
    from .metrics import get_descriptor
    from .sampling import parse_seeds

    refs = resolve_models([str(c) for c in ckpts])
    opts, seed_list = SamplingOptions(progress=False), parse_seeds(seeds)
    sets = [r.samples_at(seed_list, out, opts, log=lambda _: None) for r in refs]
    d = get_descriptor(choose_descriptor(None, refs[0].image_shape)[0])
    fa, fb = (featurize(d, s.images).features for s in sets)
    train = featurize(d, refs[0].training_set()[0]).features
    return rp(fa, fb.roll(-1, 0), d.default_threshold), copy_chance(fa, fb, train, d.default_threshold)


def monitor_figure(out: Path, rows: list[dict]) -> Path:
    """``DIR/monitor.png``: every model's RP against the optimal denoiser (and GL) over its training steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for r in rows:
        with open(r["monitor_csv"]) as fh:
            hist = list(csv.DictReader(fh))
        steps = [int(h["step"]) for h in hist]
        for ax, key in zip(axes, ("rp", "gl")):
            ax.plot(steps, [float(h[key]) for h in hist], marker="o", ms=3, label=f"{r['family']} N={r['N']}")
    axes[0].set_title("RP against the optimal denoiser")
    axes[1].set_title("GL against the training subset")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "monitor.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def score_size(out: Path, n: int, families: list[str], seeds: str) -> dict:
    """``--matrix ddpmpp dit optimal: --gl`` at size ``n``, plus the different-seed null baseline."""
    from .evaluation import main as evaluate_main

    ckpts = [out / f"{f}_N{n}" / "checkpoints" / "last.ckpt" for f in families]
    res = evaluate_main(["--matrix", *map(str, ckpts), "optimal:", "--seeds", seeds, "--gl",
                         "--out", str(out / f"matrix_N{n}"), "--no-progress"])
    rp = res["rp"]
    null, chance = null_baseline(out / f"matrix_N{n}", ckpts, seeds)
    return {"N": n, "rp_pair": rp[0][1], "rp_optimal": [rp[0][2], rp[1][2]], "gl": res["gl"][:2], "null": null,
            "chance": chance, "descriptor": res["descriptor"], "threshold": res["threshold"],
            "matrix": str(out / f"matrix_N{n}" / "rp_matrix.png")}


def summary(sizes: list[dict], families: list[str]) -> str:
    """One line naming what the run showed, from its own numbers."""
    parts = []
    for s in sizes:
        regime = "memorise" if max(s["gl"]) < 0.5 else "generate new digits" if min(s["gl"]) > 0.5 else "mixed"
        parts.append(f"N={s['N']}: both {regime} (GL {s['gl'][0]:.2f}/{s['gl'][1]:.2f}), RP vs optimal "
                     f"{s['rp_optimal'][0]:.2f}/{s['rp_optimal'][1]:.2f}, RP({'-'.join(families)}) "
                     f"{s['rp_pair']:.2f} against a different-seed null of {s['null']:.2f} (chance for their "
                     f"copies {s['chance']:.2f})")
    return "shown: " + "; ".join(parts)


def print_table(sizes: list[dict], families: list[str]) -> None:
    pair = "-".join(families)
    print(f"\n{'N':>5}  {'model':7}  {'RP vs optimal':>13}  {'GL':>5}  {'RP(' + pair + ')':>14}  "
          f"{'null (other seeds)':>18}  {'chance of copies':>16}")
    for s in sizes:
        for i, fam in enumerate(families):
            shared = (f"{s['rp_pair']:>14.3f}  {s['null']:>18.3f}  {s['chance']:>16.3f}" if i == 0
                      else f"{'':>14}  {'':>18}  {'':>16}")
            print(f"{s['N']:>5}  {fam:7}  {s['rp_optimal'][i]:>13.3f}  {s['gl'][i]:>5.3f}  {shared}")
    print(f"descriptor: {sizes[0]['descriptor']} at threshold {sizes[0]['threshold']:g} (the suite's calibrated "
          "default, metrics/descriptors.py)")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 1797])
    p.add_argument("--families", nargs=2, default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--steps", type=int, default=None, help="training steps of every model "
                   f"(default: {', '.join(f'{k} {v[1]}' for k, v in FAMILIES.items())})")
    p.add_argument("--parallel", type=int, default=2, help="trainings run at the same time (one per core)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch of every model (default: the "
                   "recipes' 128)")
    p.add_argument("--seeds", default="0-255")
    p.add_argument("--monitor-every", type=int, default=400, help="steps between the monitor's measurements")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 by default: tiny nets gain little from 2, and lose a lot when "
                        "another process competes for the cores)")
    p.add_argument("--compile", action="store_true", help="torch.compile every training (off by default: on 2 CPU "
                   "cores the compile costs more than it saves over these runs, benchmarks/compile_step.py)")
    a = p.parse_args(argv)
    if a.threads > 0 and not torch.cuda.is_available():
        torch.set_num_threads(a.threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))

    t0, out = time.time(), Path(a.out)
    jobs = [(f, n, a.steps or FAMILIES[f][1], out / f"{f}_N{n}") for n in a.sizes for f in a.families]
    train_all(jobs, a.batch_size, a.parallel, max(a.threads, 1), a.monitor_every, a.compile)
    sizes = [score_size(out, n, a.families, a.seeds) for n in a.sizes]
    rows = [{"N": s["N"], "family": f, "rp_optimal": s["rp_optimal"][i], "gl": s["gl"][i], "rp_pair": s["rp_pair"],
             "null": s["null"], "chance": s["chance"], "monitor_csv": str(out / f"{f}_N{s['N']}" / "monitor.csv")}
            for s in sizes for i, f in enumerate(a.families)]
    print_table(sizes, a.families)
    fig = monitor_figure(out, rows)
    print(f"done: {len(rows)} models, {len(a.sizes)} sizes, seeds {a.seeds}, {time.time() - t0:.0f}s | "
          f"matrices: {out}/matrix_N*/rp_matrix.png | monitor curves: {fig} | sample grids: {out}/*/samples/final.png")
    print(summary(sizes, a.families), flush=True)
    return rows


if __name__ == "__main__":
    main()
