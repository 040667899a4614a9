"""Regression tests of the reliability issue: files are data (no code runs from a checkpoint), one sentence per failure."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

import lightning_repro.evaluation as ev
from lightning_repro.data import SubsetDataModule, get_source
from lightning_repro.module import EDM, load_denoiser


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    module = EDM(model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0.0)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, SubsetDataModule("digits", size=16, batch_size=8, val_seeds=2))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path


def _malicious(tiny_ckpt: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint that passes ``torch.load(weights_only=True)`` but names ``subprocess.run`` as its class."""
    marker = tmp_path / "MARKER"
    ckpt = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    ckpt["lightning_repro"]["class_path"] = "subprocess.run"
    ckpt["lightning_repro"]["hparams"] = {"args": ["sh", "-c", f"touch {marker}"]}
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    torch.load(bad, map_location="cpu", weights_only=True)  # the file itself is a valid weights-only checkpoint
    return bad, marker


def test_checkpoint_cannot_name_a_callable(tiny_ckpt, tmp_path):
    bad, marker = _malicious(tiny_ckpt, tmp_path)
    with pytest.raises(ValueError, match=r"names class 'subprocess.run', which is not a lightning_repro preset"):
        load_denoiser(bad)
    assert not marker.exists()


@pytest.mark.parametrize("argv", [
    lambda bad, ok, out: ["sample", str(bad), "--seeds", "0-1", "--steps", "2", "--out", str(out), "--no-progress"],
    lambda bad, ok, out: ["--pair", str(ok), str(bad), "--seeds", "0-1", "--steps", "2", "--out", str(out),
                          "--no-progress"],
])
def test_malicious_checkpoint_through_evaluate(tiny_ckpt, tmp_path, argv, capsys):
    bad, marker = _malicious(tiny_ckpt, tmp_path)
    with pytest.raises(SystemExit) as exc:
        ev.main(argv(bad, tiny_ckpt, tmp_path / "out"))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a lightning_repro preset" in err[0]
    assert not marker.exists()


def test_malicious_checkpoint_through_generated_source(tiny_ckpt, tmp_path):
    bad, marker = _malicious(tiny_ckpt, tmp_path)
    with pytest.raises(ValueError, match="not a lightning_repro preset"):
        get_source("generated", checkpoint=str(bad), seeds="1000000-1000001", steps=2)
    assert not marker.exists()
