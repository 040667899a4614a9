"""CIFAR-10 / CIFAR-100 python batches (Krizhevsky 2009) read as data, never run as code.

A batch file is a pickle of a dict (``data`` N×3072 uint8 in CHW order, ``labels`` / ``fine_labels``).  It is
read by ``CifarUnpickler``, whose ``find_class`` allows only the globals the genuine files (and batches written
with ``pickle.dump`` of numpy arrays) reference: numpy's array reconstruction and the builtin containers; any
other global is refused with one sentence.  Before reading, each file's MD5 is compared with the value the
archive publishes (torchvision's ``CIFAR10`` / ``CIFAR100`` file lists); ``verify_md5=False`` skips that check
for batches of one's own (tests).  ``download_cifar`` fetches and extracts the archive with torchvision.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np

__all__ = ["CIFAR_FOLDERS", "CIFAR_URLS", "CifarUnpickler", "cifar_files", "read_cifar_batches", "download_cifar"]

CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}

#: (module, name) of every global a CIFAR batch may reference (numpy 1 and 2 spellings, Python 2 builtins)
_ALLOWED_GLOBALS = frozenset({
    *((f"numpy.{core}.multiarray", "_reconstruct") for core in ("core", "_core")),  # ndarray, pickle protocol <= 4
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),  # ndarray, pickle protocol 5
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # bytes written by Python 3 at pickle protocol <= 2
    *((m, n) for m in ("builtins", "__builtin__")
      for n in ("dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray")),
})


class CifarUnpickler(pickle.Unpickler):
    """Unpickler of one CIFAR batch file that resolves only ``_ALLOWED_GLOBALS`` (see the module docstring)."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise ValueError(f"CIFAR batch {self.path} references the global {module}.{name}, which a CIFAR batch "
                             "never holds; it is refused rather than loaded.")
        return super().find_class(module, name)


def cifar_files(name: str, train: bool = True) -> list[tuple[str, str]]:
    """``(file name, published MD5)`` of the batches of ``name``'s training or test split, in reading order."""
    import torchvision.datasets as tvd

    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    return [(f, md5) for f, md5 in (cls.train_list if train else cls.test_list)]


def _md5(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    """(images N×3×32×32 uint8, labels) of one batch file, or one sentence on what is wrong with it."""
    try:
        with open(path, "rb") as fh:
            entry = CifarUnpickler(fh, path).load()
    except ValueError:
        raise
    except Exception as err:  # truncated file, not a pickle, ...
        raise ValueError(f"CIFAR batch {path} could not be read as a python batch ({type(err).__name__}: "
                         f"{err}).") from None
    entry = entry if isinstance(entry, dict) else {}
    labels = entry.get("labels", entry.get("fine_labels"))
    data = np.asarray(entry.get("data", np.zeros(0)))
    if not isinstance(labels, list) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 \
            or len(labels) != len(data):
        raise ValueError(f"CIFAR batch {path} is not a CIFAR python batch (a dict with uint8 'data' N×3072 and N "
                         "'labels' or 'fine_labels').")
    return data.reshape(-1, 3, 32, 32), [int(v) for v in labels]


def read_cifar_batches(folder: Path, name: str, train: bool = True,
                       verify_md5: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images N×32×32×3 and int64 labels of ``name``'s split in ``folder`` (the extracted archive)."""
    images, labels = [], []
    for fname, md5 in cifar_files(name, train):
        f = Path(folder) / fname
        if not f.is_file():
            raise FileNotFoundError(f"{name}: {f} is missing; {folder} must hold the extracted python batches "
                                    f"of {CIFAR_URLS[name]}.")
        if verify_md5 and (got := _md5(f)) != md5:
            raise ValueError(f"{name}: {f} has MD5 {got}, not the published {md5} of {CIFAR_URLS[name]}; "
                             "re-extract the archive, or pass source_kwargs verify_md5: false for batches of "
                             "your own.")
        x, y = _read_batch(f)
        images.append(x)
        labels.extend(y)
    return np.concatenate(images).transpose(0, 2, 3, 1), np.asarray(labels, dtype=np.int64)


def download_cifar(name: str, root: Path, train: bool = True) -> None:
    """Download and extract ``name``'s archive into ``root`` (torchvision checks the archive's MD5)."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        cls(str(root), train=train, download=True)
    except (RuntimeError, OSError) as err:  # URLError is an OSError
        raise FileNotFoundError(
            f"{name} could not be downloaded to {root} ({type(err).__name__}: {err}): extract "
            f"{CIFAR_URLS[name]} into {root} by hand so that {root / CIFAR_FOLDERS[name]} holds the python batches."
        ) from None
