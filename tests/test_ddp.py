"""Many processes and speed features: gloo DDP training and torchrun evaluation equal one process; training draws
depend on the global sample position only; bf16 sampling; no host read of device tensors inside the samplers.

The two distributed tests run the real entry points in subprocesses (``train.py fit --trainer.devices 2
--trainer.strategy ddp`` on CPU, ``torchrun --nproc_per_node 2 evaluate.py --pair``) next to their
one-process twins; both pairs run concurrently to keep the wall time of the file down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]


class RankRecorder(Callback):
    """Used by the training subprocesses (``--trainer.callbacks+=test_ddp.RankRecorder``): writes
    ``rank<r>.pt`` with this rank's per-step loss (its own half batch) and its final EMA weights."""

    def __init__(self, out: str):
        self.out, self.losses = out, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module):
        ema = {k: v.detach().cpu().clone() for k, v in pl_module.ema.state_dict().items()}
        path = Path(self.out) / f"rank{trainer.global_rank}.pt"
        torch.save({"losses": self.losses, "ema": ema, "world": trainer.world_size}, path)


def _env(tmp: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MASTER_", "LOCAL_RANK", "RANK"))
    }
    env.update(
        HOME=str(tmp),
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
        WANDB_MODE="offline",
        PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT), env.get("PYTHONPATH", "")]),
    )
    return env


