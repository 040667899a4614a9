"""The README's main job, at toy size: trains both families through the CLI, scores the pair, prints the table."""

import json

from lightning_repro import demo


def test_demo_trains_scores_and_reuses(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = ["--out", str(tmp_path), "--sizes", "8", "--steps", "3", "--seeds", "0-7"]
    rows = demo.main(args)
    out = capsys.readouterr().out
    assert [(r["N"], r["family"]) for r in rows] == [(8, "edm"), (8, "dit")]
    res = json.loads((tmp_path / "pair_N8" / "results.json").read_text())
    assert res["n"] == 8 and res["descriptor"] == "pixel" and rows[0]["rp"] == res["rp"]
    assert rows[0]["gl"] == res["gl_a"] and rows[1]["gl"] == res["gl_b"]
    for fam in ("edm", "dit"):
        assert (tmp_path / f"{fam}_N8" / "checkpoints" / "last.ckpt").is_file()
        assert (tmp_path / f"{fam}_N8" / "samples" / "final.png").is_file()
    assert "RP(edm-dit)" in out and out.strip().splitlines()[-1].startswith("done: 2 models, 1 sizes")
    demo.main(args)  # a rerun trains nothing
    assert "reusing" in capsys.readouterr().out
