"""The multi-decoder DDPM++ U-Net of Zhang et al. (CVPR 2024), "Improving Training Efficiency of Diffusion Models
via Multi-Stage Framework and Tailored Multi-Decoder Architectures", Sec. 4 / Fig. 1(c): ``MultistageUNet``.

The noise range is cut into stages (intervals of the network's noise label); one encoder (and mapping network) is
shared by every stage and each stage has its own decoder, of its own width.  Each sample of a batch goes through
the encoder once and through the decoder of its stage (the reference code, ``edm/training/networks.py``
``MultistageUNet``, sends a whole batch to the stage of its first sample and draws one stage per batch).

Encoder, mapping network and each decoder are exactly those of ``edm_unet.SongUNet`` (EDM's ``ddpmpp``): a decoder
is SongUNet's decoder at ``decoder_channels[k]`` (its two bottleneck blocks keep the encoder's width) followed by
its own output ``GroupNorm`` + 3x3 conv.  The network knows nothing of sigma: ``stage_boundaries`` are increasing
values of the noise label ``c_noise`` it receives (the preset, ``multistage.Multistage``, maps the paper's sigma
boundaries through its preconditioning); sample ``i`` goes to stage ``k`` with ``b_{k-1} < c_noise_i <= b_k``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .edm_unet import SongUNet, check_unet_input, group_norm, xavier_init

__all__ = ["MultistageUNet", "StageDecoder"]


class StageDecoder(nn.Module):
    """One stage's decoder: SongUNet's decoder blocks (a ``ModuleDict``), then ``conv3x3(silu(GroupNorm(h)))``."""

    def __init__(self, blocks: nn.ModuleDict, out_channels: int):
        super().__init__()
        self.blocks = blocks
        width = list(blocks.values())[-1].out_channels
        self.out_norm = group_norm(width)
        self.out_conv = xavier_init(nn.Conv2d(width, out_channels, 3, padding=1), gain=1e-5)

    def forward(self, x: Tensor, skips: list[Tensor], emb: Tensor) -> Tensor:
        skips = list(skips)
        for m in self.blocks.values():
            if m.takes_skip:
                x = torch.cat([x, skips.pop()], dim=1)
            x = m(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


class MultistageUNet(SongUNet):
    """SongUNet with one shared encoder and ``len(decoder_channels)`` stage decoders.

    Args (besides SongUNet's; ``model_channels`` is the encoder's width):
        decoder_channels: base width of each stage's decoder, lowest noise first (CIFAR-10, 3 stages: 192, 128, 16).
        stage_boundaries: ``len(decoder_channels) - 1`` strictly increasing noise labels between the stages.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, model_channels: int = 128,
                 channel_mult: Sequence[int] = (2, 2, 2), num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 decoder_channels: Sequence[int] = (192, 128, 16), stage_boundaries: Sequence[float] = (0.0, 0.5),
                 **kwargs):
        widths = [int(c) for c in decoder_channels]
        bounds = [float(b) for b in stage_boundaries]
        if not widths or min(widths) < 1:
            raise ValueError(f"MultistageUNet: decoder_channels must be positive widths, got {list(decoder_channels)}.")
        if len(bounds) != len(widths) - 1 or not all(map(math.isfinite, bounds)) or any(
                b <= a for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"MultistageUNet: {len(widths)} decoders need {len(widths) - 1} finite, strictly "
                             f"increasing stage boundaries, got {bounds}.")
        channel_mult, attn = tuple(int(m) for m in channel_mult), tuple(int(r) for r in attn_resolutions)
        super().__init__(img_resolution, in_channels, out_channels, model_channels=model_channels,
                         channel_mult=channel_mult, num_blocks=num_blocks, attn_resolutions=attn, **kwargs)
        self.register_buffer("stage_boundaries", torch.tensor(bounds, dtype=torch.float64), persistent=False)
        shared = next(iter(self.dec.values()))  # the bottleneck block: the settings SongUNet built its blocks with
        block = dict(emb_channels=shared.affine.in_features, num_heads=shared.num_heads, dropout=shared.dropout,
                     resample_filter=kwargs.get("resample_filter", (1, 1)))
        bottleneck = shared.in_channels
        del self.dec, self.out_norm, self.out_conv  # SongUNet's single decoder gives way to the stage decoders
        self.decoders = nn.ModuleList(
            StageDecoder(self._decoder(bottleneck, w, channel_mult, num_blocks, attn, block), out_channels)
            for w in widths)

    @property
    def num_stages(self) -> int:
        return len(self.decoders)

    def stage_of(self, noise_labels: Tensor) -> Tensor:
        """The stage index (int64, (B,)) of each noise label: ``k`` with ``b_{k-1} < c_noise <= b_k``."""
        return torch.bucketize(noise_labels.to(torch.float64), self.stage_boundaries.to(noise_labels.device))

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        noise_labels = check_unet_input("MultistageUNet", x, noise_labels, self.in_channels, self.factor)
        emb = self.embedding(x, noise_labels, class_labels, augment_labels)
        h, skips = self.encode(x, emb)
        stage = self.stage_of(noise_labels)
        out = None
        for k, decoder in enumerate(self.decoders):  # each decoder sees only the rows of its stage
            rows = (stage == k).nonzero().flatten()
            if rows.numel() == 0:
                continue
            if rows.numel() == x.shape[0]:  # the whole batch in one stage (sampling: one sigma for all)
                return decoder(h, skips, emb)
            y = decoder(h[rows], [s[rows] for s in skips], emb[rows])
            if out is None:
                out = y.new_zeros((x.shape[0], *y.shape[1:]))
            out = out.index_copy(0, rows, y)
        return out
