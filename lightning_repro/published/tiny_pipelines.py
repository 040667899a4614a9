"""Tiny random diffusers pipelines written with ``save_pretrained`` (offline tests and ``--quick`` study runs).

``write_unet_pipeline``: a UNet2DModel + scheduler (DDPM-style pixel pipeline).  ``write_sd_pipeline``: a Stable
Diffusion v1 layout (UNet2DConditionModel, AutoencoderKL, CLIPTextModel and a CLIPTokenizer over a letter vocabulary
written here) with an SD-v1 DDIM schedule.  ``write_dit_pipeline``: a class-conditional DiTTransformer2DModel + AutoencoderKL.  Weights are random (``torch.manual_seed(seed)``), modules in eval mode; shapes are a few
channels at 8 x 8 (latents) so they run on a CPU in seconds.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch

__all__ = ["write_unet_pipeline", "write_sd_pipeline", "write_dit_pipeline", "tiny_tokenizer", "SD_V1_SCHEDULER"]

#: Stable Diffusion v1's schedule (scaled-linear betas, leading spacing with offset 1, final alpha_bar_0)
SD_V1_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
    steps_offset=1,
)  # fmt: skip


def write_unet_pipeline(path: str | Path, scheduler, seed: int = 0, size: int = 8) -> Path:
    """A random UNet2DModel (3 x size x size, 2 levels of 8 channels) with ``scheduler``, saved under ``path``."""
    from diffusers import DDPMPipeline, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=size, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )  # fmt: skip
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    return Path(path)


def tiny_tokenizer(max_length: int = 12):
    """A CLIPTokenizer over single letters and no merges (vocab.json / merges.txt written to a temporary folder)."""
    from transformers import CLIPTokenizer

    vocab = ["<|startoftext|>", "<|endoftext|>", *string.ascii_lowercase, *(c + "</w>" for c in string.ascii_lowercase)]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        tok = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=max_length)
    return tok


def write_sd_pipeline(path: str | Path, seed: int = 0, latent_size: int = 8):
    """A random Stable-Diffusion-v1-layout pipeline (images 3 x 2*latent_size^2) saved under ``path``; returns it."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
    )  # fmt: skip
    vae = _tiny_vae(2 * latent_size)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
        max_position_embeddings=tok.model_max_length, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text.eval(), tokenizer=tok, unet=unet.eval(), scheduler=DDIMScheduler(**SD_V1_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(path)
    return pipe


def _tiny_vae(image_size: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4,
        sample_size=image_size,
    )  # fmt: skip


def write_dit_pipeline(path: str | Path, scheduler, seed: int = 0, latent_size: int = 4):
    """A random DiT pipeline (1,000 classes as DiTPipeline assumes, learned sigma, one block) saved under ``path``."""
    from diffusers import DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    net = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8, num_layers=1,
        sample_size=latent_size, patch_size=2, num_embeds_ada_norm=1000,
    )  # fmt: skip
    pipe = DiTPipeline(transformer=net.eval(), vae=_tiny_vae(2 * latent_size).eval(), scheduler=scheduler)  # eval: no label dropout
    pipe.save_pretrained(path)
    return pipe
