"""Size-controlled training subsets (the paper's N = 2^k training sets, Sec. 3.1).

``SubsetDataModule(source, size, subset_seed)`` keeps the first ``size`` images of one permutation of the
source fixed by ``subset_seed``, so smaller subsets are nested in larger ones (as the paper's subsets of
CIFAR-10).  ``class_balanced=True`` orders the permutation round-robin over classes, so every prefix is
as balanced as possible and still nested.

Training batches are an infinite, resumable stream: global step ``k`` uses stream positions
``[k*G, (k+1)*G)`` with ``G = batch_size * world_size`` (the *effective* batch), where the stream is the
concatenation of per-epoch permutations of the subset seeded by ``(subset_seed, epoch)``.  Rank ``r``
takes its slice ``[r*batch_size, (r+1)*batch_size)`` of each global batch, so ranks never overlap, the
global batch does not depend on the number of ranks, and a resumed run (``--ckpt_path last``) continues
at exactly the batch it stopped before.  ``N = 16`` still fills a batch of 128.  Random flips are drawn
for the whole global batch from a generator seeded by ``(seed, step)`` and sliced the same way, so they too
depend on the global position only (one process with batch ``B`` sees the same flipped images as ``W``
ranks with batch ``B / W``).

Small subsets stay on the training device (``on_device``): the images are moved there once and each batch
is gathered there, so no host-to-device copy happens per step (auto: on a GPU, when the subset takes at
most ``ON_DEVICE_MAX_BYTES``; CIFAR-10's 50,000 float32 images take 614 MB).

Under DDP nothing is read at start-up: ``image_shape`` and ``num_classes`` (linked into the model by the CLI)
come from the source's metadata (``sources.source_info``), files are downloaded in ``prepare_data`` (once per
node), and the images are read when the first loader is built.
"""

from __future__ import annotations

import operator
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .sources import ImageSource, SourceInfo, get_source, prepare_source, source_info

__all__ = ["SubsetDataModule", "subset_indices", "InfiniteBatchStream", "SeedDataset", "ON_DEVICE_MAX_BYTES"]

#: subsets up to this size (bytes of float32 images) are kept on the GPU when ``on_device`` is auto (None)
ON_DEVICE_MAX_BYTES = 1 << 30


def subset_indices(source: ImageSource, size: int | None, subset_seed: int = 0, class_balanced: bool = False) -> Tensor:
    """Indices of the first ``size`` images of the ``subset_seed`` permutation (nested in ``size``)."""
    n = len(source)
    if size is None:
        size = n
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"data.size must be a positive integer, got {size!r}.")
    if size > n:
        raise ValueError(f"data.size={size} is larger than the {source.name} source, which has {n} images.")
    g = torch.Generator().manual_seed(int(subset_seed))
    perm = torch.randperm(n, generator=g)
    if class_balanced:
        if source.labels is None:
            raise ValueError(f"class_balanced needs labels, but the {source.name} source has none.")
        labels = source.labels[perm]
        # rank of each image within its class (in permutation order); sort by (rank, class) = round robin.
        rank = torch.zeros(n, dtype=torch.long)
        for c in labels.unique():
            m = labels == c
            rank[m] = torch.arange(int(m.sum()))
        order = torch.argsort(rank * (int(labels.max()) + 1) + labels, stable=True)
        perm = perm[order]
    return perm[:size]


def _is_int(value: Any, minimum: int | None = None) -> bool:
    """Whether ``value`` is an integer (not a bool) of at least ``minimum``."""
    try:
        number = operator.index(value)
    except TypeError:
        return False
    return not isinstance(value, bool) and (minimum is None or number >= minimum)


def _check_arguments(size: Any, batch_size: Any, val_seeds: Any, subset_seed: Any, data_seed: Any,
                    classes: Any) -> None:
    """One sentence naming the first obviously invalid argument of ``SubsetDataModule``."""
    if size is not None and not _is_int(size, 1):
        raise ValueError(f"data.size must be a positive integer, got {size!r}.")
    if not _is_int(batch_size, 1):
        raise ValueError(f"data.batch_size must be a positive integer (the per-device batch), got {batch_size!r}.")
    if not _is_int(val_seeds, 0):
        raise ValueError(f"data.val_seeds must be a non-negative integer (seeds sampled at validation), "
                         f"got {val_seeds!r}.")
    for name, seed in (("subset_seed", subset_seed), ("data_seed", data_seed)):
        if seed is not None and not _is_int(seed):
            raise ValueError(f"data.{name} must be an integer, got {seed!r}.")
    if classes is not None and (not isinstance(classes, (list, tuple)) or not classes):
        raise ValueError(f"data.classes must be a non-empty list of class labels (or null for all), got {classes!r}.")


