"""The conditional-reproducibility study (Fig. 8, App. D): a quick run writes the per-class RP table and the
seed x class grids; the choice of the class an unconditional sample is compared under, on a constructed case.

The scientific numbers (class accuracy >= 90%, RP) come from the full run, not from this test."""

import csv
import math

import pytest
import torch
from PIL import Image
from wandb_offline import read_offline_run

from lightning_repro.studies import conditional

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_quick_run_writes_per_class_table_and_grids(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    conditional.main(["--quick", "--out", str(tmp_path)])
    with open(tmp_path / "conditional_rp.csv") as f:
        rows = list(csv.DictReader(f))
    # quick models: dit, edm (conditional), uncond: one cond pair, two uncond-vs-cond rows
    assert [(r["comparison"], r["model_a"], r["model_b"]) for r in rows] == [
        ("cond_vs_cond", "dit", "edm"),
        ("uncond_vs_cond", "uncond", "dit"),
        ("uncond_vs_cond", "uncond", "edm"),
    ]
    cond = rows[0]
    per_class = [float(cond[f"class_{c}"]) for c in range(10)]
    assert all(0.0 <= v <= 1.0 for v in per_class)  # every class has 8 seeds: no NaN
    assert 0.0 <= float(cond["overall"]) <= 1.0 and float(cond["threshold"]) == 0.97
    for r in rows[1:]:  # classes no unconditional sample resembles are NaN, the others in [0, 1]
        vals = [float(r[f"class_{c}"]) for c in range(10)]
        assert any(not math.isnan(v) for v in vals)
        assert all(math.isnan(v) or 0.0 <= v <= 1.0 for v in vals)
        assert 0.0 <= float(r["agree_best_class"]) <= 1.0
    with open(tmp_path / "conditional_models.csv") as f:
        models = {r["model"]: r for r in csv.DictReader(f)}
    assert 0.0 <= float(models["dit"]["class_accuracy"]) <= 1.0 and models["uncond"]["conditional"] == "False"
    # grids: rows = 8 seeds, columns = the unconditional sample + 10 classes; 8x8 digits drawn at 32 px + 1 px pad
    for name in ("dit", "edm"):
        with Image.open(tmp_path / "grids" / f"{name}.png") as im:
            assert im.size == ((1 + 10) * 33 + 1, 8 * 33 + 1)
    assert (tmp_path / "conditional.png").is_file()
    out = capsys.readouterr().out
    assert "class_9" in out and "class accuracy" in out and "conditional done in" in out
    # the study logged one (offline) W&B run in its group, with the per-class table
    (run_dir,) = list((tmp_path / "wandb").glob("offline-run-*"))
    run = read_offline_run(run_dir)
    assert run["group"] == "conditional" and "conditional/table/_type" in run["history_keys"]


def test_resembled_class_is_the_label_of_the_nearest_training_image():
    # training set: one image per class c, constant value v_c; labels deliberately not in index order
    values = torch.linspace(-0.9, 0.9, 5)
    train = values.view(5, 1, 1, 1).expand(5, 1, 8, 8).clone()
    labels = torch.tensor([3, 0, 4, 1, 2])
    # unconditional samples: noisy versions of training images 2, 0, 4 -> classes 4, 3, 2
    g = torch.Generator().manual_seed(0)
    uncond = train[[2, 0, 4]] + 0.05 * torch.randn(3, 1, 8, 8, generator=g)
    c = conditional.resembled_class(uncond, train, labels)
    assert c.tolist() == [4, 3, 2]
    # the compared conditional sample is the same seed's sample under that class
    cond = torch.arange(3 * 5).float().view(3, 5, 1, 1, 1).expand(3, 5, 1, 8, 8)  # (seeds, classes, ...)
    picked = conditional.select_by_class(cond, c)
    assert picked[:, 0, 0, 0].tolist() == [0 * 5 + 4, 1 * 5 + 3, 2 * 5 + 2]
    with pytest.raises(ValueError, match="3 classes for 2 seeds"):
        conditional.select_by_class(cond[:2], c)


def test_config_errors_are_one_sentence(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  u: {class_path: DiT, init_args: {}, conditional: false}\n")
    with pytest.raises(SystemExit, match="error: models must hold at least one conditional model"):
        conditional.main(["--config", str(bad), "--out", str(tmp_path / "o")])
    bad.write_text("models:\n  d: {class_path: DiT, init_args: {}, lr: 1}\n")
    with pytest.raises(SystemExit, match=r"error: models.d has unknown keys \['lr'\]"):
        conditional.main(["--config", str(bad), "--out", str(tmp_path / "o")])
