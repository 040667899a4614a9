"""Image descriptors ``f(x)`` for the reproducibility and generalization scores.

Zhang et al., "The Emergence of Reproducibility and Generalizability in Diffusion Models" (ICML 2024),
Sec. 2.1, compare two images by the cosine similarity of their SSCD descriptors (Pizzi et al., "A
Self-Supervised Descriptor for Image Copy Detection", CVPR 2022) and call them "the same" above 0.6:

    RP = P( <f(x_A), f(x_B)> > 0.6 ),     GL = 1 - P( max_j <f(x), f(y_j)> > 0.6 ),

with ``f`` L2-normalised.  A descriptor here is an ``nn.Module`` mapping a batch of images to
L2-normalised float32 features ``(N, D)``, computed in mini-batches of ``batch_size`` under
``torch.no_grad()``, and declaring the similarity threshold it was calibrated for as
``default_threshold``.

Input images (both descriptors): ``N x C x H x W`` tensors, either ``uint8`` in ``[0, 255]`` or
floating point in ``[-1, 1]`` (the suite's convention; values outside are clamped, as they would be
when written to PNG).  Channels-last (``N x H x W x C``) arrays must be permuted first
(``torch.from_numpy(npz["images"]).permute(0, 3, 1, 2)``).  Features come back on the device of
the input images.

* ``SSCDDescriptor``: the official SSCD TorchScript models (``sscd_disc_large``, ResNeXt101 32x4,
  1024-d, the one the paper's evaluation script uses; ``sscd_disc_mixup``, ResNet-50, 512-d), with the
  paper's preprocessing: bilinear resize to 320 x 320, grey images repeated to 3 channels, ImageNet
  mean/std normalisation of ``[0, 1]`` images.  Threshold 0.6 (the paper's).
* ``PixelDescriptor``: centred, L2-normalised pixels (the normalised correlation of two images),
  for data where SSCD is meaningless (8 x 8 digits) or unavailable (offline machines).  Its
  threshold is calibrated below.

Weights of the SSCD models
--------------------------
Looked up, in order: ``path=`` if given; else ``torch.hub.get_dir()/checkpoints/<file>``, downloaded
from the official URL (``SSCD_MODELS[name].url``) with ``torch.hub.download_url_to_file`` on first
use.  The file's SHA-256 is checked before ``torch.jit.load`` touches it, against (in order)

1. ``sha256=`` if the caller passes one;
2. the pinned value of the model: ``sscd_disc_mixup`` is pinned to
   ``9f26bd4c848cc19b73d2ae92eea6e04886f61a7b764ceb7a13aeee62e6a6db56`` (98,791,638 bytes), the digest
   that several independent public projects record for the official file (we could not download it
   here to check it ourselves).  facebookresearch/sscd-copy-detection publishes no digests (its README
   and docs list URLs only), and no record of ``sscd_disc_large.torchscript.pt``'s was found, so its pin
   is ``None``;
3. for an unpinned model, nothing: the file is refused unless the caller passes ``trust_unpinned=True``
   (the refusal names the file's digest, to pin with ``sha256=`` once checked).  A trusted file's digest
   is recorded in the sidecar ``<file>.sha256`` the first time (with a warning that it was not checked
   against a published value); every later trusted load must match it.  ``trust_unpinned`` never
   overrides a digest of step 1 or 2.

A mismatch raises ``ValueError`` naming both digests, the file and what to do; a missing file that
cannot be downloaded raises ``FileNotFoundError`` naming the URL and the path to put it at.
``check_descriptor_weights`` runs these checks without loading the model, so a command can fail on
its weights before it samples anything.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..files import file_sha256 as sha256_file

__all__ = [
    "Descriptor",
    "SSCDDescriptor",
    "PixelDescriptor",
    "SSCDModel",
    "SSCD_MODELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DESCRIPTORS",
    "get_descriptor",
    "images_to_unit",
    "sha256_file",
    "resolve_sscd_weights",
    "check_descriptor_weights",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class SSCDModel:
    """One official SSCD TorchScript file (facebookresearch/sscd-copy-detection, README)."""

    name: str
    dim: int
    sha256: str | None

    @property
    def filename(self) -> str:
        return f"{self.name}.torchscript.pt"

    @property
    def url(self) -> str:
        return f"https://dl.fbaipublicfiles.com/sscd-copy-detection/{self.filename}"


SSCD_MODELS: dict[str, SSCDModel] = {
    # No public record of this file's SHA-256 was found: verified by `sha256=` or trust on first use.
    "sscd_disc_large": SSCDModel("sscd_disc_large", 1024, None),
    # Recorded identically (with size 98,791,638 bytes) by several independent public projects.
    "sscd_disc_mixup": SSCDModel(
        "sscd_disc_mixup", 512, "9f26bd4c848cc19b73d2ae92eea6e04886f61a7b764ceb7a13aeee62e6a6db56"
    ),
}


def images_to_unit(images: Tensor) -> Tensor:
    """``uint8`` ``[0, 255]`` or float ``[-1, 1]`` images -> float32 ``[0, 1]`` (clamped)."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if images.is_floating_point():
        return images.float().add(1.0).mul_(0.5).clamp_(0.0, 1.0)
    raise ValueError(f"images must be uint8 in [0, 255] or float in [-1, 1], got dtype {images.dtype}.")


