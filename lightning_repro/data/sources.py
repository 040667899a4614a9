"""Image sources: where the training images come from.

Every source returns an ``ImageSource``: float32 images in [-1, 1], N×C×H×W, optional int64 labels.
Sources (DESIGN.md, "Data flow"):

* ``digits``   scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10 classes; Alpaydin &
               Kaynak 1998), values 0..16 mapped to [-1, 1]; optional ``resolution`` (bilinear).
* ``cifar10`` / ``cifar100``  CIFAR's python batches (Krizhevsky 2009), ``root`` + ``download``, read as data
               and checked against the published MD5s (``data.cifar``; ``verify_md5: false`` for one's own).
* ``folder``   class sub-folders of images (``root/<class>/<image>``), classes in sorted order.
* ``npz``      a ``.npz`` with uint8 ``images`` N×H×W×C (or N×H×W) and optional ``labels`` (one per image).
* ``mog``      samples of the low-rank mixture of Gaussians of the paper's Eq. 2 (``theory.mog``).
* ``generated`` a teacher checkpoint's own deterministic samples (the paper's model recovery, Sec. 3.2.1,
               Case 2), cached in a ``.npz`` whose format is defined here (``generated_cache_file``,
               ``read_generated``, ``write_generated``); the sampling, which needs the model layer, is
               ``lightning_repro.teachers``, which registers the source when first named (``DEFERRED_SOURCES``).

Each name is a ``SourceKind`` in ``SOURCES``: ``load`` reads the images, ``info`` gives their shape, classes
and count without reading images or downloading (so every DDP rank can build the model), ``download`` fetches
missing files (called once per node by ``SubsetDataModule.prepare_data``).  ``register_source`` adds a kind.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..files import atomic_write
from .cifar import CIFAR_FOLDERS, CIFAR_URLS, download_cifar, read_cifar_batches

__all__ = [
    "ImageSource",
    "SourceInfo",
    "SourceKind",
    "get_source",
    "mog_mixture",
    "source_info",
    "prepare_source",
    "register_source",
    "SOURCES",
    "uint8_to_float",
    "float_to_uint8",
    "generated_cache_file",
    "read_generated",
    "write_generated",
    "GENERATED_FORMAT",
]


@dataclass
class ImageSource:
    """Images (float32 in [-1, 1], N×C×H×W), labels (int64 (N,) or None) and the number of classes."""

    name: str
    images: Tensor
    labels: Tensor | None = None
    num_classes: int = 0

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]


@dataclass(frozen=True)
class SourceInfo:
    """What a source holds, known without reading its images: what the model is built from."""

    image_shape: tuple[int, int, int]  # C, H, W of every image
    num_classes: int = 0  # classes of its labels (0: none)
    labelled: bool = False  # whether it carries labels
    num_images: int | None = None  # its number of images, None where only loading tells
    class_counts: tuple[int, ...] | None = None  # images of each class, None where only loading tells


@dataclass(frozen=True)
class SourceKind:
    """One kind of source: how its images are loaded, described, and (where they come from afar) downloaded."""

    load: Callable[..., ImageSource]  # source kwargs -> the images
    info: Callable[..., SourceInfo]  # source kwargs -> shape / classes / count, never reading images or downloading
    download: Callable[..., None] | None = None  # source kwargs -> fetch missing files (once per node)

    def __call__(self, **kwargs) -> ImageSource:
        return self.load(**kwargs)


def uint8_to_float(images: np.ndarray | Tensor) -> Tensor:
    """uint8 N×H×W×C (or N×H×W) -> float32 N×C×H×W in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images))
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"expected images of shape N×H×W×C, got {tuple(x.shape)}.")
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def float_to_uint8(images: Tensor) -> np.ndarray:
    """float N×C×H×W in [-1, 1] -> uint8 N×H×W×C (round to nearest, as EDM's generate.py)."""
    x = (images.detach().float().clamp(-1, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _resolution(source: str, resolution: int | None) -> int | None:
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1):
        raise ValueError(f"{source} source: resolution must be a positive integer, got {resolution!r}.")
    return resolution


def _resize(images: Tensor, resolution: int | None) -> Tensor:
    if resolution is None or resolution == images.shape[-1]:
        return images
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False).clamp(-1, 1)


