"""Checkpoint I/O: reading a lightning_repro checkpoint as data and rebuilding its preset or its EMA denoiser.

A checkpoint holds Lightning's ``state_dict`` plus the ``lightning_repro`` metadata (``CKPT_KEY``: class path,
hyperparameters, kernel, arch, image shape, classes, training data) that ``DiffusionModule.on_save_checkpoint``
writes.  It is read with ``weights_only=True`` and may only *name* one of the registered presets.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .files import file_sha256
from .kernels import Kernel
from .precond import Precond

if TYPE_CHECKING:
    from .diffusion_module import DiffusionModule

__all__ = ["CKPT_KEY", "load_checkpoint", "preset_class", "module_from_checkpoint", "load_denoiser", "file_sha256"]

#: the key of the suite's metadata in a checkpoint
CKPT_KEY = "lightning_repro"


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``) with one clear sentence on failure (``mmap``: tensors are
    mapped, not read, e.g. to check a file cheaply)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # truncated zip, pickle errors, ...
        reason = (str(err).splitlines() or [""])[0].split(". ")[0].rstrip(".")  # torch's first sentence
        raise ValueError(f"checkpoint {path} could not be read (truncated or not a lightning_repro checkpoint?): "
                         f"{type(err).__name__}: {reason}.") from None
    if not isinstance(ckpt, dict) or CKPT_KEY not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"checkpoint {path} was not written by lightning_repro's DiffusionModule "
                         f"(no '{CKPT_KEY}' metadata).")
    return ckpt


def preset_class(class_path: str, path: str | os.PathLike = "") -> type[DiffusionModule]:
    """The registered preset a checkpoint's ``class_path`` names; nothing outside ``ARCHS`` is imported or called.

    A checkpoint is data: its metadata may only *name* one of the suite's presets by its public class path
    (``lightning_repro.module.DDPMpp``; ``lightning_repro.module.EDM``, the old name, still works); any other name is
    one sentence, never an import.
    """
    # rebuilding needs the presets (and their consistency models), which read checkpoints themselves (init_from)
    from .consistency import CONSISTENCY_MODELS
    from .presets import ARCHS

    classes = [*ARCHS.values(), *CONSISTENCY_MODELS.values()]
    for cls in classes:
        if class_path in (cls.class_path(), f"{cls.__module__}.{cls.__qualname__}"):
            return cls
    valid = ", ".join(c.class_path() for c in classes)
    raise ValueError(f"checkpoint {path} names class {class_path!r}, which is not a lightning_repro preset "
                     f"({valid}); it is refused rather than imported.")


def module_from_checkpoint(path: str | os.PathLike, map_location="cpu") -> DiffusionModule:
    """Rebuild the DiffusionModule of a checkpoint (no training state) with its weights."""
    ckpt = load_checkpoint(path)
    meta = ckpt[CKPT_KEY]
    cls = preset_class(str(meta.get("class_path")), path)
    hparams = meta.get("hparams")
    if not isinstance(hparams, dict) or not all(isinstance(k, str) for k in hparams):
        raise ValueError(f"checkpoint {path} has no hyperparameter mapping in its '{CKPT_KEY}' metadata.")
    try:
        module = cls(**hparams)
    except TypeError as err:
        raise ValueError(f"checkpoint {path}: its hyperparameters do not fit {cls.__qualname__}: {err}.") from None
    module.load_state_dict(ckpt["state_dict"])
    module.checkpoint_meta = meta
    return module.to(map_location).eval()


def load_denoiser(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Precond, Kernel]:
    """Checkpoint path -> (the EMA ``Denoiser`` in eval mode, its kernel)."""
    module = module_from_checkpoint(path, device)
    den = module.ema.eval().requires_grad_(False)
    den.checkpoint_meta = module.checkpoint_meta  # image_shape, num_classes, data config, ...
    return den, module.kernel


