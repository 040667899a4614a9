"""Model recovery (Sec. 3.2.1, Case 2) and noise-hyperplane maps (Fig. 7): the ``generated`` data source (a
teacher's cached samples), the recovery study's disjoint data and seeds, the plane's geometry, anchor
labels and agreement, and quick runs of both studies.

Tiny models and a few steps only: the scientific outcome is measured by the default-scale runs."""

import math
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from study_helpers import assert_png, read_csv

import lightning_repro.sampling as sampling
from lightning_repro.data import SubsetDataModule, get_source
from lightning_repro.data.datamodule import subset_indices
from lightning_repro.module import file_sha256
from lightning_repro.sampling import sample, sample_from_noise, seed_noise
from lightning_repro.studies import TrainJob, hyperplane, recovery, run_training_jobs
from lightning_repro.teachers import generated_cache_path
from lightning_repro.theory import EmpiricalOptimalDenoiser

ROOT = Path(__file__).resolve().parents[1]
RECOVERY_YAML = ROOT / "configs" / "studies" / "recovery.yaml"
HYPERPLANE_YAML = ROOT / "configs" / "studies" / "hyperplane.yaml"
TINY_DIT = {"class_path": "DiT", "init_args": {"patch_size": 4, "hidden_size": 16, "depth": 1, "num_heads": 1}}
SEEDS = "1000000-1000007"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two tiny DiT checkpoints trained for 2 steps: unconditional and class-conditional (10 classes)."""
    folder = tmp_path_factory.mktemp("teachers")
    jobs = []
    for name, cond in (("uncond", False), ("cond", True)):
        jobs.append(TrainJob(
            name, TINY_DIT, (1, 8, 8),
            dict(kernel="edm", lr=1e-3, num_classes=10 if cond else 0, seed=0),
            dict(source="digits", size=32, batch_size=8, conditional=cond),
            str(folder / f"{name}.ckpt"), 2, threads=1, progress_bar=False,
        ))
    run_training_jobs(jobs, log=lambda m: None)
    return {j.name: Path(j.ckpt) for j in jobs}


# ------------------------------------------------------------------------------ generated source
def test_generated_source_caches_next_to_checkpoint_and_second_call_reads_the_npz(teachers, tmp_path, monkeypatch):
    ckpt = tmp_path / "teacher.ckpt"
    shutil.copy(teachers["uncond"], ckpt)
    src = get_source("generated", checkpoint=str(ckpt), seeds=SEEDS, steps=3)
    assert src.name == "generated" and src.images.shape == (8, 1, 8, 8) and src.labels is None
    assert src.num_classes == 0 and float(src.images.min()) >= -1 and float(src.images.max()) <= 1
    cache = generated_cache_path(ckpt, SEEDS, "heun", 3, 1.0)
    assert cache.parent == tmp_path and cache.is_file()  # by default next to the checkpoint
    with np.load(cache, allow_pickle=False) as f:
        assert f["images"].dtype == np.uint8 and f["images"].shape == (8, 8, 8, 1)
        assert f["seeds"].tolist() == list(range(1_000_000, 1_000_008))
        assert str(f["teacher_sha256"]) == file_sha256(ckpt)
        assert str(f["sampler"]) == "heun" and int(f["steps"]) == 3 and float(f["guidance"]) == 1.0
        assert "labels" not in f.files
    # the second call reads the cache: sampling is not called
    monkeypatch.setattr(sampling, "sample", lambda *a, **k: pytest.fail("the cache must be read, not resampled"))
    again = get_source("generated", checkpoint=str(ckpt), seeds=SEEDS, steps=3)
    assert torch.equal(again.images, src.images)
    # other sampling settings are another cache file
    assert generated_cache_path(ckpt, SEEDS, "heun", 4, 1.0) != cache
    assert generated_cache_path(ckpt, "1000000-1000008", "heun", 3, 1.0) != cache


def test_generated_source_is_deterministic_and_conditional_teacher_labels_seed_mod_classes(teachers, tmp_path):
    a = get_source("generated", checkpoint=str(teachers["uncond"]), seeds=SEEDS, steps=3, cache_dir=tmp_path / "a")
    b = get_source("generated", checkpoint=str(teachers["uncond"]), seeds=SEEDS, steps=3, cache_dir=tmp_path / "b")
    assert torch.equal(a.images, b.images)  # sampled twice from scratch: the same images
    seeds = [1_000_003, 1_000_004, 1_000_005, 1_000_017]
    c = get_source("generated", checkpoint=str(teachers["cond"]), seeds=seeds, steps=3, cache_dir=tmp_path)
    assert c.num_classes == 10 and c.labels.tolist() == [s % 10 for s in seeds]
    (cache,) = tmp_path.glob("cond.generated_*.npz")
    with np.load(cache) as f:
        assert f["labels"].tolist() == [s % 10 for s in seeds] and f["seeds"].tolist() == seeds
    # through the data module (the path of train.py --data.source generated)
    dm = SubsetDataModule(source="generated", size=3, conditional=True,
                          source_kwargs={"checkpoint": str(teachers["cond"]), "seeds": seeds, "steps": 3,
                                         "cache_dir": str(tmp_path)})
    assert dm.images.shape == (3, 1, 8, 8) and dm.num_classes == 10
    assert set(dm.labels.tolist()) <= {s % 10 for s in seeds}


def test_generated_source_bad_input_sentences(teachers, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^generated source: teacher checkpoint .*nope.ckpt does not exist\.$"):
        get_source("generated", checkpoint=str(tmp_path / "nope.ckpt"))
    with pytest.raises(ValueError, match=r"^generated source: give the teacher checkpoint"):
        get_source("generated")
    with pytest.raises(ValueError, match=r"^generated source: Invalid seeds '5-'"):
        get_source("generated", checkpoint=str(teachers["uncond"]), seeds="5-")
    with pytest.raises(ValueError, match=r"repeat a seed"):
        get_source("generated", checkpoint=str(teachers["uncond"]), seeds=[1, 1])
    with pytest.raises(ValueError, match=r"needs a class-conditional teacher"):
        get_source("generated", checkpoint=str(teachers["uncond"]), seeds=SEEDS, guidance=2.0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"valid sources are: .*generated"):
        get_source("nonsense")


# ------------------------------------------------------------------------------ recovery
def test_recovery_quick_writes_both_rps_and_baseline_data_is_disjoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "recovery"
    rows = recovery.main(["--config", str(RECOVERY_YAML), "--quick", "--out", str(out)])
    header, body = read_csv(out / "recovery.csv")
    assert header == recovery.COLUMNS and len(body) == len(rows) == 1
    r = body[0]
    for key in ("rp_teacher_student", "rp_teacher_baseline", "gl_teacher", "gl_student", "gl_baseline"):
        assert 0.0 <= float(r[key]) <= 1.0
    assert int(r["N"]) == 16 and int(r["n_seeds"]) == recovery.QUICK["sample"]["seeds"]
    assert r["student_seeds"] == "1000000-1000015" and r["eval_seeds"] == "0-7"
    assert_png(out / "recovery.png")
    assert (out / "eval" / "N16_student" / "results.json").is_file()
    assert "recovery done" in capsys.readouterr().out
    # the student's data are the teacher's cached samples; the baseline's are images outside subset A
    (teacher,) = (out / "checkpoints").glob("teacher_N16_*.ckpt")
    assert len(list((out / "checkpoints").glob("teacher_N16_*.generated_*.npz"))) == 1
    cfg = recovery.STUDY.load_config(RECOVERY_YAML, quick=True, out=out)
    path, n_rest = recovery.write_complement(cfg, 16)
    a = subset_indices(get_source("digits"), 16, 0)
    with np.load(path) as f:
        assert not set(f["source_index"].tolist()) & set(a.tolist()) and len(f["images"]) == n_rest == 1797 - 16
    # a rerun trains nothing and gives the same numbers
    monkeypatch.setattr(L.Trainer, "fit", lambda *a, **k: pytest.fail("a rerun must not train"))
    again = recovery.main(["--config", str(RECOVERY_YAML), "--quick", "--out", str(out)])
    assert [(r["rp_teacher_student"], r["rp_teacher_baseline"]) for r in again] == [
        (r["rp_teacher_student"], r["rp_teacher_baseline"]) for r in rows]


def test_recovery_rejects_student_seeds_that_meet_evaluation_seeds(tmp_path):
    cfg_path = tmp_path / "bad.yaml"
    cfg_path.write_text(yaml.safe_dump({"generated": {"seeds_start": 5}, "sizes": [16], "sample": {"seeds": 8}}))
    with pytest.raises(SystemExit, match=r"^error: the student's training seeds 5-20 overlap the evaluation seeds"):
        recovery.main(["--config", str(cfg_path), "--out", str(tmp_path / "x")])
    cfg_path.write_text(yaml.safe_dump({"sizes": [1000]}))
    with pytest.raises(SystemExit, match=r"only 797 remain for a disjoint baseline subset"):
        recovery.main(["--config", str(cfg_path), "--out", str(tmp_path / "x")])


# ------------------------------------------------------------------------------ hyperplane
def test_plane_grid_geometry_corners_are_anchors_and_norms_are_sqrt_d():
    shape = (1, 8, 8)
    z = seed_noise([0, 1, 2], shape)
    anchors = hyperplane.rescale_to_sphere(z)
    grid, coords = hyperplane.plane_grid(z, 5, margin=0.0)
    assert grid.shape == (5, 5, *shape) and coords.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    norms = grid.reshape(25, -1).double().norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, math.sqrt(64)), atol=1e-4)
    assert torch.equal(grid[0, 0], anchors[0])  # (a, b) = (0, 0): z1
    assert torch.allclose(grid[0, -1], anchors[1], atol=1e-5)  # (1, 0): z2
    assert torch.allclose(grid[-1, 0], anchors[2], atol=1e-5)  # (0, 1): z3
    # with a margin: the point (a, b) is the rescaled z1 + a (z2 - z1) + b (z3 - z1)
    grid, coords = hyperplane.plane_grid(z, 4, margin=0.5)
    assert torch.allclose(coords, torch.tensor([-0.5, 1 / 6, 5 / 6, 1.5], dtype=torch.float64))
    a, b = float(coords[2]), float(coords[1])
    raw = (z[0] + a * (z[1] - z[0]) + b * (z[2] - z[0])).double()
    assert torch.allclose(grid[1, 2].double(), raw * 8 / raw.norm(), atol=1e-5)
    with pytest.raises(ValueError, match="resolution must be an integer >= 2"):
        hyperplane.plane_grid(z, 1)


def test_anchor_points_get_their_own_labels_and_agreement():
    train = SubsetDataModule(size=16).images
    den = EmpiricalOptimalDenoiser(train)
    z = seed_noise([0, 1, 2], (1, 8, 8))
    grid, _ = hyperplane.plane_grid(z, 3, margin=0.0)
    x = sample_from_noise(den, "edm", grid.reshape(9, 1, 8, 8), steps=6)
    x_anchor = sample_from_noise(den, "edm", hyperplane.rescale_to_sphere(z), steps=6)
    from lightning_repro.metrics import get_descriptor

    desc = get_descriptor("pixel")
    fa = desc(x_anchor)
    assert hyperplane.label_by_anchors(fa, fa).tolist() == [0, 1, 2]
    labels = hyperplane.label_by_anchors(desc(x), fa).reshape(3, 3)
    assert [int(labels[0, 0]), int(labels[0, 2]), int(labels[2, 0])] == [0, 1, 2]
    assert hyperplane.agreement(labels, labels) == 1.0
    assert hyperplane.agreement([0, 1, 2, 2], [0, 1, 1, 0]) == 0.5
    # the explicit-noise sampler equals sample() on seed noise
    assert torch.equal(sample_from_noise(den, "edm", z, steps=4), sample(den, "edm", [0, 1, 2], (1, 8, 8), steps=4))


def test_hyperplane_quick_writes_png_csv_and_self_agreement(tmp_path, capsys):
    out = tmp_path / "hp"
    rows = hyperplane.main(["--config", str(HYPERPLANE_YAML), "--quick", "--out", str(out)])
    header, body = read_csv(out / "hyperplane.csv")
    assert header == hyperplane.COLUMNS
    assert [(r["model_a"], r["model_b"]) for r in body] == [("dit", "optimal")] and len(rows) == 1
    assert 0.0 <= float(body[0]["agreement"]) <= 1.0 and int(body[0]["resolution"]) == 6
    assert_png(out / "hyperplane.png")
    with np.load(out / "labels.npz") as f:
        assert f["labels_dit"].shape == (6, 6) and set(np.unique(f["labels_optimal"])) <= {0, 1, 2}
        assert hyperplane.agreement(f["labels_dit"], f["labels_dit"]) == 1.0
    text = capsys.readouterr().out
    assert "hyperplane done" in text and "agreement dit|optimal" in text


def test_hyperplane_takes_checkpoint_paths_and_rejects_bad_entries(teachers, tmp_path):
    cfg = {"models": {"teacher": str(teachers["uncond"]), "optimal": "optimal"}, "size": 16, "wandb": False,
           "plane": {"resolution": 3, "margin": 0.0}, "sample": {"steps": 3}}
    path = tmp_path / "hp.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    (row,) = hyperplane.main(["--config", str(path), "--out", str(tmp_path / "out")])
    assert (row["model_a"], row["model_b"]) == ("teacher", "optimal") and 0.0 <= row["agreement"] <= 1.0
    with np.load(tmp_path / "out" / "labels.npz") as f:  # margin 0: the corners are the anchors
        for name in ("teacher", "optimal"):
            lab = f[f"labels_{name}"]
            assert [lab[0, 0], lab[0, 2], lab[2, 0]] == [0, 1, 2]
    path.write_text(yaml.safe_dump({**cfg, "models": {"x": 5}}))
    with pytest.raises(SystemExit, match=r"^error: models.x must be 'optimal', a checkpoint path"):
        hyperplane.main(["--config", str(path), "--out", str(tmp_path / "out2")])
    path.write_text(yaml.safe_dump({**cfg, "models": {"x": str(tmp_path / "none.ckpt")}}))
    with pytest.raises(SystemExit, match=r"^error: models.x: checkpoint .*none.ckpt does not exist\.$"):
        hyperplane.main(["--config", str(path), "--out", str(tmp_path / "out2")])
