"""The MoG transition study (empirical optimal denoiser -> closed-form MoG denoiser): its closed-form samples are the
theory module's sampled directly from the same seeds, RP between the two closed forms rises with N, the CSV is
well-formed, a rerun loads the checkpoints, the mixture is the source's, the pixel threshold's checks on the mixture
and bad configs fail in one sentence."""

from pathlib import Path

import lightning as L
import pytest
import torch
from study_helpers import assert_png, read_csv

from lightning_repro.data import SubsetDataModule, get_source
from lightning_repro.kernels import get_kernel
from lightning_repro.metrics import get_descriptor
from lightning_repro.sampling import sample
from lightning_repro.studies import mog_transition as mt
from lightning_repro.theory import EmpiricalOptimalDenoiser, LowRankMoG

YAML = Path(__file__).resolve().parents[1] / "configs" / "studies" / "mog_transition.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def quick(tmp_path_factory, one_thread_module):
    """One ``--quick`` run: (its config, its rows, its output folder)."""
    out = tmp_path_factory.mktemp("mog_transition")
    rows = mt.main(["--quick", "--out", str(out)])
    return mt.STUDY.load_config(quick=True, out=out), rows, out


def test_closed_form_samples_are_the_theory_modules_from_the_same_seeds(quick):
    cfg, _, out = quick
    smp, data = cfg["sample"], cfg["data"]
    kernel = get_kernel(cfg["kernel"], **cfg["train"]["kernel_kwargs"])
    kw = data["source_kwargs"]
    mog = LowRankMoG(tuple(kw["shape"]), kw["num_components"], kw["rank"], seed=kw["seed"])
    seeds = list(range(smp["seeds"]))
    direct_mog = sample(mog, kernel, seeds, kw["shape"], sampler="heun", steps=smp["steps"])
    for n in cfg["sizes"]:
        saved = torch.load(out / "samples" / f"N{n}.pt", weights_only=True)
        assert saved["seeds"].tolist() == seeds
        assert list(saved) == ["seeds", mt.EMPIRICAL, *cfg["archs"], mt.MOG]
        assert torch.equal(saved[mt.MOG], direct_mog)
        images = SubsetDataModule(source="mog", size=n, subset_seed=data["subset_seed"], source_kwargs=kw).images
        direct_emp = sample(EmpiricalOptimalDenoiser(images), kernel, seeds, kw["shape"], sampler="heun",
                            steps=smp["steps"])
        assert torch.equal(saved[mt.EMPIRICAL], direct_emp)
        assert_png(out / "samples" / f"N{n}.png", min_size=10)


def test_csv_is_well_formed_and_the_closed_forms_meet_as_n_grows(quick, monkeypatch, capsys):
    cfg, rows, out = quick
    header, body = read_csv(out / "mog_transition.csv")
    assert header == mt.COLUMNS
    archs, sizes = list(cfg["archs"]), cfg["sizes"]
    pairs = [(a, b) for a in archs for b in (mt.EMPIRICAL, mt.MOG)] + [("unet", "dit"), (mt.EMPIRICAL, mt.MOG)]
    assert [(int(r["N"]), r["a"], r["b"]) for r in body] == [(n, a, b) for n in sizes for a, b in pairs]
    for r in rows:
        for key in ("rp", "mean_sim", "gl_a", "gl_b"):
            assert -1.0 <= r[key] <= 1.0 and (key == "mean_sim" or r[key] >= 0.0)
        assert r["threshold"] == 0.97 and r["descriptor"] == "pixel"
        # the empirical optimal denoiser only reproduces its training samples (Prop. 1)
        assert (r["gl_b"] if r["b"] == mt.EMPIRICAL else r["gl_a"] if r["a"] == mt.EMPIRICAL else 0.0) == 0.0
        assert r.get("steps") == (cfg["train"]["max_steps"] if r["a"] in archs else None)
    baseline = {r["N"]: r for r in rows if (r["a"], r["b"]) == (mt.EMPIRICAL, mt.MOG)}
    # rank 2: with more samples a memorised sample is more often the closed form's own; and fewer MoG samples are new
    assert baseline[sizes[-1]]["rp"] > baseline[sizes[0]]["rp"] + 0.1
    assert baseline[sizes[-1]]["gl_b"] < baseline[sizes[0]]["gl_b"] - 0.3
    assert_png(out / "mog_transition.png")
    cal = (out / "calibration.json").read_text()
    assert '"eer_0.05"' in cal and '"noise_0.1_frac_above"' in cal

    def fail(*a, **k):
        raise AssertionError("a rerun must load the finished checkpoints, not train")

    monkeypatch.setattr(L.Trainer, "fit", fail)
    rows2 = mt.main(["--quick", "--out", str(out)])
    assert capsys.readouterr().out.count("checkpoint exists, skipping training") == len(archs) * len(sizes)
    assert [r["rp"] for r in rows2] == [r["rp"] for r in rows]  # same checkpoints, seeds, sampler: same numbers