def _check_images(images: Tensor, channels: tuple[int, ...] | None = None) -> None:
    if not isinstance(images, Tensor):
        raise ValueError(
            f"images must be a torch.Tensor of shape N x C x H x W, got {type(images).__name__}."
        )
    if images.ndim != 4:
        raise ValueError(f"images must have shape N x C x H x W, got shape {tuple(images.shape)}.")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch (N = 0); pass at least one image.")
    if channels is not None and images.shape[1] not in channels:
        raise ValueError(
            f"images must have {' or '.join(map(str, channels))} channels in dim 1 (N x C x H x W), "
            f"got shape {tuple(images.shape)}."
        )


class Descriptor(nn.Module):
    """Base class: ``forward(images) -> (N, D)`` float32 L2-normalised features.

    Subclasses implement ``embed(x)`` on float32 ``[0, 1]`` images (on the model's device, or the input's
    for parameter-free descriptors); features are returned on the input's device.
    Descriptors have no training mode: ``train()`` always leaves them in eval mode.
    """

    default_threshold: float = 0.6
    channels: tuple[int, ...] | None = None

    def __init__(self, batch_size: int = 256):
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
        self.batch_size = int(batch_size)
        super().train(False)

    def train(self, mode: bool = True) -> Descriptor:
        """Descriptors stay in eval mode (no dropout / batch-norm updates), whatever ``mode`` says."""
        return super().train(False)

    def embed(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _compute_device(self, images: Tensor) -> torch.device:
        """Where ``embed`` runs: the input's device for parameter-free descriptors."""
        return images.device

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        _check_images(images, self.channels)
        device = self._compute_device(images)
        feats = []
        for chunk in images.split(self.batch_size):
            x = images_to_unit(chunk.to(device))
            f = self.embed(x).float().flatten(1)
            feats.append(F.normalize(f, dim=1).to(images.device))
        return torch.cat(feats)


# ----------------------------------------------------------------------------- pixel descriptor


class PixelDescriptor(Descriptor):
    """Centred, L2-normalised pixels: ``f(x) = (x - mean(x)) / ||x - mean(x)||`` per image.

    The cosine similarity of two such features is the normalised (Pearson) correlation of the two
    images; it is invariant to per-image brightness offset and contrast, so whether the images are
    in ``[0, 1]``, ``[0, 255]`` or ``[-1, 1]`` does not matter.  ``size`` (int or ``(H, W)``) first
    resizes the images (bilinear, antialiased).  A constant image has a zero feature (similarity 0
    to everything).

    Calibration of ``default_threshold = 0.97``, measured with ``pixel_calibration()`` (float64,
    seed 0, images in ``[-1, 1]``)::

        python -c "from lightning_repro.metrics.descriptors import pixel_calibration as c; print(c())"

    "distinct NN" is each image's most similar *other* image of the set; "noise" adds N(0, std^2) per
    pixel; "shift" moves the image by one pixel (edge replicated), worst of the four directions:

    ============================  ==============  ==============  ==============  ==========
    set                           distinct NN     noise std 0.05  noise std 0.10  1-px shift
                                  max (frac>0.97) min similarity  min similarity  min sim.
    ============================  ==============  ==============  ==============  ==========
    digits, 1797 x 1 x 8 x 8      0.9942 (11.1%)  0.9954          0.9835          0.0565
    smooth 32 x 32 x 3, n=2000    0.3452 (0%)     0.9935          0.9753          0.8930
    uniform 32 x 32 x 3, n=2000   0.0845 (0%)     0.9958          0.9839          -0.0294
    ============================  ==============  ==============  ==============  ==========

    ("smooth" = bicubically upsampled 8 x 8 Gaussian noise scaled to per-image std 0.5 and clamped, a
    CIFAR-like spectrum; "uniform" = i.i.d. uniform pixels.)  So at 0.97 the same image under noise of
    std 0.05-0.1 is "the same" on all three sets, and distinct 32 x 32 images never are; distinct
    digits are for 11% of the digits (2.4% above 0.98, 45% above 0.95, 92% above 0.9): handwritten
    8 x 8 digits are near-duplicates of each other in pixel space, and no pixel threshold separates
    them from a noisy copy with any margin (0.9942 vs 0.9954 at std 0.05).

    Limitation, measured: pixel correlation is not shift-tolerant.  A one-pixel shift scores 0.89 on
    smooth 32 x 32 images, 0.06 on an 8 x 8 digit (one pixel is 1/8 of its width) and ~0 on white
    noise.  Calling a shifted smooth image "the same" needs a threshold below 0.893, where 92% of the
    digits have a distinct neighbour above it: no single threshold meets both, and the default favours
    the noise criterion and distinct digits.  Use SSCD (trained for copy detection under shifts, crops
    and colour changes) where shifts matter; with the pixel descriptor on 32 x 32 data,
    ``threshold=0.85`` also accepts one-pixel shifts of smooth images.
    """

    default_threshold = 0.97

    def __init__(self, size: int | tuple[int, int] | None = None, batch_size: int = 1024):
        super().__init__(batch_size=batch_size)
        if size is not None:
            size = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"size must be a positive int or an (H, W) pair, got {size}.")
        self.size = size

    def embed(self, x: Tensor) -> Tensor:
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        f = x.flatten(1)
        return f - f.mean(dim=1, keepdim=True)

    def extra_repr(self) -> str:
        return f"size={self.size}, batch_size={self.batch_size}, default_threshold={self.default_threshold}"