class InfiniteBatchStream(IterableDataset):
    """Yields ``(images, labels)`` batches for global steps ``start, start+1, ...`` (see module docstring)."""

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, seed: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1, flip: bool = False):
        self.images, self.labels = images, labels
        self.batch_size, self.seed, self.start_step = batch_size, seed, start_step
        self.rank, self.world_size, self.flip = rank, world_size, flip
        self._epoch, self._perm = -1, None

    def _perm_of(self, epoch: int) -> Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(len(self.images), generator=g), epoch
        return self._perm

    def positions(self, step: int) -> Tensor:
        """Stream positions of this rank's part of the global batch at ``step``."""
        g = self.batch_size * self.world_size
        start = step * g + self.rank * self.batch_size
        return torch.arange(start, start + self.batch_size)

    def indices(self, step: int) -> Tensor:
        """Subset indices of this rank's batch at ``step``: position ``p`` is image ``perm_{p // N}[p % N]``."""
        n = len(self.images)
        pos = self.positions(step)  # consecutive, so the epochs they span are too
        first, last = int(pos[0]) // n, int(pos[-1]) // n
        if first == last:
            return self._perm_of(first)[pos - first * n]
        perms = torch.stack([self._perm_of(e) for e in range(first, last + 1)])  # one gather for all epochs
        return perms.view(-1)[pos - first * n]

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        idx = self.indices(step)
        x = self.images[idx.to(self.images.device)]
        if self.flip:  # deterministic per (seed, step) and global position: drawn for the global batch, sliced
            g = torch.Generator().manual_seed(int(self.seed) * 7919 + step * 104729)
            m = torch.rand(self.batch_size * self.world_size, generator=g) < 0.5
            m = m[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].to(x.device)
            x = torch.where(m[:, None, None, None], x.flip(-1), x)
        return x, self.labels[idx.to(self.labels.device)]

    def __iter__(self):
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1


class SeedDataset(Dataset):
    """Seeds (with their class labels) for sampling at validation; each item is ``(seed, label)``."""

    def __init__(self, seeds: list[int], labels: list[int] | None = None):
        self.seeds, self.labels = list(seeds), labels

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, i):
        return self.seeds[i], (self.labels[i] if self.labels is not None else -1)


