"""The README's main job, at toy size: trains both families through the CLI with the monitor, scores them and the
optimal denoiser, computes the different-seed null baseline, prints the table and the summary line, reuses runs."""

import json

import torch

from lightning_repro import demo
from lightning_repro.data import SubsetDataModule
from lightning_repro.evaluation import load_samples
from lightning_repro.evaluation.scoring import copy_chance
from lightning_repro.metrics import PixelDescriptor, ReproducibilityScore


def test_demo_trains_scores_and_reuses(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = ["--out", str(tmp_path), "--sizes", "8", "--steps", "4", "--seeds", "0-7", "--monitor-every", "2"]
    rows = demo.main(args)
    out = capsys.readouterr().out
    assert [(r["N"], r["family"]) for r in rows] == [(8, "ddpmpp"), (8, "dit")]
    res = json.loads((tmp_path / "matrix_N8" / "matrix.json").read_text())
    assert res["n"] == 8 and res["descriptor"] == "pixel" and res["threshold"] == PixelDescriptor.default_threshold
    assert res["labels"][2].startswith("optimal[digits,N=8]")
    assert [r["rp_optimal"] for r in rows] == [res["rp"][0][2], res["rp"][1][2]]
    assert [r["gl"] for r in rows] == res["gl"][:2] and rows[0]["rp_pair"] == res["rp"][0][1]
    # the null baseline: family A's seed k against family B's seed k+1, recomputed from the cached shards
    folders = sorted((tmp_path / "matrix_N8" / "samples").glob("*_heun18"))
    a, b = (load_samples(f) for f in folders if not f.name.startswith("optimal"))
    d, score = PixelDescriptor(), ReproducibilityScore(threshold=0.97)
    fa, fb = (d(torch.from_numpy(s.images).permute(0, 3, 1, 2).float() / 127.5 - 1) for s in (a, b))
    score.update(fa, fb.roll(-1, 0))
    assert abs(rows[0]["null"] - float(score.compute())) < 1e-6
    train = d(SubsetDataModule("digits", size=8).images)
    assert rows[0]["chance"] == copy_chance(fa, fb, train, 0.97) and 0.0 <= rows[0]["chance"] <= 1.0
    for fam in ("ddpmpp", "dit"):
        run = tmp_path / f"{fam}_N8"
        assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "samples" / "final.png").is_file()
        assert (run / "monitor.csv").read_text().splitlines()[0] == "step,rp,mean_similarity,gl,memorized"
        assert len((run / "monitor.csv").read_text().splitlines()) == 3  # steps 2 and 4
    assert (tmp_path / "monitor.png").is_file()
    lines = out.strip().splitlines()
    assert "descriptor: pixel at threshold 0.97" in out and "null (other seeds)" in out and "chance of copies" in out
    assert lines[-2].startswith("done: 2 models, 1 sizes") and lines[-1].startswith("shown: N=8: both ")
    demo.main(args)  # a rerun trains nothing
    assert "reusing" in capsys.readouterr().out


def test_compile_flag_reaches_every_training_and_is_off_by_default(tmp_path):
    """``--compile`` turns ``torch.compile`` on in the trainings' modules (built from the demo's own command lines);
    without it they train eagerly, the default the compile benchmark chose for the CPU."""
    from lightning_repro.cli import main as cli_main

    for compile in (False, True):
        for family in demo.FAMILIES:
            cmd = demo.train_command(family, 16, 4, tmp_path / family, 8, 2, compile)
            cli = cli_main(cmd[cmd.index("fit") + 1:] + ["--trainer.logger", "false"], run=False)
            assert cli.model.hparams.compile is compile
            assert (cli.model._forward is not cli.model.model) is compile
