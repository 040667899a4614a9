"""U-ViT: a ViT backbone for diffusion with long skip connections.

Bao et al., "All are Worth Words: A ViT Backbone for Diffusion Models", CVPR 2023 (reference code:
baofff/U-ViT ``libs/uvit.py``). Every input is a token: the image patches (a ``p x p`` conv), the time
``t`` (sinusoidal embedding, optionally followed by an MLP) and, for class-conditional models, the class
label (an ``nn.Embedding`` with one extra row, the null class of classifier-free guidance). ``depth // 2``
in-blocks, one mid-block and ``depth // 2`` out-blocks of pre-LN transformer layers; out-block ``i``
receives the output of in-block ``depth // 2 - 1 - i`` through a long skip
``h <- Linear([h, skip])`` (Eq. "concatenate then linear" of the paper). The patch tokens are decoded by a
linear layer, un-patchified, and refined by a 3x3 conv.

Parameter names follow the reference code, so its checkpoints load with ``load_state_dict``. Attention
always goes through ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels
on GPU).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Mlp
from torch import Tensor, nn

from lightning_repro.nets.embeddings import timestep_embedding

__all__ = ["UViTNet", "UViT", "UVIT_CONFIGS", "Attention", "check_patch_size", "check_input", "check_class_labels"]

#: Named U-ViT sizes (Bao et al. 2023, Table 1; ``depth`` is the reference config's value, the model has
#: ``depth + 1`` transformer blocks). U-ViT-S/2 is the reference CIFAR-10 model (44.3M parameters).
UVIT_CONFIGS: dict[str, dict[str, Any]] = {
    "U-ViT-S/2": dict(
        patch_size=2,
        embed_dim=512,
        depth=12,
        num_heads=8,
        mlp_ratio=4.0,
        qkv_bias=False,
        mlp_time_embed=False,
    ),
    "U-ViT-S/2-Deep": dict(
        patch_size=2,
        embed_dim=512,
        depth=16,
        num_heads=8,
        mlp_ratio=4.0,
        qkv_bias=False,
        mlp_time_embed=False,
    ),
    "U-ViT-M/2": dict(
        patch_size=2,
        embed_dim=768,
        depth=16,
        num_heads=12,
        mlp_ratio=4.0,
        qkv_bias=False,
        mlp_time_embed=False,
    ),
}


def check_patch_size(model: str, img_resolution: int, patch_size: int) -> None:
    """Raise ValueError unless ``img_resolution`` is a positive multiple of ``patch_size``."""
    if patch_size < 1 or img_resolution < 1 or img_resolution % patch_size:
        raise ValueError(
            f"{model}: img_resolution={img_resolution} is not divisible by patch_size={patch_size}; "
            "choose a patch size that divides the image resolution."
        )


def check_input(model: str, x: Tensor, in_channels: int, img_resolution: int) -> None:
    """Raise ValueError unless ``x`` has shape (B, in_channels, img_resolution, img_resolution)."""
    if (
        x.ndim != 4
        or x.shape[1] != in_channels
        or x.shape[2] != img_resolution
        or x.shape[3] != img_resolution
    ):
        raise ValueError(
            f"{model}: expected x of shape (B, {in_channels}, {img_resolution}, {img_resolution}), "
            f"got {tuple(x.shape)}."
        )


def check_class_labels(
    model: str, class_labels: Tensor, num_classes: int, batch: int, allow_null: bool
) -> Tensor:
    """Validate (B,) integer labels in ``[-1, num_classes)`` (``[0, num_classes)`` without a null class).

    Returns the labels as int64. The range check reads the labels, so it runs only on host tensors (labels
    on an accelerator were checked where they were made, ``sampling.sample`` or the data module; a read
    would be a host-device sync in every sampling step) and not while ``torch.compile`` traces.
    """
    if class_labels.shape != (batch,) or class_labels.is_floating_point() or class_labels.is_complex():
        raise ValueError(
            f"{model}: class_labels must be an integer tensor of shape ({batch},), "
            f"got {class_labels.dtype} of shape {tuple(class_labels.shape)}."
        )
    class_labels = class_labels.long()
    if not torch.compiler.is_compiling() and batch > 0 and class_labels.device.type == "cpu":
        lo, hi = int(class_labels.min()), int(class_labels.max())
        low = -1 if allow_null else 0
        if lo < low or hi >= num_classes:
            bad = lo if lo < low else hi
            raise ValueError(
                f"{model}: class label {bad} is out of range; expected labels in [{low}, {num_classes - 1}]"
                + (" (-1 = the null class)." if allow_null else " (this model has no null class).")
            )
    return class_labels


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` (Vaswani et al. 2017).

    Same parameters (``qkv``, ``proj``) and packing ``(3, heads, head_dim)`` of the qkv projection as
    ``timm.models.vision_transformer.Attention`` and the U-ViT / DiT reference code.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim={dim} is not divisible by num_heads={num_heads}.")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "b l (k h d) -> k b h l d", k=3, h=self.num_heads).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(x, "b h l d -> b l (h d)"))


class UViTBlock(nn.Module):
    """Pre-LN transformer block ``x += Attn(LN(x)); x += MLP(LN(x))`` with an optional long-skip input."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, skip: bool = False):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViTNet(nn.Module):
    """U-ViT denoiser network (Bao et al. 2023): ``forward(x, noise_labels, class_labels=None)``.

    ``depth`` follows the reference config: ``depth // 2`` in-blocks, one mid-block and ``depth // 2``
    out-blocks (U-ViT-S/2: depth 12, i.e. 13 blocks). With ``num_classes > 0`` a label token is prepended
    (embedding table of ``num_classes + 1`` rows; label -1, or ``class_labels=None``, selects the null row
    used for classifier-free guidance). With ``num_classes == 0`` labels are ignored.
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        num_classes: int = 0,
        patch_size: int = 2,
        embed_dim: int = 512,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        mlp_time_embed: bool = False,
        conv: bool = True,
        skip: bool = True,
    ):
        super().__init__()
        check_patch_size("UViT", img_resolution, patch_size)
        if num_classes < 0:
            raise ValueError(f"UViT: num_classes must be >= 0 (0 = unconditional), got {num_classes}.")
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.num_classes, self.patch_size, self.embed_dim = num_classes, patch_size, embed_dim

        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.time_embed = (
            nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, embed_dim))
            if mlp_time_embed
            else nn.Identity()
        )
        self.label_emb = nn.Embedding(num_classes + 1, embed_dim) if num_classes > 0 else None
        self.extras = 2 if num_classes > 0 else 1
        num_patches = (img_resolution // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, embed_dim))

        block = dict(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias)
        self.in_blocks = nn.ModuleList([UViTBlock(**block) for _ in range(depth // 2)])
        self.mid_block = UViTBlock(**block)
        self.out_blocks = nn.ModuleList([UViTBlock(**block, skip=skip) for _ in range(depth // 2)])
        self.skip = skip

        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, patch_size**2 * out_channels)
        self.final_layer = nn.Conv2d(out_channels, out_channels, 3, padding=1) if conv else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference initialisation: truncated N(0, 0.02^2) for linear weights and the position embedding."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """Map (B, C_in, H, W) images, (B,) noise labels and optional (B,) int labels to (B, C_out, H, W)."""
        check_input("UViT", x, self.in_channels, self.img_resolution)
        batch = x.shape[0]
        noise_labels = noise_labels.reshape(-1).expand(batch) if noise_labels.numel() == 1 else noise_labels
        tokens = rearrange(self.patch_embed.proj(x), "b d h w -> b (h w) d")
        time_token = self.time_embed(
            timestep_embedding(noise_labels, self.embed_dim, flip=True).to(tokens.dtype)
        )
        extra = [time_token[:, None]]
        if self.label_emb is not None:
            if class_labels is None:
                class_labels = torch.full((batch,), -1, dtype=torch.long, device=x.device)
            labels = check_class_labels("UViT", class_labels, self.num_classes, batch, allow_null=True)
            labels = torch.where(labels < 0, self.num_classes, labels)
            extra.insert(0, self.label_emb(labels)[:, None])
        h = torch.cat([*extra, tokens], dim=1) + self.pos_embed

        skips = []
        for blk in self.in_blocks:
            h = blk(h)
            skips.append(h)
        h = self.mid_block(h)
        for blk in self.out_blocks:
            h = blk(h, skips.pop())

        h = self.decoder_pred(self.norm(h))[:, self.extras :]
        side = self.img_resolution // self.patch_size
        out = rearrange(h, "b (h w) (p q c) -> b c (h p) (w q)", h=side, p=self.patch_size, q=self.patch_size)
        return self.final_layer(out)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters the reference excludes from weight decay."""
        return {"pos_embed"}


#: the old name of ``UViTNet`` (the ``DiffusionModule`` preset is ``lightning_repro.module.UViT``)
UViT = UViTNet