def test_evaluate_pair_with_mog_is_the_studys_closed_form(quick, tmp_path):
    """``evaluate.py --pair CKPT mog:`` samples the study's MoG closed form (the mixture of the checkpoint's own
    source) from the same seeds, so its RP is the study's RP(model, MoG) on the same uint8 samples; ``mog:`` of a
    checkpoint trained on digits is refused in one sentence."""
    import lightning_repro.evaluation as ev
    from lightning_repro.data.sources import float_to_uint8
    from lightning_repro.evaluation import scoring

    cfg, _, out = quick
    n, smp = cfg["sizes"][0], cfg["sample"]
    ckpt = next((out / "checkpoints").glob(f"unet_N{n}_*.ckpt"))
    res = ev.main(["--pair", str(ckpt), "mog:", "--seeds", f"0-{smp['seeds'] - 1}", "--sampler", "heun", "--steps",
                   str(smp["steps"]), "--out", str(tmp_path), "--no-wandb", "--no-progress"])
    assert res["model_b"]["kind"] == "mog" and res["model_b"]["size"] == n
    saved = torch.load(out / "samples" / f"N{n}.pt", weights_only=True)
    desc = get_descriptor("pixel")
    feats = [scoring.featurize(desc, float_to_uint8(saved[k])) for k in ("unet", mt.MOG)]
    assert res["rp"] == scoring.score_pair(*feats, desc.default_threshold)["rp"]
    ref = ev.resolve_models([str(ckpt), "mog:"])[1]
    assert ref.label == "mog[K=2,d=2]" and torch.equal(
        sample(ref.denoiser(torch.device("cpu")), ref.kernel(), list(range(smp["seeds"])), (1, 8, 8),
               sampler="heun", steps=smp["steps"]), saved[mt.MOG])
    with pytest.raises(ValueError, match="^'mog:' is the closed form of a mog source's mixture, but its data source "
                                         "is 'digits'; write e.g."):
        ev.resolve_model("mog:digits?size=16")


def test_mixture_is_the_one_the_source_draws_from():
    data = mt.STUDY.load_config()["data"]
    kw = data["source_kwargs"]
    mog = mt.mixture(data)
    assert (mog.K, mog.d, mog.shape) == (kw["num_components"], kw["rank"], tuple(kw["shape"]))
    drawn = mog.sample(kw["num_samples"], generator=torch.Generator().manual_seed(kw["seed"] + 1))
    assert torch.equal(get_source("mog", **kw).images, drawn)


