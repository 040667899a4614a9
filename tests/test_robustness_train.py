"""Regression tests of the reliability issue (#17), training side: exact resume with dropout, a resumed checkpoint
must fit the configured model, and bad input to ``train.py fit`` is one sentence (files, folders, option values)."""

from __future__ import annotations

import errno
from pathlib import Path

import jsonargparse
import lightning as L
import pytest
import torch

from lightning_repro import cli
from lightning_repro.data import SubsetDataModule
from lightning_repro.module import EDM, DiT

NET = dict(model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])
#: a tiny DDPM++ training run from the command line (the digits config, 8x8 images, no logger, no samples)
ARGS = ["fit", "--config", "configs/train/digits_ddpmpp.yaml", "--model.init_args.model_channels", "8",
        "--model.init_args.channel_mult", "[1]", "--model.init_args.attn_resolutions", "[]",
        "--data.size", "16", "--data.batch_size", "8", "--trainer.max_steps", "1", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--final_samples.enabled", "false", "--trainer.val_check_interval", "100"]
ROOT = Path(__file__).resolve().parents[1]


def fit(module, root, steps, ckpt_path=None, save=None):
    """``steps`` steps on 32 digits (4 steps an epoch); the global RNG is re-seeded first, as a new process is."""
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        default_root_dir=str(root), accelerator="cpu", devices=1)
    trainer.fit(module, SubsetDataModule("digits", size=32, batch_size=8), ckpt_path=ckpt_path)
    if save is not None:
        trainer.save_checkpoint(save)
    return module


def ema(module):
    return {k: v.detach().clone() for k, v in module.ema.state_dict().items()}


@pytest.fixture(scope="module")
def dit_ckpt(tmp_path_factory) -> Path:
    """A one-step checkpoint of another architecture (DiT) than the command line configures (DDPMpp), with the
    ``_class_path`` hyperparameter a ``train.py fit`` run stores (which Lightning's CLI would adopt)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dit")
    fit(DiT(patch_size=4, hidden_size=16, depth=1, num_heads=1), root, 1, save=root / "dit.ckpt")
    ckpt = torch.load(root / "dit.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["_class_path"] = "lightning_repro.module.DiT"
    torch.save(ckpt, root / "dit.ckpt")
    return root / "dit.ckpt"


@pytest.fixture(scope="module")
def rgb_ckpt(tmp_path_factory) -> Path:
    """A one-step checkpoint of the command line's network under its old preset name (EDM), but of 3x8x8 images
    (the digits are 1x8x8)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("rgb")
    module = EDM(**NET, image_shape=(3, 8, 8))
    ckpt = {"state_dict": module.state_dict(), "pytorch-lightning_version": L.__version__, "global_step": 1,
            "epoch": 0, "loops": {}, "optimizer_states": [], "lr_schedulers": []}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, root / "rgb.ckpt")
    return root / "rgb.ckpt"


def edm(**kw):
    """A tiny EDM with the same initial weights every time."""
    torch.manual_seed(0)
    return EDM(**NET, **kw)


def test_resume_is_exact_with_dropout(tmp_path, one_thread):
    """Killed after step 3 of 6 and resumed in a fresh process (fresh global RNG): the EMA of the uninterrupted run
    (when dropout drew from the global RNG: 5e-4 max abs here, 0.112 after 300 steps of the digits config)."""
    straight = ema(fit(edm(dropout=0.1), tmp_path / "a", 6))
    fit(edm(dropout=0.1), tmp_path / "b", 3, save=tmp_path / "b3.ckpt")
    resumed = ema(fit(edm(dropout=0.1), tmp_path / "b", 6, ckpt_path=str(tmp_path / "b3.ckpt")))
    diff = max((resumed[k] - straight[k]).abs().max().item() for k in straight)
    assert diff <= 1e-6, diff
    no_dropout = ema(fit(edm(dropout=0.0), tmp_path / "c", 6))  # the masks do matter in this test
    assert max((no_dropout[k] - straight[k]).abs().max().item() for k in straight) > 1e-4


