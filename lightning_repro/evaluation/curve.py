"""RP between two training runs at the steps both kept a checkpoint (Zhang et al., ICML 2024, Sec. 2.1, over training).

The live monitor (``callbacks.ReproducibilityMonitor``) follows one run against a fixed reference; two runs that
train side by side (a U-Net and a DiT on one subset) can only be compared afterwards, at their checkpoints.  For
every step at which both runs saved ``checkpoints/step_<step>.ckpt`` this runs ``evaluate.py --pair A B --gl`` with
the options given (same seeds, sampler, descriptor and threshold) into ``DIR/step_<step>/`` and writes
``DIR/curve.csv`` (step, rp, mean_similarity, gl_a, gl_b, n, descriptor, threshold) and ``DIR/curve.png``.

    python -m lightning_repro.evaluation.curve RUN_A RUN_B --out DIR [--seeds 0-255] [evaluate.py --pair options]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["checkpoint_steps", "main"]

COLUMNS = ("step", "rp", "mean_similarity", "gl_a", "gl_b", "n", "descriptor", "threshold")


def checkpoint_steps(run: str | Path) -> dict[int, Path]:
    """``{step: path}`` of the ``step_<step>.ckpt`` files of a run folder (or of its ``checkpoints`` folder)."""
    run = Path(run).expanduser()
    folder = run / "checkpoints" if (run / "checkpoints").is_dir() else run
    if not folder.is_dir():
        raise ValueError(f"{run} is not a run folder (no {run / 'checkpoints'} and not a folder itself).")
    found = {int(m.group(1)): p for p in folder.glob("step_*.ckpt") if (m := re.fullmatch(r"step_(\d+)\.ckpt", p.name))}
    if not found:
        raise ValueError(f"{folder} holds no step_<step>.ckpt checkpoints (train with checkpoint.every_n_train_steps).")
    return found


def _split(argv: Sequence[str]) -> tuple[list[str], Path, list[str]]:
    """(the two runs, --out, the options passed on to ``evaluate.py --pair``): the runs come first."""
    p = argparse.ArgumentParser(prog="python -m lightning_repro.evaluation.curve", add_help=False)
    p.add_argument("--out")
    args, rest = p.parse_known_args(list(argv)[2:])
    runs = list(argv)[:2]
    if len(runs) != 2 or any(r.startswith("-") for r in runs) or not args.out:
        raise ValueError("usage: python -m lightning_repro.evaluation.curve RUN_A RUN_B --out DIR [evaluate.py --pair "
                         "options]; it needs two run folders first, and --out.")
    if any(a in ("--pair", "--matrix", "--no-wandb", "--gl") for a in rest):
        raise ValueError("curve runs evaluate.py --pair --gl itself (without W&B); give it sampling and scoring "
                         "options only.")
    return runs, Path(args.out), rest


def run(argv: Sequence[str], log=print) -> list[dict]:
    """The rows of ``curve.csv``, one per common step, after writing it and ``curve.png``."""
    from ..files import atomic_write_csv
    from .cli import main as evaluate
    from .common import output_folder

    (run_a, run_b), out, options = _split(argv)
    a, b = checkpoint_steps(run_a), checkpoint_steps(run_b)
    steps = sorted(set(a) & set(b))
    if not steps:
        raise ValueError(f"{run_a} (steps {sorted(a)}) and {run_b} (steps {sorted(b)}) kept no checkpoint at a common "
                         "step.")
    out = output_folder(out)
    rows = []
    for s in steps:
        res = evaluate(["--pair", str(a[s]), str(b[s]), "--gl", "--no-wandb", *options, "--out",
                        str(out / f"step_{s:07d}")])
        rows.append({"step": s, **{k: res[k] for k in COLUMNS[1:]}})
        log(f"step {s}: RP {res['rp']:.4f}  mean similarity {res['mean_similarity']:.4f}  GL {res['gl_a']:.3f} / "
            f"{res['gl_b']:.3f}")
    atomic_write_csv(out / "curve.csv", COLUMNS,
                     ([repr(v) if isinstance(v, float) else v for v in (r[k] for k in COLUMNS)] for r in rows))
    names = Path(run_a).name, Path(run_b).name
    _plot(rows, out / "curve.png", *names)
    log(f"RP({names[0]}, {names[1]}) at steps {', '.join(map(str, steps))}: "
        + " -> ".join(f"{r['rp']:.3f}" for r in rows) + f" ({rows[-1]['descriptor']}@{rows[-1]['threshold']:g}, "
        f"{rows[-1]['n']} seeds) | {out / 'curve.csv'} | {out / 'curve.png'}")
    return rows


def _plot(rows: list[dict], path: Path, name_a: str, name_b: str) -> None:
    from matplotlib.figure import Figure

    from ..viz import save_figure

    fig = Figure(figsize=(9, 3.6), dpi=120)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    steps = [r["step"] for r in rows]
    left.plot(steps, [r["rp"] for r in rows], marker="o", color="k", label="RP")
    left.plot(steps, [r["mean_similarity"] for r in rows], marker=".", ls="--", color="grey", label="mean similarity")
    left.set(xlabel="training step", ylabel=f"{name_a} vs {name_b}", ylim=(-0.02, 1.02), title="same seeds")
    right.plot(steps, [r["gl_a"] for r in rows], marker="o", label=name_a)
    right.plot(steps, [r["gl_b"] for r in rows], marker="s", label=name_b)
    right.set(xlabel="training step", ylabel="GL", ylim=(-0.02, 1.02), title="novelty against each training set")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    last = rows[-1]
    fig.suptitle(f"{last['descriptor']} descriptor, threshold {last['threshold']:g}, {last['n']} seeds", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Entry point; bad input ends with ``SystemExit`` (status 2) whose text is one sentence."""
    from .common import exit_with_sentence

    try:
        return run(list(sys.argv[1:] if argv is None else argv))
    except ValueError as err:
        raise exit_with_sentence(err) from None


if __name__ == "__main__":
    main()
