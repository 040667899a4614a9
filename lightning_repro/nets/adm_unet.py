"""The ADM U-Net of Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs on Image Synthesis") in the form used by
EDM (Karras et al. 2022, config ``adm``, its ImageNet-64 model): ``DhariwalUNet``.

Differences from ``edm_unet.SongUNet`` (same encoder / decoder layout and parameter names):

* mapping: ``emb = silu(L1(silu(L0(PE(c_noise)))) + W y)`` with ``PE`` the positional embedding in ``[cos, sin]``
  order without the frequency endpoint, and a bias-free label layer on the plain one-hot ``y`` (null class: 0);
* blocks: adaptive group norm ``silu(shift + GN(h) (1 + scale))`` (``affine`` gives 2C values), ``skip_scale = 1``,
  ``eps = 1e-5``, a bare resampled skip when the width does not change, 64 channels per attention head;
* the first level has ``model_channels * channel_mult[0]`` channels and every decoder block at an attention
  resolution attends.

Initialisation follows EDM's ``adm``: PyTorch's default (``kaiming_uniform`` with weight and bias gain sqrt(1/3))
and zeros for the last conv of each branch, the attention projection, the output conv and ``map_augment``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .edm_unet import SongUNetBlock, check_resolution, check_unet_input, class_one_hot, group_norm
from .embeddings import PositionalEmbedding

__all__ = ["DhariwalUNet"]


class DhariwalUNet(nn.Module):
    """ADM U-Net, a plain network: ``forward(x, noise_labels, class_labels=None, augment_labels=None)``."""

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        num_classes: int = 0,  # class labels, 0 = unconditional (ImageNet-64: 1000)
        augment_dim: int = 0,  # augmentation-label width, 0 = none
        model_channels: int = 192,  # base width
        channel_mult: Sequence[int] = (1, 2, 3, 4),  # width multiplier per resolution
        channel_mult_emb: int = 4,  # embedding width = model_channels * channel_mult_emb
        num_blocks: int = 3,  # residual blocks per resolution
        attn_resolutions: Sequence[int] = (32, 16, 8),  # resolutions with self-attention
        dropout: float = 0.10,  # dropout of the residual branches
    ):
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        self.factor = check_resolution("DhariwalUNet", img_resolution, len(channel_mult))
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.num_classes, self.augment_dim = int(num_classes), int(augment_dim)
        emb = model_channels * channel_mult_emb
        block = dict(emb_channels=emb, dropout=dropout, adaptive_scale=True, skip_scale=1.0, eps=1e-5,
                     resample_proj=False, channels_per_head=64)
        self.map_noise = PositionalEmbedding(model_channels)
        if augment_dim:
            self.map_augment = nn.Linear(augment_dim, model_channels, bias=False)
        self.map_layer0 = nn.Linear(model_channels, emb)
        self.map_layer1 = nn.Linear(emb, emb)
        self.map_label = nn.Linear(num_classes, emb, bias=False) if num_classes else None

        self.enc, cout = nn.ModuleDict(), in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = nn.Conv2d(cin, cout, 3, padding=1)
            else:
                self.enc[f"{res}x{res}_down"] = SongUNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = SongUNetBlock(
                    cin, cout, attention=res in attn_resolutions, **block)
        skips = [m.out_channels for m in self.enc.values()]
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = SongUNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = SongUNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = SongUNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = SongUNetBlock(
                    cin, cout, attention=res in attn_resolutions, takes_skip=True, **block)
        self.out_norm = group_norm(cout, eps=1e-5)
        self.out_conv = nn.Conv2d(cout, out_channels, 3, padding=1)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """EDM's ``adm`` initialisation: PyTorch's default layers, zeros at the end of every branch."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.reset_parameters()
        zero = [self.out_conv, getattr(self, "map_augment", None)]
        for m in self.modules():
            if isinstance(m, SongUNetBlock):
                zero += [m.conv1, getattr(m, "proj", None)]
        for m in filter(None, zero):
            m.weight.zero_()
            if m.bias is not None:
                m.bias.zero_()

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        noise_labels = check_unet_input("DhariwalUNet", x, noise_labels, self.in_channels, self.factor)
        emb = self.map_noise(noise_labels).to(self.map_layer0.weight.dtype)
        if self.augment_dim and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            y = class_one_hot("DhariwalUNet", class_labels, self.num_classes, x.shape[0], x.device)
            emb = emb + self.map_label(y.to(emb.dtype))
        emb = F.silu(emb)
        skips = []
        for m in self.enc.values():
            x = m(x, emb) if isinstance(m, SongUNetBlock) else m(x)
            skips.append(x)
        for m in self.dec.values():
            if m.takes_skip:
                x = torch.cat([x, skips.pop()], dim=1)
            x = m(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))
