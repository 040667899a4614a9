"""Small helpers shared by the study tests (import as ``from study_helpers import ...``; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import csv

from PIL import Image


def read_csv(path) -> tuple[list[str], list[dict[str, str]]]:
    """``(header, rows)`` of a CSV file written by a study."""
    with open(path) as f:
        r = csv.DictReader(f)
        return r.fieldnames, list(r)


def assert_png(path, min_size: int = 100) -> None:
    """``path`` is a PNG image whose sides are at least ``min_size`` pixels."""
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_size
