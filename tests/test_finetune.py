"""Attention-only fine-tuning (paper Sec. 4.3, Fig. 11, App. G): ``DiffusionModule(init_from=, trainable=)`` and
``studies.finetune``."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_repro.data import SubsetDataModule
from lightning_repro.module import DiT, UViT, load_denoiser, module_from_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(patch_size=4, hidden_size=16, depth=1, num_heads=1)
ATTN = {"blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias"}


def fit(module, root, steps, classes=(5, 6, 7, 8, 9), ckpt_path=None):
    dm = SubsetDataModule(source="digits", size=16, batch_size=16, classes=list(classes))
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        default_root_dir=str(root), accelerator="cpu", devices=1)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


def ckpt_weights(path, prefix):
    sd = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny DiT trained 5 steps on digits 0-4 (lr 1e-2: the adaLN-Zero gates open, EMA != weights)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pre")
    L.seed_everything(0, verbose=False)
    m = DiT(**TINY, lr=1e-2)
    trainer = fit(m, root, 5, classes=(0, 1, 2, 3, 4))
    path = root / "pre.ckpt"
    trainer.save_checkpoint(path, weights_only=True)
    return path


def test_one_step_changes_only_the_attention_parameters(pretrained, tmp_path):
    m = DiT(**TINY, lr=1e-2, init_from=str(pretrained))
    assert {n for n, p in m.network_parameters() if p.requires_grad} == ATTN
    trainer = fit(m, tmp_path, 1)
    init = ckpt_weights(pretrained, "ema.")
    assert len(trainer.optimizers[0].param_groups[0]["params"]) == len(ATTN)  # frozen: not in the optimiser
    for name, p in m.model.named_parameters():
        if name[len("net."):] in ATTN:
            assert not torch.equal(p, init[name]), f"{name} was selected but did not change"
        else:
            assert torch.equal(p, init[name]), f"{name} is frozen but changed"
    for name, p in m.ema.named_parameters():  # the EMA averages everything: frozen entries stay the init values
        if name[len("net."):] not in ATTN:
            assert torch.equal(p, init[name]), name


def test_trainable_counts_and_summary(pretrained, capsys, tmp_path):
    m = DiT(**TINY, init_from=str(pretrained))
    h = TINY["hidden_size"]
    total = sum(p.numel() for p in m.model.parameters())
    assert m.parameter_counts() == (4 * h * h + 4 * h, total) == (1088, 10384)  # qkv 3h^2+3h, proj h^2+h
    fit(m, tmp_path, 1)
    assert "trainable 1,088 / total 10,384 parameters (10.48%)" in capsys.readouterr().out
    cfg = m.run_config()
    assert (cfg["trainable_params"], cfg["total_params"], cfg["init_from"]) == (1088, 10384, str(pretrained))
    pos = m.model.net.pos_embed.numel()  # DiT's fixed sin-cos embedding stays frozen whatever the patterns
    assert DiT(**TINY, init_from=str(pretrained), trainable=["*"]).parameter_counts() == (total - pos, total)
    assert DiT(**TINY).parameter_counts() == (total - pos, total)  # from scratch: unchanged behaviour
    assert DiT(**TINY, trainable=["model.net.final_layer.*"]).parameter_counts()[0] == 16 * 16 + 16 + 32 * 16 + 32


def test_init_from_loads_the_ema_weights_exactly(pretrained):
    m = DiT(**TINY, init_from=str(pretrained))
    m.load_init_weights()
    ema, raw = ckpt_weights(pretrained, "ema."), ckpt_weights(pretrained, "model.")
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)  # so the test tells the EMA from the raw weights
    for sd in (m.model.state_dict(), m.ema.state_dict()):
        assert sd.keys() == ema.keys() and all(torch.equal(sd[k], ema[k]) for k in ema)


def test_finetuned_checkpoint_reloads_and_resumes_without_the_init_file(pretrained, tmp_path):
    init = tmp_path / "init.ckpt"
    shutil.copy(pretrained, init)
    m = DiT(**TINY, lr=1e-2, init_from=str(init))
    trainer = fit(m, tmp_path, 2)
    trainer.save_checkpoint(tmp_path / "ft.ckpt")  # with optimiser state, for the resume below
    init.unlink()
    back = module_from_checkpoint(tmp_path / "ft.ckpt")
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in back.state_dict().items())
    den, _ = load_denoiser(tmp_path / "ft.ckpt")
    assert den.checkpoint_meta["init_from"] == str(init)
    again = DiT(**TINY, lr=1e-2, init_from=str(init))  # resume: neither reads the missing file nor loads init weights
    fit(again, tmp_path, 2, ckpt_path=str(tmp_path / "ft.ckpt"))
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in again.state_dict().items())


@pytest.mark.parametrize("make,error,message", [
    (lambda p: UViT(patch_size=4, embed_dim=16, depth=2, num_heads=1, init_from=p), ValueError,
     "holds a 'dit' model (lightning_repro.module.DiT), but this model is 'uvit'"),
    (lambda p: DiT(**{**TINY, "hidden_size": 32}, init_from=p), ValueError,
     "has a different DiT network: hidden_size=16 (this model: 32)"),
    (lambda p: DiT(**TINY, image_shape=(1, 16, 16), init_from=p), ValueError,
     "1 parameter(s) differ in shape from this model (checkpoint vs model): net.pos_embed (1, 4, 16) vs (1, 16, 16)"),
    (lambda p: DiT(**TINY, init_from=p + ".missing"), FileNotFoundError, "init_from checkpoint"),
])
def test_bad_init_from_is_one_sentence(pretrained, make, error, message):
    with pytest.raises(error) as exc:
        make(str(pretrained)).load_init_weights()
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_pattern_matching_nothing_is_one_sentence(pretrained):
    with pytest.raises(ValueError, match=r"trainable pattern '\*\.attention\.\*' matches no parameter of the DiT "
                                         r"network; names look like blocks\.0\.attn\.qkv\.weight"):
        DiT(**TINY, init_from=str(pretrained), trainable=["*.attention.*"])


def run_cli(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    base = ["--config", "configs/train/digits_ddpmpp.yaml", "--model.init_args.model_channels", "8",
            "--model.init_args.channel_mult", "[1]", "--data.size", "16", "--data.batch_size", "8",
            "--trainer.max_steps", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path / "r")]
    return subprocess.run([sys.executable, "train.py", "fit", *base, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("args,message", [
    (["--model.init_args.init_from", "{pre}"],
     "error: init_from {pre} holds a 'dit' model (lightning_repro.module.DiT), but this model is 'ddpmpp'"),
    (["--model.init_from", "{pre}", "--model.trainable", '["nope.*"]'],  # the init_args level may be left out
     "error: trainable pattern 'nope.*' matches no parameter of the DDPMpp network"),
])
def test_cli_bad_init_from_prints_one_error_line(pretrained, tmp_path, args, message):
    p = run_cli([a.replace("{pre}", str(pretrained)) for a in args], tmp_path)
    assert p.returncode != 0 and "Traceback" not in p.stdout + p.stderr
    errors = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message.replace("{pre}", str(pretrained))), errors


def test_quick_study_writes_csv(tmp_path):
    from lightning_repro.studies import finetune

    rows = finetune.main(["--quick", "--out", str(tmp_path / "fig11")])
    with open(tmp_path / "fig11" / "fig11.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == finetune.COLUMNS and [int(r["N"]) for r in table] == [8, 16] == [r["N"] for r in rows]
    for r in rows:
        assert (r["trainable_params"], r["total_params"]) == (1088, 10384)
        assert all(0.0 <= r[k] <= 1.0 for k in finetune.COLUMNS[1:8] + ["rp_ft_vs_pretrained"])
    assert (tmp_path / "fig11" / "fig11.png").is_file() and (tmp_path / "fig11" / "samples" / "N16.png").is_file()
    ckpts = sorted(p.name.split("_")[0] for p in (tmp_path / "fig11" / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["finetune", "finetune", "pretrain", "scratch", "scratch"]
