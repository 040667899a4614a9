"""Teachers: the ``generated`` data source and the frozen teacher of a distillation (``load_teacher``).

The ``generated`` data source: a teacher's own deterministic samples as training images (model recovery, Zhang et
al. 2024, Sec. 3.2.1, Case 2: a student trained on a teacher's samples); the teacher is any model spec the
evaluation takes (a suite checkpoint, ``optimal:``, ``edm:``, ``uvit:``, ``dit:``, ``diffusers:``).

The data layer defines the source registry and the cache file (``data.sources.generated_cache_file``,
``read_generated``, ``write_generated``); sampling the teacher needs the model layer, so it lives here and this
module registers the source (``data.register_source``) when imported.  The data layer imports it when the name
``generated`` is first used (``data.sources.DEFERRED_SOURCES``), so every entry point (``train.py`` and its DDP
children, the studies, the evaluation, library code) can name the source without importing anything first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoints import CKPT_KEY, load_checkpoint
from .data.sources import (
    ImageSource,
    SourceInfo,
    float_to_uint8,
    generated_cache_file,
    read_generated,
    register_source,
    uint8_to_float,
    write_generated,
)

__all__ = ["generated_source", "generated_cache_path", "GENERATED_DEFAULT_SEEDS", "Teacher", "load_teacher"]

#: default seeds of the ``generated`` source: from 1,000,000 on, disjoint from the evaluation seeds (0, 1, ...)
GENERATED_DEFAULT_SEEDS = "1000000-1000255"




def _checked_teacher(checkpoint: str | os.PathLike | None, seeds: str | int | list[int]) -> tuple[str, list[int]]:
    """The teacher's spec (a checkpoint that must exist, or a model spec) and the parsed seeds, or one sentence."""
    from .evaluation.references import is_model_spec
    from .sampling.noise import parse_seeds

    if checkpoint is None:
        raise ValueError("generated source: give the teacher checkpoint (source_kwargs checkpoint: PATH).")
    text = str(checkpoint)
    if not is_model_spec(text):
        ckpt = Path(text).expanduser()
        if not ckpt.is_file():
            raise FileNotFoundError(f"generated source: teacher checkpoint {ckpt} does not exist.")
        text = str(ckpt)
    try:
        return text, parse_seeds(seeds)
    except ValueError as err:
        raise ValueError(f"generated source: {err}") from None


def _resolve(text: str):
    """The teacher's ``Reference`` (``evaluation.references.resolve_model``), errors prefixed as this source's."""
    from .evaluation.references import resolve_model

    try:
        ref = resolve_model(text)
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"generated source: {err}") from None
    if ref.stored is not None:
        raise ValueError(f"generated source: {text} holds stored samples; the teacher must be a model that samples "
                         "new seeds.")
    return ref


def _cache_path(ref, seeds: list[int], sampler: str, steps: int, guidance: float,
                cache_dir: str | os.PathLike | None) -> Path:
    """``generated_cache_file`` of the teacher: next to its file (or local folder) unless ``cache_dir`` is given."""
    info = ref.info
    local = info.get("path") if info.get("kind") != "diffusers" or Path(str(info.get("location"))).expanduser().is_dir() \
        else None  # a Hub snapshot is not a folder to write into
    if cache_dir is None and local is None:
        raise ValueError(f"generated source: {ref.text} is not a local file, so its samples have no folder to be "
                         "cached next to; give source_kwargs cache_dir: DIR.")
    own = Path(ref.text if ref.kind == "checkpoint" else str(local)) if local is not None else None
    folder = Path(cache_dir).expanduser() if cache_dir is not None else own.parent
    if own is not None:
        stem = own.stem
    else:
        from .evaluation.common import safe_name

        stem = safe_name(ref.label)
    return generated_cache_file(folder, stem, ref.sha256, seeds, sampler, steps, guidance)