def test_an_architecture_may_train_its_own_number_of_steps(tmp_path):
    """``archs.<name>.max_steps`` trains that family longer at every N (its checkpoints get new names, the others'
    stay); the network is built without it; a bad value is one sentence."""
    cfg = mt.STUDY.load_config(quick=True, out=tmp_path)
    before = {j.name: Path(j.ckpt).name for j in mt.jobs(cfg, (1, 8, 8))}
    cfg["archs"]["dit"]["max_steps"] = 5
    jobs = mt.jobs(cfg, (1, 8, 8))
    assert {j.name: j.max_steps for j in jobs} == {f"{a} N={n}": 5 if a == "dit" else 3 for n in cfg["sizes"]
                                                   for a in ("unet", "dit")}
    assert all("max_steps" not in j.arch for j in jobs) and mt.arch_steps(cfg) == {"unet": 3, "dit": 5}
    assert [Path(j.ckpt).name == before[j.name] for j in jobs] == [True, False] * len(cfg["sizes"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("archs:\n  dit: {class_path: DiT, init_args: {patch_size: 4}, max_steps: 0}\n")
    with pytest.raises(SystemExit) as exc:
        mt.main(["--config", str(bad), "--out", str(tmp_path / "o")])
    assert str(exc.value.code).startswith("error: archs.dit.max_steps must be a positive integer")


def test_crossings_name_the_first_size_where_the_mog_wins():
    def rows(a, emp, mog):
        return [{"N": n, "a": a, "b": b, "rp": v} for n, e, m in zip((16, 64, 256), emp, mog)
                for b, v in ((mt.EMPIRICAL, e), (mt.MOG, m))]

    got = mt.crossings(rows("u", (0.9, 0.5, 0.1), (0.0, 0.6, 0.8)) + rows("d", (0.9, 0.9, 0.9), (0, 0, 0.9))
                       + rows("x", (0.1, 0.1, 0.1), (0.2, 0.2, 0.2))
                       + [{"N": 16, "a": mt.EMPIRICAL, "b": mt.MOG, "rp": 0.0}])
    assert got == {"u": 64, "d": None, "x": 16}


def test_a_crossing_must_be_beyond_chance_on_the_seeds():
    """0.000 vs 0.004 on 256 seeds (one seed) is not a crossing; 0.043 vs 0.148 is (difference 0.105 > 2 SE 0.051);
    the same 0.105 on 16 seeds (2 SE 0.20) is not."""
    def rows(emp, mog):
        return [{"N": n, "a": "m", "b": b, "rp": v} for n, e, m in zip((64, 256, 1024), emp, mog)
                for b, v in ((mt.EMPIRICAL, e), (mt.MOG, m))]

    assert mt.crossings(rows((0.0, 0.0, 0.0), (0.0, 0.0, 0.004)), 256) == {"m": None}
    assert mt.crossings(rows((0.0, 0.0, 0.0), (0.0, 0.0, 0.004))) == {"m": 1024}
    assert mt.crossings(rows((0.41, 0.043, 0.03), (0.0, 0.148, 0.5)), 256) == {"m": 256}
    assert mt.crossings(rows((0.41, 0.043, 0.03), (0.0, 0.148, 0.5)), 16) == {"m": 1024}
    assert "never exceeds" in mt._crossing_text(rows((0.0, 0.0, 0.0), (0.0, 0.0, 0.004)), {"m": None})


def test_pixel_threshold_checks_on_the_shipped_mixture():
    """The shipped threshold (0.97) lies between the equal-error thresholds of noisy copies (std 0.1 .. 0.05) against
    distinct draws of the shipped mixture, as the YAML says; a lower rank crowds the draws together."""
    cfg = mt.STUDY.load_config()
    desc, cal = get_descriptor("pixel"), cfg["calibration"]
    rep = mt.mog_pixel_calibration(mt.mixture(cfg["data"]), desc, desc.default_threshold, cal["num_samples"],
                                   cal["seed"])
    assert rep["eer_0.1"] <= desc.default_threshold <= rep["eer_0.05"]
    assert rep["noise_0.1_frac_above"] < rep["noise_0.05_frac_above"] and rep["noise_0.05_min"] < 1.0
    low = mt.mog_pixel_calibration(LowRankMoG((1, 8, 8), 2, 2, seed=0), desc, 0.97, 500)
    high = mt.mog_pixel_calibration(LowRankMoG((1, 8, 8), 2, 8, seed=0), desc, 0.97, 500)
    assert low["distinct_frac_above"] > 0.9 > 0.1 > high["distinct_frac_above"]


@pytest.mark.parametrize("text, message", [
    ("data: {source: digits}\n", "error: mog_transition needs data.source: mog (its closed-form denoiser is the "
                                 "mixture's), got 'digits'."),
    ("data: {source_kwargs: {rank: null, num_samples: 64}}\n", None),
    ("sizes: [16, 8192]\n", "error: sizes go up to 8192 but data.source_kwargs.num_samples draws only 4096 samples."),
    ("archs: {mog_closed_form: {class_path: DiT}}\n",
     "error: archs may not be named ['mog_closed_form']: those are the names of the closed forms."),
])
def test_bad_configs_fail_with_one_sentence(tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(SystemExit) as exc:
        mt.main(["--config", str(bad), "--out", str(tmp_path / "o")])
    if message is not None:
        assert exc.value.code == message
    else:
        assert str(exc.value.code).startswith("error: d (rank) must be an integer")
    assert not (tmp_path / "o").exists()  # refused before anything was written
