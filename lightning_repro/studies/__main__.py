"""``python -m lightning_repro.studies``: the index of the studies (name, paper, what it shows, its command);
``python -m lightning_repro.studies NAME [--config FILE] [--out DIR] [--quick]`` runs one of them."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from . import all_studies, get_study


def main(argv: Sequence[str] | None = None) -> Any:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "list"):
        for s in all_studies().values():
            print(f"{s.name:18} {s.paper:11} {s.title}\n{'':31}{s.command}")
        return None
    try:
        study = get_study(argv[0])
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    return study.main(argv[1:])


if __name__ == "__main__":
    main()
