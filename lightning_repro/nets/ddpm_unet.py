"""The U-Net of Ho et al. 2020 ("Denoising Diffusion Probabilistic Models", App. B), a plain network:
``DDPMUNet``.

Architecture (the authors' TensorFlow model ``diffusion_tf/models/unet.py``; PyTorch ports:
pesser/pytorch_diffusion, score_sde_pytorch ``models/ddpm.py``):

* timestep embedding: ``temb = L1(silu(L0(PE(t))))``, ``PE`` the sinusoidal embedding
  ``[sin(t w_i), cos(t w_i)]`` with ``w_i = 10000^(-i / (half - 1))`` of width ``ch``; ``temb`` has width
  ``4 ch``.  Class-conditional models add ``W y`` (``y`` one-hot, the null label -1 gives 0) to ``temb``
  (the ADM convention of Dhariwal & Nichol 2021);
* down path: 3x3 conv, then per level ``num_blocks`` residual blocks (self-attention after each block at
  ``attn_resolutions``) and, below the last level, a stride-2 3x3 conv (TF "SAME" padding);
* middle: residual block, attention, residual block;
* up path: per level ``num_blocks + 1`` residual blocks on the concatenated skips (attention after each at
  ``attn_resolutions``) and, above level 0, nearest 2x upsampling + 3x3 conv;
* output: ``conv3x3(silu(GroupNorm(h)))``.

Residual block: ``x + conv2(dropout(silu(GN(conv1(silu(GN(x))) + A silu(temb)))))`` (1x1 shortcut when
the width changes); GroupNorm with ``min(32, C // 4)`` groups and eps 1e-6; initialisation as DDPM
(Xavier-uniform / "fan_avg uniform", 1e-5 gain on the zero-initialised layers).  The CIFAR-10
configuration (``ch=128``, ``ch_mult=(1,2,2,2)``, 2 blocks, attention at 16, dropout 0.1) has
35,746,307 parameters.  ``noise_labels`` is the (possibly fractional) DDPM timestep, e.g. ``999 t``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .edm_unet import (
    check_resolution,
    check_unet_input,
    class_one_hot,
    group_norm,
    self_attention,
    xavier_init,
)
from .embeddings import PositionalEmbedding

__all__ = ["DDPMUNet"]


class DDPMResBlock(nn.Module):
    """Residual block of Ho et al. 2020 with the time embedding added after the first conv."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.dropout = dropout
        self.norm1 = group_norm(in_channels)
        self.conv1 = xavier_init(nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.temb_proj = xavier_init(nn.Linear(emb_channels, out_channels))
        self.norm2 = group_norm(out_channels)
        self.conv2 = xavier_init(nn.Conv2d(out_channels, out_channels, 3, padding=1), gain=1e-5)
        self.shortcut = (
            xavier_init(nn.Conv2d(in_channels, out_channels, 1)) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor, act_temb: Tensor) -> Tensor:
        """``act_temb`` is ``silu(temb)`` (computed once per forward)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(act_temb)[:, :, None, None].to(h.dtype)
        h = self.conv2(F.dropout(F.silu(self.norm2(h)), p=self.dropout, training=self.training))
        return (self.shortcut(x) if self.shortcut is not None else x) + h


class DDPMAttnBlock(nn.Module):
    """Single-head self-attention over pixels, ``x + proj(softmax(q k^T / sqrt(C)) v)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = xavier_init(nn.Conv2d(channels, channels * 3, 1))
        self.proj_out = xavier_init(nn.Conv2d(channels, channels, 1), gain=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.proj_out(self_attention(self.qkv(self.norm(x)), 1, like=x))


class DDPMDownsample(nn.Module):
    """2x downsampling: stride-2 3x3 conv with TF "SAME" padding (one row/column after), or 2x2 average pooling."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = xavier_init(nn.Conv2d(channels, channels, 3, stride=2)) if with_conv else None

    def forward(self, x: Tensor) -> Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, 2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class DDPMUpsample(nn.Module):
    """2x nearest-neighbour upsampling, optionally followed by a 3x3 conv."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = xavier_init(nn.Conv2d(channels, channels, 3, padding=1)) if with_conv else None

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class DDPMUNet(nn.Module):
    """The DDPM U-Net (Ho et al. 2020), a plain network predicting (by convention) epsilon.

    ``forward(x, noise_labels, class_labels=None)``: ``x`` (B, in_channels, H, W), ``noise_labels`` (B,)
    float timesteps (fractional allowed), ``class_labels`` (B,) int64 with -1 = no label (ignored when
    ``num_classes == 0``; ``None`` means "no label" for every sample).  Returns (B, out_channels, H, W).
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        num_classes: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        resample_with_conv: bool = True,
    ):
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"DDPMUNet: num_classes must be >= 0 (0 = unconditional), got {num_classes}.")
        channel_mult = tuple(int(m) for m in channel_mult)
        self.factor = check_resolution("DDPMUNet", img_resolution, len(channel_mult))
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.num_classes = num_classes
        ch, temb_ch, levels = model_channels, 4 * model_channels, len(channel_mult)

        self.temb_embed = PositionalEmbedding(ch, endpoint=True)  # [cos, sin]; swapped in forward
        self.temb_dense0 = xavier_init(nn.Linear(ch, temb_ch))
        self.temb_dense1 = xavier_init(nn.Linear(temb_ch, temb_ch))
        self.label_emb = xavier_init(nn.Linear(num_classes, temb_ch, bias=False)) if num_classes else None

        self.conv_in = xavier_init(nn.Conv2d(in_channels, ch, 3, padding=1))
        self.down = nn.ModuleList()
        skips, c, res = [ch], ch, img_resolution
        for level, mult in enumerate(channel_mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_blocks):
                stage.block.append(DDPMResBlock(c, ch * mult, temb_ch, dropout))
                c = ch * mult
                if res in attn_resolutions:
                    stage.attn.append(DDPMAttnBlock(c))
                skips.append(c)
            if level != levels - 1:
                stage.downsample = DDPMDownsample(c, resample_with_conv)
                skips.append(c)
                res //= 2
            self.down.append(stage)

        self.mid_block1 = DDPMResBlock(c, c, temb_ch, dropout)
        self.mid_attn = DDPMAttnBlock(c)
        self.mid_block2 = DDPMResBlock(c, c, temb_ch, dropout)

        self.up = nn.ModuleList()  # from the lowest resolution up
        for level, mult in reversed(list(enumerate(channel_mult))):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_blocks + 1):
                stage.block.append(DDPMResBlock(c + skips.pop(), ch * mult, temb_ch, dropout))
                c = ch * mult
                if res in attn_resolutions:
                    stage.attn.append(DDPMAttnBlock(c))
            if level != 0:
                stage.upsample = DDPMUpsample(c, resample_with_conv)
                res *= 2
            self.up.append(stage)
        self.norm_out = group_norm(c)
        self.conv_out = xavier_init(nn.Conv2d(c, out_channels, 3, padding=1), gain=1e-5)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None) -> Tensor:
        t = check_unet_input("DDPMUNet", x, noise_labels, self.in_channels, self.factor)
        emb = self.temb_embed(t)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # DDPM order: [sin, cos]
        emb = emb.to(self.temb_dense0.weight.dtype)
        temb = self.temb_dense1(F.silu(self.temb_dense0(emb)))
        if self.label_emb is not None:
            y = class_one_hot("DDPMUNet", class_labels, self.num_classes, x.shape[0], x.device)
            temb = temb + self.label_emb(y.to(temb.dtype))
        act = F.silu(temb)

        hs = [self.conv_in(x)]
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(hs[-1], act)
                if len(stage.attn):
                    h = stage.attn[i](h)
                hs.append(h)
            if hasattr(stage, "downsample"):
                hs.append(stage.downsample(hs[-1]))

        h = self.mid_block2(self.mid_attn(self.mid_block1(hs[-1], act)), act)

        for stage in self.up:
            for i, block in enumerate(stage.block):
                h = block(torch.cat([h, hs.pop()], dim=1), act)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
