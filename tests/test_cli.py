"""The training CLI end to end, in subprocesses: fit, checkpoints, W&B offline config, resume, bad input."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from wandb_offline import read_offline_run

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--config", "configs/experiments/digits_edm.yaml",
    "--model.init_args.kernel", "vp", "--model.init_args.model_channels", "16",
    "--model.init_args.channel_mult", "[1,2]", "--model.init_args.attn_resolutions", "[]",
    "--model.init_args.dropout", "0.1", "--data.size", "64", "--data.batch_size", "16",
    "--data.val_seeds", "4", "--model.init_args.val_steps", "3", "--trainer.val_check_interval", "25",
    "--checkpoint.every_n_train_steps", "25", "--final_samples.num_samples", "8", "--final_samples.steps", "3",
    "--trainer.enable_progress_bar", "false",
]


def run_cli(args, tmp_path, check=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")  # no netrc: offline by itself
    p = subprocess.run([sys.executable, "train.py", "fit", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"CLI failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def ema_state(path):
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return sd["global_step"], {k: v for k, v in sd["state_dict"].items() if k.startswith("ema.")}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    p = run_cli([*TINY, "--trainer.max_steps", "50", "--trainer.default_root_dir", str(tmp / "run")], tmp)
    return tmp / "run", p


def test_fit_writes_checkpoints_grid_and_summary(full_run):
    run, p = full_run
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "checkpoints" / "step_0000025.ckpt").is_file()
    assert (run / "samples" / "final.png").is_file() and (run / "samples" / "step_0000025.png").is_file()
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("done:")]
    assert line and "arch=edm kernel=vp size=64 steps=50" in line[0] and "final.png" in line[0]
    step, ema = ema_state(run / "checkpoints" / "last.ckpt")
    assert step == 50 and ema


def test_wandb_offline_run_holds_config_keys(full_run):
    run, _ = full_run
    (run_dir,) = list((run / "wandb").glob("offline-run-*"))
    info = read_offline_run(run_dir)
    cfg = info["config"]
    assert info["group"] == "digits_edm" and info["project"] == "lightning_repro"
    assert (cfg["arch"], cfg["kernel"], cfg["size"], cfg["subset_seed"], cfg["seed"]) == ("edm", "vp", 64, 0, 0)


def test_resume_from_last_continues_with_identical_ema(full_run, tmp_path):
    run, _ = full_run
    args = [*TINY, "--trainer.default_root_dir", str(tmp_path / "run")]
    run_cli([*args, "--trainer.max_steps", "25"], tmp_path)
    step, _ = ema_state(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert step == 25
    p = run_cli([*args, "--trainer.max_steps", "50", "--ckpt_path", "last"], tmp_path)
    assert "steps=50" in p.stdout
    step, resumed = ema_state(tmp_path / "run" / "checkpoints" / "last.ckpt")
    _, straight = ema_state(run / "checkpoints" / "last.ckpt")
    assert step == 50
    # same step, same data order, same noise, same dropout masks (dropout 0.1): the EMA of the uninterrupted run
    diff = max((resumed[k] - straight[k]).abs().max().item() for k in straight)
    assert resumed.keys() == straight.keys() and diff <= 1e-6, diff


@pytest.mark.parametrize("extra,message", [
    (["--model.init_args.kernel", "foo"], "error: Unknown kernel 'foo'; valid kernels are: vp, subvp, ve, edm, vp_discrete."),
    (["--model", "Transformer"], "error: unknown architecture 'Transformer'; valid architectures are: DDPM, DiT, EDM, UViT"),
    (["--data.size", "5000"], "error: data.size=5000 is larger than the digits source, which has 1797 images."),
    (["--data.source_kwargs.resolution", "6", "--model.init_args.channel_mult", "[1,2,2]"],
     "error: SongUNet: img_resolution 6 is not divisible by 4"),
    (["--data.source", "cifar10", "--data.source_kwargs.root", "{tmp}/nocifar"],
     "error: cifar10 was not found under {tmp}/nocifar/cifar-10-batches-py: extract"),
    (["--model.init_args.lr", "abc"], "error: Problem with given class_path 'lightning_repro.module.EDM': "
                                      "Parser key \"lr\": Expected a <class 'float'>. Got value: abc"),
])
def test_bad_input_is_one_sentence(extra, message, tmp_path):
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    p = run_cli([*TINY, "--trainer.max_steps", "1", "--trainer.logger", "false",
                 "--trainer.default_root_dir", str(tmp_path / "r"), *extra], tmp_path, check=False)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr + p.stdout
    last = (p.stderr.strip().splitlines() or [""])[-1]
    assert last.startswith(message.replace("{tmp}", str(tmp_path))), last


#: the study configs (configs/studies/<name>.yaml) -> their Study; everything in configs/experiments is a training
#: config
STUDY_CONFIGS = sorted(p.name for p in (ROOT / "configs" / "studies").glob("*.yaml"))
EXPERIMENTS = sorted(p.name for p in (ROOT / "configs" / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("config", EXPERIMENTS + STUDY_CONFIGS)
def test_shipped_configs_parse(config, capsys):
    """Training configs resolve with ``--print_config``; study configs load with their study's keys (a typo fails)."""
    import yaml

    from lightning_repro.cli import main
    from lightning_repro.studies import all_studies

    if config in STUDY_CONFIGS:
        study = all_studies()[config.removesuffix(".yaml")]  # every study config belongs to a registered study
        path = ROOT / "configs" / "studies" / config
        cfg = study.load_config(path)
        assert cfg["out"].startswith("outputs/") and cfg == study.defaults()
        assert study.load_config(path, quick=True)["out"] == cfg["out"] + "_quick"
        return
    path = ROOT / "configs" / "experiments" / config
    assert "model" in yaml.safe_load(path.read_text()), f"{config}: not a training config and not in STUDY_CONFIGS"
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(ROOT / "configs" / "experiments" / config), "--print_config"])
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path: lightning_repro.module." in out and "data:" in out
