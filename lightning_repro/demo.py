"""The README's main job: model reproducibility on the embedded digits, end to end, on a laptop CPU.

Zhang et al. (ICML 2024), Sec. 2-3 in miniature: two *different* families -- the DDPM++ U-Net of EDM
(``DDPMpp`` preset; family ``edm``) and DiT -- are trained on a small nested subset of the digits
(memorization regime) and on all 1,797 of them (generalization regime), each model is sampled from the same seeds with the deterministic
EDM Heun sampler, and ``evaluate.py --pair`` scores them:

* RP   the fraction of seeds whose two samples are near-copies of each other (pixel descriptor: normalised
       correlation of centred pixels, threshold 0.97; SSCD is meaningless at 8x8),
* GL   per model, the fraction of samples that are *not* near-copies of a training image of its subset.

Expected at this scale: at small N both families reproduce their training images (GL ~ 0) and agree
(high RP); at N = 1797 they generate new digits (GL high) and agree less (short training; the paper's
RP rises again with far longer training at CIFAR scale).

    python -m lightning_repro.demo [--out runs/demo] [--sizes 16 1797] [--steps N] [--seeds 0-255]

Trainings go through the same CLI as ``train.py`` (checkpoints, W&B offline logging, sample grids), two at
a time with one CPU thread each (``--parallel``, ``--threads``), and are skipped when their ``last.ckpt``
exists; samples are cached by ``evaluate.py``.  Ends with a table (one
line per model) and a one-line summary.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "train"

#: the two families (small widths so four trainings fit a few CPU minutes)
FAMILIES = {
    "edm": ["--config", str(CONFIGS / "digits_ddpmpp.yaml"), "--model.init_args.model_channels", "16",
            "--model.init_args.channel_mult", "[1,2]", "--model.init_args.attn_resolutions", "[]"],
    "dit": ["--config", str(CONFIGS / "digits_dit.yaml"), "--model.init_args.hidden_size", "64",
            "--model.init_args.depth", "4", "--model.init_args.num_heads", "4"],
}


DEFAULT_STEPS = {"edm": 1600, "dit": 2400}  # DiT steps are ~2x cheaper and it memorises more slowly


def train_command(family: str, size: int, steps: int, root: Path, batch_size: int) -> list[str]:
    """The ``train.py fit`` command line of one demo model."""
    return [sys.executable, "-m", "lightning_repro.cli", "fit", *FAMILIES[family],
            "--data.size", str(size), "--data.batch_size", str(batch_size),
            "--model.init_args.kernel", "edm", "--model.init_args.lr", "0.002",
            "--model.init_args.ema_halflife_kimg", "2", "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", str(steps), "--data.val_seeds", "16",
            "--checkpoint.every_n_train_steps", str(steps), "--final_samples.num_samples", "64",
            "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.group", "demo",
            "--trainer.enable_progress_bar", "false"]


def train_all(jobs: list[tuple[str, int, int, Path]], batch_size: int, parallel: int, threads: int) -> None:
    """Run the trainings not finished yet, ``parallel`` at a time (one CPU thread each by default)."""
    todo = [j for j in jobs if not (j[3] / "checkpoints" / "last.ckpt").is_file()]
    for fam, n, _, root in jobs:
        if (fam, n, _, root) not in todo:
            print(f"[demo] {fam} N={n}: reusing {root / 'checkpoints' / 'last.ckpt'}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    running: list[tuple[subprocess.Popen, str, Path]] = []
    while todo or running:
        while todo and len(running) < parallel:
            fam, n, steps, root = todo.pop(0)
            root.mkdir(parents=True, exist_ok=True)
            log = root / "train.log"
            print(f"[demo] training {fam} on N={n} digits for {steps} steps (log: {log})", flush=True)
            with open(log, "w") as fh:
                proc = subprocess.Popen(train_command(fam, n, steps, root, batch_size), stdout=fh,
                                        stderr=subprocess.STDOUT, env=env)
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


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 1797])
    p.add_argument("--families", nargs=2, default=["edm", "dit"], choices=list(FAMILIES))
    p.add_argument("--steps", type=int, default=None, help="training steps of every model "
                   f"(default: {DEFAULT_STEPS})")
    p.add_argument("--parallel", type=int, default=2, help="trainings run at the same time (one per core)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seeds", default="0-255")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 by default: tiny nets gain little from 2, and lose a lot when "
                        "another process competes for the cores)")
    a = p.parse_args(argv)
    if a.threads > 0 and not torch.cuda.is_available():
        torch.set_num_threads(a.threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    from .evaluation import main as evaluate_main

    t0, out, rows = time.time(), Path(a.out), []
    jobs = [(f, n, a.steps or DEFAULT_STEPS[f], out / f"{f}_N{n}") for n in a.sizes for f in a.families]
    train_all(jobs, a.batch_size, a.parallel, max(a.threads, 1))
    for n in a.sizes:
        ckpts = [out / f"{f}_N{n}" / "checkpoints" / "last.ckpt" for f in a.families]
        res = evaluate_main(["--pair", *map(str, ckpts), "--seeds", a.seeds, "--gl", "--descriptor", "pixel",
                             "--out", str(out / f"pair_N{n}"), "--no-progress"])
        for fam, gl in zip(a.families, (res["gl_a"], res["gl_b"])):
            rows.append({"N": n, "family": fam, "rp": res["rp"], "sim": res["mean_similarity"], "gl": gl,
                         "mae": res["mae_mean"],
                         "grid": str(out / f"pair_N{n}" / "pair.png")})
    pair = "(" + "-".join(a.families) + ")"
    print(f"\n{'N':>5}  {'family':6}  {'RP' + pair:>12}  {'sim' + pair:>13}  {'GL':>5}  {'MAE':>5}  grid")
    for r in rows:
        print(f"{r['N']:>5}  {r['family']:6}  {r['rp']:>12.3f}  {r['sim']:>13.3f}  {r['gl']:>5.3f}  {r['mae']:>5.1f}  "
              f"{r['grid']}")
    print(f"done: {len(rows)} models, {len(a.sizes)} sizes, seeds {a.seeds}, {time.time() - t0:.0f}s | "
          f"results: {out}/pair_N*/results.json | sample grids: {out}/*/samples/final.png", flush=True)
    return rows


if __name__ == "__main__":
    main()
