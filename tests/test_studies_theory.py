"""Theory studies (Fig. 4 memorization, Fig. 5 MoG score error): quick runs write their CSV and PNG with the
expected columns and rows, reruns load the checkpoints instead of training, configs are checked.

The scientific trends are not asserted here (a few training steps); the full runs are for that."""

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from study_helpers import assert_png, read_csv
from wandb_offline import read_offline_run

from lightning_repro.studies import memorization, mog_generalization
from lightning_repro.theory import LowRankMoG

ROOT = Path(__file__).resolve().parents[1]
FIG4_YAML = ROOT / "configs" / "studies" / "fig4_memorization.yaml"
FIG5_YAML = ROOT / "configs" / "studies" / "fig5_mog.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def no_training(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a rerun must load the finished checkpoints, not train")

    monkeypatch.setattr(L.Trainer, "fit", fail)


def test_memorization_quick_writes_csv_png_and_rerun_skips_training(tmp_path, monkeypatch, capsys):
    out = tmp_path / "fig4"
    rows = memorization.main(["--config", str(FIG4_YAML), "--quick", "--out", str(out)])
    header, body = read_csv(out / "fig4.csv")
    assert header == memorization.COLUMNS
    sizes, archs = memorization.QUICK["sizes"], list(memorization.QUICK["archs"])
    assert [(r["arch"], int(r["N"])) for r in body] == [(a, n) for n in sizes for a in archs]
    for r in body:
        for key in ("rp_vs_optimal", "gl", "same_nn_vs_optimal", "gl_optimal"):
            assert 0.0 <= float(r[key]) <= 1.0
        # the optimal denoiser of the empirical distribution only reproduces training images (Prop. 1)
        assert float(r["gl_optimal"]) == 0.0
        assert float(r["threshold"]) == 0.97 and r["descriptor"] == "pixel"
        assert int(r["steps"]) == memorization.QUICK["train"]["max_steps"]
    assert_png(out / "fig4.png")
    assert_png(out / "samples" / f"edm_N{sizes[0]}.png", min_size=10)
    ckpts = sorted((out / "checkpoints").glob("*.ckpt"))
    assert len(ckpts) == len(sizes) * len(archs)
    mtimes = {p: p.stat().st_mtime_ns for p in ckpts}
    assert "fig4 done" in capsys.readouterr().out
    # the study's table and plot went to a W&B run in the study's group (offline here)
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    run = read_offline_run(run_dir)
    assert run["group"] == "fig4_memorization" and run["config"]["sizes"] == sizes
    assert {"fig4_memorization/table/_type", "fig4_memorization/plot/_type"} <= run["history_keys"]
    assert run["summary"][f"dit_N{sizes[0]}_rp_vs_optimal"] == pytest.approx(rows[0]["rp_vs_optimal"])

    no_training(monkeypatch)
    rows2 = memorization.main(["--config", str(FIG4_YAML), "--quick", "--out", str(out)])
    assert capsys.readouterr().out.count("checkpoint exists, skipping training") == len(ckpts)
    assert {p: p.stat().st_mtime_ns for p in (out / "checkpoints").glob("*.ckpt")} == mtimes
    # same checkpoints, same seeds, deterministic sampler: the same numbers
    key = ["rp_vs_optimal", "gl", "same_nn_vs_optimal", "mae_vs_optimal"]
    assert [[r[k] for k in key] for r in rows2] == [[r[k] for k in key] for r in rows]


def test_mog_quick_writes_csv_png_and_rerun_skips_training(tmp_path, monkeypatch, capsys):
    out = tmp_path / "fig5"
    rows = mog_generalization.main(["--config", str(FIG5_YAML), "--quick", "--out", str(out)])
    header, body = read_csv(out / "fig5.csv")
    cfg = mog_generalization.STUDY.load_config(FIG5_YAML, quick=True)
    assert header == mog_generalization.columns(cfg["eval"]["per_sigma"])
    expect = [(K, d, n) for K, d in cfg["mixtures"] for n in cfg["sizes"]]
    assert [(int(r["K"]), int(r["d"]), int(r["N"])) for r in body] == expect
    for r in body:
        assert float(r["score_error"]) > 0 and math.isfinite(float(r["score_error"]))
        assert float(r["score_error_empirical"]) > 0
    assert_png(out / "fig5.png")
    ckpts = sorted((out / "checkpoints").glob("*.ckpt"))
    assert len(ckpts) == len(expect)
    mtimes = {p: p.stat().st_mtime_ns for p in ckpts}
    assert "fig5 done" in capsys.readouterr().out

    no_training(monkeypatch)
    rows2 = mog_generalization.main(["--config", str(FIG5_YAML), "--quick", "--out", str(out)])
    assert {p: p.stat().st_mtime_ns for p in (out / "checkpoints").glob("*.ckpt")} == mtimes
    assert [r["score_error"] for r in rows2] == [r["score_error"] for r in rows]


def test_score_error_columns_vanish_for_the_exact_mog_denoiser():
    """The study's score-error evaluation gives 0 for the closed-form denoiser itself (up to float32 input)."""
    mog = LowRankMoG((1, 8, 8), 2, 4, seed=0)
    ev = {"num_samples": 64, "sigmas": None, "per_sigma": [0.5, 2.0], "seed": 0, "batch_size": 64}
    errs = mog_generalization._score_errors(mog, mog, ev, torch.device("cpu"))
    assert set(errs) == {"score_error", "score_error_sigma0.5", "score_error_sigma2"}
    untrained = mog_generalization._score_errors(
        lambda x, s, labels=None: torch.zeros_like(x), mog, ev, torch.device("cpu")
    )
    for k, v in errs.items():
        assert v < 1e-6 * untrained[k]


