"""``evaluate.py --matrix`` over a mix of model kinds in one command: a suite checkpoint, an ``edm:`` pickle, a
``diffusers:`` pipeline folder and ``optimal:`` (the optimal denoiser of the suite model's training set)."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
from diffusers import DDIMScheduler
from test_published import _case

import lightning_repro.evaluation as ev
from lightning_repro.data import SubsetDataModule
from lightning_repro.module import DDPM
from lightning_repro.published.tiny_pipelines import write_unet_pipeline


def _suite_checkpoint(tmp_path) -> str:
    """A tiny DDPM U-Net trained 2 steps on 16 random 3 x 8 x 8 images (an ``npz`` source)."""
    rng = np.random.default_rng(0)
    data = tmp_path / "rgb.npz"
    np.savez(data, images=rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8))
    module = DDPM(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0,
                  image_shape=(3, 8, 8))
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, SubsetDataModule("npz", size=16, batch_size=8, val_seeds=2,
                                         source_kwargs={"path": str(data)}))
    trainer.save_checkpoint(tmp_path / "suite.ckpt")
    return str(tmp_path / "suite.ckpt")


def test_matrix_over_suite_edm_diffusers_and_optimal(tmp_path, monkeypatch, one_thread):
    suite = _suite_checkpoint(tmp_path)
    pickle_path, marker, *_ = _case("ddpmpp-edm", tmp_path, monkeypatch)
    folder = write_unet_pipeline(tmp_path / "ddim", DDIMScheduler(num_train_timesteps=1000))
    specs = [suite, f"edm:{pickle_path}", f"diffusers:{folder}", "optimal:"]
    out = tmp_path / "matrix"
    ev.main(["--matrix", *specs, "--seeds", "0-7", "--steps", "4", "--out", str(out), "--no-progress",
             "--no-wandb"])
    res = json.loads((out / "matrix.json").read_text())
    rp, mae = np.array(res["rp"]), np.array(res["mae_mean"])
    assert rp.shape == mae.shape == (4, 4)
    assert np.allclose(np.diag(rp), 1.0) and np.allclose(np.diag(mae), 0.0)
    assert np.allclose(rp, rp.T) and np.allclose(mae, mae.T)
    assert (mae[~np.eye(4, dtype=bool)] > 0).all()  # four different models give four different sample sets
    for name in ("rp_matrix.png", "mae_matrix.png", "rp_matrix.csv", "mae_matrix.csv"):
        assert (out / name).stat().st_size > 0
    assert not marker.exists()
    kinds = [m.get("kind") for m in res["models"]]
    assert kinds == ["checkpoint", "edm", "diffusers", "optimal"]


def test_fig6_released_config_names_registered_kinds_and_valid_sampling_flags():
    import shlex
    from pathlib import Path

    import yaml

    from lightning_repro.evaluation.cli import _sample_parser
    from lightning_repro.evaluation.references import REFERENCES, _kind_of

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/published/fig6_released.yaml").read_text())
    assert set(cfg) == {"seeds", "descriptor", "threshold", "models"}
    for name, m in cfg["models"].items():
        cls, _ = _kind_of(m["spec"])
        assert cls is REFERENCES[m["spec"].split(":", 1)[0]], name
        args = _sample_parser().parse_args([m["spec"], *shlex.split(m["sample"]), "--seeds", cfg["seeds"],
                                            "--out", "samples"])
        assert args.steps >= 1 and args.sampler in ("heun", "euler", "dpmpp"), name
