"""Several evaluation processes under ``torchrun``: a gloo group over host data, rank / world, barrier, all-gather.

Design decision (since DESIGN.md): a distributed evaluation gathers the descriptor *features* of all ranks and
computes every score once from them, instead of reducing per-rank metric states; float partial sums depend on
the split, so only gathering makes N processes equal one process exactly.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "finish_distributed", "rank_world", "is_main", "barrier", "all_gather"]


def init_distributed() -> bool:
    """Join the gloo process group of a ``torchrun`` launch (``WORLD_SIZE`` > 1) and pick ``cuda:LOCAL_RANK``.

    Returns True when this call created the group (the caller then calls ``finish_distributed``).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    dist.init_process_group("gloo", timeout=timedelta(hours=6))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return True


def finish_distributed(created: bool) -> None:
    if created:
        dist.destroy_process_group()


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) in one process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Rank 0, the rank that prints and writes the reports."""
    return rank_world()[0] == 0


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def all_gather(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (just ``[obj]`` in one process)."""
    world = rank_world()[1]
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out
