"""The live reproducibility monitor: equal to ``evaluate.py --pair CKPT optimal:``, logged, inert; subset statistics."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import Logger
from wandb_offline import read_offline_run

import lightning_repro.evaluation as ev
from lightning_repro.callbacks import ReproducibilityMonitor, subset_statistics
from lightning_repro.data import SubsetDataModule
from lightning_repro.module import EDM

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--config", "configs/train/digits_ddpmpp.yaml", "--model.init_args.model_channels", "16",
    "--model.init_args.channel_mult", "[1,2]", "--model.init_args.attn_resolutions", "[]",
    "--data.size", "64", "--data.batch_size", "16", "--data.val_seeds", "4", "--model.init_args.val_steps", "3",
    "--trainer.val_check_interval", "100", "--checkpoint.every_n_train_steps", "5",
    "--final_samples.num_samples", "4", "--final_samples.steps", "2", "--trainer.enable_progress_bar", "false",
    "--trainer.max_steps", "10",
]  # the experiment's W&B logger, offline (no credentials under the test's HOME)
MONITOR_YAML = """trainer:
  callbacks:
    - class_path: lightning_repro.callbacks.ReproducibilityMonitor
      init_args: {every_n_steps: 5, seeds: 8, reference: optimal, threshold: 0.15}
