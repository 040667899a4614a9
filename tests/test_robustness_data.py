"""Data-layer reliability (#17): CIFAR batches read as data (restricted unpickler, published MD5s), source
metadata without loading or downloading, one download per node in ``prepare_data``, npz labels that fit their
images, and one sentence for invalid data-module arguments."""

import hashlib
import os
import pickle
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_repro.data import SubsetDataModule, get_source
from lightning_repro.data import cifar as cifar_mod
from lightning_repro.data.sources import (
    SOURCES,
    ImageSource,
    SourceInfo,
    SourceKind,
    register_source,
    source_info,
    uint8_to_float,
)

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    """Pickles as a call of ``func(*args)``: what a malicious batch file would run when unpickled."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _cifar_folder(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _write_batches(folder: Path, protocol: int = pickle.DEFAULT_PROTOCOL, n: int = 3) -> tuple[np.ndarray, list]:
    """Genuine-format batches (dict of numpy uint8 data, list of int labels) written with ``pickle.dump``."""
    rng = np.random.default_rng(1)
    data, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x, y = rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": x, "labels": y, "filenames": [b"a.png"] * n}, f,
                        protocol=protocol)
        if name != "test_batch":
            data.append(x)
            labels += y
    return np.concatenate(data), labels


# -- 1. CIFAR batches are data -------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_genuine_format_batches_load_at_every_pickle_protocol(tmp_path, protocol):
    data, labels = _write_batches(_cifar_folder(tmp_path), protocol)
    src = get_source("cifar10", root=str(tmp_path), verify_md5=False)
    assert src.labels.tolist() == labels
    assert torch.equal(src.images, uint8_to_float(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)))


@pytest.mark.parametrize("payload", ["os.system", "subprocess.check_call", "builtins.exec"])
def test_malicious_batch_is_refused_and_never_runs(tmp_path, payload):
    folder = _cifar_folder(tmp_path)
    _write_batches(folder)
    marker = tmp_path / "pwned"
    func, args = {
        "os.system": (os.system, (f"touch {marker}",)),
        "subprocess.check_call": (subprocess.check_call, (["touch", str(marker)],)),
        "builtins.exec": (exec, (f"open({str(marker)!r}, 'w').close()",)),
    }[payload]
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({"data": _Payload(func, *args), "labels": [0]}, f)
    glob = f"{func.__module__}.{func.__name__}"
    message = (f"CIFAR batch {folder / 'data_batch_1'} references the global {glob}, which a CIFAR batch never "
               "holds; it is refused rather than loaded.")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        get_source("cifar10", root=str(tmp_path), verify_md5=False)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):  # the path of train.py
        _ = SubsetDataModule("cifar10", source_kwargs={"root": str(tmp_path), "verify_md5": False}).images
    assert not marker.exists()


def test_published_md5_is_checked_before_reading(tmp_path, monkeypatch):
    folder = _cifar_folder(tmp_path)
    _write_batches(folder)
    md5 = hashlib.md5((folder / "data_batch_1").read_bytes()).hexdigest()
    message = (f"cifar10: {folder / 'data_batch_1'} has MD5 {md5}, not the published c99cafc152244af753f735de768cd75f "
               "of https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz; re-extract the archive, or pass "
               "source_kwargs verify_md5: false for batches of your own.")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        get_source("cifar10", root=str(tmp_path))
    # files whose MD5 is the published one are read with the check on
    sums = [(f, hashlib.md5((folder / f).read_bytes()).hexdigest()) for f, _ in cifar_mod.cifar_files("cifar10")]
    monkeypatch.setattr(cifar_mod, "cifar_files", lambda name, train=True: sums)
    assert len(get_source("cifar10", root=str(tmp_path))) == 15


def test_unreadable_or_foreign_batch_is_one_sentence(tmp_path):
    folder = _cifar_folder(tmp_path)
    _write_batches(folder)
    (folder / "data_batch_2").write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [1]}))
    with pytest.raises(ValueError, match=r"^CIFAR batch .*data_batch_2 is not a CIFAR python batch \(a dict with "
                                         r"uint8 'data' N×3072 and N 'labels' or 'fine_labels'\)\.$"):
        get_source("cifar10", root=str(tmp_path), verify_md5=False)
    (folder / "data_batch_2").write_bytes(pickle.dumps({"data": 1})[:5])
    with pytest.raises(ValueError, match=r"^CIFAR batch .*data_batch_2 could not be read as a python batch "
                                         r"\(UnpicklingError: .*\)\.$"):
        get_source("cifar10", root=str(tmp_path), verify_md5=False)


# -- 2. metadata without loading, one download per node ------------------------------------------------------

def test_cifar_metadata_needs_no_files_and_prepare_data_downloads(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("lightning_repro.data.sources.download_cifar", lambda name, root, train: calls.append(name))
    kwargs = {"root": str(tmp_path / "cache"), "download": True}
    dm = SubsetDataModule("cifar100", size=64, conditional=True, source_kwargs=kwargs)
    assert (dm.image_shape, dm.num_classes, dm.describe()["size"]) == ((3, 32, 32), 100, 64)
    assert SubsetDataModule("cifar10", source_kwargs={**kwargs, "resolution": 16}).image_shape == (3, 16, 16)
    whole = SubsetDataModule("cifar10", classes=[1, 2], source_kwargs={**kwargs, "train": False})
    assert whole.describe()["size"] == 2000  # the published test split: 1,000 images per class
    assert calls == [] and not (tmp_path / "cache").exists()  # nothing read, nothing downloaded
    dm.prepare_data()
    assert calls == ["cifar100"]
    with pytest.raises(ValueError, match=r"^data.size=60000 is larger than the cifar10 source, which has 50000 "
                                         r"images\.$"):
        _ = SubsetDataModule("cifar10", size=60000, source_kwargs=kwargs).image_shape


def test_metadata_of_each_source_matches_what_it_loads(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "rgb.npz", images=rng.integers(0, 256, (5, 6, 6, 3), dtype=np.uint8), labels=[0, 3, 1, 1, 2])
    np.savez(tmp_path / "gray.npz", images=rng.integers(0, 256, (4, 6, 6), dtype=np.uint8))
    for c in ("a", "b"):
        (tmp_path / "img" / c).mkdir(parents=True)
        Image.fromarray(np.full((5, 7, 3), 9, np.uint8)).save(tmp_path / "img" / c / "0.png")
    digits = (178, 182, 177, 183, 181, 182, 181, 179, 174, 180)
    cases = [
        ("digits", {}, SourceInfo((1, 8, 8), 10, True, 1797, digits)),
        ("digits", {"resolution": 12}, SourceInfo((1, 12, 12), 10, True, 1797, digits)),
        ("npz", {"path": str(tmp_path / "rgb.npz")}, SourceInfo((3, 6, 6), 4, True, 5, (1, 2, 1, 1))),
        ("npz", {"path": str(tmp_path / "gray.npz"), "resolution": 4}, SourceInfo((1, 4, 4), 0, False, 4)),
        ("folder", {"root": str(tmp_path / "img")}, SourceInfo((3, 5, 7), 2, True, 2, (1, 1))),
        ("folder", {"root": str(tmp_path / "img"), "grayscale": True, "resolution": 4},
         SourceInfo((1, 4, 4), 2, True, 2, (1, 1))),
        ("mog", {"num_samples": 6, "shape": [2, 4, 4], "num_components": 3}, SourceInfo((2, 4, 4), 3, True, 6)),
    ]
    for name, kwargs, expect in cases:
        info, src = source_info(name, **kwargs), get_source(name, **kwargs)
        assert info == expect, (name, kwargs)
        assert (src.image_shape, src.num_classes, src.labels is not None, len(src)) == \
            (info.image_shape, info.num_classes, info.labelled, info.num_images), (name, kwargs)
        if info.class_counts is not None:
            assert tuple(torch.bincount(src.labels, minlength=src.num_classes).tolist()) == info.class_counts
    assert source_info("digits", classes=[2, 7]) == SourceInfo((1, 8, 8), 2, True, 177 + 179, (177, 179))
    assert len(get_source("digits", classes=[2, 7])) == 177 + 179
    mog = {"num_samples": 40, "num_components": 3}  # component counts are known only once sampled
    assert SubsetDataModule("mog", classes=[1], source_kwargs=mog).describe()["size"] == \
        len(get_source("mog", classes=[1], **mog))
    with pytest.raises(ValueError, match=r"^classes \[3, 3\] repeat a class; give each class of 'digits' once\.$"):
        source_info("digits", classes=[3, 3])
    with pytest.raises(ValueError, match=r"^source 'npz' has no labels, so classes=\[0\] cannot select any\.$"):
        source_info("npz", classes=[0], path=str(tmp_path / "gray.npz"))


@pytest.fixture
def counting_source(tmp_path):
    """A stand-in source whose download appends a line to ``downloads.txt`` (its loader never downloads)."""
    root = tmp_path / "counting"
    root.mkdir()

    def download(root, **_):
        with open(Path(root) / "downloads.txt", "a") as fh:
            fh.write("download\n")
        np.save(Path(root) / "images.npy", np.zeros((8, 4, 4, 1), np.uint8))

    def load(root, **_):
        return ImageSource("counting", uint8_to_float(np.load(Path(root) / "images.npy")))

    register_source("counting", load, lambda root, **_: SourceInfo((1, 4, 4), 0, False, 8), download)
    yield root
    del SOURCES["counting"]


def test_prepare_data_downloads_and_the_shape_reads_nothing(counting_source):
    dm = SubsetDataModule("counting", size=4, source_kwargs={"root": str(counting_source)})
    assert dm.image_shape == (1, 4, 4) and dm.num_classes == 0
    assert not (counting_source / "downloads.txt").exists()
    dm.prepare_data()
    assert dm.images.shape == (4, 1, 4, 4)
    assert (counting_source / "downloads.txt").read_text() == "download\n"
    with pytest.raises(ValueError, match=r"^data source 'counting' is already registered\.$"):
        register_source("counting", get_source, source_info)


# -- 3. npz labels fit the images ----------------------------------------------------------------------------

@pytest.mark.parametrize("n_labels", [150, 50])
def test_npz_label_count_must_equal_image_count(tmp_path, n_labels):
    path = tmp_path / "x.npz"
    np.savez(path, images=np.zeros((100, 4, 4, 3), np.uint8), labels=np.arange(n_labels) % 10)
    message = f"npz source: {path} has {n_labels} labels for 100 images; give exactly one label per image."
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        get_source("npz", path=str(path))
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):  # at CLI start-up: the shape link
        _ = SubsetDataModule("npz", source_kwargs={"path": str(path)}).image_shape


def test_npz_bad_arrays_are_one_sentence(tmp_path):
    cases = [
        ({"images": np.zeros((3, 4, 4), np.uint8), "labels": np.zeros((3, 1), np.int64)},
         r"'labels' in .*bad.npz must be one integer per image \(shape \(N,\)\), got int64 of shape \(3, 1\)\."),
        ({"images": np.zeros((3, 4, 4), np.uint8), "labels": np.array([0.5, 1, 2])},
         r"'labels' in .*bad.npz must be one integer per image \(shape \(N,\)\), got float64 of shape \(3,\)\."),
        ({"images": np.zeros((3, 4, 4), np.uint8), "labels": np.array([0, -1, 2])},
         r"'labels' in .*bad.npz must lie in 0..2, got -1..2\."),
        ({"images": np.zeros((3, 4, 4), np.float32)},
         r"'images' in .*bad.npz must be uint8 N×H×W×C \(or N×H×W\), got float32 of shape \(3, 4, 4\)\."),
    ]
    for arrays, message in cases:
        np.savez(tmp_path / "bad.npz", **arrays)
        for read in (get_source, source_info):
            with pytest.raises(ValueError, match=f"^npz source: {message}$"):
                read("npz", path=str(tmp_path / "bad.npz"))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"^npz source: .*bad.npz is not a .npz archive"):
        source_info("npz", path=str(tmp_path / "bad.npz"))


# -- 4. data-module arguments --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({"batch_size": 0}, "data.batch_size must be a positive integer (the per-device batch), got 0."),
    ({"batch_size": -8}, "data.batch_size must be a positive integer (the per-device batch), got -8."),
    ({"batch_size": True}, "data.batch_size must be a positive integer (the per-device batch), got True."),
    ({"size": 0}, "data.size must be a positive integer, got 0."),
    ({"size": -16}, "data.size must be a positive integer, got -16."),
    ({"val_seeds": -1}, "data.val_seeds must be a non-negative integer (seeds sampled at validation), got -1."),
    ({"subset_seed": 1.5}, "data.subset_seed must be an integer, got 1.5."),
    ({"classes": []}, "data.classes must be a non-empty list of class labels (or null for all), got []."),
    ({"source": "cifar11"}, "Unknown data source 'cifar11'; valid sources are: digits, cifar10, cifar100, folder, "
                            "npz, mog, generated."),
])
def test_invalid_data_arguments_are_one_sentence(kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        _ = SubsetDataModule(**kwargs).image_shape


def test_cli_batch_size_zero_is_one_sentence(tmp_path):
    from lightning_repro.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(ROOT / "configs" / "train" / "digits_ddpmpp.yaml"), "--data.batch_size", "0",
              "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)])
    assert exc.value.code == "error: data.batch_size must be a positive integer (the per-device batch), got 0."


def test_a_source_whose_metadata_lies_is_one_sentence(counting_source):
    SOURCES["liar"] = SourceKind(SOURCES["counting"].load, lambda **_: SourceInfo((1, 8, 8), 0, False, 8))
    try:
        dm = SubsetDataModule("liar", source_kwargs={"root": str(counting_source)})
        dm.prepare_data()  # no downloader: nothing happens
        SOURCES["counting"].download(root=counting_source)
        with pytest.raises(ValueError, match=r"^data source liar: its metadata promised 8 images of shape \(1, 8, 8\) "
                                             r"in 0 classes, but it holds 8 of shape \(1, 4, 4\) in 0\.$"):
            _ = dm.images
    finally:
        del SOURCES["liar"]
