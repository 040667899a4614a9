"""Shared test set-up: offline W&B, few threads (2-core CI machine), deterministic seeds."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