def _smooth_images(n: int, generator: torch.Generator, size: int = 32) -> Tensor:
    z = torch.randn(n, 3, 8, 8, generator=generator, dtype=torch.float64)
    y = F.interpolate(z, size=size, mode="bicubic", align_corners=False)
    return (0.5 * y / y.flatten(1).std(dim=1).view(-1, 1, 1, 1)).clamp(-1.0, 1.0)


def _shift(x: Tensor, dx: int, dy: int) -> Tensor:
    h, w = x.shape[-2:]
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return xp[..., 1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]


def pixel_calibration(n_random: int = 2000, seed: int = 0, threshold: float | None = None) -> dict:
    """The numbers behind ``PixelDescriptor.default_threshold`` (see its docstring), as a dict per set.

    For each set: ``distinct_max`` (largest similarity between two different images),
    ``distinct_frac_above`` (fraction of images with a different image above ``threshold``),
    ``noise_0.05_min``, ``noise_0.1_min`` and ``shift_min``.  Needs scikit-learn (digits).
    """
    from sklearn.datasets import load_digits

    threshold = PixelDescriptor.default_threshold if threshold is None else threshold
    g = torch.Generator().manual_seed(seed)

    def feats(x: Tensor) -> Tensor:  # the descriptor's embedding, in float64
        f = x.flatten(1)
        return F.normalize(f - f.mean(dim=1, keepdim=True), dim=1)

    sets = {
        "digits": torch.from_numpy(load_digits().images / 8.0 - 1.0)[:, None],
        "smooth32": _smooth_images(n_random, g),
        "uniform32": torch.rand(n_random, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1,
    }
    report = {}
    for name, x in sets.items():
        f = feats(x)
        s = f @ f.T
        s.fill_diagonal_(-2.0)
        nn_sim = s.max(dim=1).values
        row = {"n": len(x), "distinct_max": float(nn_sim.max())}
        row["distinct_frac_above"] = float((nn_sim > threshold).double().mean())
        for std in (0.05, 0.1):
            xn = x + std * torch.randn(x.shape, generator=g, dtype=x.dtype)
            row[f"noise_{std}_min"] = float((feats(xn) * f).sum(1).min())
        row["shift_min"] = min(
            float((feats(_shift(x, dx, dy)) * f).sum(1).min())
            for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1))
        )
        report[name] = row
    return report


