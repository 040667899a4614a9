"""Image sources: where the training images come from.

Every source returns an ``ImageSource``: float32 images in [-1, 1], N×C×H×W, optional int64 labels.
Sources (DESIGN.md, "Data flow"):

* ``digits``   scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10 classes; Alpaydin &
               Kaynak 1998), values 0..16 mapped to [-1, 1]; optional ``resolution`` (bilinear).
* ``cifar10`` / ``cifar100``  torchvision's CIFAR loaders (Krizhevsky 2009), ``root`` + ``download``.
* ``folder``   class sub-folders of images (``root/<class>/<image>``), classes in sorted order.
* ``npz``      a ``.npz`` with uint8 ``images`` N×H×W×C (or N×H×W) and optional ``labels``.
* ``mog``      samples of the low-rank mixture of Gaussians of the paper's Eq. 2 (``theory.mog``).
* ``generated`` a teacher checkpoint's own deterministic samples (the paper's model recovery, Sec. 3.2.1,
               Case 2: a student trained on a teacher's samples), cached in a ``.npz``; see ``generated_source``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ImageSource",
    "get_source",
    "SOURCES",
    "uint8_to_float",
    "float_to_uint8",
    "generated_source",
    "generated_cache_path",
    "GENERATED_DEFAULT_SEEDS",
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


def _resize(images: Tensor, resolution: int | None) -> Tensor:
    if resolution is None or resolution == images.shape[-1]:
        return images
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False).clamp(-1, 1)


def _digits(resolution: int | None = None, **_) -> ImageSource:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().div(8.0).sub(1.0)[:, None]  # 0..16 -> [-1, 1]
    return ImageSource("digits", _resize(x, resolution), torch.from_numpy(d.target).long(), 10)


_CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}


_CIFAR_FILES = {
    ("cifar10", True): [f"data_batch_{i}" for i in range(1, 6)],
    ("cifar10", False): ["test_batch"],
    ("cifar100", True): ["train"],
    ("cifar100", False): ["test"],
}


def read_cifar_batches(folder: Path, name: str, train: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Read CIFAR's python pickles (``data`` N×3072 uint8 in CHW order, ``labels`` / ``fine_labels``)."""
    import pickle

    images, labels = [], []
    for fname in _CIFAR_FILES[(name, train)]:
        f = folder / fname
        if not f.is_file():
            raise FileNotFoundError(f"{name}: {f} is missing; {folder} must hold the extracted python batches "
                                    f"of {_CIFAR_URLS[name]}.")
        with open(f, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
    return np.concatenate(images).transpose(0, 2, 3, 1), np.asarray(labels, dtype=np.int64)


def _cifar(name: str, root: str | os.PathLike = "data_cache", download: bool = False, train: bool = True,
           resolution: int | None = None, **_) -> ImageSource:
    root = Path(root).expanduser()
    folder = root / _CIFAR_FOLDERS[name]
    if not folder.is_dir() and download:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        try:  # torchvision's downloader verifies the archive's MD5
            cls(str(root), train=train, download=True)
        except (RuntimeError, OSError) as err:  # URLError is an OSError
            raise FileNotFoundError(
                f"{name} could not be downloaded to {root} ({type(err).__name__}: {err}): extract "
                f"{_CIFAR_URLS[name]} into {root} by hand so that {folder} holds the python batches."
            ) from None
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{name} was not found under {folder}: extract {_CIFAR_URLS[name]} into {root} so that {folder} "
            f"holds the python batches, or pass --data.source_kwargs.download true on a machine with network."
        )
    images, labels = read_cifar_batches(folder, name, train)
    x = uint8_to_float(images)
    return ImageSource(name, _resize(x, resolution), torch.from_numpy(labels), 10 if name == "cifar10" else 100)


_IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _folder(root: str | os.PathLike, resolution: int | None = None, grayscale: bool = False, **_) -> ImageSource:
    from PIL import Image

    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"folder source: {root} is not a directory (expected root/<class>/<image files>).")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"folder source: {root} has no class sub-folders (expected root/<class>/<image files>).")
    imgs, labels = [], []
    for k, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            if f.suffix.lower() in _IMAGE_EXT:
                im = Image.open(f).convert("L" if grayscale else "RGB")
                if resolution is not None:
                    im = im.resize((resolution, resolution), Image.BICUBIC)
                imgs.append(np.asarray(im))
                labels.append(k)
    if not imgs:
        raise ValueError(f"folder source: no images ({', '.join(sorted(_IMAGE_EXT))}) under {root}.")
    shapes = {a.shape for a in imgs}
    if len(shapes) > 1:
        raise ValueError(f"folder source: images under {root} differ in size {sorted(shapes)[:3]}; pass resolution=.")
    return ImageSource("folder", uint8_to_float(np.stack(imgs)), torch.tensor(labels), len(classes))