def generated_cache_path(checkpoint: str | os.PathLike, seeds: str | int | list[int] = GENERATED_DEFAULT_SEEDS,
                         sampler: str = "heun", steps: int = 18, guidance: float = 1.0,
                         cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``generated_source`` caches the teacher's samples for these arguments:
    ``<cache_dir or the teacher file's folder>/<file stem>.generated_<hash>.npz`` (``generated_cache_file``; the
    hash covers the teacher's SHA-256 as the evaluation records it: a checkpoint's or published file's digest)."""
    text, seed_list = _checked_teacher(checkpoint, seeds)
    return _cache_path(_resolve(text), seed_list, sampler, steps, guidance, cache_dir)


def generated_source(checkpoint: str | os.PathLike | None = None,
                     seeds: str | int | list[int] = GENERATED_DEFAULT_SEEDS, sampler: str = "heun",
                     steps: int = 18, guidance: float = 1.0, cache_dir: str | os.PathLike | None = None,
                     device: str = "auto", batch_size: int = 256) -> ImageSource:
    """A teacher's deterministic samples as a training source.

    ``checkpoint`` is a suite checkpoint or any model spec the evaluation takes (``optimal:<data spec>``,
    ``edm:FILE.pkl``, ``uvit:`` / ``dit:FILE[?vae=DIR]``, ``diffusers:DIR``; ``evaluation.resolve_model``).  Its
    denoiser is sampled with ``sampling.sample`` at ``seeds`` (default 1,000,000-1,000,255, disjoint from
    evaluation seeds 0, 1, ...) exactly as ``evaluate.py sample`` samples it (latent models decoded by their VAE),
    with labels ``seed % num_classes`` when the teacher is class-conditional (the source then carries those
    labels).  The uint8 images and their provenance (the teacher's SHA-256, kind and format) are cached in
    ``generated_cache_path(...)`` (by default next to the teacher's file), written atomically; a later call with
    the same teacher contents and arguments reads the cache instead of sampling.  Images are returned as the cache
    holds them (uint8 -> [-1, 1]), so the first and later calls give the same tensor.
    """
    text, seed_list = _checked_teacher(checkpoint, seeds)
    if len(set(seed_list)) != len(seed_list):
        raise ValueError(f"generated source: seeds {seeds!r} repeat a seed; each training sample needs its own seed.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"generated source: steps must be a positive integer, got {steps!r}.")
    ref = _resolve(text)  # hashes the file once: the cache's name and its check
    path = _cache_path(ref, seed_list, sampler, steps, guidance, cache_dir)
    cached = read_generated(path, ref.sha256, seed_list) if path.is_file() else None
    if cached is None:
        cached = _generate(ref, seed_list, sampler, steps, guidance, device, batch_size, path)
    images, labels, num_classes = cached
    lab = torch.from_numpy(np.asarray(labels, dtype=np.int64)) if labels is not None else None
    return ImageSource("generated", uint8_to_float(images), lab, num_classes)


def _generate(ref, seeds: list[int], sampler: str, steps: int, guidance: float, device: str,
              batch_size: int, path: Path) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Sample the teacher ``ref`` at ``seeds`` and write the cache file ``path``."""
    from . import sampling  # looked up at call time (tests replace sampling.sample)

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    num_classes = int(ref.num_classes or 0)
    if guidance != 1.0 and not num_classes:
        raise ValueError(f"generated source: guidance={guidance} needs a class-conditional teacher, and {ref.text} "
                         "is unconditional.")
    dev = torch.device(device)
    den, kernel = ref.denoiser(dev), ref.kernel()
    labels = np.asarray(seeds, dtype=np.int64) % num_classes if num_classes else None
    x = sampling.sample(den, kernel, seeds, tuple(ref.sample_shape), sampler=sampler, steps=steps,
                        labels=None if labels is None else torch.from_numpy(labels), guidance=guidance,
                        batch_size=batch_size, device=device, decode=ref.decoder(dev))
    images = float_to_uint8(x)
    is_file = ref.kind == "checkpoint"
    write_generated(path, images, labels, num_classes, {
        "seeds": np.asarray(seeds, dtype=np.int64),
        "teacher_sha256": np.asarray(ref.sha256),
        "teacher_checkpoint": np.asarray(str(Path(ref.text).resolve()) if is_file else ref.text),
        "teacher_kind": np.asarray(ref.kind),
        "teacher_format": np.asarray(str(ref.info.get("format") or ref.kind)),
        "sampler": np.asarray(str(sampler)),
        "steps": np.asarray(int(steps), dtype=np.int64),
        "guidance": np.asarray(float(guidance), dtype=np.float64),
    })
    return images, labels, num_classes


def _generated_info(checkpoint: str | os.PathLike | None = None, seeds: str | int | list[int] = GENERATED_DEFAULT_SEEDS,
                    **_) -> SourceInfo:
    """The teacher's image shape and classes, from its checkpoint's metadata or its reference (nothing is sampled)."""
    text, seed_list = _checked_teacher(checkpoint, seeds)
    from .evaluation.references import is_model_spec

    if is_model_spec(text):
        ref = _resolve(text)
        shape, num_classes = tuple(int(v) for v in ref.image_shape), int(ref.num_classes or 0)
        return SourceInfo(shape, num_classes, num_classes > 0, len(seed_list), _class_counts(seed_list, num_classes))
    ckpt = Path(text)
    meta = load_checkpoint(ckpt)[CKPT_KEY]
    shape = meta.get("image_shape") if isinstance(meta, dict) else None
    if not isinstance(shape, (list, tuple)) or len(shape) != 3:
        raise ValueError(f"generated source: teacher checkpoint {ckpt} records no image_shape (C, H, W).")
    num_classes = int(meta.get("num_classes") or 0)
    return SourceInfo(tuple(int(v) for v in shape), num_classes, num_classes > 0, len(seed_list),
                      _class_counts(seed_list, num_classes))


def _class_counts(seeds: list[int], num_classes: int) -> tuple[int, ...] | None:
    """Images per class: the label of seed s is s % num_classes."""
    if not num_classes:
        return None
    return tuple(int(v) for v in np.bincount(np.asarray(seeds) % num_classes, minlength=num_classes))


register_source("generated", generated_source, _generated_info)


# ---------------------------------------------------------------------------- teachers of the distillations


@dataclass
class Teacher:
    """A frozen teacher of a distillation (consistency distillation, progressive distillation): its
    ``Denoiser`` in the EDM variable, the kernel it was trained under and its provenance (for W&B and checkpoints)."""

    denoiser: Any
    kernel: Any
    provenance: dict[str, Any]


def load_teacher(spec: str, image_shape, num_classes: int = 0, data: dict[str, Any] | None = None,
                 device: str | torch.device = "cpu") -> Teacher:
    """Any model spec the evaluation takes (a suite checkpoint, ``optimal:[data spec]``, ``edm:``, ``diffusers:``,
    ...) as a ``Teacher`` for a student of ``image_shape`` / ``num_classes``; ``data`` (the student's
    ``SubsetDataModule`` kwargs) is what ``optimal:`` without a source means.  A teacher of another image shape or
    class count is refused with one sentence."""
    from .evaluation.references import resolve_model

    ref = resolve_model(str(spec), data=data)
    shape, want = tuple(int(v) for v in ref.image_shape), tuple(int(v) for v in image_shape)
    if shape != want:
        raise ValueError(f"teacher {spec} makes {'x'.join(map(str, shape))} images but the student's data are "
                         f"{'x'.join(map(str, want))}; a teacher must make images of the student's shape.")
    if tuple(ref.sample_shape) != shape:
        raise ValueError(f"teacher {spec} is a latent model (it denoises {'x'.join(map(str, ref.sample_shape))} "
                         "latents and decodes them to images); a distillation teacher must denoise the student's images.")
    if int(ref.num_classes) != int(num_classes):
        raise ValueError(f"teacher {spec} has {ref.num_classes} classes but the student's data have {num_classes}; "
                         "a teacher must be conditioned on the student's classes (0: unconditional).")
    den = ref.denoiser(torch.device(device))
    if isinstance(den, torch.nn.Module):
        den.requires_grad_(False).eval()
    return Teacher(denoiser=den, kernel=ref.kernel(), provenance={**ref.describe(), "sha256": ref.sha256})
