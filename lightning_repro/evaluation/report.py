"""What rank 0 shows and keeps of an evaluation: annotated heatmaps (the style of Zhang et al., Fig. 6), CSV
matrices, the printed summaries, and one W&B run per command (offline without credentials, never fatal)."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from .common import json_safe, write_bytes

__all__ = ["heatmap", "write_csv", "log_wandb", "print_pair", "print_matrix"]


def heatmap(
    matrix: np.ndarray,
    labels: list[str],
    title: str,
    path: Path,
    fmt: str,
    vmin=None,
    vmax=None,
    cmap: str = "viridis",
) -> None:
    """An annotated k x k heatmap PNG of ``matrix`` with ``labels`` on both axes."""
    from matplotlib.figure import Figure

    k = len(labels)
    size = max(3.0, 0.8 * k + 1.5)
    fig = Figure(figsize=(size + 1.0, size), dpi=120)
    ax = fig.subplots()
    im = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(k), labels=labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), labels=labels, fontsize=8)
    lo, hi = (np.nanmin(matrix), np.nanmax(matrix)) if vmin is None else (vmin, vmax)
    for i in range(k):
        for j in range(k):
            v = matrix[i, j]
            light = (v - lo) / (hi - lo + 1e-12) < 0.6 if np.isfinite(v) else True
            ax.text(
                j,
                i,
                "-" if not np.isfinite(v) else format(v, fmt),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if light else "black",
            )
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_bytes(path, buf.getvalue())


def write_csv(path: Path, matrix: np.ndarray, labels: list[str]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", *labels])
    for lab, row in zip(labels, matrix):
        w.writerow([lab, *(f"{v:.6f}" for v in row)])
    write_bytes(path, buf.getvalue().encode())


def log_wandb(out: Path, name: str, job: str, config: dict, metrics: dict, images: dict[str, Path]) -> str:
    """One W&B run (project lightning_repro, group evaluate) of ``metrics`` and ``images``; returns the line
    saying where it is (or why it failed: W&B never stops an evaluation)."""
    from ..cli import wandb_offline

    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    try:
        import wandb

        mode = "offline" if wandb_offline() else "online"
        run = wandb.init(
            project="lightning_repro",
            group="evaluate",
            job_type=job,
            name=name,
            dir=str(out),
            mode=mode,
            config=json_safe(config),
            reinit="finish_previous",
            settings=wandb.Settings(silent=True, console="off", init_timeout=30),
        )
        run.log(
            {
                **{k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None},
                **{k: wandb.Image(str(p)) for k, p in images.items()},
            }
        )
        for k, v in metrics.items():
            run.summary[k] = v
        run_dir = run.dir
        run.finish()
        return f"W&B run {mode}: {Path(run_dir).parent}"
    except Exception as err:  # W&B must never stop an evaluation
        first = str(err).splitlines()[0] if str(err) else ""
        return f"warning: W&B logging failed ({type(err).__name__}: {first}); results are in {out}."


def _fmt(v, spec=".4f") -> str:
    return "-" if v is None else format(v, spec)


def print_pair(r: dict[str, Any], nearest_note: str, log=print) -> None:
    """The table of a ``--pair`` result (before its one-line summary)."""
    t = r["threshold"]
    log(f"  A  {r['model_a']['label']:<28} {r['model_a']['text']}")
    log(f"  B  {r['model_b']['label']:<28} {r['model_b']['text']}")
    log(f"  {'n pairs':<26}{r['n']}")
    log(f"  {'RP (sim > ' + format(t, 'g') + ')':<26}{_fmt(r['rp'])}")
    log(f"  {'mean similarity':<26}{_fmt(r['mean_similarity'])}")
    log(f"  {'MAE mean [0-255]':<26}{_fmt(r['mae_mean'], '.3f')}")
    log(f"  {'MAE score (< ' + format(r['mae_threshold'], 'g') + ')':<26}{_fmt(r['mae_score'])}")
    log(f"  {'GL A / memorised A':<26}{_fmt(r['gl_a'])} / {_fmt(r['memorized_a'])}")
    log(f"  {'GL B / memorised B':<26}{_fmt(r['gl_b'])} / {_fmt(r['memorized_b'])}")
    log(f"  grid (rows: A, B, {nearest_note}): {r['grid_png']}")


def print_matrix(labels: list[str], rp: np.ndarray, gl: list[float] | None, log=print) -> None:
    width = max(8, *(len(x) for x in labels))
    log("RP matrix:")
    log(" " * (width + 2) + " ".join(f"{x[:width]:>{width}}" for x in labels))
    for lab, row in zip(labels, rp):
        log(f"  {lab:<{width}}" + " ".join(f"{v:>{width}.3f}" for v in row))
    if gl is not None:
        log("GL: " + ", ".join(f"{lab}={v:.3f}" for lab, v in zip(labels, gl)))