def _start(cmd: list[str], tmp: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=ROOT, env=_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(p: subprocess.Popen, what: str) -> str:
    out, _ = p.communicate(timeout=600)
    if p.returncode != 0:
        raise AssertionError(f"{what} failed ({p.returncode}):\n{out[-4000:]}")
    return out


# -- distributed training ------------------------------------------------------------------------------------

TRAIN = [
    "fit",
    "--config",
    "configs/train/digits_ddpmpp.yaml",
    "--model.init_args.model_channels",
    "16",
    "--model.init_args.channel_mult",
    "[1,2]",
    "--model.init_args.attn_resolutions",
    "[4]",
    "--data.size",
    "64",
    "--data.flip",
    "true",
    "--trainer.max_steps",
    "6",
    "--trainer.val_check_interval",
    "6",
    "--data.val_seeds",
    "5",
    "--model.init_args.val_steps",
    "2",
    "--checkpoint.every_n_train_steps",
    "3",
    "--final_samples.enabled",
    "false",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.accelerator",
    "cpu",
    "--trainer.logger",
    "lightning.pytorch.loggers.CSVLogger",
    "--trainer.log_every_n_steps",
    "1",
    "--trainer.callbacks+=test_ddp.RankRecorder",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same training (global batch 16, 6 steps, random flips) on one process and on two gloo DDP ranks."""
    tmp = tmp_path_factory.mktemp("ddp_train")
    procs = {}
    for name, devices, batch in (("one", 1, 16), ("two", 2, 8)):
        d = tmp / name
        d.mkdir()
        extra = [
            "--trainer.devices",
            str(devices),
            "--data.batch_size",
            str(batch),
            "--trainer.default_root_dir",
            str(d),
            "--trainer.logger.init_args.save_dir",
            str(d),
            "--trainer.callbacks.init_args.out",
            str(d),
        ]
        if devices > 1:
            extra += ["--trainer.strategy", "ddp"]
        procs[name] = _start([sys.executable, "train.py", *TRAIN, *extra], tmp)
    for name, p in procs.items():
        _finish(p, f"training ({name})")
    return tmp / "one", tmp / "two"


def _csv_losses(run: Path) -> list[float]:
    (path,) = run.glob("version_*/metrics.csv")
    lines = path.read_text().splitlines()
    col = lines[0].split(",").index("train/loss")
    return [float(ln.split(",")[col]) for ln in lines[1:] if ln.split(",")[col]]


def test_ddp_training_follows_the_single_process_trajectory(runs):
    one, two = runs
    single = torch.load(one / "rank0.pt", weights_only=True)
    r0, r1 = (torch.load(two / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert (single["world"], r0["world"], r1["world"]) == (1, 2, 2)
    # each rank's loss is the mean over its half of the global batch: their mean is the one-process loss
    mean = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    assert len(mean) == len(single["losses"]) == 6
    assert np.allclose(mean, single["losses"], rtol=1e-5, atol=0), (mean, single["losses"])
    assert r0["losses"] != r1["losses"]  # the ranks did see different images
    # the logged train/loss is the global-batch loss in both runs (synced across ranks)
    assert np.allclose(_csv_losses(two), _csv_losses(one), rtol=1e-5, atol=0)
    # EMA: bit-identical on the two ranks, and the one-process EMA up to float round-off
    assert r0["ema"].keys() == r1["ema"].keys() == single["ema"].keys()
    assert all(torch.equal(r0["ema"][k], r1["ema"][k]) for k in r0["ema"])
    for k, v in single["ema"].items():
        assert torch.allclose(r0["ema"][k], v, rtol=1e-4, atol=1e-6), k
    # checkpoints written once (by rank 0), with the same weights as the one-process run
    names = sorted(p.name for p in (two / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step_0000003.ckpt", "step_0000006.ckpt"]
    c1 = torch.load(one / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    c2 = torch.load(two / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert c1["global_step"] == c2["global_step"] == 6
    for k, v in c1["state_dict"].items():
        assert torch.allclose(c2["state_dict"][k], v, rtol=1e-4, atol=1e-6), k
    for k, v in r0["ema"].items():
        assert torch.equal(c2["state_dict"][f"ema.{k}"], v), k
    # the validation grid of rank 0 holds every seed (each rank sampled its share; gathered, padding dropped)
    from PIL import Image

    g1, g2 = (np.asarray(Image.open(r / "samples" / "step_0000006.png")).astype(int) for r in (one, two))
    assert g1.shape == g2.shape and np.abs(g1 - g2).max() <= 2


# -- distributed evaluation ----------------------------------------------------------------------------------


def test_torchrun_evaluation_equals_one_process(runs, tmp_path):
    one, _ = runs
    a, b = one / "checkpoints" / "last.ckpt", one / "checkpoints" / "step_0000003.ckpt"
    args = [
        "--pair",
        str(a),
        str(b),
        "--seeds",
        "0-1199",
        "--steps",
        "3",
        "--descriptor",
        "pixel",
        "--gl",
        "--shard-size",
        "300",
        "--batch-size",
        "150",
        "--no-wandb",
        "--no-progress",
        "--device",
        "cpu",
    ]
    single = _start([sys.executable, "evaluate.py", *args, "--out", str(tmp_path / "one")], tmp_path)
    multi = _start(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "evaluate.py",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        tmp_path,
    )
    out1, out2 = (
        _finish(single, "evaluate.py (1 process)"),
        _finish(multi, "torchrun evaluate.py (2 processes)"),
    )
    r1 = json.loads((tmp_path / "one" / "results.json").read_text())
    r2 = json.loads((tmp_path / "two" / "results.json").read_text())
    differ = {k for k in r1 if r1[k] != r2[k]}
    assert differ <= {"samples_a", "samples_b", "grid_png"}, {k: (r1[k], r2[k]) for k in differ}  # paths only
    assert r1["n"] == 1200 and r1["gl_a"] is not None and 0 <= r1["rp"] <= 1
    assert out2.count("done: RP=") == 1 and out1.count("done: RP=") == 1  # rank 0 alone reports
    # the shards (4 per model, dealt to two ranks) hold the same images as the one-process shards; the features
    # came in two chunks of FEATURE_CHUNK = 1024 images, one per rank
    for side in ("samples_a", "samples_b"):
        f1 = sorted(Path(r1[side]).glob("samples_*.npz"))
        f2 = sorted(Path(r2[side]).glob("samples_*.npz"))
        assert [f.name for f in f1] == [f.name for f in f2] and len(f1) == 4
        for x, y in zip(f1, f2):
            with np.load(x) as p, np.load(y) as q:
                assert np.array_equal(p["images"], q["images"]) and np.array_equal(p["seeds"], q["seeds"])
    assert (tmp_path / "two" / "pair.png").is_file()


# -- training draws are a function of the global position ----------------------------------------------------


def _tiny_edm(**kw):
    from lightning_repro.module import EDM

    return EDM(
        model_channels=16,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[],
        dropout=0.0,
        image_shape=(1, 8, 8),
        **kw,
    )


def test_training_draws_of_a_rank_are_its_rows_of_the_global_batch():
    m = _tiny_edm(num_classes=10, label_dropout=0.5, kernel="vp_discrete")
    labels = torch.arange(12) % 10
    x0 = torch.zeros(12, 1, 8, 8)
    whole = m.draw_noise(x0, labels, m.step_generator(7, "cpu"))
    parts = [
        m.draw_noise(x0[r * 4 : (r + 1) * 4], labels[r * 4 : (r + 1) * 4], m.step_generator(7, "cpu"), r, 3)
        for r in range(3)
    ]
    for i in range(3):  # sigma, noise, labels after dropout
        assert torch.equal(torch.cat([p[i] for p in parts]), whole[i])
    assert (whole[2] == -1).any() and (whole[2] >= 0).any()
    other = m.draw_noise(x0, labels, m.step_generator(8, "cpu"))
    assert not torch.equal(other[1], whole[1])  # a new step, new noise
    with pytest.raises(ValueError, match=r"rank must lie in \[0, 1\] for world_size=2, got 2"):
        m.draw_noise(x0, labels, m.step_generator(7, "cpu"), 2, 2)


def test_flips_of_a_rank_are_its_rows_of_the_global_batch():
    from lightning_repro.data.datamodule import InfiniteBatchStream

    imgs, lab = torch.randn(40, 1, 2, 3), torch.arange(40)
    single = InfiniteBatchStream(imgs, lab, 12, seed=3, flip=True)
    ranks = [InfiniteBatchStream(imgs, lab, 4, seed=3, rank=r, world_size=3, flip=True) for r in range(3)]
    flipped = 0
    for step in range(6):
        x, y = single.batch(step)
        parts = [r.batch(step) for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(
            torch.cat([p[1] for p in parts]), y
        )
        flipped += int((x != imgs[y]).flatten(1).any(1).sum())
    assert 0 < flipped < 72


def test_small_subsets_stay_on_the_gpu_when_auto():
    from lightning_repro.data import SubsetDataModule

    dm = SubsetDataModule("digits", size=64, batch_size=8)
    assert dm.stream_device("cuda") == torch.device("cuda")  # 64 x 1 x 8 x 8 floats: kept on the GPU
    assert dm.stream_device("cpu") == torch.device("cpu")
    assert SubsetDataModule("digits", size=64, on_device=False).stream_device("cuda") == torch.device("cpu")
    x, y = next(iter(SubsetDataModule("digits", size=64, batch_size=8, on_device=True).train_dataloader()))
    assert x.shape == (8, 1, 8, 8) and x.device.type == "cpu"  # no trainer: its device is the CPU


# -- sampling: bf16 autocast and no host syncs -----------------------------------------------------------------


def test_bf16_sampling_is_close_to_float32_and_returns_float32():
    from lightning_repro.sampling import sample

    torch.set_num_threads(1)
    m = _tiny_edm().eval()
    kw = dict(steps=4, batch_size=8)
    x32 = sample(m.ema, m.kernel, "0-7", (1, 8, 8), **kw)
    x16 = sample(m.ema, m.kernel, "0-7", (1, 8, 8), precision="bf16", **kw)
    assert x16.dtype == torch.float32 and x16.shape == x32.shape
    assert 0 < (x16 - x32).abs().max() < 0.1
    with pytest.raises(ValueError, match="Unknown precision 'fp8'; valid precisions are: fp32, bf16, fp16."):
        sample(m.ema, m.kernel, "0", (1, 8, 8), precision="fp8")


def _syncs(arch: str, kernel: str, num_classes: int, sampler: str) -> None:
    """Run ``sampler`` with every tensor on the meta device: any host read (``.item()``, ``.tolist()``,
    ``float(t)``, ``if t:``) raises, so passing means the loop would not synchronise with a GPU."""
    from lightning_repro.module import DiT, UViT
    from lightning_repro.sampling.solvers import get_sampler

    if arch == "edm":
        m = _tiny_edm(kernel=kernel, num_classes=num_classes)
    elif arch == "uvit":
        m = UViT(
            patch_size=2,
            embed_dim=32,
            depth=2,
            num_heads=2,
            kernel=kernel,
            image_shape=(1, 8, 8),
            num_classes=num_classes,
        )
    else:
        m = DiT(
            patch_size=2,
            hidden_size=32,
            depth=2,
            num_heads=2,
            kernel=kernel,
            image_shape=(1, 8, 8),
            num_classes=num_classes,
        )
    den = m.ema.to("meta")
    x = torch.empty(2, 1, 8, 8, device="meta")
    labels = torch.zeros(2, dtype=torch.long, device="meta") if num_classes else None
    with torch.inference_mode():
        get_sampler(sampler)(den, x, m.kernel.sigmas(4), labels)


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_3m"])
@pytest.mark.parametrize("arch,kernel", [("edm", "edm"), ("edm", "vp"), ("uvit", "ve"), ("dit", "subvp")])
def test_sampling_loop_reads_nothing_back_from_the_device(arch, kernel, sampler):
    _syncs(arch, kernel, 0, sampler)


@pytest.mark.parametrize(
    "arch,kernel,num_classes", [("edm", "edm", 10), ("dit", "edm", 10), ("edm", "vp_discrete", 0)]
)
def test_conditional_and_discrete_sampling_reads_nothing_back(arch, kernel, num_classes):
    _syncs(arch, kernel, num_classes, "heun")


def test_bf16_shards_record_their_precision_and_old_shards_count_as_fp32(runs, tmp_path):
    import lightning_repro.evaluation as ev

    torch.set_num_threads(1)
    ref = ev.resolve_model(str(runs[0] / "checkpoints" / "last.ckpt"))
    fp32, bf16 = ev.SamplingOptions(steps=2, progress=False), ev.SamplingOptions(steps=2, progress=False, precision="bf16")
    kw = dict(log=lambda msg: None)
    s16 = ev.generate_samples(ref, list(range(6)), tmp_path / "bf16", bf16, **kw)
    s32 = ev.generate_samples(ref, list(range(6)), tmp_path / "fp32", fp32, **kw)
    assert s16.provenance["precision"] == "bf16" and s32.provenance["precision"] == "fp32"
    assert np.abs(s16.images.astype(int) - s32.images.astype(int)).max() <= 16  # network round-off only
    with pytest.raises(ValueError, match=r"was made with precision='bf16' but this run uses 'fp32'"):
        ev.generate_samples(ref, list(range(6)), tmp_path / "bf16", fp32, **kw)
    # a shard written before the precision field existed is a float32 shard: reused, not an error
    (path,) = (tmp_path / "fp32").glob("samples_*.npz")
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    prov = json.loads(str(arrays["provenance"]))
    del prov["precision"]
    arrays["provenance"] = np.array(json.dumps(prov, sort_keys=True))
    np.savez(path, **arrays)
    again = ev.generate_samples(ref, list(range(6)), tmp_path / "fp32", fp32, **kw)
    assert (again.skipped, again.generated) == (1, 0) and np.array_equal(again.images, s32.images)


# -- one download per node -----------------------------------------------------------------------------------

COUNTING_SCRIPT = '''"""train.py with a stand-in "counting" source: download appends this rank to downloads.txt, load to loads.txt."""
import os
from pathlib import Path

import numpy as np

from lightning_repro.cli import main
from lightning_repro.data.sources import ImageSource, SourceInfo, register_source, uint8_to_float


def _note(root, name):
    with open(Path(root) / name, "a") as fh:
        fh.write(os.environ.get("LOCAL_RANK", "0") + "\\n")


def download(root, **_):
    _note(root, "downloads.txt")
    np.save(Path(root) / "images.npy", np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1), dtype=np.uint8))


def load(root, **_):  # no download here: a load before prepare_data fails
    _note(root, "loads.txt")
    return ImageSource("counting", uint8_to_float(np.load(Path(root) / "images.npy")))


register_source("counting", load, lambda root, **_: SourceInfo((1, 8, 8), 0, False, 16), download)
main()
'''


def test_ddp_downloads_the_source_once_and_builds_the_model_from_metadata(tmp_path):
    """Two gloo ranks: the shape link reads no file, ``prepare_data`` downloads once, then each rank loads."""
    script, data = tmp_path / "train_counting.py", tmp_path / "data"
    script.write_text(COUNTING_SCRIPT)
    data.mkdir()
    args = ["fit", "--config", "configs/train/digits_ddpmpp.yaml", "--model.init_args.model_channels", "8",
            "--model.init_args.channel_mult", "[1,2]", "--model.init_args.attn_resolutions", "[]",
            "--data.source", "counting", "--data.source_kwargs.root", str(data), "--data.batch_size", "4",
            "--trainer.max_steps", "1", "--final_samples.enabled", "false", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
            "--trainer.strategy", "ddp", "--trainer.default_root_dir", str(tmp_path / "run")]
    _finish(_start([sys.executable, str(script), *args], tmp_path), "training on the counting source (2 ranks)")
    assert (data / "downloads.txt").read_text() == "0\n"
    assert sorted((data / "loads.txt").read_text().split()) == ["0", "1"]
