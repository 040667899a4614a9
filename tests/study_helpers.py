"""Small helpers shared by tests (import as ``from study_helpers import ...``; pytest puts tests/ on sys.path)."""

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


def tiny_unet_checkpoint(path, size: int = 16, steps: int = 3):
    """A 16-channel DDPM++ U-Net trained ``steps`` steps on ``size`` digits and saved at ``path``:
    ``(str(path), its EMA denoiser in eval mode, its kernel)``."""
    import lightning as L

    from lightning_repro.data import SubsetDataModule
    from lightning_repro.module import DDPMpp

    module = DDPMpp(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0,
                    image_shape=(1, 8, 8))
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, SubsetDataModule("digits", size=size, batch_size=16, val_seeds=2))
    trainer.save_checkpoint(path)
    return str(path), module.ema.eval(), module.kernel