def test_configs_load_and_training_changes_the_checkpoint_name():
    cfg4 = memorization.STUDY.load_config(FIG4_YAML)
    assert len(cfg4["archs"]) >= 2 and cfg4["sizes"] == sorted(cfg4["sizes"]) and cfg4["kernel"] == "edm"
    quick = memorization.STUDY.load_config(FIG4_YAML, quick=True)
    assert quick["out"] == cfg4["out"] + "_quick"  # quick results never land in a full run's folder
    assert memorization.STUDY.load_config(FIG4_YAML, quick=True, out="x")["out"] == "x"
    cfg5 = mog_generalization.STUDY.load_config(FIG5_YAML)
    assert len(cfg5["mixtures"]) >= 2 and len(cfg5["sizes"]) >= 3
    spec = next(iter(cfg4["archs"].values()))
    k1 = memorization.run_key(spec, 16, cfg4)
    assert memorization.run_key(spec, 16, cfg4) == k1 and memorization.run_key(spec, 64, cfg4) != k1
    longer = {**cfg4, "train": {**cfg4["train"], "max_steps": cfg4["train"]["max_steps"] + 1}}
    assert memorization.run_key(spec, 16, longer) != k1
    assert mog_generalization.run_key(2, 4, 64, cfg5) != mog_generalization.run_key(4, 2, 64, cfg5)


def test_bad_configs_fail_with_one_sentence(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sizes: [16]\nsteps: 3\n")
    with pytest.raises(SystemExit, match="unknown keys \\['steps'\\]"):
        memorization.main(["--config", str(bad), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="does not exist"):
        mog_generalization.main(["--config", str(tmp_path / "missing.yaml")])
    bad.write_text("mixtures: [[2]]\n")
    with pytest.raises(SystemExit, match="mixtures must be"):
        mog_generalization.main(["--config", str(bad), "--out", str(tmp_path / "o")])
    bad.write_text("archs: {x: {class_path: MLP, init_args: {}}}\nsizes: [8]\n")
    with pytest.raises(SystemExit, match="unknown architecture 'MLP'"):
        memorization.main(["--config", str(bad), "--out", str(tmp_path / "o")])


def test_parallel_training_jobs_write_checkpoints_and_records(tmp_path):
    """``workers=2`` trains in spawned processes; the checkpoints load and their records hold the steps."""
    from lightning_repro.studies import TrainJob, load_trained, run_training_jobs

    arch = memorization.QUICK["archs"]["dit"]
    kw = dict(kernel="edm", lr=1e-3, seed=0)
    jobs = [
        TrainJob(
            f"n{n}",
            arch,
            (1, 8, 8),
            kw,
            dict(source="digits", size=n, batch_size=8),
            str(tmp_path / f"n{n}.ckpt"),
            2,
            threads=1,
        )
        for n in (4, 8)
    ]
    assert run_training_jobs(jobs, workers=2, log=lambda m: None) == 2
    for j in jobs:
        module, meta = load_trained(j)
        assert meta["steps"] == 2 and meta["name"] == j.name
        assert module.hparams.kernel_kwargs is None and module.kernel.name == "edm"
    assert run_training_jobs(jobs, workers=2, log=lambda m: None) == 0  # all done: nothing trained
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        run_training_jobs(jobs, workers=0)


def test_a_training_another_study_finished_is_reused_not_repeated(tmp_path, monkeypatch):
    """A job equal to one a sibling study (``<parent>/*/checkpoints/``) finished copies its checkpoint; a job that
    differs in anything that decides the model (here one more step) trains."""
    from lightning_repro.studies import TrainJob, run_training_jobs

    def job(study, steps=2, name="n4"):
        return TrainJob(name, memorization.QUICK["archs"]["dit"], (1, 8, 8), dict(kernel="edm", lr=1e-3, seed=0),
                        dict(source="digits", size=4, batch_size=8), str(tmp_path / study / "checkpoints" / "a.ckpt"),
                        steps, threads=1, wandb=None if study == "fig4" else {"group": study})

    first = job("fig4")
    assert run_training_jobs([first], log=lambda m: None) == 1
    fit = L.Trainer.fit
    monkeypatch.setattr(L.Trainer, "fit", lambda *a, **k: pytest.fail("an equal training must be reused"))
    same, logged = job("fig2", name="w64_n4"), []
    assert same.identity == first.identity  # where it is written and logged does not decide the model
    assert run_training_jobs([same], log=logged.append) == 0
    assert (tmp_path / "fig2" / "checkpoints" / "a.ckpt").read_bytes() == Path(first.ckpt).read_bytes()
    assert logged == [f"  w64_n4: the same training finished in another study, reusing {Path(first.ckpt).resolve()}"]
    assert same.meta()["name"] == "w64_n4" and same.meta()["steps"] == 2
    monkeypatch.setattr(L.Trainer, "fit", fit)
    longer = job("other", steps=3)
    assert longer.identity != first.identity
    assert run_training_jobs([longer], log=lambda m: None) == 1 and longer.meta()["steps"] == 3
