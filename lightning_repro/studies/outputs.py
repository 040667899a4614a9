"""What a study writes: CSV tables, PNG figures, ``.npz`` / tensor files (all atomically, through
``files.atomic_write_bytes``: a temp file and a rename), the plain-text table of its log, and one W&B run per study
result (the table, the figures and a summary, in the study's group; offline without credentials).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["log", "atomic_bytes", "write_csv", "save_figure", "save_npz", "save_tensor", "format_table",
           "log_study_to_wandb", "finish", "n_axis"]


def log(msg: str) -> None:
    """A study's progress line (flushed at once, so it interleaves with progress bars correctly)."""
    print(msg, flush=True)


def atomic_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` (temp file + rename, parents created); returns the path."""
    from ..files import atomic_write_bytes

    atomic_write_bytes(path, data)
    return Path(path)


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, columns: Sequence[str]) -> Path:
    """Write ``rows`` (dicts) with the given column order to ``path`` atomically; floats with 6 significant digits."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return atomic_bytes(path, buf.getvalue().encode())


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return atomic_bytes(path, buf.getvalue())


def save_npz(path: str | os.PathLike, **arrays: Any) -> Path:
    """``numpy.savez`` of ``arrays`` to ``path`` atomically."""
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_bytes(path, buf.getvalue())


def save_tensor(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` of ``obj`` to ``path`` atomically (read back with ``torch.load(..., weights_only=True)``)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_bytes(path, buf.getvalue())


def n_axis(ax, title: str, xlabel: str = "training set size N", legend_size: float | None = None) -> None:
    """The x axis of a plot against the training-set size: log2 N, a [0, 1] score on y, grid and legend."""
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(**({} if legend_size is None else {"fontsize": legend_size}))


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of ``rows`` (for the end of a study's output)."""

    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def log_study_to_wandb(study: str, cfg: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                       columns: Sequence[str], images: Mapping[str, str | os.PathLike] | None = None,
                       summary: Mapping[str, Any] | None = None, group: str | None = None) -> Path | None:
    """Log a study's table (``wandb.Table``), figures (``wandb.Image``) and summary to one W&B run.

    The run is named after the study, grouped by ``group`` (default: the study name) so it sits beside the
    training runs of the same experiment, and carries ``cfg`` as its config.  With no W&B credentials it is
    written offline under ``<cfg["out"]>/wandb`` (never blocks or prompts).  ``cfg["wandb"]`` false (or
    ``WANDB_MODE=disabled``) skips it.  Returns the run's local folder, or None when skipped.
    """
    if not cfg.get("wandb", True) or os.environ.get("WANDB_MODE", "").lower() == "disabled":
        return None
    import wandb

    from ..cli import wandb_offline

    out = Path(str(cfg.get("out", "."))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings = wandb.Settings(silent=True, console="off", mode="offline" if wandb_offline() else "online")
    config = json.loads(json.dumps({k: v for k, v in cfg.items() if k != "wandb"}, default=str))
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lightning_repro"), group=group or study, name=study,
                     job_type="study", config=config, dir=str(out), settings=settings, reinit="create_new")
    try:
        cols = list(columns)
        payload: dict[str, Any] = {f"{study}/table": wandb.Table(columns=cols, data=[[r.get(c) for c in cols]
                                                                                      for r in rows])}
        for key, path in (images or {}).items():
            if path is not None and Path(path).is_file():
                payload[f"{study}/{key}"] = wandb.Image(str(path))
        run.log(payload)
        for k, v in (summary or {}).items():
            run.summary[k] = v
        return Path(run.dir).parent
    finally:
        run.finish()
        wandb.teardown()  # wait for the (offline) run file to be written completely before returning


def finish(study: str, cfg: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
           csv_name: str, images: Mapping[str, str | os.PathLike], summary: Mapping[str, Any],
           table: Sequence[str] | None = None, group: str | None = None) -> Path:
    """The end every study shares: its CSV (``<out>/<csv_name>``), its table in the log (``table``: the columns
    shown, default all; empty: none), its W&B run."""
    csv_path = write_csv(rows, Path(str(cfg["out"])) / csv_name, columns)
    if table is None or len(table):
        log(format_table(rows, list(columns if table is None else table)))
    log_study_to_wandb(study, cfg, rows, columns, images, summary, group=group)
    return csv_path