# ----------------------------------------------------------------------------- SSCD descriptor


def _check_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    digest = str(sha256).strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"sha256 must be 64 hexadecimal digits (a SHA-256 digest), got {sha256!r}.")
    return digest


def _locate_sscd_file(spec: SSCDModel, path: str | os.PathLike | None) -> Path:
    """``path`` (which must exist), else the torch hub cache's copy, downloaded there if missing."""
    if path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(
                f"SSCD weights file {file} does not exist; download {spec.url} to it, or pass path= of an "
                "existing TorchScript file."
            )
        return file
    file = Path(torch.hub.get_dir()) / "checkpoints" / spec.filename
    if not file.is_file():
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(spec.url, str(file), progress=True)
        except Exception as err:  # no network, proxy, disk full, ...
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise FileNotFoundError(
                f"SSCD weights {spec.filename} are not in the torch hub cache and could not be downloaded "
                f"({reason}); download {spec.url} to {file}, or pass path= of a local copy."
            ) from err
    return file


def _trusted_unpinned(file: Path, spec: SSCDModel, got: str) -> None:
    """``trust_unpinned=True``: the sidecar ``<file>.sha256`` records the digest first trusted; later ones must match."""
    sidecar = file.with_name(file.name + ".sha256")
    if sidecar.is_file():
        recorded = (sidecar.read_text().split() or [""])[0].lower()
        if got != recorded:
            raise ValueError(
                f"SSCD weights {file} have SHA-256 {got} but {recorded} was recorded in {sidecar} when the file "
                f"was first trusted; delete both files to download {spec.url} again, or pass sha256= of a file "
                "you trust."
            )
        return
    try:
        sidecar.write_text(f"{got}  {file.name}\n")
        where = f"recorded in {sidecar}"
    except OSError:
        where = f"could not be recorded next to it ({sidecar} is not writable)"
    warnings.warn(
        f"No published SHA-256 exists for {spec.filename}: {file} was loaded unverified (trust_unpinned=True) and "
        f"its digest {got} {where}; later trusted loads are checked against it (pass sha256= to pin a value you "
        "trust).",
        stacklevel=4,
    )


def resolve_sscd_weights(
    name: str,
    path: str | os.PathLike | None = None,
    sha256: str | None = None,
    trust_unpinned: bool = False,
) -> Path:
    """Find (or download) and verify the TorchScript file of SSCD model ``name``; return its path.

    The file is never loaded here.  See the module docstring for the order of look-ups and checks: a
    digest (``sha256=`` or the model's pin) must match; a model without either is refused unless
    ``trust_unpinned=True``.  Raises ``FileNotFoundError`` if the file is missing and cannot be
    downloaded, ``ValueError`` (one sentence) if it cannot be verified.
    """
    if name not in SSCD_MODELS:
        raise ValueError(f"Unknown SSCD model {name!r}; expected one of {sorted(SSCD_MODELS)}.")
    spec = SSCD_MODELS[name]
    expected = _check_sha256(sha256) or spec.sha256
    file = _locate_sscd_file(spec, path)
    got = sha256_file(file)
    if expected is not None:
        if got != expected:
            source = "the sha256= you passed" if sha256 else f"the published digest of {spec.filename}"
            raise ValueError(
                f"SSCD weights {file} have SHA-256 {got} but {expected} was expected ({source}); delete the "
                f"file and download it again from {spec.url}, or pass sha256= of a file you trust."
            )
        return file
    if not trust_unpinned:
        raise ValueError(
            f"SSCD weights {file} (SHA-256 {got}) cannot be verified because no published digest of "
            f"{spec.filename} exists; pass sha256= of a copy you trust, or trust_unpinned=True to load it "
            "unverified."
        )
    _trusted_unpinned(file, spec, got)
    return file


def check_descriptor_weights(
    name: str,
    path: str | os.PathLike | None = None,
    sha256: str | None = None,
    trust_unpinned: bool = False,
) -> Path | None:
    """Resolve and verify the weights descriptor ``name`` will load, without loading them; ``None`` for ``pixel``.

    Cheap enough to call before any sampling (it reads the file once to hash it, downloading it first
    if it is missing from the hub cache), so a missing or unverifiable file fails before hours of work;
    the same arguments then go to ``get_descriptor``.  Raises what ``get_descriptor`` would.
    """
    key = _descriptor_key(name)
    if key == "pixel":
        _no_weights_for_pixel(path, sha256)
        return None
    return resolve_sscd_weights(key, path=path, sha256=sha256, trust_unpinned=trust_unpinned)