def test_dropout_rng_is_a_function_of_seed_step_rank_and_disturbs_nothing():
    m = EDM(**NET, dropout=0.1)
    seeds = {m.dropout_seed(step, rank) for step in range(3) for rank in range(2)}
    assert len(seeds) == 6 and m.dropout_seed(2, 1) == EDM(**NET, dropout=0.5).dropout_seed(2, 1)
    assert m.dropout_seed(2, 1) != EDM(**NET, seed=1).dropout_seed(2, 1)
    before = torch.get_rng_state()
    with m.seeded_rng(m.dropout_seed(5, 0), torch.device("cpu")):
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    with m.seeded_rng(m.dropout_seed(5, 0), torch.device("cpu")):
        assert torch.equal(torch.rand(4), a)


def run_main(argv, capsys=None) -> str:
    """``cli.main(argv)`` must exit with one ``error:`` sentence; returns it."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    message = str(exc.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.fixture
def cli_env(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # the CLI sets it by default; restored after the test
    return tmp_path


def test_resume_from_another_architecture_is_one_sentence(dit_ckpt, cli_env):
    """Lightning adopted the checkpoint's hyperparameters: a DDPMpp config trained the DiT (``done: arch=dit``)."""
    message = run_main([*ARGS, "--trainer.default_root_dir", str(cli_env / "r"), "--ckpt_path", str(dit_ckpt)])
    assert message == (f"error: ckpt_path {dit_ckpt} holds a 'dit' model (lightning_repro.module.DiT), but this "
                       f"model is 'ddpmpp' (lightning_repro.module.DDPMpp); resuming needs a checkpoint of the same "
                       f"architecture.")


def test_resume_from_another_image_shape_is_one_sentence(rgb_ckpt, cli_env):
    """Was ~100 lines of ``size mismatch for model.net...``."""
    message = run_main([*ARGS, "--trainer.default_root_dir", str(cli_env / "r"), "--ckpt_path", str(rgb_ckpt)])
    assert message == (f"error: ckpt_path {rgb_ckpt} was trained with image_shape [3, 8, 8], but this model has "
                       f"[1, 8, 8] (from the data module); resuming needs the same data shape.")


@pytest.mark.parametrize("key,value,theirs", [
    ("model_channels", "16", "model_channels=8 (this model: 16)"),
    ("kernel", "vp", None),
])
def test_resume_with_other_network_or_kernel_is_one_sentence(rgb_ckpt, cli_env, key, value, theirs):
    ckpt = torch.load(rgb_ckpt, weights_only=True)
    ckpt["lightning_repro"]["image_shape"] = [1, 8, 8]
    torch.save(ckpt, cli_env / "ok.ckpt")
    message = run_main([*ARGS, "--trainer.default_root_dir", str(cli_env / "r"), "--ckpt_path",
                        str(cli_env / "ok.ckpt"), f"--model.init_args.{key}", value])
    if theirs:
        assert message == (f"error: ckpt_path {cli_env / 'ok.ckpt'} has a different DDPMpp network: {theirs}; "
                           f"resuming needs the same architecture settings.")
    else:
        assert message == (f"error: ckpt_path {cli_env / 'ok.ckpt'} was trained with kernel 'edm', but this model "
                           f"uses 'vp'; resuming needs the same kernel and preconditioning (kernel_kwargs may "
                           f"differ).")


def test_truncated_ckpt_path_is_one_sentence(rgb_ckpt, cli_env):
    cut = cli_env / "cut.ckpt"
    cut.write_bytes(rgb_ckpt.read_bytes()[:3000])
    message = run_main([*ARGS, "--trainer.default_root_dir", str(cli_env / "r"), "--ckpt_path", str(cut)])
    assert message == (f"error: --ckpt_path: checkpoint {cut} could not be read (truncated or not a lightning_repro "
                       f"checkpoint?): RuntimeError: PytorchStreamReader failed reading zip archive: failed finding "
                       f"central directory.")
    message = run_main([*ARGS, "--trainer.default_root_dir", str(cli_env / "r"), "--ckpt_path",
                        str(cli_env / "none.ckpt")])
    assert message == f"error: --ckpt_path: checkpoint {cli_env / 'none.ckpt'} does not exist."


def test_root_dir_under_a_file_is_one_sentence(cli_env):
    (cli_env / "file").write_text("")
    root = cli_env / "file" / "run"
    message = run_main([*ARGS, "--trainer.default_root_dir", str(root)])
    assert message == f"error: --trainer.default_root_dir {root} cannot be created: Not a directory."