class SubsetDataModule(L.LightningDataModule):
    """A nested, seeded training subset of a source, served as an infinite resumable batch stream.

    Args:
        source: ``digits`` | ``cifar10`` | ``cifar100`` | ``folder`` | ``npz`` | ``mog`` | ``generated``.
        size: number of training images N (``None``: the whole source).
        subset_seed: seed of the permutation whose first N images form the subset.
        batch_size: per-device batch; the effective batch is ``batch_size * world_size``.
        flip: random horizontal flips (off by default: the paper trains without augmentation).
        class_balanced: round-robin class order so every N is balanced.
        conditional: train a class-conditional model (the model's ``num_classes`` is linked to this).
        source_kwargs: options of the source (``root``, ``download``, ``resolution``, ``path``, ``verify_md5``, ...).
        classes: keep only these labels of the source (relabelled 0..len-1).
        val_seeds: number of fixed seeds sampled at each validation (seeds 0..val_seeds-1).
        data_seed: seed of the batch order and flips (default: ``subset_seed``).
        on_device: keep the subset on the training device and gather batches there (``None``: when training
            on a GPU and the subset takes at most ``ON_DEVICE_MAX_BYTES``).
    """

    def __init__(
        self,
        source: str = "digits",
        size: int | None = None,
        subset_seed: int = 0,
        batch_size: int = 128,
        flip: bool = False,
        class_balanced: bool = False,
        conditional: bool = False,
        source_kwargs: dict[str, Any] | None = None,
        classes: list[int] | None = None,
        val_seeds: int = 64,
        data_seed: int | None = None,
        on_device: bool | None = None,
    ):
        super().__init__()
        _check_arguments(size, batch_size, val_seeds, subset_seed, data_seed, classes)
        self.save_hyperparameters()
        self.source_name, self.size, self.subset_seed = source, size, subset_seed
        self.batch_size, self.flip, self.class_balanced = batch_size, flip, class_balanced
        self.conditional, self.source_kwargs, self.classes = conditional, dict(source_kwargs or {}), classes
        self.val_seeds = val_seeds
        self.data_seed = subset_seed if data_seed is None else data_seed
        self.on_device = on_device
        self._info: SourceInfo | None = None
        self._source: ImageSource | None = None
        self._indices: Tensor | None = None

    # -- the subset ---------------------------------------------------------------------------
    @property
    def info(self) -> SourceInfo:
        """The source's image shape, classes and size from its metadata: no image is read or downloaded."""
        if self._info is None:
            info = source_info(self.source_name, classes=self.classes, **self.source_kwargs)
            if self.conditional and not info.labelled:
                raise ValueError(f"data.conditional is true but the {self.source_name} source has no labels.")
            if self.size is not None and info.num_images is not None and self.size > info.num_images:
                raise ValueError(f"data.size={self.size} is larger than the {self.source_name} source, which has "
                                 f"{info.num_images} images.")
            self._info = info
        return self._info

    def prepare_data(self) -> None:
        """Download the source's files if its kwargs ask for it (Lightning calls this once per node)."""
        prepare_source(self.source_name, **self.source_kwargs)

    @property
    def source(self) -> ImageSource:
        if self._source is None:
            info = self.info
            src = get_source(self.source_name, classes=self.classes, **self.source_kwargs)
            if (src.image_shape, src.num_classes) != (info.image_shape, info.num_classes) \
                    or info.num_images not in (None, len(src)):
                raise ValueError(f"data source {self.source_name}: its metadata promised {info.num_images} images "
                                 f"of shape {info.image_shape} in {info.num_classes} classes, but it holds "
                                 f"{len(src)} of shape {src.image_shape} in {src.num_classes}.")
            self._indices = subset_indices(src, self.size, self.subset_seed, self.class_balanced)
            self._source = src
        return self._source

    @property
    def indices(self) -> Tensor:
        _ = self.source
        return self._indices  # type: ignore[return-value]

    @property
    def images(self) -> Tensor:
        """The subset's images, float32 N×C×H×W in [-1, 1] (for GL and the optimal denoiser)."""
        return self.source.images[self.indices]

    @property
    def labels(self) -> Tensor | None:
        return None if self.source.labels is None else self.source.labels[self.indices]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """C, H, W of the images, from the source's metadata (the CLI links it into the model on every rank)."""
        return tuple(int(v) for v in self.info.image_shape)  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        """Classes the *model* is conditioned on: the source's when ``conditional``, else 0 (from metadata)."""
        return self.info.num_classes if self.conditional else 0

    # -- loaders ------------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int, int]:
        t = self.trainer
        if t is None:
            return 0, 1, 0
        return t.global_rank, t.world_size, t.global_step

    def stream_device(self, device: torch.device | str | None = None) -> torch.device:
        """Where the training images are kept: ``device`` (default: the trainer's) when ``on_device`` says so, else CPU."""
        if device is None:
            t = self.trainer
            device = t.strategy.root_device if t is not None else "cpu"
        device = torch.device(device)
        keep = self.on_device
        if keep is None:
            n_bytes = len(self.indices) * 4 * int(torch.tensor(self.image_shape).prod())
            keep = device.type == "cuda" and n_bytes <= ON_DEVICE_MAX_BYTES
        return device if keep else torch.device("cpu")

    def train_dataloader(self) -> DataLoader:
        rank, world, step = self._rank_world()
        labels = self.labels if (self.conditional and self.labels is not None) else torch.full((len(self.indices),), -1)
        dev = self.stream_device()
        stream = InfiniteBatchStream(self.images.to(dev), labels.to(dev), self.batch_size, self.data_seed,
                                     start_step=step, rank=rank, world_size=world, flip=self.flip)
        return DataLoader(stream, batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        seeds = list(range(self.val_seeds))
        labels = [s % self.num_classes for s in seeds] if self.num_classes else None
        return DataLoader(SeedDataset(seeds, labels), batch_size=max(1, min(self.val_seeds, 256)))

    def describe(self) -> dict[str, Any]:
        """The subset in a few keys (from metadata where it tells the size: no image is read before fit)."""
        size = self.size if self.size is not None else self.info.num_images
        if size is None or self._source is not None:
            size = len(self.indices)
        return {"source": self.source_name, "size": size, "subset_seed": self.subset_seed,
                "image_shape": list(self.image_shape), "num_classes": self.num_classes}