class SSCDDescriptor(Descriptor):
    """SSCD copy-detection descriptor (Pizzi et al. 2022), as used by Zhang et al. 2024, Sec. 2.1.

    Args:
        name: ``"sscd_disc_large"`` (1024-d, the paper's evaluation script) or ``"sscd_disc_mixup"`` (512-d).
        path: a local TorchScript file; default: the torch hub cache, downloading on first use.
        sha256: expected SHA-256 of the file (overrides the pinned value; required for any file that
            is not the official one, e.g. a fine-tuned or test model).
        trust_unpinned: load a model that has no pinned digest (``sscd_disc_large``) without ``sha256=``;
            the digest is recorded on first use and checked on later trusted loads (see the module docstring).
        device: where the model runs; default CUDA if available, else CPU.  ``.to()`` moves it too.
        batch_size: images per forward pass.
        size: the square side the images are resized to (bilinear, antialiased); 320 as in the paper.

    Preprocessing (the paper's ``Resize((320, 320))``, ``ToTensor``, ``Normalize``): images to
    ``[0, 1]``, grey repeated to 3 channels, resize, ImageNet mean/std.  Output: ``(N, D)`` float32,
    L2-normalised (the TorchScript models normalise already; done again, harmlessly).
    """

    default_threshold = 0.6
    channels = (1, 3)

    def __init__(
        self,
        name: str = "sscd_disc_large",
        path: str | os.PathLike | None = None,
        sha256: str | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 64,
        size: int = 320,
        trust_unpinned: bool = False,
    ):
        super().__init__(batch_size=batch_size)
        self.name = name
        self.size = int(size)
        self.weights_path = resolve_sscd_weights(name, path=path, sha256=sha256, trust_unpinned=trust_unpinned)
        try:
            with (
                warnings.catch_warnings()
            ):  # TorchScript is the official SSCD format; its deprecation is noise here
                warnings.filterwarnings(
                    "ignore", message=r".*torch\.jit\.load.* is deprecated", category=FutureWarning
                )
                model = torch.jit.load(str(self.weights_path), map_location="cpu")
        except Exception as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(
                f"SSCD weights {self.weights_path} are not a loadable TorchScript model ({reason})."
            ) from err
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.to(device)
        super().train(False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def _compute_device(self, images: Tensor) -> torch.device:
        return self.mean.device

    def embed(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True
            )
        return self.model((x - self.mean) / self.std)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weights={str(self.weights_path)!r}, size={self.size}, batch_size={self.batch_size}"


DESCRIPTORS = ("pixel", "sscd", *SSCD_MODELS)


def _descriptor_key(name: str) -> str:
    """``"pixel"`` or an ``SSCD_MODELS`` name (``"sscd"`` is ``"sscd_disc_large"``, the paper's)."""
    key = str(name).lower()
    key = "sscd_disc_large" if key == "sscd" else key
    if key == "pixel" or key in SSCD_MODELS:
        return key
    raise ValueError(f"Unknown descriptor {name!r}; expected one of {list(DESCRIPTORS)}.")


def _no_weights_for_pixel(path, sha256) -> None:
    if path is not None or sha256 is not None:
        given = "path=" if path is not None else "sha256="
        raise ValueError(f"The pixel descriptor has no weights file, so {given} is only for the SSCD descriptors.")


def get_descriptor(
    name: str,
    *,
    path: str | os.PathLike | None = None,
    sha256: str | None = None,
    trust_unpinned: bool = False,
    **kwargs,
) -> Descriptor:
    """``"pixel"`` -> ``PixelDescriptor(**kwargs)``; ``"sscd"`` (= ``"sscd_disc_large"``, the paper's) or
    ``"sscd_disc_mixup"`` -> ``SSCDDescriptor(name, path=, sha256=, trust_unpinned=, **kwargs)``.

    ``trust_unpinned`` means nothing to the pixel descriptor (it has no weights); ``path`` / ``sha256``
    with ``"pixel"`` are refused.
    """
    key = _descriptor_key(name)
    if key == "pixel":
        _no_weights_for_pixel(path, sha256)
        return PixelDescriptor(**kwargs)
    return SSCDDescriptor(key, path=path, sha256=sha256, trust_unpinned=trust_unpinned, **kwargs)
