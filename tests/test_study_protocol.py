"""The ``Study`` protocol: the registry and its configs (the YAML is the only source of defaults), the moved config
paths, unchanged checkpoint names, the README's study index, and a killed study taking its training workers with
it (SIGTERM and SIGKILL of the parent)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lightning_repro import studies
from lightning_repro.studies import all_studies, get_study, protocol

ROOT = Path(__file__).resolve().parents[1]
STUDIES = all_studies()


def test_every_study_has_its_config_and_every_config_its_study():
    shipped = sorted(p.stem for p in (ROOT / "configs" / "studies").glob("*.yaml"))
    assert sorted(STUDIES) == shipped and len(STUDIES) == len(studies.STUDY_MODULES)
    for name, study in STUDIES.items():
        assert study.config_path == ROOT / "configs" / "studies" / f"{name}.yaml"
        assert get_study(name) is study and get_study(study.module) is study
        module = __import__(f"lightning_repro.studies.{study.module}", fromlist=["STUDY"])
        assert not hasattr(module, "DEFAULTS")  # no second copy of the defaults in Python
        assert set(study.quick) <= set(study.defaults()), f"{name}: --quick sets keys its YAML does not have"
        assert set(study.replace) <= set(study.defaults())
    with pytest.raises(ValueError, match=r"^unknown study 'fig99'; the studies are: phase_transition, "):
        get_study("fig99")


def test_defaults_are_the_yaml_and_layers_merge_in_order(tmp_path):
    study = get_study("memorization")
    shipped = yaml.safe_load(study.config_path.read_text())
    assert study.load_config() == study.defaults() == shipped
    assert study.defaults()["workers"] == shipped["workers"] == 2  # the YAML's value, the only one there is
    mine = tmp_path / "mine.yaml"
    mine.write_text("sizes: [32]\ntrain: {max_steps: 7}\narchs: {only: {class_path: DiT, init_args: {}}}\n")
    cfg = study.load_config(mine, out=tmp_path / "o")
    assert cfg["sizes"] == [32] and cfg["train"]["max_steps"] == 7 and cfg["out"] == str(tmp_path / "o")
    assert cfg["train"]["lr"] == shipped["train"]["lr"]  # mappings merge key by key ...
    assert list(cfg["archs"]) == ["only"]  # ... except the study's replace keys
    quick = study.load_config(mine, quick=True)
    assert quick["train"]["max_steps"] == study.quick["train"]["max_steps"] and list(quick["archs"]) == ["dit", "edm"]
    assert quick["out"] == shipped["out"] + "_quick"


@pytest.mark.parametrize("old", sorted(protocol.MOVED_CONFIGS))
def test_old_config_paths_fail_with_the_new_path(old, capsys):
    study = STUDIES[protocol.MOVED_CONFIGS[old]]
    with pytest.raises(SystemExit) as exc:
        study.main(["--config", f"configs/{old}", "--quick"])
    assert exc.value.code == (f"error: config file configs/{old} moved to "
                              f"configs/studies/{protocol.MOVED_CONFIGS[old]}.yaml.")
    assert (ROOT / "configs" / "studies" / f"{study.name}.yaml").is_file() and not (ROOT / "configs" / old).exists()


#: the first checkpoint of every study's shipped configuration, as named before the studies became one protocol
#: (a changed name would retrain what finished runs already hold); Fig. 4 and Fig. 2 changed their defaults on
#: purpose (the U-Net + multi-token DiT recipe): their earlier defaults are the single-token variants, below; they
#: changed again on purpose with the demo's recipe (batch 128, 3,200 steps: was ddpmpp_N16_0d3008d0 /
#: ddpmpp_w64_N16_s0_65a43c0e at batch 64, 2,400 steps), so their finished batch-64 runs are not reused
CHECKPOINT_NAMES = {
    "fig4_memorization": "ddpmpp_N16_efd2b593.ckpt", "inverse": "dit_N1024_3bcc0fd6.ckpt",
    "fig5_mog": "K2_d4_N16_46b854c6.ckpt", "phase_transition": "ddpmpp_w64_N16_s0_d242ffa1.ckpt",
    "hyperplane": "dit_N64_92f48979.ckpt", "gan_vae_contrast": "gan_seed0_79926dd8.ckpt",
    "conditional": "edm_f2bde872.ckpt", "fig11_finetune": "pretrain_a288adb2.ckpt",
    "recovery": "teacher_N512_e2761057.ckpt",
}


@pytest.mark.parametrize("name", sorted(CHECKPOINT_NAMES))
def test_checkpoint_names_are_unchanged(name):
    study, shape = STUDIES[name], (1, 8, 8)
    cfg = study.load_config()
    if name == "fig5_mog":
        jobs = study.jobs(cfg)
    elif name == "conditional":
        jobs = study.jobs(cfg, shape, 10)
    elif name == "recovery":
        jobs = list(study.jobs(cfg, cfg["sizes"][0], shape, Path("complement.npz")).values())
    else:
        jobs = study.jobs(cfg, shape)
    first = next(iter(jobs.values())) if isinstance(jobs, dict) else jobs[0]  # finetune: (pretrain, ...)
    assert Path(first.ckpt).name == CHECKPOINT_NAMES[name]


#: the variant that holds a study's earlier default -> (study, the first checkpoint name of that earlier default)
EARLIER_DEFAULTS = {"fig4_single_token.yaml": ("fig4_memorization", "dit_N16_f9a21a5a.ckpt"),
                    "phase_transition_single_token.yaml": ("phase_transition", "dit_w64_N16_s0_fbf7f644.ckpt")}


@pytest.mark.parametrize("variant", sorted(EARLIER_DEFAULTS))
def test_earlier_defaults_keep_their_checkpoint_names(variant):
    """A variant that spells out an earlier default (``lr_decay: constant`` included) names its checkpoints as that
    default did, so the runs it made are found again (``protocol.NEUTRAL_OPTIONS``)."""
    name, expected = EARLIER_DEFAULTS[variant]
    study = STUDIES[name]
    cfg = study.load_config(ROOT / "configs" / "studies" / "variants" / variant)
    assert cfg["train"]["lr_decay"] == "constant" and Path(study.jobs(cfg, (1, 8, 8))[0].ckpt).name == expected
    cosine = dict(cfg, train={**cfg["train"], "lr_decay": "cosine"})
    assert Path(study.jobs(cosine, (1, 8, 8))[0].ckpt).name != expected  # a real change still renames
    assert protocol.config_key({"a": 1, "lr_decay": "constant"}) == protocol.config_key({"a": 1})


def test_readme_study_index_lists_every_study():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Studies"):]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and "python -m" in ln]
    assert len(rows) == len(STUDIES)
    for row, study in zip(rows, STUDIES.values()):
        assert f"`{study.command}`" in row and f"| {study.paper} |" in row and study.title in row


# ------------------------------------------------------------------------------ a killed study leaves no worker
def _session_processes(sid: int) -> dict[int, str]:
    """pid -> command line of every live (not zombie) process of session ``sid``."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # it exited meanwhile
        if int(fields[3]) == sid and fields[0] not in "ZX":
            found[int(stat.parent.name)] = cmd
    return found


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := condition()):
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def _torch_loaded(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads the process table from /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_study_takes_its_training_workers_with_it(tmp_path, sig):
    """Two trainings that would run for hours in a pool of two workers; the parent is killed once both workers
    have loaded torch; within a bounded wait no process of the study is left (finding 5 of issue #17)."""
    cfg = {"out": str(tmp_path / "out"), "workers": 2, "wandb": False, "sizes": [8, 16],
           "data": {"batch_size": 8}, "train": {"max_steps": 10**7, "warmup_steps": 0},
           "archs": {"dit": get_study("memorization").quick["archs"]["dit"]}, "sample": {"seeds": 4, "steps": 2}}
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    study = subprocess.Popen([sys.executable, "-m", "lightning_repro.studies.memorization", "--config", str(path)],
                             cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        def training_workers():
            workers = [p for p, cmd in _session_processes(study.pid).items() if "spawn_main" in cmd]
            return workers if len(workers) == 2 and all(map(_torch_loaded, workers)) else None

        workers = _wait_for(training_workers, 240, "two training workers")
        os.kill(study.pid, sig)
        assert study.wait(timeout=60) == (128 + sig if sig == signal.SIGTERM else -sig)
        _wait_for(lambda: not _session_processes(study.pid), 30, f"the workers {workers} to exit")
    finally:
        for pid in _session_processes(study.pid):  # never leave a runaway training behind, whatever failed
            os.kill(pid, signal.SIGKILL)
        if study.poll() is None:
            study.kill()
    assert not list((tmp_path / "out" / "checkpoints").glob("*.ckpt"))  # killed long before the end


def test_package_command_lists_and_runs_the_studies(capsys):
    from lightning_repro.studies.__main__ import main

    main([])
    out = capsys.readouterr().out
    assert all(s.command in out and s.title in out for s in STUDIES.values())
    with pytest.raises(SystemExit, match=r"^error: unknown study 'fig99'; the studies are: "):
        main(["fig99"])
    with pytest.raises(SystemExit, match=r"^error: config file configs/experiments/inverse.yaml moved to "
                                         r"configs/studies/inverse.yaml\.$"):
        main(["inverse", "--config", "configs/experiments/inverse.yaml"])


@pytest.mark.parametrize("name, text, message", [
    ("memorization", "workers: true\n", "workers must be a positive integer, got True."),
    ("finetune", "scratch: {max_steps: 0}\n", "scratch.max_steps must be a positive integer, got 0."),
    ("baselines", "latent_dim: 2.5\n", "latent_dim must be a positive integer, got 2.5."),
    ("baselines", "families: {gan: {class_path: DCGAN, steps: true, batch_size: 8}}\n",
     "families.gan.steps must be a positive integer, got True."),
    ("inverse", "inverse: {observations: -1}\n", "inverse.observations must be a positive integer, got -1."),
    ("hyperplane", "size: 0\n", "size must be a positive integer (the training subset), got 0."),
    ("sweep", "sample: {seeds: 0}\n", "sample.seeds must be a positive integer (seeds 0..seeds-1), got 0."),
])
def test_counts_are_checked_once_the_same_way(tmp_path, name, text, message):
    """Every count a config gives (steps, workers, seeds, sizes) fails with the same one sentence; bools are no
    counts (``workers: true`` used to mean one worker silently)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(SystemExit) as exc:
        get_study(name).main(["--config", str(bad), "--out", str(tmp_path / "out")])
    assert exc.value.code == f"error: {message}"


def test_descriptor_trust_reaches_sscd_only():
    from lightning_repro.studies.steps import descriptor_trust

    assert descriptor_trust({"descriptor": "pixel", "trust_descriptor": True, "sha256": "AB" * 32}) == {}
    assert descriptor_trust({"descriptor": "sscd"}) == {"trust_unpinned": False}
    assert descriptor_trust({"descriptor": "sscd", "trust_descriptor": True, "sha256": "AB" * 32}) == {
        "trust_unpinned": True, "sha256": "ab" * 32}