def _npz(path: str | os.PathLike, resolution: int | None = None, num_classes: int | None = None, **_) -> ImageSource:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"npz source: {path} does not exist (expected a .npz with uint8 'images' N×H×W×C).")
    with np.load(path) as f:
        if "images" not in f:
            raise ValueError(f"npz source: {path} has no 'images' array (keys: {', '.join(f.files)}).")
        images = f["images"]
        labels = f["labels"] if "labels" in f else None
    if images.dtype != np.uint8:
        raise ValueError(f"npz source: 'images' in {path} must be uint8 N×H×W×C, got {images.dtype}.")
    lab = torch.as_tensor(labels).long() if labels is not None else None
    n_cls = num_classes if num_classes is not None else (int(lab.max()) + 1 if lab is not None and len(lab) else 0)
    return ImageSource("npz", _resize(uint8_to_float(images), resolution), lab, n_cls)


def _mog(num_samples: int = 8192, shape: tuple[int, int, int] = (1, 8, 8), num_components: int = 2, rank: int = 4,
         seed: int = 0, **kwargs) -> ImageSource:
    from ..theory.mog import LowRankMoG

    mog = LowRankMoG(tuple(shape), num_components, rank, seed=seed, **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    x, comp = mog.sample(num_samples, generator=g, return_components=True)
    return ImageSource("mog", x.float(), comp.long(), num_components)


#: default seeds of the ``generated`` source: from 1,000,000 on, disjoint from the evaluation seeds (0, 1, ...)
GENERATED_DEFAULT_SEEDS = "1000000-1000255"
GENERATED_FORMAT = "lightning_repro.generated/1"


def _generated_key(sha256: str, seeds: list[int], sampler: str, steps: int, guidance: float) -> str:
    blob = json.dumps(
        {"checkpoint_sha256": sha256, "seeds": seeds, "sampler": str(sampler), "steps": int(steps),
         "guidance": float(guidance)},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _checked_teacher(checkpoint: str | os.PathLike | None, seeds: str | int | list[int]) -> tuple[Path, list[int]]:
    """The teacher checkpoint's path (which must exist) and the parsed seeds, or one sentence on what is wrong."""
    from ..sampling.noise import parse_seeds

    if checkpoint is None:
        raise ValueError("generated source: give the teacher checkpoint (source_kwargs checkpoint: PATH).")
    ckpt = Path(checkpoint).expanduser()
    if not ckpt.is_file():
        raise FileNotFoundError(f"generated source: teacher checkpoint {ckpt} does not exist.")
    try:
        return ckpt, parse_seeds(seeds)
    except ValueError as err:
        raise ValueError(f"generated source: {err}") from None


def _cache_path(ckpt: Path, sha: str, seeds: list[int], sampler: str, steps: int, guidance: float,
                cache_dir: str | os.PathLike | None) -> Path:
    folder = Path(cache_dir).expanduser() if cache_dir is not None else ckpt.parent
    return folder / f"{ckpt.stem}.generated_{_generated_key(sha, seeds, sampler, steps, guidance)}.npz"


def generated_cache_path(checkpoint: str | os.PathLike, seeds: str | int | list[int] = GENERATED_DEFAULT_SEEDS,
                         sampler: str = "heun", steps: int = 18, guidance: float = 1.0,
                         cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``generated_source`` caches the teacher's samples for these arguments:
    ``<cache_dir or the checkpoint's folder>/<checkpoint stem>.generated_<hash>.npz``, the hash covering the
    checkpoint's SHA-256, the seeds, the sampler, the steps and the guidance weight."""
    from ..module import file_sha256

    ckpt, seed_list = _checked_teacher(checkpoint, seeds)
    return _cache_path(ckpt, file_sha256(ckpt), seed_list, sampler, steps, guidance, cache_dir)


def _read_generated(path: Path, sha256: str, seeds: list[int]) -> tuple[np.ndarray, np.ndarray | None, int] | None:
    """(images, labels, num_classes) of a cache file that matches, None if it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception:  # a truncated / foreign file: regenerate it
        return None
    if str(arrays.get("teacher_sha256", "")) != sha256 or arrays.get("seeds") is None \
            or arrays["seeds"].tolist() != seeds:
        raise ValueError(f"generated source: cache file {path} holds samples of another checkpoint or other seeds; "
                         "delete it to regenerate.")
    labels = arrays["labels"] if "labels" in arrays else None
    return arrays["images"], labels, int(arrays.get("num_classes", 0))


def generated_source(checkpoint: str | os.PathLike | None = None,
                     seeds: str | int | list[int] = GENERATED_DEFAULT_SEEDS, sampler: str = "heun",
                     steps: int = 18, guidance: float = 1.0, cache_dir: str | os.PathLike | None = None,
                     device: str = "auto", batch_size: int = 256) -> ImageSource:
    """A teacher checkpoint's deterministic samples as a training source (model recovery, Zhang et al. 2024,
    Sec. 3.2.1, Case 2).

    The teacher's EMA denoiser (``module.load_denoiser``) is sampled with ``sampling.sample`` at ``seeds``
    (default 1,000,000-1,000,255, disjoint from evaluation seeds 0, 1, ...), with labels ``seed %
    num_classes`` when the teacher is class-conditional (the source then carries those labels).  The uint8
    images, labels, seeds, teacher SHA-256, sampler, steps and guidance are cached in
    ``generated_cache_path(...)`` (by default next to the checkpoint), written atomically; a later call
    with the same checkpoint contents and arguments reads the cache instead of sampling.  Images are
    returned as the cache holds them (uint8 -> [-1, 1]), so the first and later calls give the same tensor.
    """
    from ..module import file_sha256

    ckpt, seed_list = _checked_teacher(checkpoint, seeds)
    if len(set(seed_list)) != len(seed_list):
        raise ValueError(f"generated source: seeds {seeds!r} repeat a seed; each training sample needs its own seed.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"generated source: steps must be a positive integer, got {steps!r}.")
    sha = file_sha256(ckpt)  # read once: the cache's name and its check
    path = _cache_path(ckpt, sha, seed_list, sampler, steps, guidance, cache_dir)
    cached = _read_generated(path, sha, seed_list) if path.is_file() else None
    if cached is None:
        cached = _generate(ckpt, sha, seed_list, sampler, steps, guidance, device, batch_size, path)
    images, labels, num_classes = cached
    lab = torch.from_numpy(np.asarray(labels, dtype=np.int64)) if labels is not None else None
    return ImageSource("generated", uint8_to_float(images), lab, num_classes)


def _generate(ckpt: Path, sha: str, seeds: list[int], sampler: str, steps: int, guidance: float, device: str,
              batch_size: int, path: Path) -> tuple[np.ndarray, np.ndarray | None, int]:
    from ..module import load_denoiser
    from ..sampling import sample

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    den, kernel = load_denoiser(ckpt, device)
    meta = den.checkpoint_meta
    num_classes = int(meta.get("num_classes") or 0)
    if guidance != 1.0 and not num_classes:
        raise ValueError(f"generated source: guidance={guidance} needs a class-conditional teacher, and {ckpt} "
                         "is unconditional.")
    labels = np.asarray(seeds, dtype=np.int64) % num_classes if num_classes else None
    x = sample(den, kernel, seeds, tuple(meta["image_shape"]), sampler=sampler, steps=steps,
               labels=None if labels is None else torch.from_numpy(labels), guidance=guidance,
               batch_size=batch_size, device=device)
    images = float_to_uint8(x)
    arrays: dict[str, np.ndarray] = {
        "images": images,
        "seeds": np.asarray(seeds, dtype=np.int64),
        "teacher_sha256": np.asarray(sha),
        "teacher_checkpoint": np.asarray(str(ckpt.resolve())),
        "sampler": np.asarray(str(sampler)),
        "steps": np.asarray(int(steps), dtype=np.int64),
        "guidance": np.asarray(float(guidance), dtype=np.float64),
        "num_classes": np.asarray(num_classes, dtype=np.int64),
        "format": np.asarray(GENERATED_FORMAT),
    }
    if labels is not None:
        arrays["labels"] = labels
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)
    return images, labels, num_classes


SOURCES = {
    "digits": _digits,
    "cifar10": lambda **kw: _cifar("cifar10", **kw),
    "cifar100": lambda **kw: _cifar("cifar100", **kw),
    "folder": _folder,
    "npz": _npz,
    "mog": _mog,
    "generated": generated_source,
}


def get_source(name: str, classes: list[int] | None = None, **kwargs) -> ImageSource:
    """Load a source by name; ``classes`` keeps only those labels (relabelled 0..len-1 in the given order)."""
    if name not in SOURCES:
        raise ValueError(f"Unknown data source {name!r}; valid sources are: {', '.join(SOURCES)}.")
    src = SOURCES[name](**kwargs)
    if classes is not None:
        if src.labels is None:
            raise ValueError(f"source {name!r} has no labels, so classes={classes} cannot select any.")
        bad = [c for c in classes if not 0 <= c < src.num_classes]
        if bad:
            raise ValueError(f"classes {bad} are out of range for {name!r}, which has {src.num_classes} classes.")
        keep = torch.isin(src.labels, torch.tensor(classes))
        remap = torch.full((src.num_classes,), -1, dtype=torch.long)
        remap[torch.tensor(classes)] = torch.arange(len(classes))
        src = ImageSource(src.name, src.images[keep], remap[src.labels[keep]], len(classes))
    return src