def test_unwritable_root_dir_is_one_sentence(cli_env, monkeypatch):
    """Permission errors, simulated (the tests may run as root, who may write anywhere)."""
    root = cli_env / "locked" / "run"

    def refuse(self, *args, **kwargs):  # as if "locked" could not be written to
        raise PermissionError(errno.EACCES, "Permission denied", str(root.parent))

    monkeypatch.setattr(Path, "mkdir", refuse)
    message = run_main([*ARGS, "--trainer.default_root_dir", str(root)])
    assert message == (f"error: --trainer.default_root_dir {root} cannot be created: Permission denied "
                       f"(at {root.parent}).")
    monkeypatch.undo()
    root.mkdir(parents=True)
    access = cli.os.access
    monkeypatch.setattr(cli.os, "access", lambda path, mode, **kw: str(path) != str(root) and access(path, mode, **kw))
    message = run_main([*ARGS, "--trainer.default_root_dir", str(root)])
    assert message == f"error: --trainer.default_root_dir {root} is not writable."


def test_full_disk_leaves_no_config_file(cli_env, monkeypatch):
    """ENOSPC half-way through ``config.yaml`` (simulated): one sentence, and neither a 0-byte file nor a temp."""
    def full_disk(self, cfg, path, **kwargs):
        with open(path, "w") as f:
            f.write("# lightning_repro")  # what fit on the disk
        raise OSError(errno.ENOSPC, "No space left on device")  # as file.write raises it: no file name

    monkeypatch.setattr(jsonargparse.ArgumentParser, "save", full_disk)
    root = cli_env / "run"
    message = run_main([*ARGS, "--trainer.default_root_dir", str(root)])
    assert message == f"error: {root / 'config.yaml'}: No space left on device."
    assert sorted(p.name for p in root.iterdir()) == []


def test_write_atomic_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "config.yaml"
    target.write_text("old: 1\n")

    def half_then_full(tmp):
        Path(tmp).write_text("new")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as exc:
        cli.write_atomic(target, half_then_full)
    assert (exc.value.filename, exc.value.errno) == (str(target), errno.ENOSPC)
    assert target.read_text() == "old: 1\n" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
    cli.write_atomic(target, lambda tmp: Path(tmp).write_text("new: 2\n"))
    assert target.read_text() == "new: 2\n" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_bad_option_value_keeps_the_reason(cli_env):
    message = run_main([*ARGS, "--trainer.default_root_dir", str(cli_env / "r"), "--model.init_args.lr", "abc"])
    assert message == ("error: Problem with given class_path 'lightning_repro.module.DDPMpp': Parser key \"lr\": "
                       "Expected a <class 'float'>. Got value: abc")


def test_os_error_without_a_path_keeps_its_traceback(cli_env, monkeypatch):
    """An ``OSError`` that names no file is not bad input: it is not turned into a sentence."""
    def broken(self, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(cli.ReproCLI, "before_fit", broken)
    with pytest.raises(OSError, match="Input/output error"):
        cli.main([*ARGS, "--trainer.default_root_dir", str(cli_env / "r")])


def test_resume_checks_classes_and_metadata(rgb_ckpt):
    """Unit level: a class-conditional checkpoint into an unconditional model; a checkpoint of another module."""
    meta = torch.load(rgb_ckpt, weights_only=True)["lightning_repro"]
    with pytest.raises(ValueError) as exc:
        EDM(**NET, image_shape=(3, 8, 8), num_classes=10).on_load_checkpoint({"lightning_repro": meta})
    assert str(exc.value) == ("ckpt_path checkpoint was trained with num_classes 0, but this model has 10 (from the "
                              "data module); resuming needs the same data shape.")
    with pytest.raises(ValueError) as exc:
        EDM(**NET).on_load_checkpoint({"state_dict": {}})
    assert str(exc.value) == ("ckpt_path checkpoint was not written by lightning_repro's DiffusionModule (no "
                              "'lightning_repro' metadata).")
    EDM(**NET, image_shape=(3, 8, 8)).on_load_checkpoint({"lightning_repro": meta})  # the same model: accepted
