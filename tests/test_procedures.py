"""The Fig. 6 study (``studies.procedures``): '@name' teachers and training rounds, checkpoint keys that follow the
teacher, the ``--quick`` run (every procedure sampled with its own sampler, the matrix, the CT curve, a rerun that
trains nothing), and its bad input in one sentence."""

import copy
import re

import pytest
from study_helpers import assert_png, read_csv

from lightning_repro.studies import get_study
from lightning_repro.studies.procedures import compared_models, jobs, training_rounds

STUDY = get_study("fig6_procedures")


def test_rounds_follow_the_at_references_and_keys_follow_the_teacher():
    cfg = STUDY.load_config()
    assert training_rounds(cfg["models"]) == [["edm", "ddpm", "ct", "multistage", "uvit", "dit"], ["cd", "pd"]]
    j = jobs(cfg, (1, 8, 8))
    assert j["cd"].arch["init_args"]["teacher"] == j["cd"].arch["init_args"]["init_from"] == j["edm"].ckpt
    assert j["pd"].arch["init_args"]["teacher"] == j["edm"].ckpt
    assert j["pd"].max_steps == 5 * 500  # steps_per_stage x the number of halvings
    assert j["pd"].module_kwargs.get("lr_decay") is None and j["edm"].module_kwargs["lr_decay"] == "cosine"
    other = copy.deepcopy(cfg)
    other["models"]["edm"]["init_args"]["model_channels"] = 32
    k = jobs(other, (1, 8, 8))
    assert k["edm"].ckpt != j["edm"].ckpt and k["cd"].ckpt != j["cd"].ckpt and k["pd"].ckpt != j["pd"].ckpt
    assert k["ddpm"].ckpt == j["ddpm"].ckpt and k["dit"].ckpt == j["dit"].ckpt  # untouched models keep their runs
    other["models"]["edm"]["sample"] = {"sampler": "euler", "steps": 40}
    assert jobs(other, (1, 8, 8))["edm"].ckpt == k["edm"].ckpt  # how a model is sampled is not how it is trained


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["models"]["cd"]["init_args"].update(teacher="@nope"),
     "model 'cd': init_args.teacher = '@nope' names no other model; the models are: edm, ddpm, ct, cd, pd, "
     "multistage, uvit, dit."),
    (lambda c: c["models"]["edm"]["init_args"].update(init_from="@cd"),
     "the models edm, cd, pd need each other's checkpoints ('@name' cycle)."),
    (lambda c: c.update(teacher="sd"), "teacher 'sd' is not one of the models (edm, ddpm, ct, cd, pd, multistage, "
                                        "uvit, dit)."),
    (lambda c: c["models"].update(bad=[1]), "model 'bad' must be a mapping with class_path (and init_args), got [1]."),
    (lambda c: c.update(size=0), "size must be a positive integer or null (all images), got 0."),
])
def test_bad_configs_are_one_sentence(edit, message):
    from lightning_repro.studies.procedures import _check

    cfg = STUDY.load_config()
    edit(cfg)
    with pytest.raises(ValueError) as err:
        _check(cfg)
        training_rounds(cfg["models"])
    assert str(err.value) == message


def test_train_cli_takes_the_consistency_presets():
    from lightning_repro.cli import _check_arch

    _check_arch(["--model", "CTDiT"])  # accepted (was refused as an unknown architecture)
    with pytest.raises(SystemExit, match=r"and the consistency models CDDDPM, CDDDPMpp, CDDiT, CDUViT, CTDDPM, "):
        _check_arch(["--model", "Transformer"])


def test_quick_run_samples_each_procedure_with_its_own_sampler(tmp_path, capsys):
    out = tmp_path / "fig6"
    rows = STUDY.main(["--quick", "--out", str(out)])
    got = {r["model"]: (r["sampler"], r["steps"]) for r in rows}
    # sample entries where given, else what the checkpoint records (consistency: one step; students: DDIM at K)
    assert got == {"edm": ("heun", 4), "ddpm": ("ddim", 4), "ct": ("consistency", 1), "dit": ("heun", 18),
                   "cd": ("consistency", 1), "pd2": ("ddim", 2), "pd1": ("ddim", 1)}
    csv = {r["model"]: r for r in read_csv(out / "fig6_models.csv")[1]}
    header, matrix = read_csv(out / "matrix" / "rp_matrix.csv")
    assert header[1:] == [m["model"] for m in matrix] == list(got)
    teacher_row = matrix[0]
    for label, r in csv.items():  # the RP column is the matrix's teacher row
        assert float(r["rp_vs_teacher"]) == pytest.approx(float(teacher_row[label]), abs=1e-6)
    assert float(csv["edm"]["rp_vs_teacher"]) == 1.0 and float(csv["edm"]["mae_vs_teacher"]) == 0.0
    curve = read_csv(out / "curve.csv")[1]
    assert [int(c["step"]) for c in curve] == [2, 4]
    # the curve's last point is the final checkpoint: the same samples as the matrix, so the same RP / MAE
    assert float(curve[-1]["mae_vs_teacher"]) == pytest.approx(float(csv["ct"]["mae_vs_teacher"]), rel=1e-5)
    for png in ("fig6_samples.png", "curve.png", "matrix/rp_matrix.png", "matrix/mae_matrix.png"):
        assert_png(out / png)
    cfg = STUDY.load_config(quick=True, out=out)
    students = compared_models(cfg, jobs(cfg, (1, 8, 8)))
    assert [k for k in students if k.startswith("pd")] == ["pd2", "pd1"]
    capsys.readouterr()
    again = STUDY.main(["--quick", "--out", str(out)])
    log = capsys.readouterr().out
    assert re.search(r"^training \d+ model", log, re.M) is None and "generated 1 shard" not in log
    assert again == rows  # every checkpoint and every sample shard reused


def test_size_flag_sets_the_regime_and_its_own_output_folder(monkeypatch):
    from lightning_repro.studies import procedures

    seen = []
    monkeypatch.setattr(procedures, "run", lambda cfg: seen.append(cfg) or [])
    STUDY.main(["--size", "16"])
    STUDY.main(["--size", "16", "--out", "elsewhere"])
    STUDY.main([])
    assert [(c["size"], c["out"]) for c in seen] == [(16, "outputs/fig6_N16"), (16, "elsewhere"), (None, "outputs/fig6")]
