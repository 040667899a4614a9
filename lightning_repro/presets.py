"""The architecture presets of ``DiffusionModule`` (DESIGN.md), each with any kernel (``vp``, ``vp_discrete``,
``subvp``, ``ve``, ``edm``): ``DDPM`` (the U-Net of Ho et al. 2020), ``DDPMpp`` (the DDPM++ U-Net of Song et al. 2021
as configured by Karras et al. 2022; ``EDM`` is its deprecated old name), ``UViT`` (Bao et al. 2023) and ``DiT``
(Peebles & Xie 2023).  ``ARCHS`` is the registry the CLI, the studies and checkpoint loading look names up in.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from .diffusion_module import DiffusionModule
from .multistage import Multistage  # the multi-decoder DDPM++ (Zhang et al. 2024)
from .progressive import ProgressiveDistillation  # a training procedure over the presets (Salimans & Ho 2022)

__all__ = ["DDPM", "DDPMpp", "EDM", "UViT", "DiT", "Multistage", "ProgressiveDistillation", "ARCHS", "RENAMED"]


def _unet_kwargs(model_channels, channel_mult, num_blocks, attn_resolutions, dropout) -> dict[str, Any]:
    return dict(model_channels=model_channels, channel_mult=tuple(channel_mult), num_blocks=num_blocks,
                attn_resolutions=tuple(attn_resolutions), dropout=dropout)


class DDPMpp(DiffusionModule):
    """DDPM++ U-Net (Song et al. 2021) as configured by EDM (Karras et al. 2022, ``ddpmpp``).

    CIFAR-10: ``model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16]`` is the
    55,732,739-parameter network; the paper's own runs use ``model_channels=64`` (13,956,355).
    """

    arch = "ddpmpp"
    public_path = "lightning_repro.module.DDPMpp"
    attention_patterns = ("*.qkv.*", "*.proj.*", "*.norm2.*")  # SongUNetBlock self-attention (+ its GroupNorm)
    network_aliases = {"ddpmpp": "DDPMpp", "edm": "EDM"}  # checkpoints of either name hold this network

    def __init__(self, model_channels: int = 128, channel_mult: list[int] = (2, 2, 2), num_blocks: int = 4,
                 attn_resolutions: list[int] = (16,), dropout: float = 0.10, kernel: str = "edm", **kwargs):
        self._net_cfg = _unet_kwargs(model_channels, channel_mult, num_blocks, attn_resolutions, dropout)
        super().__init__(kernel=kernel, **kwargs)

    def build_net(self) -> nn.Module:
        from .nets.edm_unet import SongUNet

        return SongUNet(**self.net_kwargs(), **self._net_cfg)


_warned: set[str] = set()


class EDM(DDPMpp):
    """Deprecated name of ``DDPMpp`` (the network is DDPM++, not "EDM"; ``EDM`` with ``kernel: vp`` read as a
    contradiction).  Kept so that configs (``class_path: lightning_repro.module.EDM``, ``class_path: EDM``) and
    checkpoints (``arch: edm``) keep working: it builds the same network and records ``arch: edm``; ``init_from``
    and ``--ckpt_path`` accept ``DDPMpp`` and ``EDM`` checkpoints alike.  Warns once per process."""

    arch = "edm"
    public_path = "lightning_repro.module.EDM"

    def build_net(self) -> nn.Module:
        if "EDM" not in _warned:  # construction by the old name; once, so long runs and tests are not flooded
            _warned.add("EDM")
            warnings.warn("the preset EDM is now called DDPMpp (class_path: lightning_repro.module.DDPMpp); "
                          "EDM keeps working as a deprecated alias.", FutureWarning, stacklevel=2)
        return super().build_net()


class DDPM(DiffusionModule):
    """The U-Net of Ho et al. 2020 (CIFAR-10: 128 channels, [1, 2, 2, 2], 2 blocks, attention at 16; 35.7M)."""

    arch = "ddpm"
    public_path = "lightning_repro.module.DDPM"
    attention_patterns = ("*.attn.*", "mid_attn.*")  # DDPMAttnBlock: norm, qkv, proj_out

    def __init__(self, model_channels: int = 128, channel_mult: list[int] = (1, 2, 2, 2), num_blocks: int = 2,
                 attn_resolutions: list[int] = (16,), dropout: float = 0.10, kernel: str = "vp", **kwargs):
        self._net_cfg = _unet_kwargs(model_channels, channel_mult, num_blocks, attn_resolutions, dropout)
        super().__init__(kernel=kernel, **kwargs)

    def build_net(self) -> nn.Module:
        from .nets.ddpm_unet import DDPMUNet

        return DDPMUNet(**self.net_kwargs(), **self._net_cfg)


class UViT(DiffusionModule):
    """U-ViT (Bao et al. 2023); CIFAR-10 U-ViT-S/2: patch 2, depth 12 (13 blocks), width 512, 8 heads."""

    arch = "uvit"
    public_path = "lightning_repro.module.UViT"
    attention_patterns = ("*.attn.*",)  # qkv + proj of every transformer block

    def __init__(self, patch_size: int = 2, embed_dim: int = 512, depth: int = 12, num_heads: int = 8,
                 mlp_ratio: float = 4.0, kernel: str = "vp", **kwargs):
        self._net_cfg = dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                             mlp_ratio=mlp_ratio)
        super().__init__(kernel=kernel, **kwargs)

    def build_net(self) -> nn.Module:
        from .nets.uvit import UViTNet

        return UViTNet(**self.net_kwargs(), **self._net_cfg)


class DiT(DiffusionModule):
    """DiT (Peebles & Xie 2023) in pixel space; DiT-S/2: patch 2, depth 12, width 384, 6 heads."""

    arch = "dit"
    public_path = "lightning_repro.module.DiT"
    attention_patterns = ("*.attn.*",)  # qkv + proj of every DiT block

    def __init__(self, patch_size: int = 2, hidden_size: int = 384, depth: int = 12, num_heads: int = 6,
                 mlp_ratio: float = 4.0, kernel: str = "edm", **kwargs):
        self._net_cfg = dict(patch_size=patch_size, hidden_size=hidden_size, depth=depth, num_heads=num_heads,
                             mlp_ratio=mlp_ratio)
        super().__init__(kernel=kernel, **kwargs)

    def build_net(self) -> nn.Module:
        from .nets.dit import DiTNet

        return DiTNet(**self.net_kwargs(), **self._net_cfg)


#: name -> preset; ``edm`` is the deprecated alias of ``ddpmpp`` (old configs and checkpoints name it)
ARCHS: dict[str, type[DiffusionModule]] = {"ddpm": DDPM, "ddpmpp": DDPMpp, "edm": EDM, "uvit": UViT, "dit": DiT,
                                           "multistage": Multistage, "progressive": ProgressiveDistillation}
#: old preset name -> its new name (the old one keeps working, with a FutureWarning)
RENAMED: dict[str, str] = {"EDM": "DDPMpp"}
