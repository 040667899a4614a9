"""``python -m lightning_repro.evaluation.curve``: RP between two runs at the steps both kept, equal to
``evaluate.py --pair`` of the matched checkpoints; steps one run lacks are skipped; bad input is one sentence."""

from __future__ import annotations

import csv

import pytest
from study_helpers import tiny_unet_checkpoint

import lightning_repro.evaluation as ev
from lightning_repro.evaluation import curve

pytestmark = pytest.mark.usefixtures("one_thread_module")  # conftest: one torch thread per module

OPTIONS = ["--seeds", "0-7", "--steps", "3", "--threshold", "0.3", "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run A keeps steps 2 and 4; run B (16 other digits) 2, 4 and 6."""
    tmp = tmp_path_factory.mktemp("curve")
    for name, size, steps in (("a", 16, (2, 4)), ("b", 24, (2, 4, 6))):
        (tmp / name / "checkpoints").mkdir(parents=True)
        for s in steps:
            tiny_unet_checkpoint(tmp / name / "checkpoints" / f"step_{s:07d}.ckpt", size=size, steps=s)
    return tmp


def test_each_step_is_evaluate_pair_of_the_matched_checkpoints(runs, tmp_path, capsys):
    rows = curve.main([str(runs / "a"), str(runs / "b"), "--out", str(tmp_path / "c"), *OPTIONS])
    assert [r["step"] for r in rows] == [2, 4]  # step 6 exists only in b
    for r in rows:
        ckpt = f"checkpoints/step_{r['step']:07d}.ckpt"
        res = ev.main(["--pair", str(runs / "a" / ckpt), str(runs / "b" / ckpt), "--gl", "--no-wandb", *OPTIONS,
                       "--out", str(tmp_path / f"direct{r['step']}")])
        assert (r["rp"], r["mean_similarity"], r["gl_a"], r["gl_b"], r["n"]) == (
            res["rp"], res["mean_similarity"], res["gl_a"], res["gl_b"], 8)
        assert (r["descriptor"], r["threshold"]) == ("pixel", 0.3)
    with open(tmp_path / "c" / "curve.csv") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == list(curve.COLUMNS) and [int(g["step"]) for g in got] == [2, 4]
    assert (tmp_path / "c" / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "RP(a, b) at steps 2, 4: " in capsys.readouterr().out


def test_bad_input_is_one_sentence(runs, tmp_path):
    def error(argv):
        with pytest.raises(SystemExit) as exc:
            curve.main(argv)
        assert exc.value.code == 2
        return str(exc.value)

    (tmp_path / "lone" / "checkpoints").mkdir(parents=True)
    assert error([str(runs / "a"), str(tmp_path / "lone"), "--out", str(tmp_path / "o")]).startswith(
        f"error: {tmp_path / 'lone' / 'checkpoints'} holds no step_<step>.ckpt checkpoints")
    assert error([str(runs / "a"), str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == (
        f"error: {tmp_path / 'missing'} is not a run folder (no {tmp_path / 'missing' / 'checkpoints'} and not a "
        "folder itself).")
    assert error([str(runs / "a"), str(runs / "b")]).startswith("error: usage: python -m lightning_repro.evaluation.curve")
    assert error([str(runs / "a"), str(runs / "b"), "--out", str(tmp_path / "o"), "--gl"]).startswith(
        "error: curve runs evaluate.py --pair --gl itself")
    only6 = tmp_path / "only6" / "checkpoints"
    only6.mkdir(parents=True)
    (only6 / "step_0000006.ckpt").write_bytes((runs / "b" / "checkpoints" / "step_0000006.ckpt").read_bytes())
    assert error([str(runs / "a"), str(tmp_path / "only6"), "--out", str(tmp_path / "o")]) == (
        f"error: {runs / 'a'} (steps [2, 4]) and {tmp_path / 'only6'} (steps [6]) kept no checkpoint at a common step.")
    assert not (tmp_path / "o").exists()
