"""The ``Multistage`` preset: the multi-decoder DDPM++ U-Net of Zhang et al. (CVPR 2024, "Improving Training
Efficiency of Diffusion Models via Multi-Stage Framework and Tailored Multi-Decoder Architectures") trained with the
suite's kernels and losses (``DiffusionModule``; the network is ``nets.multistage.MultistageUNet``).

Stages are intervals of sigma in the EDM variable, ``(0, b_1], (b_1, b_2], ..., (b_{S-1}, inf)``; each sample of a
batch is routed to the decoder of its interval (the preconditioning's ``c_noise`` is increasing in sigma, so the
boundaries are mapped to ``c_noise`` once).  ``STAGE_PRESETS``:

* 3 stages, the paper's (reference code ``edm/training/networks.py`` ``MultistageUNet`` defaults and
  ``edm/train.py --arch=ddpmpp-multistage``): sigma boundaries 2.5103 and 7.6577 (the DPM-Solver code's VP-SDE times
  t = 0.4420, 0.6308, found by the paper's optimal-denoiser clustering, Sec. 4.2), decoder widths 192, 128, 16 from
  low to high noise, encoder width 128.
* 4 and 5 stages: the reference code ships only the 3-stage boundaries, so these refine them, keeping the paper's
  boundaries and widths: 4 stages split the widest interval in VP time, [0, 0.4420], at t = 0.2210
  (sigma = 0.8137, beta 0.1 .. 20); 5 stages also split [0.6308, 1] at t = 0.8154 (sigma = 28.4434).  A split
  stage's halves keep its decoder width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .diffusion_module import DiffusionModule
from .precond import PRECONDS

__all__ = ["Multistage", "STAGE_PRESETS"]

#: number of stages -> (sigma boundaries, decoder widths low -> high noise)
STAGE_PRESETS: dict[int, tuple[tuple[float, ...], tuple[int, ...]]] = {
    3: ((2.5103, 7.6577), (192, 128, 16)),
    4: ((0.8137, 2.5103, 7.6577), (192, 192, 128, 16)),
    5: ((0.8137, 2.5103, 7.6577, 28.4434), (192, 192, 128, 16, 16)),
}


class Multistage(DiffusionModule):
    """Multi-decoder DDPM++ (Zhang et al. 2024) with any kernel.

    Args (besides ``DiffusionModule``'s):
        model_channels, channel_mult, num_blocks, attn_resolutions, dropout: the shared encoder (and the mapping
            network), as ``DDPMpp``'s; CIFAR-10: 128, [2, 2, 2], 4, [16], 0.13.
        stages: 3, 4 or 5: the boundaries and decoder widths of ``STAGE_PRESETS``.
        stage_sigmas: the sigma boundaries instead (increasing, inside the kernel's (sigma_min, sigma_max)).
        decoder_channels: the decoders' widths instead, low noise first (one more than the boundaries).
    """

    arch = "multistage"
    public_path = "lightning_repro.module.Multistage"
    attention_patterns = ("*.qkv.*", "*.proj.*", "*.norm2.*")  # SongUNetBlock self-attention (+ its GroupNorm)

    def __init__(self, model_channels: int = 128, channel_mult: list[int] = (2, 2, 2), num_blocks: int = 4,
                 attn_resolutions: list[int] = (16,), dropout: float = 0.10, stages: int | None = 3,
                 stage_sigmas: list[float] | None = None, decoder_channels: list[int] | None = None,
                 kernel: str = "edm", **kwargs):
        sigmas, widths = self.stage_layout(stages, stage_sigmas, decoder_channels)
        self._net_cfg = dict(model_channels=model_channels, channel_mult=tuple(channel_mult), num_blocks=num_blocks,
                             attn_resolutions=tuple(attn_resolutions), dropout=dropout, stage_sigmas=sigmas,
                             decoder_channels=widths)
        super().__init__(kernel=kernel, **kwargs)

    @staticmethod
    def stage_layout(stages, stage_sigmas, decoder_channels) -> tuple[list[float], list[int]]:
        """(sigma boundaries, decoder widths) from a preset and/or explicit lists, checked for agreement."""
        if stages is not None and stages not in STAGE_PRESETS:
            raise ValueError(f"stages must be one of {sorted(STAGE_PRESETS)} (the presets), or null with "
                             f"stage_sigmas and decoder_channels; got {stages!r}.")
        preset = STAGE_PRESETS.get(stages, (None, None))
        sigmas = [float(s) for s in (stage_sigmas if stage_sigmas is not None else preset[0] or [])]
        widths = [int(c) for c in (decoder_channels if decoder_channels is not None else preset[1] or [])]
        if not widths or len(widths) != len(sigmas) + 1:
            raise ValueError(f"Multistage needs one decoder width per stage, one more than the stage boundaries; got "
                             f"stage_sigmas {sigmas} and decoder_channels {widths}.")
        if any(b <= a for a, b in zip(sigmas, sigmas[1:])):
            raise ValueError(f"stage_sigmas must increase strictly, got {sigmas}.")
        return sigmas, widths

    def stage_boundaries(self) -> list[float]:
        """The sigma boundaries as the network's noise labels (``c_noise`` of this preconditioning)."""
        lo, hi = self.kernel.sigma_min, self.kernel.sigma_max
        sigmas = self._net_cfg["stage_sigmas"]
        for s in sigmas:
            if not lo < s < hi:
                raise ValueError(f"stage boundary sigma={s:g} lies outside the {self.kernel.name} kernel's noise range "
                                 f"({lo:g}, {hi:g}); every boundary must split it.")
        precond = PRECONDS[self.precond_name](nn.Identity(), self.kernel)
        c_noise = precond.coefficients(torch.tensor(sigmas, dtype=torch.float64))[3].double().tolist()
        if any(b <= a for a, b in zip(c_noise, c_noise[1:])):
            raise ValueError(f"the {self.precond_name} preconditioning's noise labels do not increase with sigma "
                             f"over {sigmas}; stages cannot be told apart.")
        return c_noise

    def build_net(self) -> nn.Module:
        from .nets.multistage import MultistageUNet

        cfg: dict[str, Any] = dict(self._net_cfg)
        cfg.pop("stage_sigmas")
        return MultistageUNet(**self.net_kwargs(), **cfg, stage_boundaries=self.stage_boundaries())