def _digits(resolution: int | None = None, **_) -> ImageSource:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().div(8.0).sub(1.0)[:, None]  # 0..16 -> [-1, 1]
    return ImageSource("digits", _resize(x, _resolution("digits", resolution)), torch.from_numpy(d.target).long(), 10)


def _digits_info(resolution: int | None = None, **_) -> SourceInfo:
    from sklearn.datasets import load_digits

    r = _resolution("digits", resolution) or 8
    counts = np.bincount(load_digits().target, minlength=10)  # bundled with scikit-learn: nothing to download
    return SourceInfo((1, r, r), 10, True, int(counts.sum()), tuple(int(c) for c in counts))


def _cifar_download(name: str, root: str | os.PathLike = "data_cache", download: bool = False, train: bool = True,
                    **_) -> None:
    root = Path(root).expanduser()
    if download and not (root / CIFAR_FOLDERS[name]).is_dir():
        download_cifar(name, root, train)


def _cifar(name: str, root: str | os.PathLike = "data_cache", download: bool = False, train: bool = True,
           resolution: int | None = None, verify_md5: bool = True, **_) -> ImageSource:
    _cifar_download(name, root, download, train)
    root = Path(root).expanduser()
    folder = root / CIFAR_FOLDERS[name]
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{name} was not found under {folder}: extract {CIFAR_URLS[name]} into {root} so that {folder} "
            f"holds the python batches, or pass --data.source_kwargs.download true on a machine with network."
        )
    images, labels = read_cifar_batches(folder, name, train, verify_md5=verify_md5)
    x = _resize(uint8_to_float(images), _resolution(name, resolution))
    return ImageSource(name, x, torch.from_numpy(labels), 10 if name == "cifar10" else 100)


def _cifar_info(name: str, train: bool = True, resolution: int | None = None, verify_md5: bool = True,
                **_) -> SourceInfo:
    r = _resolution(name, resolution) or 32
    n_cls = 10 if name == "cifar10" else 100
    if not verify_md5:  # batches of one's own hold any number of images
        return SourceInfo((3, r, r), n_cls, True)
    per_class = (50_000 if train else 10_000) // n_cls  # the published splits are balanced
    return SourceInfo((3, r, r), n_cls, True, per_class * n_cls, (per_class,) * n_cls)


_IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _folder_files(root: str | os.PathLike) -> list[list[Path]]:
    """The image files of each class sub-folder of ``root`` (classes in sorted order), or one sentence."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"folder source: {root} is not a directory (expected root/<class>/<image files>).")
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"folder source: {root} has no class sub-folders (expected root/<class>/<image files>).")
    files = [[f for f in sorted(c.iterdir()) if f.suffix.lower() in _IMAGE_EXT] for c in classes]
    if not any(files):
        raise ValueError(f"folder source: no images ({', '.join(sorted(_IMAGE_EXT))}) under {root}.")
    return files


def _folder(root: str | os.PathLike, resolution: int | None = None, grayscale: bool = False, **_) -> ImageSource:
    from PIL import Image

    resolution = _resolution("folder", resolution)
    imgs, labels = [], []
    files = _folder_files(root)
    for k, class_files in enumerate(files):
        for f in class_files:
            im = Image.open(f).convert("L" if grayscale else "RGB")
            if resolution is not None:
                im = im.resize((resolution, resolution), Image.BICUBIC)
            imgs.append(np.asarray(im))
            labels.append(k)
    shapes = {a.shape for a in imgs}
    if len(shapes) > 1:
        raise ValueError(f"folder source: images under {root} differ in size {sorted(shapes)[:3]}; pass resolution=.")
    return ImageSource("folder", uint8_to_float(np.stack(imgs)), torch.tensor(labels), len(files))


def _folder_info(root: str | os.PathLike, resolution: int | None = None, grayscale: bool = False,
                 **_) -> SourceInfo:
    from PIL import Image

    files = _folder_files(root)
    first = next(f for fs in files for f in fs)
    with Image.open(first) as im:  # reads the header only
        w, h = im.size
    r = _resolution("folder", resolution)
    counts = tuple(len(fs) for fs in files)
    return SourceInfo((1 if grayscale else 3, r or h, r or w), len(files), True, sum(counts), counts)


def _npz_file(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"npz source: {path} does not exist (expected a .npz with uint8 'images' N×H×W×C).")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"npz source: {path} is not a .npz archive (expected uint8 'images' N×H×W×C, np.savez).")
    return path


def _npy_header(path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the array ``key`` of an npz, from its header (the data is not read)."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(fh)
    return tuple(shape), dtype


def _npz_arrays(path: Path, images: bool) -> tuple[tuple[int, ...], np.ndarray | None, np.ndarray | None]:
    """(shape of 'images', 'images' when asked for else None, 'labels' or None), checked to fit together."""
    with np.load(path, allow_pickle=False) as f:
        if "images" not in f.files:
            raise ValueError(f"npz source: {path} has no 'images' array (keys: {', '.join(f.files)}).")
        labels = f["labels"] if "labels" in f.files else None
        x = f["images"] if images else None
    shape, dtype = (x.shape, x.dtype) if x is not None else _npy_header(path, "images")
    if dtype != np.uint8 or len(shape) not in (3, 4):
        raise ValueError(f"npz source: 'images' in {path} must be uint8 N×H×W×C (or N×H×W), got {dtype} of shape "
                         f"{tuple(shape)}.")
    if labels is not None and (labels.ndim != 1 or labels.dtype.kind not in "iu"):
        raise ValueError(f"npz source: 'labels' in {path} must be one integer per image (shape (N,)), got "
                         f"{labels.dtype} of shape {labels.shape}.")
    if labels is not None and len(labels) != shape[0]:
        raise ValueError(f"npz source: {path} has {len(labels)} labels for {shape[0]} images; give exactly one "
                         "label per image.")
    return tuple(shape), x, labels


def _npz_classes(path: Path, labels: np.ndarray | None, num_classes: int | None) -> int:
    """The number of classes: ``num_classes`` if given, else the largest label + 1; labels must lie below it."""
    if labels is None or not len(labels):
        return int(num_classes or 0)
    n_cls = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if labels.min() < 0 or labels.max() >= n_cls:
        raise ValueError(f"npz source: 'labels' in {path} must lie in 0..{n_cls - 1}, got {labels.min()}.."
                         f"{labels.max()}.")
    return n_cls


def _npz(path: str | os.PathLike, resolution: int | None = None, num_classes: int | None = None, **_) -> ImageSource:
    path = _npz_file(path)
    _, images, labels = _npz_arrays(path, images=True)
    n_cls = _npz_classes(path, labels, num_classes)
    lab = torch.as_tensor(labels).long() if labels is not None else None
    return ImageSource("npz", _resize(uint8_to_float(images), _resolution("npz", resolution)), lab, n_cls)


def _npz_info(path: str | os.PathLike, resolution: int | None = None, num_classes: int | None = None,
              **_) -> SourceInfo:
    path = _npz_file(path)
    shape, _, labels = _npz_arrays(path, images=False)
    n, h, w = shape[:3]
    r = _resolution("npz", resolution)
    c = shape[3] if len(shape) == 4 else 1
    n_cls = _npz_classes(path, labels, num_classes)
    counts = None if labels is None else tuple(int(v) for v in np.bincount(labels, minlength=n_cls))
    return SourceInfo((c, r or h, r or w), n_cls, labels is not None, n, counts)


def _mog_shape(shape) -> tuple[int, int, int]:
    s = tuple(int(v) for v in shape)
    if len(s) != 3 or min(s) < 1:
        raise ValueError(f"mog source: shape must be an image shape (C, H, W) of positive sizes, got {list(shape)}.")
    return s  # type: ignore[return-value]


def mog_mixture(num_samples: int = 8192, shape: tuple[int, int, int] = (1, 8, 8), num_components: int = 2,
                rank: int = 4, seed: int = 0, device: torch.device | str | None = None, **kwargs):
    """The ``theory.LowRankMoG`` that the ``mog`` source with these ``source_kwargs`` draws from (``num_samples``
    only sets how many draws the source holds)."""
    from ..theory.mog import LowRankMoG

    return LowRankMoG(_mog_shape(shape), num_components, rank, seed=seed, device=device, **kwargs)


def _mog(num_samples: int = 8192, shape: tuple[int, int, int] = (1, 8, 8), num_components: int = 2, rank: int = 4,
         seed: int = 0, **kwargs) -> ImageSource:
    mog = mog_mixture(num_samples, shape, num_components, rank, seed, **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    x, comp = mog.sample(num_samples, generator=g, return_components=True)
    return ImageSource("mog", x.float(), comp.long(), num_components)


def _mog_info(num_samples: int = 8192, shape: tuple[int, int, int] = (1, 8, 8), num_components: int = 2,
              **_) -> SourceInfo:
    return SourceInfo(_mog_shape(shape), int(num_components), True, int(num_samples))


#: format tag of a ``generated`` cache file (a teacher's samples; the sampling itself lives in ``teachers``)
GENERATED_FORMAT = "lightning_repro.generated/1"


def generated_cache_file(folder: str | os.PathLike, stem: str, teacher_sha256: str, seeds: list[int], sampler: str,
                         steps: int, guidance: float) -> Path:
    """``<folder>/<stem>.generated_<hash>.npz``: the hash covers the teacher checkpoint's SHA-256, the seeds, the
    sampler, the steps and the guidance weight, so other samples of the teacher are another file."""
    blob = json.dumps(
        {"checkpoint_sha256": teacher_sha256, "seeds": seeds, "sampler": str(sampler), "steps": int(steps),
         "guidance": float(guidance)},
        sort_keys=True,
    )
    return Path(folder) / f"{stem}.generated_{hashlib.sha256(blob.encode()).hexdigest()[:16]}.npz"


def read_generated(path: Path, teacher_sha256: str, seeds: list[int]) -> tuple[np.ndarray, np.ndarray | None, int] | None:
    """(uint8 images, labels, num_classes) of a cache file of these samples, None if it cannot be read (then it is
    regenerated); one sentence if it holds another teacher's samples or other seeds."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception:  # a truncated / foreign file: regenerate it
        return None
    if str(arrays.get("teacher_sha256", "")) != teacher_sha256 or arrays.get("seeds") is None \
            or arrays["seeds"].tolist() != seeds:
        raise ValueError(f"generated source: cache file {path} holds samples of another checkpoint or other seeds; "
                         "delete it to regenerate.")
    labels = arrays["labels"] if "labels" in arrays else None
    return arrays["images"], labels, int(arrays.get("num_classes", 0))


