"""Small helpers every evaluation module shares: JSON-safe values, compact seed text, checked writes under ``--out``.

Writes are atomic (temp file + rename, ``files.atomic_write_bytes``); a failed write (no permission, a full
disk) leaves no partial file and becomes one ``OSError`` sentence naming the file.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from ..files import atomic_write_bytes

__all__ = [
    "version",
    "seed_text",
    "safe_name",
    "json_safe",
    "write_bytes",
    "write_json",
    "writing",
    "output_folder",
]


def version() -> str:
    """This package's installed version (``unknown`` when running from a source tree)."""
    try:
        from importlib.metadata import version as _v

        return _v("lightning_repro")
    except Exception:
        return "unknown"


def seed_text(seeds: Sequence[int]) -> str:
    """Compact text of a seed list: ``0-9,20,30-31`` (cut to 60 characters)."""
    parts, i = [], 0
    seeds = list(seeds)
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if i == j else f"{seeds[i]}-{seeds[j]}")
        i = j + 1
    text = ",".join(parts)
    return text if len(text) <= 60 else text[:57] + "..."


def safe_name(name: str) -> str:
    """``name`` reduced to a file-name-safe token."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def json_safe(obj: Any) -> Any:
    """NaN / inf -> None, tensors / numpy scalars -> Python values, tuples -> lists (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Tensor):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _reason(err: OSError) -> str:
    return (err.strerror or str(err) or type(err).__name__).rstrip(".").lower()


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn an ``OSError`` raised while writing ``path`` into one sentence naming it."""
    try:
        yield
    except OSError as err:
        raise OSError(
            f"could not write {path} ({_reason(err)}); check that --out is writable and has free space."
        ) from None


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Atomic write of ``data`` to ``path``; on failure no partial file is left and one sentence is raised."""
    with writing(path):
        atomic_write_bytes(path, data)


def write_json(path: Path, obj: Any) -> None:
    write_bytes(path, (json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n").encode())


def output_folder(out: str | os.PathLike) -> Path:
    """``--out``, created if needed and checked writable before any work (one sentence if it is not)."""
    path = Path(out).expanduser()
    probe = path / f".write_check_{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        with suppress(OSError):
            probe.unlink(missing_ok=True)
        raise OSError(f"--out {path} is not a writable folder ({_reason(err)}).") from None
    return path


def sentence(err: Exception) -> str:
    """The one sentence a command prints for ``err`` (a raw ``OSError`` of e.g. ``mkdir`` names its file)."""
    if isinstance(err, OSError) and err.errno is not None and err.strerror:
        where = f" {err.filename}" if err.filename else ""
        return f"could not use{where} ({err.strerror.lower()})."
    return str(err)


def exit_with_sentence(err: Exception) -> SystemExit:
    """Print ``error: <sentence>`` to stderr and return the ``SystemExit`` (status 2) for the caller to raise."""
    msg = f"error: {sentence(err)}"
    print(msg, file=sys.stderr, flush=True)
    exc = SystemExit(msg)
    exc.code = 2
    return exc