"""


pytestmark = pytest.mark.usefixtures("one_thread_module")  # conftest: one torch thread per module


def _numpy_statistics(images: np.ndarray) -> dict[str, float]:
    y = images.reshape(len(images), -1).astype(np.float64)
    d = np.sqrt(((y[:, None, :] - y[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    nn = d.min(1)
    np.fill_diagonal(d, 0.0)
    return {"sigma_data": y.std(), "max_pairwise_distance": d.max(), "nn_distance_min": nn.min(),
            "nn_distance_median": np.median(nn), "nn_distance_max": nn.max()}


@pytest.mark.parametrize("chunk", [7, 1024])
def test_subset_statistics_equal_a_direct_numpy_computation(chunk):
    images = SubsetDataModule("digits", size=64, subset_seed=0).images
    images = torch.cat([images, images[:1]])  # a duplicate: its nearest-neighbour distance is exactly 0
    got = subset_statistics(images, chunk=chunk)
    want = _numpy_statistics(images.numpy())
    assert got["num_images"] == 65
    assert got["nn_distance_min"] == 0.0
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key


def test_subset_statistics_need_two_images():
    with pytest.raises(ValueError, match=r"^subset statistics need at least 2 training images, got 1\.$"):
        subset_statistics(torch.zeros(1, 1, 8, 8))


# ----------------------------------------------------------------------------- the acceptance test, via the CLI


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("monitor_cli")
    (tmp / "monitor.yaml").write_text(MONITOR_YAML)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))
    args = [*TINY, "--config", str(tmp / "monitor.yaml"), "--trainer.default_root_dir", str(tmp / "run")]
    p = subprocess.run([sys.executable, "train.py", "fit", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return tmp / "run", p.stdout


def test_monitor_equals_evaluate_pair_with_the_optimal_denoiser(cli_run, tmp_path):
    run, _ = cli_run
    with open(run / "monitor.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [5, 10]
    assert (run / "monitor.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row, ckpt in zip(rows, ["step_0000005.ckpt", "last.ckpt"]):
        res = ev.main(["--pair", str(run / "checkpoints" / ckpt), "optimal:", "--seeds", "0-7", "--steps", "3",
                       "--threshold", "0.15", "--gl", "--no-wandb", "--no-progress", "--out", str(tmp_path / ckpt)])
        assert res["n"] == 8 and res["steps"] == 3
        assert float(row["rp"]) == res["rp"]
        assert float(row["mean_similarity"]) == res["mean_similarity"]
        assert float(row["gl"]) == res["gl_a"]
        assert float(row["memorized"]) == res["memorized_a"]
    assert 0.0 < float(rows[-1]["rp"]) < 1.0  # a threshold at which the comparison is not trivially 0 or 1


def test_fit_prints_the_subset_statistics(cli_run):
    _, stdout = cli_run
    s = subset_statistics(SubsetDataModule("digits", size=64, subset_seed=0).images)
    line = next(ln for ln in stdout.splitlines() if ln.startswith("subset statistics"))
    assert line == (f"subset statistics (N=64, [-1, 1] pixels): sigma_data={s['sigma_data']:.4f} | "
                    f"largest pairwise distance={s['max_pairwise_distance']:.4f} (sigma_max rule, Song & Ermon 2020) | "
                    f"nearest-neighbour distance min={s['nn_distance_min']:.4f} "
                    f"median={s['nn_distance_median']:.4f} max={s['nn_distance_max']:.4f}")
    assert [ln for ln in stdout.splitlines() if ln.startswith("monitor: 2 measurement(s)")]


def test_cli_run_logs_the_curves_and_statistics_to_wandb(cli_run):
    run, _ = cli_run
    (run_dir,) = list((run / "wandb").glob("offline-run-*"))
    info = read_offline_run(run_dir)
    assert {"monitor/rp", "monitor/mean_similarity", "monitor/gl", "monitor/memorized"} <= info["history_keys"]
    with open(run / "monitor.csv") as f:
        last = list(csv.DictReader(f))[-1]
    assert info["summary"]["monitor/mean_similarity"] == float(last["mean_similarity"])
    s = subset_statistics(SubsetDataModule("digits", size=64, subset_seed=0).images)
    assert {k: info["config"][f"subset/{k}"] for k in s} == s


# ----------------------------------------------------------------------------- in process: logging, inertness


class RecordingLogger(Logger):
    def __init__(self):
        super().__init__()
        self.metrics: list[tuple[int, dict]] = []
        self.hparams: dict = {}

    name, version = "recording", 0

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        self.hparams.update(params)


def _fit(tmp_path, callbacks, logger=False, seed=0, lr=2e-4, data=None):
    torch.manual_seed(seed)
    module = EDM(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0,
                 image_shape=(1, 8, 8), val_steps=3, seed=seed, lr=lr)
    trainer = L.Trainer(max_steps=4, logger=logger, callbacks=callbacks, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, data or SubsetDataModule("digits", size=32, batch_size=8, val_seeds=2))
    return module, trainer


def test_monitor_logs_to_the_logger_and_progress_bar_and_leaves_training_alone(tmp_path):
    logger, monitor = RecordingLogger(), ReproducibilityMonitor(every_n_steps=2, seeds="3-6")
    module, trainer = _fit(tmp_path, [monitor], logger)
    plain, _ = _fit(tmp_path / "plain", [])
    assert [r["step"] for r in monitor.history] == [2, 4]
    logged = {step: m for step, m in logger.metrics if "monitor/rp" in m}
    for row in monitor.history:
        assert logged[row["step"]] == {f"monitor/{k}": row[k] for k in ("rp", "mean_similarity", "gl", "memorized")}
    assert float(trainer.progress_bar_metrics["monitor/gl"]) == pytest.approx(monitor.history[-1]["gl"])
    stats = subset_statistics(SubsetDataModule("digits", size=32).images)
    assert {k: logger.hparams[f"subset/{k}"] for k in stats} == stats
    for (k, a), b in zip(module.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), k  # sampling draws no random numbers: the training is the same


def test_a_checkpoint_reference_equals_evaluate_pair_of_the_two_checkpoints(tmp_path):
    _, ref_trainer = _fit(tmp_path / "ref", [], seed=1, lr=0.02)  # moves the zero-initialised output layer
    ref_trainer.save_checkpoint(tmp_path / "ref.ckpt")
    monitor = ReproducibilityMonitor(every_n_steps=4, seeds=6, reference=str(tmp_path / "ref.ckpt"), threshold=0.5)
    _, trainer = _fit(tmp_path / "mon", [monitor])
    trainer.save_checkpoint(tmp_path / "mon.ckpt")  # step 4, the step the monitor last ran
    res = ev.main(["--pair", str(tmp_path / "mon.ckpt"), str(tmp_path / "ref.ckpt"), "--seeds", "0-5", "--steps", "3",
                   "--threshold", "0.5", "--gl", "--no-wandb", "--no-progress", "--out", str(tmp_path / "pair")])
    (row,) = monitor.history
    assert row["step"] == 4 and res["n"] == 6
    assert (row["rp"], row["mean_similarity"], row["gl"]) == (res["rp"], res["mean_similarity"], res["gl_a"])
    assert row["mean_similarity"] < 0.99  # two different models, not one compared to itself


def test_a_mog_reference_is_the_mixture_of_the_models_own_source(tmp_path):
    """``reference: mog:`` (no data spec) is the closed form of the mixture the model trains on: the monitor's
    numbers equal ``evaluate.py --pair CKPT mog:`` on the same seeds."""
    kw = {"num_samples": 64, "shape": [1, 8, 8], "num_components": 2, "rank": 3, "seed": 5}
    data = SubsetDataModule("mog", size=32, batch_size=8, val_seeds=2, source_kwargs=kw)
    monitor = ReproducibilityMonitor(every_n_steps=4, seeds=6, reference="mog:", threshold=0.5)
    _, trainer = _fit(tmp_path / "mon", [monitor], lr=0.02, data=data)
    trainer.save_checkpoint(tmp_path / "mon.ckpt")
    res = ev.main(["--pair", str(tmp_path / "mon.ckpt"), "mog:", "--seeds", "0-5", "--steps", "3", "--threshold",
                   "0.5", "--gl", "--no-wandb", "--no-progress", "--out", str(tmp_path / "pair")])
    (row,) = monitor.history
    assert res["model_b"]["kind"] == "mog" and res["model_b"]["size"] == 32
    assert (row["rp"], row["mean_similarity"], row["gl"]) == (res["rp"], res["mean_similarity"], res["gl_a"])


def test_monitor_bad_input_is_one_sentence():
    with pytest.raises(ValueError, match=r"^ReproducibilityMonitor: every_n_steps must be an integer >= 1, got 0\.$"):
        ReproducibilityMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match=r"^ReproducibilityMonitor: seeds must be >= 1 \(or a seed text\), got 0\.$"):
        ReproducibilityMonitor(seeds=0)
    with pytest.raises(ValueError, match=r"^ReproducibilityMonitor needs the trainer's data module to be a "
                                         r"SubsetDataModule \(its training images"):
        ReproducibilityMonitor().on_fit_start(SimpleNamespace(datamodule=None), None)
