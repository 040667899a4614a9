"""Sources and size-controlled subsets: nesting, determinism, sharding, resumption, CIFAR on disk."""

import pickle

import numpy as np
import pytest
import torch

from lightning_repro.data import SubsetDataModule, get_source, subset_indices
from lightning_repro.data.datamodule import InfiniteBatchStream
from lightning_repro.data.sources import float_to_uint8, uint8_to_float


def test_digits_source():
    s = get_source("digits")
    assert s.images.shape == (1797, 1, 8, 8) and s.num_classes == 10
    assert s.images.min() == -1 and s.images.max() == 1
    assert get_source("digits", resolution=16).images.shape == (1797, 1, 16, 16)
    sub = get_source("digits", classes=[5, 6])
    assert sub.num_classes == 2 and set(sub.labels.tolist()) == {0, 1} and len(sub) == 182 + 181


def test_subsets_nested_and_deterministic():
    s = get_source("digits")
    a = subset_indices(s, 64, subset_seed=3)
    b = subset_indices(s, 256, subset_seed=3)
    assert torch.equal(b[:64], a) and len(set(b.tolist())) == 256
    assert torch.equal(subset_indices(s, 64, 3), a)
    assert not torch.equal(subset_indices(s, 64, 4), a)
    bal = subset_indices(s, 30, 0, class_balanced=True)
    assert torch.bincount(s.labels[bal], minlength=10).tolist() == [3] * 10
    assert torch.equal(subset_indices(s, 100, 0, class_balanced=True)[:30], bal)
    dm = SubsetDataModule("digits", size=64, subset_seed=3)
    assert torch.equal(dm.images, s.images[a]) and dm.image_shape == (1, 8, 8) and dm.num_classes == 0


def test_size_larger_than_source_is_one_sentence():
    with pytest.raises(ValueError, match=r"^data.size=5000 is larger than the digits source, which has 1797 images.$"):
        _ = SubsetDataModule("digits", size=5000).images
    with pytest.raises(ValueError, match="Unknown data source 'foo'; valid sources are: digits, cifar10"):
        get_source("foo")


def test_small_subset_fills_batch_and_covers_each_image():
    dm = SubsetDataModule("digits", size=16, batch_size=128)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (128, 1, 8, 8) and torch.all(y == -1)
    # 128 = 8 epochs of 16: every image appears exactly 8 times
    stream = InfiniteBatchStream(dm.images, torch.arange(16), 128, seed=0)
    idx = stream.indices(0)
    assert torch.bincount(idx, minlength=16).tolist() == [8] * 16


def test_ranks_shard_the_global_batch_and_resume_is_exact():
    imgs, lab = torch.randn(50, 1, 2, 2), torch.arange(50)
    single = InfiniteBatchStream(imgs, lab, 8, seed=1)
    ranks = [InfiniteBatchStream(imgs, lab, 4, seed=1, rank=r, world_size=2) for r in range(2)]
    for step in range(20):
        glob = single.indices(step)
        parts = [r.indices(step) for r in ranks]
        assert torch.equal(torch.cat(parts), glob)  # same global batch, disjoint rank slices
    resumed = InfiniteBatchStream(imgs, lab, 8, seed=1, start_step=13)
    it = iter(resumed)
    for step in range(13, 16):
        x, y = next(it)
        assert torch.equal(y, lab[single.indices(step)])


def test_conditional_requires_labels(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", images=arr)
    dm = SubsetDataModule("npz", source_kwargs={"path": str(tmp_path / "x.npz")}, conditional=True)
    with pytest.raises(ValueError, match="data.conditional is true but the npz source has no labels"):
        _ = dm.images
    src = get_source("npz", path=str(tmp_path / "x.npz"))
    assert np.array_equal(float_to_uint8(src.images), arr)  # uint8 round trip is exact


def _write_cifar10(root, n_per_batch=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    all_imgs, all_labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels, "filenames": []}, f)
        if name != "test_batch":
            all_imgs.append(data)
            all_labels += labels
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return np.concatenate(all_imgs), np.array(all_labels)


def test_cifar_reads_its_own_on_disk_format(tmp_path):
    data, labels = _write_cifar10(tmp_path)
    src = get_source("cifar10", root=str(tmp_path), verify_md5=False)  # fake batches: not the published MD5s
    assert src.images.shape == (20, 3, 32, 32) and src.num_classes == 10
    assert torch.equal(src.labels, torch.from_numpy(labels))
    expect = uint8_to_float(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert torch.equal(src.images, expect)
    assert len(get_source("cifar10", root=str(tmp_path), train=False, verify_md5=False)) == 4


def test_missing_cifar_offline_is_one_sentence(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar10 was not found under .*cifar-10-batches-py: extract "
                                                r"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"):
        get_source("cifar10", root=str(tmp_path))


def test_folder_source(tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(np.full((6, 6, 3), 40 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    s = get_source("folder", root=str(tmp_path))
    assert s.images.shape == (6, 3, 6, 6) and s.labels.tolist() == [0, 0, 0, 1, 1, 1] and s.num_classes == 2


def test_data_layer_imports_no_model_layer_and_generated_is_registered_on_first_use():
    """``lightning_repro.data`` imports neither the model layer nor the samplers; the ``generated`` source is
    registered by ``lightning_repro.teachers``, which the data layer imports only when the name is first used."""
    import subprocess
    import sys

    code = """
import sys
from lightning_repro.data import get_source
from lightning_repro.data.sources import SOURCES
upper = ("lightning_repro.module", "lightning_repro.sampling", "lightning_repro.presets", "lightning_repro.checkpoints",
         "lightning_repro.teachers", "lightning_repro.diffusion_module")
assert "generated" not in SOURCES and not [m for m in sys.modules if m.startswith(upper)], sorted(SOURCES)
try:
    get_source("nonsense")
except ValueError as err:
    print(err)
assert not [m for m in sys.modules if m.startswith(upper)]
try:
    get_source("generated")
except ValueError as err:
    print(err)
assert "generated" in SOURCES and "lightning_repro.teachers" in sys.modules
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    unknown, first = p.stdout.strip().splitlines()
    assert unknown == "Unknown data source 'nonsense'; valid sources are: digits, cifar10, cifar100, folder, npz, mog, generated."
    assert first == "generated source: give the teacher checkpoint (source_kwargs checkpoint: PATH)."
