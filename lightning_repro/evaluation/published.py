"""Model references for published checkpoints (``diffusers:``), one class per spec kind (``references.REFERENCES``).

``diffusers:LOCAL_DIR_OR_HUB_ID[@revision][#subfolder][?prompt=TEXT]``: a diffusers UNet pipeline folder sampled
in the EDM variable of its scheduler's schedule (``published.diffusers``); text-to-image pipelines sample latents
for one prompt (label 0; the empty prompt is the null class -1 of ``--guidance``) and decode them with the VAE;
consistency-model pipelines sample in one step (``--sampler euler --steps 1``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..published import diffusers as hub  # registers the "diffusers" kernel (diffusers itself loads lazily)
from .common import safe_name
from .references import Reference, register_reference

__all__ = ["DiffusersReference"]


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