def write_generated(path: Path, images: np.ndarray, labels: np.ndarray | None, num_classes: int,
                    provenance: dict[str, Any]) -> None:
    """Write a cache file atomically: uint8 ``images`` N×H×W×C, ``labels`` (conditional teachers), ``num_classes``,
    ``format`` and the ``provenance`` arrays (``seeds``, ``teacher_sha256``, ``teacher_checkpoint``, ``sampler``,
    ``steps``, ``guidance``)."""
    arrays: dict[str, np.ndarray] = {"images": images, **provenance,
                                     "num_classes": np.asarray(num_classes, dtype=np.int64),
                                     "format": np.asarray(GENERATED_FORMAT)}
    if labels is not None:
        arrays["labels"] = labels

    def save(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would add ".npz" to a name
            np.savez(fh, **arrays)

    atomic_write(path, save)


SOURCES: dict[str, SourceKind] = {
    "digits": SourceKind(_digits, _digits_info),
    "cifar10": SourceKind(partial(_cifar, "cifar10"), partial(_cifar_info, "cifar10"),
                          partial(_cifar_download, "cifar10")),
    "cifar100": SourceKind(partial(_cifar, "cifar100"), partial(_cifar_info, "cifar100"),
                           partial(_cifar_download, "cifar100")),
    "folder": SourceKind(_folder, _folder_info),
    "npz": SourceKind(_npz, _npz_info),
    "mog": SourceKind(_mog, _mog_info),
}  # + "generated" (a teacher's samples), registered by lightning_repro.teachers (DEFERRED_SOURCES)


def register_source(name: str, load: Callable[..., ImageSource], info: Callable[..., SourceInfo],
                    download: Callable[..., None] | None = None) -> None:
    """Add a source kind under ``name`` (its functions take the source kwargs; see ``SourceKind``)."""
    if name in SOURCES:
        raise ValueError(f"data source {name!r} is already registered.")
    SOURCES[name] = SourceKind(load, info, download)


#: kinds whose loaders live above the data layer (they sample a model): the module named here registers the kind
#: when imported, which ``_kind`` does on first use, so every entry point can name them; the data layer itself
#: imports nothing of the model layer
DEFERRED_SOURCES: dict[str, str] = {"generated": "lightning_repro.teachers"}


def _kind(name: str) -> SourceKind:
    if name not in SOURCES and name in DEFERRED_SOURCES:
        importlib.import_module(DEFERRED_SOURCES[name])  # registers it (register_source)
    if name not in SOURCES:
        raise ValueError(f"Unknown data source {name!r}; valid sources are: "
                         f"{', '.join(dict.fromkeys([*SOURCES, *DEFERRED_SOURCES]))}.")
    return SOURCES[name]


def _check_classes(name: str, classes: list[int], labelled: bool, num_classes: int) -> None:
    if not labelled:
        raise ValueError(f"source {name!r} has no labels, so classes={classes} cannot select any.")
    bad = [c for c in classes if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"classes {bad} are out of range for {name!r}, which has {num_classes} classes.")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes {classes} repeat a class; give each class of {name!r} once.")


def get_source(name: str, classes: list[int] | None = None, **kwargs) -> ImageSource:
    """Load a source by name; ``classes`` keeps only those labels (relabelled 0..len-1 in the given order)."""
    src = _kind(name).load(**kwargs)
    if classes is not None:
        _check_classes(name, classes, src.labels is not None, src.num_classes)
        keep = torch.isin(src.labels, torch.tensor(classes))
        remap = torch.full((src.num_classes,), -1, dtype=torch.long)
        remap[torch.tensor(classes)] = torch.arange(len(classes))
        src = ImageSource(src.name, src.images[keep], remap[src.labels[keep]], len(classes))
    return src


def source_info(name: str, classes: list[int] | None = None, **kwargs) -> SourceInfo:
    """What ``get_source(name, classes, **kwargs)`` would hold, without reading its images or downloading them."""
    info = _kind(name).info(**kwargs)
    if classes is None:
        return info
    _check_classes(name, classes, info.labelled, info.num_classes)
    counts = None if info.class_counts is None else tuple(info.class_counts[c] for c in classes)
    return SourceInfo(info.image_shape, len(classes), True, None if counts is None else sum(counts), counts)


def prepare_source(name: str, **kwargs) -> None:
    """Download the source's files where it has a downloader and its kwargs ask for it (once per node)."""
    kind = _kind(name)
    if kind.download is not None:
        kind.download(**kwargs)
