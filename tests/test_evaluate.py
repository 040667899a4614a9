"""``evaluate.py``: seed-ranged sample shards with provenance, reuse, determinism, pair / matrix scores, errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

import lightning_repro.evaluation as ev
from lightning_repro.data import SubsetDataModule
from lightning_repro.data.sources import float_to_uint8
from lightning_repro.metrics import PixelDescriptor, rp_score
from lightning_repro.module import EDM, DiT, file_sha256, load_denoiser
from lightning_repro.sampling import sample

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "4", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread_module")  # conftest: one torch thread per module


def _train(module, path: Path) -> str:
    dm = SubsetDataModule("digits", size=32, batch_size=16, val_seeds=4)
    trainer = L.Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, dm)
    trainer.save_checkpoint(path)
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    a = _train(
        EDM(
            model_channels=16,
            channel_mult=[1, 2],
            num_blocks=1,
            attn_resolutions=[],
            dropout=0.0,
            image_shape=(1, 8, 8),
        ),
        d / "edm.ckpt",
    )
    b = _train(DiT(patch_size=2, hidden_size=32, depth=2, num_heads=2, image_shape=(1, 8, 8)), d / "dit.ckpt")
    return a, b


def _no_sampling(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the sampler was called although every shard was cached")

    monkeypatch.setattr(ev.shards, "sample_seeds", boom)


def _error(argv) -> str:
    with pytest.raises(SystemExit) as info:
        ev.main(argv)
    assert info.value.code == 2
    text = str(info.value)
    assert text.startswith("error: ") and "\n" not in text, text
    return text


# ----------------------------------------------------------------------------- sample


@pytest.fixture(scope="module")
def sampled(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    ev.main(
        [
            "sample",
            ckpts[0],
            "--seeds",
            "0-11",
            "--shard-size",
            "5",
            "--batch-size",
            "7",
            "--out",
            str(out),
            *FAST,
        ]
    )
    return out


def test_sample_writes_seed_ranged_shards_with_provenance(ckpts, sampled):
    names = sorted(p.name for p in sampled.glob("samples_*.npz"))
    assert names == ["samples_000000-000004.npz", "samples_000005-000009.npz", "samples_000010-000011.npz"]
    assert (sampled / "samples_grid.png").is_file()
    with np.load(sampled / "samples_000005-000009.npz", allow_pickle=False) as f:
        assert f["images"].dtype == np.uint8 and f["images"].shape == (5, 8, 8, 1)
        assert f["seeds"].dtype == np.int64 and f["seeds"].tolist() == [5, 6, 7, 8, 9]
        assert "labels" not in f.files  # unconditional model
        assert str(f["checkpoint_sha256"]) == file_sha256(ckpts[0])
        assert (str(f["sampler"]), int(f["steps"]), str(f["grid"]), float(f["guidance"])) == (
            "heun",
            4,
            "native",
            1.0,
        )
        assert json.loads(str(f["kernel"]))["name"] == "edm"
        assert str(f["version"]) and f["sigmas"].shape == (5,) and f["sigmas"][-1] == 0
        prov = json.loads(str(f["provenance"]))
        assert (
            prov["model"]["arch"] == "edm" and prov["data"]["size"] == 32 and prov["image_shape"] == [1, 8, 8]
        )
        assert prov["checkpoint_sha256"] == str(f["checkpoint_sha256"])


def test_rerun_skips_finished_shards_and_only_samples_new_ones(ckpts, sampled, monkeypatch, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in sampled.glob("samples_*.npz")}
    _no_sampling(monkeypatch)
    ev.main(["sample", ckpts[0], "--seeds", "0-11", "--shard-size", "5", "--out", str(sampled), *FAST])
    assert "generated 0 shard(s), skipped 3 finished shard(s)" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in sampled.glob("samples_*.npz")} == before
    monkeypatch.undo()
    ev.main(["sample", ckpts[0], "--seeds", "0-14", "--shard-size", "5", "--out", str(sampled), *FAST])
    assert "generated 1 shard(s), skipped 2 finished shard(s)" in capsys.readouterr().out
    assert (sampled / "samples_000010-000014.npz").is_file()


def test_shard_of_another_sampler_is_an_error_unless_overwrite(ckpts, tmp_path):
    args = ["sample", ckpts[0], "--seeds", "0-3", "--out", str(tmp_path), *FAST]
    ev.main(args)
    msg = _error([*args, "--sampler", "euler"])
    assert "was made with sampler='heun' but this run uses 'euler'" in msg and "--overwrite" in msg
    ev.main([*args, "--sampler", "euler", "--overwrite"])
    with np.load(tmp_path / "samples_000000-000003.npz", allow_pickle=False) as f:
        assert str(f["sampler"]) == "euler"


def test_unreadable_shard_is_regenerated(ckpts, tmp_path, capsys):
    args = ["sample", ckpts[0], "--seeds", "0-3", "--out", str(tmp_path), *FAST]
    ev.main(args)
    shard = tmp_path / "samples_000000-000003.npz"
    good = np.load(shard, allow_pickle=False)["images"]
    shard.write_bytes(b"not a zip file")
    ev.main(args)
    out = capsys.readouterr().out
    assert "is unreadable" in out and "regenerating" in out and "generated 1 shard(s)" in out
    assert np.array_equal(np.load(shard, allow_pickle=False)["images"], good)


def test_same_checkpoint_seeds_sampler_give_identical_bytes_whatever_the_batch(ckpts, sampled, tmp_path):
    for batch, out in (("7", tmp_path / "b7"), ("64", tmp_path / "b64")):
        ev.main(
            [
                "sample",
                ckpts[0],
                "--seeds",
                "0-11",
                "--shard-size",
                "5",
                "--batch-size",
                batch,
                "--out",
                str(out),
                *FAST,
            ]
        )
    for name in ("samples_000000-000004.npz", "samples_000005-000009.npz"):
        first = np.load(sampled / name, allow_pickle=False)["images"]  # made with batch 7 by the fixture
        again = np.load(tmp_path / "b7" / name, allow_pickle=False)["images"]
        big = np.load(tmp_path / "b64" / name, allow_pickle=False)["images"]
        assert first.tobytes() == again.tobytes()
        assert first.tobytes() == big.tobytes()


@pytest.mark.parametrize("which", [0, 1])
def test_batch_size_changes_floats_by_less_than_1e5(ckpts, which):
    den, kernel = load_denoiser(ckpts[which])
    x7 = sample(den, kernel, "0-63", (1, 8, 8), steps=4, batch_size=7)
    x64 = sample(den, kernel, "0-63", (1, 8, 8), steps=4, batch_size=64)
    assert (x7 - x64).abs().max() <= 1e-5
    assert np.array_equal(float_to_uint8(x7), float_to_uint8(x64))


# ----------------------------------------------------------------------------- pair


@pytest.fixture(scope="module")
def pair_run(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("pair")
    argv = ["--pair", *ckpts, "--seeds", "0-7", "--gl", "--out", str(out), *FAST]
    results = ev.main(argv)  # with W&B (offline: conftest removes any API key)
    return out, argv, results


def test_pair_writes_results_grid_and_offline_wandb_run(pair_run):
    out, _, results = pair_run
    saved = json.loads((out / "results.json").read_text())
    for key in (
        "rp",
        "mae_mean",
        "mae_score",
        "gl_a",
        "gl_b",
        "n",
        "descriptor",
        "threshold",
        "mean_similarity",
        "memorized_a",
        "memorized_b",
        "sampler",
        "steps",
        "model_a",
        "model_b",
    ):
        assert key in saved, key
    assert saved["n"] == 8 and saved["descriptor"] == "pixel" and saved["threshold"] == 0.97
    assert saved["sampler"] == "heun" and saved["steps"] == 4
    assert saved["model_a"]["arch"] == "edm" and saved["model_b"]["arch"] == "dit"
    assert 0 <= saved["rp"] <= 1 and saved["gl_a"] == pytest.approx(1 - saved["memorized_a"])
    # RP recomputed independently from the cached shards
    a = np.load(next((out / "samples").glob("edm-*/samples_000000-000007.npz")), allow_pickle=False)["images"]
    b = np.load(next((out / "samples").glob("dit-*/samples_000000-000007.npz")), allow_pickle=False)["images"]
    d = PixelDescriptor()
    fa, fb = (d(torch.from_numpy(x).permute(0, 3, 1, 2)) for x in (a, b))
    assert saved["rp"] == pytest.approx(rp_score(fa, fb, 0.97))
    assert saved["mae_mean"] == pytest.approx(np.abs(a.astype(float) - b).mean())
    from PIL import Image

    w, h = Image.open(out / "pair.png").size
    assert h == 3 * (32 + 1) + 1 and w == 8 * (32 + 1) + 1  # rows A, B, nearest training image; 8 columns
    assert list((out / "wandb").glob("offline-run-*"))


def test_pair_rerun_reuses_cached_samples(pair_run, monkeypatch, capsys):
    out, argv, results = pair_run
    _no_sampling(monkeypatch)
    again = ev.main([*argv, "--no-wandb"])
    text = capsys.readouterr().out
    assert text.count("reused 1 cached shard(s) in") == 2 and "generated" not in text
    assert again["rp"] == results["rp"] and again["mae_mean"] == results["mae_mean"]


def test_pair_with_the_optimal_denoiser_of_the_training_set(ckpts, tmp_path, capsys):
    res = ev.main(
        [
            "--pair",
            ckpts[0],
            "optimal:",
            "--seeds",
            "0-7",
            "--gl",
            "--out",
            str(tmp_path),
            "--no-wandb",
            *FAST,
        ]
    )
    assert "descriptor: pixel" in capsys.readouterr().out
    assert res["model_b"]["kind"] == "optimal" and res["model_b"]["size"] == 32
    assert res["gl_b"] == 0.0 and res["memorized_b"] == 1.0  # the optimal denoiser copies its training images
    # the explicit spec is the same model: same cache folder
    explicit = ev.resolve_model("optimal:digits?size=32&subset_seed=0", None)
    implicit = ev.resolve_models([ckpts[0], "optimal:"])[1]
    assert explicit.name == implicit.name and explicit.sha256 == implicit.sha256


def test_matrix_csv_is_symmetric_with_unit_diagonal(ckpts, tmp_path):
    ev.main(["--matrix", *ckpts, "optimal:", "--seeds", "0-5", "--out", str(tmp_path), "--no-wandb", *FAST])
    rows = list(csv.reader(open(tmp_path / "rp_matrix.csv")))
    assert rows[0] == ["model", "edm", "dit", "optimal[digits,N=32]"]
    rp = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    mae = np.array(
        [[float(v) for v in r[1:]] for r in list(csv.reader(open(tmp_path / "mae_matrix.csv")))[1:]]
    )
    assert rp.shape == (3, 3) and np.array_equal(rp, rp.T) and np.all(np.diag(rp) == 1.0)
    assert (
        np.array_equal(mae, mae.T) and np.all(np.diag(mae) == 0.0) and np.all(mae[~np.eye(3, dtype=bool)] > 0)
    )
    assert (tmp_path / "rp_matrix.png").is_file() and (tmp_path / "mae_matrix.png").is_file()


def test_data_spec_syntax():
    data, kernel = ev.parse_data_spec("digits?size=64&subset_seed=3&classes=0,1&kernel=ve&resolution=16")
    assert data == {
        "source": "digits",
        "size": 64,
        "subset_seed": 3,
        "classes": [0, 1],
        "source_kwargs": {"resolution": 16},
    }
    assert kernel == "ve"
    data, _ = ev.parse_data_spec(
        "?size=16", {"source": "digits", "size": 32, "subset_seed": 1, "batch_size": 4}
    )
    assert data["source"] == "digits" and data["size"] == 16 and data["subset_seed"] == 1


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--seeds", ""], "Invalid seeds '' (empty)"),
        (["--seeds", "5-"], "Invalid seeds '5-'"),
        (["--seeds", "9-3"], "range 9-3 is descending"),
        (["--steps", "0"], "--steps must be an integer >= 1, got 0."),
        (["--sampler", "foo"], "Unknown sampler 'foo'"),
        (["--grid", "foo"], "Unknown sigma grid 'foo'"),
        (["--shard-size", "0"], "--shard-size must be an integer >= 1"),
        (["--class", "3"], "is an unconditional model"),
    ],
)
def test_sample_bad_options(ckpts, tmp_path, argv, expected):
    assert expected in _error(["sample", ckpts[0], "--out", str(tmp_path), *FAST, *argv])


def test_missing_truncated_and_specless_models(ckpts, tmp_path):
    assert "checkpoint" in _error(["sample", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path)])
    assert "does not exist" in _error(["sample", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path)])
    cut = tmp_path / "cut.ckpt"
    data = Path(ckpts[0]).read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    assert "could not be read (truncated" in _error(["sample", str(cut), "--out", str(tmp_path)])
    assert "names no data source" in _error(["sample", "optimal:", "--out", str(tmp_path)])
    assert "is not a key=value pair" in _error(["sample", "optimal:digits?size", "--out", str(tmp_path)])


@pytest.mark.parametrize("t", ["1.5", "-1", "nan"])
def test_threshold_outside_range(ckpts, tmp_path, t):
    msg = _error(["--pair", *ckpts, "--threshold", t, "--out", str(tmp_path)])
    assert "--threshold must be a cosine similarity in (-1, 1]" in msg


def test_pair_of_different_image_shapes(ckpts, tmp_path):
    msg = _error(["--pair", ckpts[0], "optimal:digits?size=8&resolution=16", "--out", str(tmp_path)])
    assert "makes 1x8x8 images but" in msg and "makes 1x16x16" in msg


def test_pair_of_sample_files_with_different_seeds(sampled, tmp_path):
    a, b = sampled / "samples_000000-000004.npz", sampled / "samples_000005-000009.npz"
    msg = _error(["--pair", str(a), str(b), "--out", str(tmp_path), "--no-wandb"])
    assert "holds seeds 0-4 but" in msg and "holds 5-9" in msg and "seed by seed" in msg
    assert "but not 0-1" in _error(["--pair", str(a), str(b), "--seeds", "0-1", "--out", str(tmp_path)])


def test_feature_dimensions_differing(pair_run, monkeypatch):
    out, argv, _ = pair_run

    class Uneven(PixelDescriptor):  # a broken descriptor: the dimension changes between calls
        calls = 0

        def forward(self, images):
            Uneven.calls += 1
            f = super().forward(images)
            return f if Uneven.calls == 1 else f[:, :-1]

    import lightning_repro.metrics as metrics

    monkeypatch.setattr(metrics, "get_descriptor", lambda name, **kw: Uneven())
    msg = _error([*argv, "--no-wandb"])
    assert "have dimension 64 but those of" in msg and "have 63" in msg


def test_sscd_unavailable_offline_is_an_error_not_a_fallback(pair_run, monkeypatch, tmp_path):
    out, argv, _ = pair_run

    def offline(url, dst, *a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    msg = _error([*argv, "--no-wandb", "--descriptor", "sscd"])
    assert "SSCD weights sscd_disc_large.torchscript.pt are not in the torch hub cache" in msg


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "evaluate.py"),
            "sample",
            str(tmp_path / "missing.ckpt"),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: checkpoint {tmp_path / 'missing.ckpt'} does not exist."


# ----------------------------------------------------------------------------- reliability (#17)


def _offline_hub(monkeypatch, hub: Path) -> None:
    def offline(url, dst, *a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))


def test_sscd_without_weights_fails_before_any_sampling(ckpts, tmp_path, monkeypatch):
    _no_sampling(monkeypatch)
    _offline_hub(monkeypatch, tmp_path / "hub")
    out = tmp_path / "out"
    msg = _error(["--pair", *ckpts, "--descriptor", "sscd", "--seeds", "0-3", "--out", str(out), "--no-wandb", *FAST])
    assert "SSCD weights sscd_disc_large.torchscript.pt are not in the torch hub cache" in msg
    assert not (out / "samples").exists()  # nothing was sampled


def test_sha256_of_the_descriptor_is_checked_before_sampling(ckpts, tmp_path, monkeypatch):
    _no_sampling(monkeypatch)
    _offline_hub(monkeypatch, tmp_path / "hub")
    fake = tmp_path / "hub" / "checkpoints" / "sscd_disc_large.torchscript.pt"
    fake.parent.mkdir(parents=True)
    fake.write_bytes(b"not the SSCD model")
    base = ["--pair", *ckpts, "--seeds", "0-3", "--out", str(tmp_path / "out"), "--no-wandb", *FAST]
    msg = _error([*base, "--descriptor", "sscd", "--sha256", "0" * 64])
    assert f"have SHA-256 {file_sha256(fake)} but {'0' * 64} was expected (the sha256= you passed)" in msg
    assert "--sha256 must be 64 hexadecimal digits" in _error([*base, "--sha256", "abc"])
    assert "does not apply to the pixel descriptor" in _error([*base, "--descriptor", "pixel", "--sha256", "a" * 64])
    assert not (tmp_path / "out" / "samples").exists()


@pytest.mark.parametrize("flags", [["--sha256", "AB" * 32], ["--trust-descriptor"]])
def test_descriptor_flags_reach_the_descriptor(ckpts, tmp_path, monkeypatch, flags):
    import inspect

    import lightning_repro.metrics as metrics
    from lightning_repro.metrics.descriptors import SSCDDescriptor

    seen = []

    def record(name, **kwargs):
        seen.append((name, kwargs))
        raise ValueError("descriptor recorded.")

    monkeypatch.setattr(metrics, "get_descriptor", record)
    _no_sampling(monkeypatch)
    _error(["--pair", *ckpts, "--descriptor", "sscd", "--out", str(tmp_path), *flags])
    if flags[0] == "--sha256":
        assert seen == [("sscd", {"sha256": "ab" * 32})]
    else:  # wired once metrics.descriptors offers trust_unpinned
        trust = "trust_unpinned" in inspect.signature(SSCDDescriptor.__init__).parameters
        assert seen == [("sscd", {"trust_unpinned": True} if trust else {})]


def test_out_that_is_not_a_folder_is_one_sentence(ckpts, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        for argv in (["sample", ckpts[0]], ["--pair", *ckpts, "--no-wandb"]):
            msg = _error([*argv, "--seeds", "0-1", "--out", str(out), *FAST])
            assert msg.startswith(f"error: --out {out} is not a writable folder (")
    assert blocker.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_unwritable_out_is_one_sentence(ckpts, tmp_path, monkeypatch):
    out = tmp_path / "ro"
    real = Path.write_bytes

    def denied(self, data):  # as a read-only folder behaves for a non-root user
        if out in self.parents:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", denied)
    _no_sampling(monkeypatch)
    msg = _error(["sample", ckpts[0], "--seeds", "0-1", "--out", str(out), *FAST])
    assert msg == f"error: --out {out} is not a writable folder (permission denied)."
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("victim", ["samples_000000-000003.npz", "results.json"])
def test_full_disk_leaves_no_partial_file(ckpts, tmp_path, monkeypatch, victim):
    import errno

    real = Path.write_bytes

    def full(self, data):  # half the bytes reach the disk, then ENOSPC
        if self.name.startswith(f".{victim}.tmp"):
            real(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    if victim == "results.json":
        out = tmp_path / "pair"
        argv = ["--pair", ckpts[0], "optimal:", "--seeds", "0-3", "--out", str(out), "--no-wandb", *FAST]
        path = out / victim
    else:
        out = tmp_path / "sample"
        argv = ["sample", ckpts[0], "--seeds", "0-3", "--out", str(out), *FAST]
        path = out / victim
    msg = _error(argv)
    expected = f"could not write {path} (no space left on device); check that --out is writable and has free space."
    assert msg == f"error: {expected}"
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".") or p.name == victim]
    assert leftovers == [] and not path.exists()


def test_rewritten_shard_is_resampled_in_a_cache_and_refused_as_a_model(ckpts, tmp_path, capsys):
    out = tmp_path / "s"
    ev.main(["sample", ckpts[0], "--seeds", "0-3", "--out", str(out), *FAST])
    shard = out / "samples_000000-000003.npz"
    with np.load(shard, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    good = arrays["images"].copy()
    assert str(arrays["content_sha256"]) == ev.content_sha256(arrays)
    arrays["images"] = 255 - arrays["images"]  # other content, same provenance and recorded hash: a valid zip
    np.savez(shard, **arrays)
    msg = _error(["--pair", str(shard), str(shard), "--out", str(tmp_path / "p"), "--no-wandb"])
    assert f"sample file {shard} holds images, seeds or labels whose SHA-256 differs" in msg
    capsys.readouterr()
    ev.main(["sample", ckpts[0], "--seeds", "0-3", "--out", str(out), *FAST])
    text = capsys.readouterr().out
    assert "does not match the content SHA-256 it records" in text and "generated 1 shard(s)" in text
    assert np.array_equal(np.load(shard, allow_pickle=False)["images"], good)


def test_seeds_are_parsed_once_and_their_errors_are_one_sentence(ckpts, tmp_path, monkeypatch):
    import lightning_repro.sampling.noise as noise

    real, texts, downstream = noise.parse_seeds, [], []

    def at_cli(seeds):
        texts.append(seeds)
        return real(seeds)

    def below(seeds):
        downstream.append(type(seeds))
        return real(seeds)

    monkeypatch.setattr(ev.cli, "parse_seeds", at_cli)
    monkeypatch.setattr(noise, "parse_seeds", below)
    ev.main(["--pair", ckpts[0], "optimal:", "--seeds", "0-3,7", "--out", str(tmp_path), "--no-wandb", *FAST])
    assert texts == ["0-3,7"] and str not in downstream  # below the CLI only parsed lists are passed on
    assert "Invalid seeds '5-'" in _error(["--pair", *ckpts, "--seeds", "5-", "--out", str(tmp_path)])

    def refuse(seeds):  # a refusal sentence of the seed parser (e.g. a range too large) reaches the user as is
        raise ValueError(f"Invalid seeds {seeds!r} (the range holds 10^12 seeds): expected fewer.")

    monkeypatch.setattr(ev.cli, "parse_seeds", refuse)
    for argv in (["sample", ckpts[0]], ["--pair", *ckpts]):
        msg = _error([*argv, "--seeds", "0-999999999999", "--out", str(tmp_path)])
        assert msg == "error: Invalid seeds '0-999999999999' (the range holds 10^12 seeds): expected fewer."


def test_a_new_kind_of_reference_is_one_registered_class(sampled, monkeypatch):
    monkeypatch.setitem(ev.REFERENCES, "dummy", None)  # the registration below is undone after the test

    @ev.register_reference("dummy")
    class Dummy(ev.SamplesReference):
        pass

    ref = ev.resolve_model(f"dummy:{sampled}")
    assert type(ref) is Dummy and ref.kind == "dummy" and ref.stored is not None and len(ref.stored.seeds) >= 12
    explicit = ev.resolve_model(f"samples:{sampled}")
    assert type(explicit) is ev.SamplesReference and explicit.sha256 == ref.sha256
    assert type(ev.resolve_model(str(sampled))) is ev.SamplesReference
