"""A published network mapped onto the suite: ``PublishedNet`` (network class + kwargs + weights + preconditioning +
kernel), its ``Denoiser``, and converted checkpoints.

A converted checkpoint (``save_converted``) is a plain dict of tensors and builtins, readable with
``torch.load(weights_only=True)``: ``state_dict`` holds ``ema.net.<name>`` and ``PUBLISHED_KEY`` the network
description.  When one of the suite's presets expresses the network exactly (DDPM++ SongUNet as ``EDM``, the
reference U-ViT / DiT as ``UViT`` / ``DiT``) the file also carries the preset's ``lightning_repro`` metadata and
``model.net.<name>`` weights, so ``module.load_denoiser`` loads it too; otherwise (NCSN++, ADM, non-default U-ViT /
DiT options) only the ``edm:`` / ``uvit:`` / ``dit:`` references read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..files import file_sha256 as sha256_of
from ..kernels import get_kernel
from ..precond import Precond, get_precond

__all__ = ["PublishedNet", "PUBLISHED_KEY", "NETS", "PRESET_OF", "save_converted", "read_converted", "sha256_of",
           "preset_mismatch", "preset_module"]

PUBLISHED_KEY = "lightning_repro_published"
NETS = ("SongUNet", "DhariwalUNet", "UViT", "DiT")


@dataclass
class PublishedNet:
    """``net(**net_kwargs)`` of the suite with ``state_dict`` (suite names), wrapped by preconditioning ``precond``
    (``edm`` | ``eps`` | ``ddpm``) on kernel ``kernel_spec`` = ``{"name", "kwargs"}``; ``info`` is provenance."""

    net: str
    net_kwargs: dict[str, Any]
    state_dict: dict[str, Tensor] = field(repr=False)
    precond: str
    kernel_spec: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)  # format, arch, source precond, sha256, ...

    @property
    def image_shape(self) -> tuple[int, int, int]:
        r = int(self.net_kwargs["img_resolution"])
        return (int(self.net_kwargs["in_channels"]), r, r)

    @property
    def num_classes(self) -> int:
        return int(self.net_kwargs.get("num_classes") or 0)

    def build(self) -> nn.Module:
        """The suite network with these weights (eval mode, no gradients); mismatched names are one sentence."""
        if self.net not in NETS:
            raise ValueError(f"published network class {self.net!r} is not one of {', '.join(NETS)}.")
        if self.net == "SongUNet":
            from ..nets.edm_unet import SongUNet as cls
        elif self.net == "DhariwalUNet":
            from ..nets.adm_unet import DhariwalUNet as cls
        elif self.net == "UViT":
            from ..nets.uvit import UViT as cls
        else:
            from ..nets.dit import DiT as cls
        net = cls(**self.net_kwargs)
        own = net.state_dict()
        missing = [k for k in own if k not in self.state_dict]
        unexpected = [k for k in self.state_dict if k not in own]
        shape = [k for k in own if k in self.state_dict and own[k].shape != self.state_dict[k].shape]
        if missing or unexpected or shape:
            raise ValueError(f"the {self.info.get('format', 'published')} weights do not fit the suite's {self.net}: "
                             f"missing {_first(missing)}; unexpected {_first(unexpected)}; other shape {_first(shape)}.")
        net.load_state_dict(self.state_dict)
        return net.eval().requires_grad_(False)

    def denoiser(self, device: torch.device | str = "cpu") -> Precond:
        """``D(x, sigma, labels)``: the network under its preconditioning."""
        kernel = get_kernel(self.kernel_spec["name"], **(self.kernel_spec.get("kwargs") or {}))
        return get_precond(self.precond, self.build(), kernel).to(device).eval()


def _first(keys: list[str]) -> str:
    return (", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")) if keys else "none"


def _meta(p: PublishedNet) -> dict[str, Any]:
    return {"net": p.net, "net_kwargs": p.net_kwargs, "precond": p.precond, "kernel": p.kernel_spec,
            "image_shape": list(p.image_shape), "num_classes": p.num_classes, "info": p.info}


def save_converted(p: PublishedNet, out: str | Path) -> bool:
    """Write ``p`` as a converted checkpoint; True when ``module.load_denoiser`` can load it (a preset fits).

    EDM's ``map_augment`` is dropped: it is bias-free and its labels are zero at sampling, so it adds exactly 0.
    """
    p = _without_augment(p)
    ckpt: dict[str, Any] = {"state_dict": {f"ema.net.{k}": v.contiguous() for k, v in p.state_dict.items()},
                            PUBLISHED_KEY: _meta(p)}
    module = _preset_module(p)
    if module is not None:
        from ..module import CKPT_KEY

        module.ema.net.load_state_dict(p.state_dict)
        module.model.net.load_state_dict(p.state_dict)
        module.on_save_checkpoint(ckpt)
        ckpt["state_dict"] = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        ckpt[CKPT_KEY]["published"] = p.info
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(out)
    return module is not None


def _without_augment(p: PublishedNet) -> PublishedNet:
    if p.net not in ("SongUNet", "DhariwalUNet") or not p.net_kwargs.get("augment_dim"):
        return p
    state = {k: v for k, v in p.state_dict.items() if not k.startswith("map_augment.")}
    info = {**p.info, "dropped": "map_augment (augmentation labels are zero at sampling)"}
    return PublishedNet(p.net, {**p.net_kwargs, "augment_dim": 0}, state, p.precond, p.kernel_spec, info)


#: the preset that holds each published network class (``DhariwalUNet``, ADM, has none)
PRESET_OF = {"SongUNet": "DDPMpp", "UViT": "UViT", "DiT": "DiT"}


def _preset_plan(p: PublishedNet) -> tuple[dict[str, Any], dict[str, Any], tuple[str, ...]]:
    """(p's network kwargs, the settings its preset fixes, the settings the preset takes)."""
    kw = dict(p.net_kwargs)
    if p.net == "SongUNet":
        fixed = {"embedding_type": "positional", "encoder_type": "standard", "channel_mult_noise": 1,
                 "channel_mult_emb": 4, "resample_filter": [1, 1], "swap_sin_cos": True, "augment_dim": 0}
        return kw, fixed, ("model_channels", "channel_mult", "num_blocks", "attn_resolutions", "dropout")
    if p.net == "UViT":
        fixed = {"qkv_bias": False, "mlp_time_embed": False, "conv": True, "skip": True}
        return kw, fixed, ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
    if not p.num_classes:  # no label table: the dropout probability builds nothing
        kw.pop("class_dropout_prob", None)
    return kw, {"learn_sigma": False, "class_dropout_prob": 0.1}, ("patch_size", "hidden_size", "depth", "num_heads",
                                                                  "mlp_ratio")


def preset_mismatch(p: PublishedNet) -> str | None:
    """None when a suite preset builds exactly ``p``'s network; else what it would need, as a clause, e.g.
    ``"the DDPMpp preset builds embedding_type='positional', this network has 'fourier'"``."""
    p = _without_augment(p)
    if p.net not in PRESET_OF:
        return f"no suite preset builds a {p.net} network"
    kw, fixed, own = _preset_plan(p)
    for k, v in fixed.items():
        if kw.get(k, v) != v:
            return f"the {PRESET_OF[p.net]} preset builds {k}={v!r}, this network has {kw[k]!r}"
    extra = sorted(set(kw) - {"img_resolution", "in_channels", "out_channels", "num_classes"} - set(fixed) - set(own))
    if extra:
        return f"the {PRESET_OF[p.net]} preset has no setting {extra[0]} (this network: {kw[extra[0]]!r})"
    return None


def preset_module(p: PublishedNet):
    """The suite preset module that builds exactly ``p``'s network (``map_augment`` dropped, see
    ``save_converted``), with ``p``'s kernel and preconditioning and ``p``'s weights in both the model and the EMA;
    None when ``preset_mismatch(p)`` names a difference."""
    p = _without_augment(p)
    module = _preset_module(p)
    if module is not None:
        module.ema.net.load_state_dict(p.state_dict)
        module.model.net.load_state_dict(p.state_dict)
    return module


def _preset_module(p: PublishedNet):
    """The suite preset that builds exactly ``p``'s network, with ``p``'s kernel and preconditioning, or None."""
    from ..module import EDM, DiT, UViT

    if preset_mismatch(p) is not None:
        return None
    kw, _, own = _preset_plan(p)
    common = dict(kernel=p.kernel_spec["name"], kernel_kwargs=p.kernel_spec.get("kwargs") or {},
                  precond=p.precond, image_shape=p.image_shape, num_classes=p.num_classes)
    cls = {"SongUNet": EDM, "UViT": UViT, "DiT": DiT}[p.net]
    return cls(**{k: kw[k] for k in own if k in kw}, **common)


def read_converted(path: str | Path) -> PublishedNet:
    """A file written by ``save_converted`` -> ``PublishedNet`` (read with ``weights_only=True``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"converted checkpoint {path} does not exist.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"converted checkpoint {path} could not be read: {type(err).__name__}.") from None
    meta = ckpt.get(PUBLISHED_KEY) if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is not a converted published checkpoint (no '{PUBLISHED_KEY}' metadata); "
                         "write one with 'python -m lightning_repro.published convert'.")
    state = {k[len("ema.net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.net.")}
    info = {**dict(meta.get("info") or {}), "converted_from": (meta.get("info") or {}).get("sha256"),
            "sha256": sha256_of(path)}
    return PublishedNet(str(meta["net"]), dict(meta["net_kwargs"]), state, str(meta["precond"]),
                        dict(meta["kernel"]), info)
