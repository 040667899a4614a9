"""Phase-transition sweep (issue 7): grid points, resume after a kill, the W&B Sweeps file (validated by wandb's own
loader and schema, and one agent run executed exactly as ``wandb agent`` builds its command), aggregation."""

import csv
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from lightning_repro import studies
from lightning_repro.studies import sweep, training

ROOT = Path(__file__).resolve().parents[1]
SWEEP_YAML = ROOT / "configs" / "studies" / "phase_transition.yaml"

TINY = {
    "grid": {"size": [8, 16], "family": ["dit"], "width": [8], "seed": [0]},
    "families": {"dit": {"class_path": "DiT", "width_arg": "hidden_size",
                         "init_args": {"patch_size": 8, "depth": 1, "num_heads": 1}}},
    "data": {"batch_size": 8},
    "train": {"max_steps": 2, "warmup_steps": 0, "wandb": False},
    "sample": {"seeds": 6, "steps": 3},
    "wandb": False,
    "workers": 1,  # in this process (the shipped YAML trains two at once), so a test can interrupt it
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_config(tmp_path, **over) -> Path:
    cfg = studies.deep_merge(TINY, over)
    for key in ("grid", "families"):
        if key in over:
            cfg[key] = over[key]
    cfg["out"] = str(tmp_path / "sweep")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_shipped_config_grid_and_checkpoint_names():
    cfg = sweep.STUDY.load_config(SWEEP_YAML)
    points = sweep.grid_points(cfg)
    g = cfg["grid"]
    assert len(points) == len(g["size"]) * len(g["family"]) * len(g["width"]) * len(g["seed"])
    assert [p.size for p in points] == sorted(p.size for p in points)  # the cheap end of the curve first
    assert all(n & (n - 1) == 0 for n in g["size"])  # powers of two
    p = sweep.GridPoint("dit", 64, 64, 0)
    assert str(p) == "dit_w64_N64_s0"
    job = sweep.point_job(cfg, p, (1, 8, 8))
    assert Path(job.ckpt).name == f"dit_w64_N64_s0_{sweep.run_key(cfg, p)}.ckpt"
    assert job.arch == {"class_path": "DiT", "init_args": {"patch_size": 2, "depth": 4, "num_heads": 4,
                                                             "hidden_size": 64}}  # 16 tokens on 8 x 8
    unet = sweep.point_job(cfg, sweep.GridPoint("ddpmpp", 64, 64, 0), (1, 8, 8))
    assert unet.arch["init_args"]["model_channels"] == 16  # width 64 / width_divisor 4
    assert unet.module_kwargs["lr_decay"] == "cosine"
    assert job.data_kwargs["size"] == 64 and job.module_kwargs["seed"] == 0
    assert job.wandb["group"] == "phase_transition" and job.wandb["config"]["width"] == 64
    # the key follows what determines the model (not W&B switches)
    changed = studies.deep_merge(cfg, {"train": {"lr": 1e-3}})
    assert sweep.run_key(changed, p) != sweep.run_key(cfg, p)
    assert sweep.run_key(studies.deep_merge(cfg, {"train": {"wandb": False}}), p) == sweep.run_key(cfg, p)


def test_killed_sweep_resumes_without_retraining(tmp_path, monkeypatch):
    path = tiny_config(tmp_path, grid={"size": [8, 16], "family": ["dit"], "width": [8, 12], "seed": [0]})
    real = training._train_job
    trained: list[str] = []

    def killed_after_two(job):
        if len(trained) == 2:
            raise KeyboardInterrupt  # the sweep is killed half-way
        trained.append(job.name)
        return real(job)

    monkeypatch.setattr(training, "_train_job", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        sweep.main(["--config", str(path)])
    assert trained == ["dit_w8_N8_s0", "dit_w12_N8_s0"]
    ckpts = sorted((tmp_path / "sweep" / "checkpoints").glob("*.ckpt"))
    assert [c.name.rsplit("_", 1)[0] for c in ckpts] == ["dit_w12_N8_s0", "dit_w8_N8_s0"]
    mtimes = {c: c.stat().st_mtime_ns for c in ckpts}

    trained.clear()
    monkeypatch.setattr(training, "_train_job", lambda job: (trained.append(job.name), real(job))[1])
    rows = sweep.main(["--config", str(path)])
    assert trained == ["dit_w8_N16_s0", "dit_w12_N16_s0"]  # only the unfinished half
    assert all(c.stat().st_mtime_ns == t for c, t in mtimes.items())  # finished checkpoints untouched
    assert len([r for r in rows if r["kind"] == "model"]) == 4
    assert len([r for r in rows if r["kind"] == "width_pair"]) == 2

    trained.clear()
    sweep.main(["--config", str(path)])  # a third run trains nothing and reads the cached samples
    assert trained == []


def _agent_command(sweep_cfg: dict, params: dict) -> list[str]:
    """The command ``wandb agent`` runs for one sweep run (wandb_agent.Agent._command_run, same helpers)."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    command = sweep_utils.create_sweep_command(list(sweep_cfg["command"]))
    args = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    args.update(interpreter=[sys.executable], program=[sweep_cfg["program"]], env=[])
    out = []
    for c in map(str, command):
        out += (args.get(c[2:-1]) or []) if c.startswith("${") and c.endswith("}") else [c]
    return out


def test_wandb_sweep_file_is_valid_and_an_agent_run_trains_one_point(tmp_path):
    sweeps = pytest.importorskip("sweeps")  # wandb[sweeps]: wandb's local sweep controller and schema
    from wandb.sdk.launch.sweeps.utils import load_sweep_config

    path = tiny_config(tmp_path, grid={"size": [8, 16], "family": ["dit"], "width": [8], "seed": [0, 1]})
    out_file = tmp_path / "wandb_sweep.yaml"
    sweep.main(["--config", str(path), "--emit-wandb", str(out_file)])
    cfg = load_sweep_config(str(out_file))
    assert cfg is not None and cfg["method"] == "grid"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert sweeps.schema_violations_from_proposed_config(cfg) == []
        # the grid as wandb's controller enumerates it: every grid point once
        runs: list = []
        while True:
            (nxt,) = sweeps.next_runs(cfg, runs)
            if nxt is None:
                break
            runs.append(sweeps.SweepRun(name=f"r{len(runs)}", config=nxt.config, state=sweeps.RunState.finished))
    params = sorted((r.config["family"]["value"], r.config["width"]["value"], r.config["size"]["value"],
                     r.config["seed"]["value"]) for r in runs)
    assert params == sorted((f, w, n, s) for f in ["dit"] for w in [8] for n in [8, 16] for s in [0, 1])

    point = {k: runs[1].config[k]["value"] for k in sweep.GRID_KEYS}
    cmd = _agent_command(cfg, point)
    assert f"--size={point['size']}" in cmd and "--train-point" in cmd
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    ckpts = list((tmp_path / "sweep" / "checkpoints").glob("*.ckpt"))
    stem = str(sweep.GridPoint(point["family"], point["width"], point["size"], point["seed"]))
    assert [c.name.rsplit("_", 1)[0] for c in ckpts] == [stem]  # exactly the agent's grid point


def test_aggregate_identical_families_reproduce_each_other(tmp_path):
    spec = {"class_path": "DiT", "width_arg": "hidden_size", "init_args": {"patch_size": 8, "depth": 1, "num_heads": 1}}
    path = tiny_config(tmp_path, grid={"size": [8], "family": ["dit", "twin"], "width": [8], "seed": [0]},
                       families={"dit": spec, "twin": spec})
    rows = sweep.main(["--config", str(path)])
    (pair,) = [r for r in rows if r["kind"] == "family_pair"]
    assert pair["rp"] == 1.0 and pair["mean_sim"] == pytest.approx(1.0, abs=1e-6)  # same weights, same seeds
    models = [r for r in rows if r["kind"] == "model"]
    assert models[0]["gl"] == models[1]["gl"] and 0.0 <= models[0]["gl"] <= 1.0
    with open(tmp_path / "sweep" / "phase_transition.csv") as f:
        header = next(csv.reader(f))
    assert header == sweep.COLUMNS
    assert (tmp_path / "sweep" / "phase_transition.png").stat().st_size > 1000


def test_bad_input_one_sentence(tmp_path, capsys):
    path = tiny_config(tmp_path, grid={"size": [8], "family": ["gan"], "width": [8], "seed": [0]})
    with pytest.raises(SystemExit, match=r"^error: grid.family has \['gan'\], which families does not define"):
        sweep.main(["--config", str(path)])
    path = tiny_config(tmp_path)
    bad = {"dit": {**TINY["families"]["dit"], "width_divisor": 3}}
    with pytest.raises(SystemExit, match=r"families.dit.width_divisor must be a positive integer dividing every "
                                         r"grid.width \[8\], got 3"):
        sweep.main(["--config", str(tiny_config(tmp_path, families=bad))])
    path = tiny_config(tmp_path)
    with pytest.raises(SystemExit, match="--train-point needs --family, --width, --size and --seed"):
        sweep.main(["--config", str(path), "--train-point", "--family", "dit"])
    with pytest.raises(SystemExit, match=r"--size 32 is not in the sweep's grid.size \[8, 16\]"):
        sweep.main(["--config", str(path), "--train-point", "--family=dit", "--width=8", "--size=32", "--seed=0"])
    with pytest.raises(SystemExit, match="no grid point of .* has been trained yet"):
        sweep.main(["--config", str(path), "--aggregate-only"])
