"""Model references for published checkpoints (DESIGN.md, "a published checkpoint is one more Denoiser").

Specs ``edm:FILE.pkl`` (NVlabs/edm), ``uvit:FILE.pth`` (baofff/U-ViT), ``dit:FILE.pt`` (facebookresearch/DiT) and
their converted ``FILE.ckpt`` (``python -m lightning_repro.published convert``), with options after ``?``:
``num_heads=N``, ``null_row=last|first|none``, ``kernel=NAME``, ``vae=VAE`` (U-ViT / DiT) and ``data=<data spec>``
(last, as in ``optimal:``, e.g. ``?data=cifar10`` or ``?data=digits?size=64``): the training set, which a published
file does not record, for GL and the nearest training images.  Files are read as data (``lightning_repro.published``).
``vae=`` makes a latent (4-channel) U-ViT / DiT a latent model, e.g. DiT's ImageNet ``dit:DiT-XL-2-256x256.pt?vae=
stabilityai/sd-vae-ft-ema``: VAE is an AutoencoderKL folder, a pipeline folder with ``vae/``, or a Hub id of either;
the sampler works on the latents from the suite's seed noise and the VAE decodes them (``latents /
scaling_factor``) before the descriptor, as for a latent ``diffusers:`` pipeline.

``diffusers:LOCAL_DIR_OR_HUB_ID[@revision][#subfolder][?prompt=TEXT]``: a diffusers UNet pipeline folder sampled
in the EDM variable of its scheduler's schedule (``published.diffusers``); text-to-image pipelines sample latents
for one prompt (label 0; the empty prompt is the null class -1 of ``--guidance``) and decode them with the VAE;
consistency-model pipelines sample in one step (``--sampler euler --steps 1``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote_plus

import torch
from torch import Tensor

from ..published import diffusers as hub  # registers the "diffusers" kernel (diffusers itself loads lazily)
from .common import safe_name
from .references import Reference, parse_data_spec, register_reference

__all__ = ["PublishedReference", "EDMReference", "UViTReference", "DiTReference", "split_published_spec",
           "DiffusersReference"]

# -- NVlabs/edm, U-ViT, DiT


def split_published_spec(spec: str, kind: str, allowed: tuple[str, ...]) -> tuple[str, dict[str, Any], str | None]:
    """``FILE?key=value&...&data=<data spec>`` -> (file, options, data spec or None)."""
    path, _, query = spec.partition("?")
    data = None
    if "data=" in query:
        query, _, data = query.partition("data=")
        query = query.rstrip("&")
    opts: dict[str, Any] = {}
    for part in filter(None, query.split("&")):
        key, eq, value = (unquote_plus(p) for p in part.partition("="))
        if not eq or key not in allowed:
            raise ValueError(f"'{kind}:{spec}': {part!r} is not one of the options "
                             f"{', '.join(f'{k}=...' for k in (*allowed, 'data'))}.")
        opts[key] = int(value) if key == "num_heads" else value
    return path, opts, data


@dataclass
class PublishedReference(Reference):
    """A published network (``lightning_repro.published.PublishedNet``) behind a ``kind:FILE[?options]`` spec."""

    options: ClassVar[tuple[str, ...]] = ()
    latent_shape: tuple[int, ...] | None = None  # latent models (``?vae=``): the shape the sampler works in
    _net: Any = None
    _vae: Any = None  # published.diffusers.VAEFolder of a latent model

    @classmethod
    def from_spec(cls, spec: str, text: str, partner: Reference | None) -> Reference:
        from ..published import read_published

        path, opts, data_spec = split_published_spec(spec, cls.kind, cls.options)
        vae = hub.read_vae(opts.pop("vae"), text) if "vae" in opts else None
        net = read_published(cls.kind, path, **opts, **({"latent": True} if vae is not None else {}))
        data = parse_data_spec(data_spec)[0] if data_spec is not None else None
        sha = str(net.info["sha256"])
        p = Path(path).expanduser()
        info = {"kind": cls.kind, "path": str(p.resolve()), **net.info, "sha256": sha, "precond": net.precond,
                "kernel": net.kernel_spec["name"], "size": None, "subset_seed": None, "seed": None,
                "source": (data or {}).get("source")}
        if vae is not None:  # the model is the network and its decoder: both digests make its identity
            info.update(file_sha256=sha, vae=str(vae.path.resolve()), vae_sha256=vae.digest(),
                        vae_scaling_factor=vae.config.get("scaling_factor"))
            sha = hashlib.sha256(f"{sha};vae={info['vae_sha256']}".encode()).hexdigest()
            info["sha256"] = sha
        return cls(text=text, label=p.stem, name=f"{safe_name(p.stem)}-{sha[:10]}", sha256=sha,
                   image_shape=net.image_shape if vae is None else vae.image_shape(net.image_shape),
                   num_classes=net.num_classes, info=info, data=data, kernel_spec=dict(net.kernel_spec),
                   latent_shape=None if vae is None else net.image_shape, _net=net, _vae=vae)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.latent_shape or self.image_shape

    def _load_denoiser(self, device: torch.device):
        return self._net.denoiser(device)

    def decoder(self, device: torch.device) -> Callable[[Tensor, float], Tensor] | None:
        return None if self._vae is None else self._vae.decoder(device)

    def training_set(self) -> tuple[Tensor, Tensor | None]:
        if self.data is None:
            raise ValueError(f"{self.text} is a published model that records no training set; name one to compute "
                             f"GL and nearest training images, e.g. '{self.kind}:{self.info['path']}?data=cifar10'.")
        return super().training_set()


@register_reference("edm")
@dataclass
class EDMReference(PublishedReference):
    """``edm:FILE.pkl``: an NVlabs/edm snapshot (SongUNet DDPM++ / NCSN++ or ADM under VP, VE or EDM precond)."""


@register_reference("uvit")
@dataclass
class UViTReference(PublishedReference):
    """``uvit:FILE.pth[?vae=VAE]``: a baofff/U-ViT state dict (continuous VP, epsilon-prediction); latent with a VAE."""

    options: ClassVar[tuple[str, ...]] = ("num_heads", "null_row", "kernel", "vae")


@register_reference("dit")
@dataclass
class DiTReference(PublishedReference):
    """``dit:FILE.pt[?vae=VAE]``: a facebookresearch/DiT state dict (DDPM timesteps, epsilon half kept); latent with a
    VAE (the released ImageNet models: 4 x 32 x 32 latents of the Stable Diffusion VAE)."""

    options: ClassVar[tuple[str, ...]] = ("num_heads", "null_row", "kernel", "vae")


# -- diffusers ----------------------------------------------------------------------------------------------------


@register_reference("diffusers")
@dataclass
class DiffusersReference(Reference):
    """A diffusers pipeline: UNet2DModel (DDPM / DDIM / DPM-Solver or one-step consistency), UNet2DConditionModel +
    AutoencoderKL + CLIP (Stable Diffusion v1), or a class-conditional DiT transformer + AutoencoderKL."""

    latent_shape: tuple[int, ...] | None = None  # latent models: the shape the sampler works in
    _folder: Any = None  # published.diffusers.PipelineFolder

    @classmethod
    def from_spec(cls, spec: str, text: str, partner: Reference | None) -> Reference:
        parsed = hub.parse_spec(spec)
        folder = hub.read_folder(hub.locate(parsed), text)
        if folder.text and parsed.prompt is None:
            raise ValueError(
                f"{text} is a text-to-image pipeline; give its prompt in the spec, e.g. "
                f"'diffusers:{parsed.location}?prompt=a photograph of an astronaut riding a horse'."
            )
        if not folder.text and parsed.prompt is not None:
            raise ValueError(f"{text}: its {folder.unet.get('_class_name')} takes no text, so ?prompt= does not apply.")
        ident = {"files": folder.digest(), "subfolder": parsed.subfolder, "prompt": parsed.prompt}
        sha = hashlib.sha256(repr(sorted(ident.items())).encode()).hexdigest()
        label = parsed.location.rstrip("/").split("/")[-1] + (f"#{parsed.subfolder}" if parsed.subfolder else "")
        info = {"kind": cls.kind, "arch": folder.unet.get("_class_name"), "kernel": folder.kernel_spec()["name"],
                "location": parsed.location, "revision": parsed.revision, "path": str(folder.path),
                "scheduler": folder.scheduler.get("_class_name"), "prompt": parsed.prompt,
                "files_sha256": ident["files"], "sha256": sha,
                "ignored": [k for k in ("clip_sample", "thresholding") if folder.scheduler.get(k)]}  # fmt: skip
        return cls(
            text=text,
            label=label,
            name=f"diffusers-{safe_name(label)}-{sha[:10]}",
            sha256=sha,
            image_shape=folder.image_shape,
            num_classes=folder.num_classes,
            info=info,
            kernel_spec=folder.kernel_spec(),
            latent_shape=folder.sample_shape if folder.latent else None,
            _folder=folder,
        )

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.latent_shape or self.image_shape

    def _load_denoiser(self, device: torch.device):
        return hub.load_denoiser(self._folder, self.kernel(), self.info["prompt"], device)

    def decoder(self, device: torch.device) -> Callable[[Tensor, float], Tensor] | None:
        return hub.load_decoder(self._folder, device)
