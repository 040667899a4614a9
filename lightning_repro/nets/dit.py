"""DiT: Diffusion Transformer with adaLN-Zero conditioning.

Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023 (reference code:
facebookresearch/DiT ``models.py``). The image is cut into ``p x p`` patches (a strided conv), a fixed
2-D sine-cosine position embedding (MAE, He et al. 2022) is added, and ``depth`` transformer blocks are
conditioned on ``c = t_emb + y_emb`` by adaptive layer norm: each block regresses
``(shift, scale, gate)`` for its attention and MLP branches from ``c``,
``x <- x + gate * Branch(LN(x) * (1 + scale) + shift)``. The modulation and the final linear layer are
zero-initialised ("adaLN-Zero"), so at initialisation every block is the identity and the network
outputs zeros. ``t_emb`` is a 256-dim sinusoidal embedding followed by an MLP; ``y_emb`` is a label
table with one extra null row for classifier-free guidance (label -1). Label dropout is done by the
training module (it replaces labels by -1), not here.

In pixel space on CIFAR-10 (32x32x3, ``learn_sigma=False``, 10 classes + null row; the frozen position
embedding is counted as a parameter with ``requires_grad=False``, as in the reference) DiT-S/2 has
32,573,964 and DiT-B/2 129,733,644 parameters. Parameter names follow the reference code.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from einops import rearrange
from timm.layers import Mlp
from torch import Tensor, nn

from lightning_repro.nets.embeddings import timestep_embedding
from lightning_repro.nets.uvit import Attention, check_class_labels, check_input, check_patch_size

__all__ = ["DiTNet", "DiT", "DiTBlock", "DIT_CONFIGS", "DiT_S_2", "DiT_B_2", "sincos_pos_embed_2d"]

#: Named DiT sizes (Peebles & Xie 2023, Table 1).
DIT_CONFIGS: dict[str, dict[str, Any]] = {
    "DiT-S/2": dict(patch_size=2, hidden_size=384, depth=12, num_heads=6),
    "DiT-S/4": dict(patch_size=4, hidden_size=384, depth=12, num_heads=6),
    "DiT-B/2": dict(patch_size=2, hidden_size=768, depth=12, num_heads=12),
    "DiT-B/4": dict(patch_size=4, hidden_size=768, depth=12, num_heads=12),
    "DiT-L/2": dict(patch_size=2, hidden_size=1024, depth=24, num_heads=16),
    "DiT-XL/2": dict(patch_size=2, hidden_size=1152, depth=28, num_heads=16),
}


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> Tensor:
    """MAE's fixed 2-D sine-cosine position embedding, (grid_size**2, embed_dim) float32, tokens row-major.

    The first half of the channels encodes the column index and the second half the row index, each as
    ``[sin(pos * w_i), cos(pos * w_i)]`` with ``w_i = 10000^(-i / (embed_dim / 4))`` (computed in float64).
    """
    if embed_dim % 4:
        raise ValueError(f"sincos_pos_embed_2d: embed_dim={embed_dim} must be divisible by 4.")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def embed_1d(p: Tensor) -> Tensor:
        args = p.reshape(-1, 1) * omega[None]
        return torch.cat([args.sin(), args.cos()], dim=1)

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """Adaptive layer-norm modulation ``x * (1 + scale) + shift`` with per-sample (B, D) shift and scale."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (Peebles & Xie 2023, Fig. 3)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        gelu_tanh = functools.partial(nn.GELU, approximate="tanh")
        self.mlp = Mlp(
            in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio), act_layer=gelu_tanh
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=1
        )
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm followed by a linear map to ``patch_size**2 * out_channels`` per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiTNet(nn.Module):
    """DiT denoiser network (Peebles & Xie 2023): ``forward(x, noise_labels, class_labels=None)``.

    ``num_classes == 0`` builds an unconditional model (no label embedder; labels are ignored). Otherwise
    the label table has ``num_classes + 1`` rows when ``class_dropout_prob > 0`` (the last row is the null
    class, selected by label -1 or by ``class_labels=None``) and ``num_classes`` rows when it is 0 (as in the
    reference; then -1 is rejected). ``class_dropout_prob`` is stored for the training module, which does
    the dropout. ``learn_sigma=True`` doubles the output channels (mean and variance, as in the reference).
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        num_classes: int = 0,
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = False,
    ):
        super().__init__()
        check_patch_size("DiT", img_resolution, patch_size)
        if num_classes < 0:
            raise ValueError(f"DiT: num_classes must be >= 0 (0 = unconditional), got {num_classes}.")
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"DiT: class_dropout_prob must be in [0, 1), got {class_dropout_prob}.")
        self.img_resolution, self.in_channels, self.patch_size = img_resolution, in_channels, patch_size
        self.out_channels = out_channels * 2 if learn_sigma else out_channels
        self.num_classes, self.class_dropout_prob, self.learn_sigma = (
            num_classes,
            class_dropout_prob,
            learn_sigma,
        )
        self.has_null_class = num_classes > 0 and class_dropout_prob > 0

        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = nn.Module()
        self.t_embedder.frequency_embedding_size = 256
        self.t_embedder.mlp = nn.Sequential(
            nn.Linear(256, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        if num_classes > 0:
            self.y_embedder = nn.Module()
            self.y_embedder.embedding_table = nn.Embedding(
                num_classes + int(self.has_null_class), hidden_size
            )
        else:
            self.y_embedder = None
        grid = img_resolution // patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference initialisation: Xavier-uniform linears, sin-cos pos-embed, N(0, 0.02^2) embeddings, adaLN-Zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        grid = self.img_resolution // self.patch_size
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid)[None])
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like an nn.Linear on flattened patches
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [*(b.adaLN_modulation[-1] for b in self.blocks), self.final_layer.adaLN_modulation[-1]]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def condition(
        self, noise_labels: Tensor, class_labels: Tensor | None, batch: int, dtype: torch.dtype
    ) -> Tensor:
        """The conditioning vector ``c = t_emb + y_emb``, (B, hidden_size)."""
        noise_labels = noise_labels.reshape(-1).expand(batch) if noise_labels.numel() == 1 else noise_labels
        c = self.t_embedder.mlp(timestep_embedding(noise_labels, 256, flip=True).to(dtype))
        if self.y_embedder is not None:
            device = c.device
            if class_labels is None:
                if not self.has_null_class:
                    raise ValueError(
                        "DiT: class_labels are required, this model has no null class (class_dropout_prob=0)."
                    )
                class_labels = torch.full((batch,), -1, dtype=torch.long, device=device)
            labels = check_class_labels("DiT", class_labels, self.num_classes, batch, self.has_null_class)
            labels = torch.where(labels < 0, self.num_classes, labels)
            c = c + self.y_embedder.embedding_table(labels)
        return c

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """Map (B, C_in, H, W) images, (B,) noise labels and optional (B,) int labels to (B, C_out, H, W)."""
        check_input("DiT", x, self.in_channels, self.img_resolution)
        h = rearrange(self.x_embedder.proj(x), "b d h w -> b (h w) d") + self.pos_embed
        c = self.condition(noise_labels, class_labels, x.shape[0], h.dtype)
        for block in self.blocks:
            h = block(h, c)
        h = self.final_layer(h, c)
        side = self.img_resolution // self.patch_size
        return rearrange(
            h, "b (h w) (p q c) -> b c (h p) (w q)", h=side, p=self.patch_size, q=self.patch_size
        )


#: the old name of ``DiTNet`` (the ``DiffusionModule`` preset is ``lightning_repro.module.DiT``)
DiT = DiTNet


def DiT_S_2(img_resolution: int, in_channels: int, out_channels: int, **kwargs: Any) -> DiTNet:
    """DiT-S/2: patch 2, width 384, depth 12, 6 heads."""
    return DiTNet(img_resolution, in_channels, out_channels, **{**DIT_CONFIGS["DiT-S/2"], **kwargs})


def DiT_B_2(img_resolution: int, in_channels: int, out_channels: int, **kwargs: Any) -> DiTNet:
    """DiT-B/2: patch 2, width 768, depth 12, 12 heads."""
    return DiTNet(img_resolution, in_channels, out_channels, **{**DIT_CONFIGS["DiT-B/2"], **kwargs})
