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
    "--config", "configs/train/digits_ddpmpp.yaml",
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
    assert line and "arch=ddpmpp kernel=vp size=64 steps=50" in line[0] and "final.png" in line[0]
    step, ema = ema_state(run / "checkpoints" / "last.ckpt")
    assert step == 50 and ema


def test_wandb_offline_run_holds_config_keys(full_run):
    run, _ = full_run
    (run_dir,) = list((run / "wandb").glob("offline-run-*"))
    info = read_offline_run(run_dir)
    cfg = info["config"]
    assert info["group"] == "digits_ddpmpp" and info["project"] == "lightning_repro"
    assert (cfg["arch"], cfg["kernel"], cfg["size"], cfg["subset_seed"], cfg["seed"]) == ("ddpmpp", "vp", 64, 0, 0)


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
    (["--model", "Transformer"], "error: unknown architecture 'Transformer'; valid architectures are: DDPM, DDPMpp, DiT, Multistage, ProgressiveDistillation, UViT"),
    (["--data.size", "5000"], "error: data.size=5000 is larger than the digits source, which has 1797 images."),
    (["--data.source_kwargs.resolution", "6", "--model.init_args.channel_mult", "[1,2,2]"],
     "error: SongUNet: img_resolution 6 is not divisible by 4"),
    (["--data.source", "cifar10", "--data.source_kwargs.root", "{tmp}/nocifar"],
     "error: cifar10 was not found under {tmp}/nocifar/cifar-10-batches-py: extract"),
    (["--config", "configs/experiments/digits_edm.yaml"],
     "error: configs/experiments/digits_edm.yaml moved to configs/train/digits_ddpmpp.yaml (training configs live "
     "in configs/train; the EDM preset is now DDPMpp)."),
    (["--model.init_args.lr", "abc"], "error: Problem with given class_path 'lightning_repro.module.DDPMpp': "
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


#: the study configs (configs/studies/<name>.yaml) -> their Study (training configs: test_training_configs_parse)
STUDY_CONFIGS = sorted(p.name for p in (ROOT / "configs" / "studies").glob("*.yaml"))
#: config folders and the test that reads their files
CONFIG_FOLDERS = {"train", "studies", "studies/variants", "model", "data", "trainer", "callbacks", "published"}
#: selectable variants of a study's defaults (configs/studies/variants/<file>) -> the study they configure
STUDY_VARIANTS = {"fig4_single_token.yaml": "fig4_memorization",
                  "phase_transition_single_token.yaml": "phase_transition"}


def test_every_shipped_config_is_in_a_checked_folder():
    folders = {p.parent.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.yaml")}
    assert folders <= CONFIG_FOLDERS, f"configs outside the checked folders: {sorted(folders - CONFIG_FOLDERS)}"


@pytest.mark.parametrize("config", STUDY_CONFIGS)
def test_shipped_configs_parse(config):
    """Study configs load with their study's keys (a typo fails) and equal the study's defaults."""
    from lightning_repro.studies import all_studies

    study = all_studies()[config.removesuffix(".yaml")]  # every study config belongs to a registered study
    path = ROOT / "configs" / "studies" / config
    cfg = study.load_config(path)
    assert cfg["out"].startswith("outputs/") and cfg == study.defaults()
    assert study.load_config(path, quick=True)["out"] == cfg["out"] + "_quick"


def test_study_variants_are_all_known_and_load_with_their_study():
    """A variant (e.g. the single-token transformers of Fig. 4) loads with its study's keys and differs from the
    defaults in what it says it changes (its families), writing to its own output folder."""
    from lightning_repro.studies import all_studies

    folder = ROOT / "configs" / "studies" / "variants"
    assert sorted(p.name for p in folder.glob("*.yaml")) == sorted(STUDY_VARIANTS)
    for name, study_name in STUDY_VARIANTS.items():
        study = all_studies()[study_name]
        cfg, defaults = study.load_config(folder / name), study.defaults()
        assert cfg["out"] == f"outputs/{name.removesuffix('.yaml')}" and cfg != defaults
    fig4 = all_studies()["fig4_memorization"].load_config(folder / "fig4_single_token.yaml")
    assert {a["init_args"]["patch_size"] for a in fig4["archs"].values()} == {8}  # one 8 x 8 patch: one token


TRAIN_CONFIGS = sorted(p.name for p in (ROOT / "configs" / "train").glob("*.yaml"))
#: what each training config resolves to: preset, kernel, data source, batch size, max_steps (the README's table)
TRAIN_EXPECTED = {
    "digits_ddpmpp.yaml": ("DDPMpp", "edm", "digits", 64, 1500),
    "digits_ddpmpp_vp.yaml": ("DDPMpp", "vp", "digits", 64, 1500),
    "digits_ddpmpp_cond.yaml": ("DDPMpp", "edm", "digits", 64, 1500),
    "digits_ddpm_ve.yaml": ("DDPM", "ve", "digits", 64, 1500),
    "digits_uvit.yaml": ("UViT", "vp", "digits", 64, 1500),
    "digits_dit.yaml": ("DiT", "edm", "digits", 64, 1500),
    "cifar10_ddpmpp_vp.yaml": ("DDPMpp", "vp", "cifar10", 128, 390625),
    "cifar10_ddpmpp64_vp.yaml": ("DDPMpp", "vp", "cifar10", 128, 390625),
    "digits_multistage.yaml": ("Multistage", "edm", "digits", 64, 1500),
    "cifar10_multistage.yaml": ("Multistage", "edm", "cifar10", 32, 1562500),
    "digits_progressive.yaml": ("ProgressiveDistillation", "edm", "digits", 64, 1000),
    "cifar10_progressive.yaml": ("ProgressiveDistillation", "edm", "cifar10", 128, 650000),
    "demo_ddpmpp.yaml": ("DDPMpp", "edm", "digits", 128, 3200),
    "demo_dit.yaml": ("DiT", "edm", "digits", 128, 3200),
    "digits_ct.yaml": ("CTDiT", "edm", "digits", 64, 3000),
    "digits_cd.yaml": ("CDDiT", "edm", "digits", 1024, 1200),
    "cifar10_ct.yaml": ("CTDDPMpp", "edm", "cifar10", 1024, 400000),
    "cifar10_cd.yaml": ("CDDDPMpp", "edm", "cifar10", 512, 800000),
}


def print_config(args, capsys):
    import yaml

    from lightning_repro.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["fit", *args, "--print_config"])
    assert exc.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_training_configs_are_all_known():
    assert TRAIN_CONFIGS == sorted(TRAIN_EXPECTED)


@pytest.mark.parametrize("config", TRAIN_CONFIGS)
def test_training_configs_parse(config, capsys):
    """Each configs/train file resolves (its model / data file references included) to the documented run."""
    cfg = print_config(["--config", str(ROOT / "configs" / "train" / config)], capsys)
    preset, kernel, source, batch, steps = TRAIN_EXPECTED[config]
    assert cfg["model"]["class_path"] == f"lightning_repro.module.{preset}"
    assert cfg["model"]["init_args"]["kernel"] == kernel
    assert (cfg["data"]["source"], cfg["data"]["batch_size"], cfg["trainer"]["max_steps"]) == (source, batch, steps)
    assert cfg["trainer"]["default_root_dir"] == f"runs/{config[:-5]}"


def test_configs_compose_from_model_data_and_trainer_files(capsys, tmp_path, monkeypatch):
    """A config refers to configs/model and configs/data files (paths relative to it, whatever the cwd); on the
    command line ``--trainer FILE`` / ``--model FILE`` / ``--data FILE`` merge over it."""
    monkeypatch.chdir(tmp_path)
    train = ROOT / "configs" / "train"
    cfg = print_config(["--config", str(train / "digits_ddpmpp.yaml")], capsys)
    assert cfg["model"]["init_args"]["model_channels"] == 32 and cfg["data"]["val_seeds"] == 64
    assert cfg["checkpoint"]["every_n_train_steps"] == 750 and cfg["final_samples"]["num_samples"] == 100
    cfg = print_config(["--config", str(train / "digits_ddpmpp.yaml"), "--trainer", str(ROOT / "configs/trainer/cpu.yaml"),
                        "--model", str(ROOT / "configs/model/digits_dit.yaml"), "--model.init_args.kernel", "vp",
                        "--data", str(ROOT / "configs/data/cifar10.yaml")], capsys)
    assert (cfg["trainer"]["accelerator"], cfg["trainer"]["precision"], cfg["trainer"]["max_steps"]) == (
        "cpu", "32-true", 1500)  # the trainer file's keys over the experiment's, the others kept
    assert cfg["model"]["class_path"] == "lightning_repro.module.DiT"
    assert (cfg["model"]["init_args"]["hidden_size"], cfg["model"]["init_args"]["kernel"]) == (64, "vp")
    assert (cfg["data"]["source"], cfg["data"]["batch_size"]) == ("cifar10", 128)


def test_old_preset_name_still_resolves(capsys):
    cfg = print_config(["--config", str(ROOT / "configs" / "train" / "digits_ddpmpp.yaml"), "--model", "EDM"], capsys)
    assert cfg["model"]["class_path"].endswith(".EDM") and cfg["model"]["init_args"]["model_channels"] == 32
