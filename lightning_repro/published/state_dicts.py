"""Released state dicts of baofff/U-ViT (``nnet_ema.pth``, Bao et al. 2023) and facebookresearch/DiT (``*.pt``,
Peebles & Xie 2023) mapped onto the suite's ``nets.uvit.UViT`` / ``nets.dit.DiT``.

Parameter names already match; the configuration is read from the tensor shapes (width, patch, depth, MLP ratio,
resolution, label rows, U-ViT's ``qkv_bias`` / ``mlp_time_embed`` / ``conv``), except ``num_heads`` (a table of
the released widths unless given).  Two layouts differ:

* the class-embedding table: the suite keeps the null class (label -1) in the LAST row.  ``null_row="last"`` (the
  references' classifier-free-guidance tables, U-ViT ``num_classes=1001``, DiT ``num_classes + 1``) copies it;
  ``"first"`` moves row 0 to the end; ``"none"`` (a table without a null row) keeps every row as a class (DiT
  then rejects -1; U-ViT gets a zero null row, which the model never saw);
* DiT's ``learn_sigma``: the final layer predicts ``2C`` channels (epsilon, then the variance interpolation);
  only the epsilon half is kept (rows of ``final_layer.linear`` whose channel index, the fastest of ``(p q c)``,
  is below C).

Noise kernels: U-ViT's pixel models are continuous VP epsilon-predictors fed ``999 t`` (``vp`` + ``eps``); DiT is
DDPM's 1000-step linear schedule fed the timestep (``vp_discrete`` + ``ddpm``).  Latent models (4 input
channels, e.g. DiT's released ImageNet models: 4 x 32 x 32 latents of the Stable Diffusion VAE) are read with
``latent=True`` only (their ``image_shape`` is then the latent shape; the caller decodes with the VAE, the
``?vae=`` option of the ``uvit:`` / ``dit:`` references); without it they are refused.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .network import PublishedNet, sha256_of

__all__ = ["read_uvit", "read_dit", "HEADS", "NULL_ROWS"]

HEADS = {384: 6, 512: 8, 768: 12, 1024: 16, 1152: 16}  # released widths -> attention heads (U-ViT, DiT)
NULL_ROWS = ("last", "first", "none")


def _load(path: str | Path, what: str) -> tuple[dict[str, Tensor], Path]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} state dict {path} does not exist.")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{what} state dict {path} could not be read with weights_only=True: "
                         f"{type(err).__name__}.") from None
    if isinstance(sd, dict) and isinstance(sd.get("ema"), dict):  # a training checkpoint {"model", "ema", ...}
        sd = sd["ema"]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{path} is not a {what} state dict (a mapping of parameter names to tensors).")
    return dict(sd), path


def _require(sd: dict[str, Tensor], key: str, path: Path, what: str) -> Tensor:
    if key not in sd:
        raise ValueError(f"{path} is not a {what} state dict: it has no {key!r}.")
    return sd[key]


def _heads(width: int, num_heads: int | None, path: Path) -> int:
    if num_heads is None:
        if width not in HEADS:
            raise ValueError(f"{path}: width {width} is not a released configuration; give num_heads (e.g. ?num_heads=8).")
        num_heads = HEADS[width]
    if width % int(num_heads):
        raise ValueError(f"{path}: num_heads {num_heads} does not divide the width {width}.")
    return int(num_heads)


def _labels(table: Tensor, null_row: str, path: Path) -> tuple[int, Tensor, bool]:
    """(num_classes, table with the null row last, has a null row) for ``null_row`` in ``NULL_ROWS``."""
    if null_row not in NULL_ROWS:
        raise ValueError(f"null_row must be one of {', '.join(NULL_ROWS)}, got {null_row!r}.")
    if null_row == "none":
        return table.shape[0], table, False
    if table.shape[0] < 2:
        raise ValueError(f"{path}: a class table of {table.shape[0]} row(s) cannot hold classes and a null row.")
    if null_row == "first":
        table = torch.cat([table[1:], table[:1]])
    return table.shape[0] - 1, table, True


def _pixel_only(channels: int, path: Path, what: str, latent: bool = False) -> None:
    """Pixel models pass; a latent one (4 channels) only with ``latent`` (its VAE given), and ``latent`` only it."""
    if channels == 4 and not latent:
        raise ValueError(f"{path} is a latent {what} (4 channels), which needs the Stable Diffusion VAE decoder; "
                         "only pixel-space models are supported here.")
    if latent and channels != 4:
        raise ValueError(f"{path} is a pixel-space {what} ({channels} channels); a VAE (?vae=) applies to latent "
                         "models (4 channels) only.")


def read_uvit(path: str | Path, num_heads: int | None = None, null_row: str = "last",
              kernel: str = "vp", latent: bool = False) -> PublishedNet:
    """baofff/U-ViT state dict -> ``PublishedNet`` (``UViT``, epsilon-prediction on ``kernel``; ``latent``: a
    4-channel latent model is accepted)."""
    sd, path = _load(path, "U-ViT")
    w = _require(sd, "patch_embed.proj.weight", path, "U-ViT")
    width, channels, patch = w.shape[0], w.shape[1], w.shape[-1]
    _pixel_only(channels, path, "U-ViT", latent)
    kw: dict[str, Any] = {"in_channels": channels, "patch_size": patch, "embed_dim": width}
    kw["depth"] = 2 * len({k.split(".")[1] for k in sd if k.startswith("in_blocks.")})
    kw["mlp_ratio"] = _require(sd, "mid_block.mlp.fc1.weight", path, "U-ViT").shape[0] / width
    kw["num_heads"] = _heads(width, num_heads, path)
    kw.update(qkv_bias="mid_block.attn.qkv.bias" in sd, mlp_time_embed="time_embed.0.weight" in sd,
              conv="final_layer.weight" in sd, skip="out_blocks.0.skip_linear.weight" in sd)
    kw["out_channels"] = _require(sd, "decoder_pred.weight", path, "U-ViT").shape[0] // patch**2
    extras, num_classes = 1, 0
    if "label_emb.weight" in sd:
        num_classes, table, has_null = _labels(sd["label_emb.weight"], null_row, path)
        sd["label_emb.weight"] = table if has_null else torch.cat([table, table.new_zeros(1, width)])
        extras = 2
    kw["num_classes"] = num_classes
    kw["img_resolution"] = patch * math.isqrt(_require(sd, "pos_embed", path, "U-ViT").shape[1] - extras)
    info = {"format": "uvit-state-dict", "arch": "uvit", "kernel": kernel, "sha256": sha256_of(path),
            "null_row": null_row if num_classes else None, "latent": bool(latent)}
    return PublishedNet("UViT", {"img_resolution": kw.pop("img_resolution"), **kw}, sd, "eps",
                        {"name": kernel, "kwargs": {}}, info)


def read_dit(path: str | Path, num_heads: int | None = None, null_row: str = "last",
             kernel: str = "vp_discrete", latent: bool = False) -> PublishedNet:
    """facebookresearch/DiT state dict -> ``PublishedNet`` (``DiT`` without ``learn_sigma``, DDPM timesteps;
    ``latent``: a 4-channel latent model is accepted)."""
    sd, path = _load(path, "DiT")
    w = _require(sd, "x_embedder.proj.weight", path, "DiT")
    width, channels, patch = w.shape[0], w.shape[1], w.shape[-1]
    _pixel_only(channels, path, "DiT", latent)
    kw: dict[str, Any] = {"in_channels": channels, "out_channels": channels, "patch_size": patch, "hidden_size": width}
    kw["img_resolution"] = patch * math.isqrt(_require(sd, "pos_embed", path, "DiT").shape[1])
    kw["depth"] = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    kw["mlp_ratio"] = _require(sd, "blocks.0.mlp.fc1.weight", path, "DiT").shape[0] / width
    kw["num_heads"] = _heads(width, num_heads, path)
    lin_w = _require(sd, "final_layer.linear.weight", path, "DiT")
    out_c = lin_w.shape[0] // patch**2
    if out_c == 2 * channels:  # learn_sigma: keep the epsilon half of every patch pixel
        for k in ("final_layer.linear.weight", "final_layer.linear.bias"):
            v = sd[k].reshape(patch * patch, out_c, *sd[k].shape[1:])
            sd[k] = v[:, :channels].reshape(patch * patch * channels, *sd[k].shape[1:]).contiguous()
    elif out_c != channels:
        raise ValueError(f"{path}: the final layer predicts {out_c} channels for {channels} input channels.")
    kw["num_classes"], kw["class_dropout_prob"] = 0, 0.0
    if "y_embedder.embedding_table.weight" in sd:
        num_classes, table, has_null = _labels(sd["y_embedder.embedding_table.weight"], null_row, path)
        sd["y_embedder.embedding_table.weight"] = table
        kw["num_classes"], kw["class_dropout_prob"] = num_classes, 0.1 if has_null else 0.0
    info = {"format": "dit-state-dict", "arch": "dit", "kernel": kernel, "sha256": sha256_of(path),
            "learn_sigma": out_c == 2 * channels, "null_row": null_row if kw["num_classes"] else None,
            "latent": bool(latent)}
    return PublishedNet("DiT", kw, sd, "ddpm" if kernel in ("vp_discrete", "ddpm") else "eps",
                        {"name": kernel, "kwargs": {}}, info)
