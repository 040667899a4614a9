"""The training API (DESIGN.md, "Public names"): ``DiffusionModule``, its presets and checkpoint loading.

One import place for users, configs (``class_path: lightning_repro.module.DDPMpp``) and checkpoints, whose metadata
names presets by these paths.  The parts live in their own files: ``diffusion_module`` (the LightningModule: EMA,
optimiser, validation grids), ``losses`` (``DenoisingLoss``), ``finetune`` (``init_from`` / ``trainable``),
``presets`` (``DDPM``, ``DDPMpp`` — ``EDM`` is its deprecated old name — ``UViT``, ``DiT``, ``Multistage`` from
``multistage``; the procedure ``ProgressiveDistillation`` from ``progressive``) and ``checkpoints``;
``consistency`` (``CTDiT``, ``CDDDPMpp``, ...: consistency training / distillation of each preset's network).
"""

from .checkpoints import (
           CKPT_KEY,
           file_sha256,
           load_checkpoint,
           load_denoiser,
           module_from_checkpoint,
           preset_class,
)
from .consistency import CDDDPM, CTDDPM, CDDDPMpp, CDDiT, CDUViT, CTDDPMpp, CTDiT, CTUViT  # noqa: F401
from .diffusion_module import DiffusionModule, default_precond
from .losses import DenoisingLoss
from .presets import ARCHS, DDPM, EDM, DDPMpp, DiT, Multistage, ProgressiveDistillation, UViT

__all__ = ["DiffusionModule", "DDPM", "DDPMpp", "EDM", "UViT", "DiT", "Multistage", "ProgressiveDistillation",
           "load_denoiser", "load_checkpoint", "ARCHS", "default_precond", "module_from_checkpoint", "file_sha256",
           "CKPT_KEY", "preset_class", "DenoisingLoss"]
