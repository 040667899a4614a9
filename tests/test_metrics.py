"""Tests of lightning_repro.metrics: descriptors (SSCD loading offline, pixel calibration) and RP / MAE / GL scores."""

from __future__ import annotations

import hashlib
import re
import time
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_repro.metrics import (
    ConditionalReproducibilityScore,
    GeneralizationScore,
    MAEScore,
    PixelDescriptor,
    ReproducibilityScore,
    SSCDDescriptor,
    get_descriptor,
    gl_score,
    mae_score,
    nearest_neighbours,
    rp_score,
)
from lightning_repro.metrics import descriptors as D
from lightning_repro.metrics.scores import DEFAULT_MAE_THRESHOLD

# ----------------------------------------------------------------------------- helpers


def _np_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _paired_features(n: int = 400, d: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs whose similarities spread over [-1, 1] (many on each side of 0.6)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    noise = torch.randn(n, d, generator=g, dtype=torch.float64)
    mix = torch.rand(n, 1, generator=g, dtype=torch.float64) * 2
    return a, a + mix * noise


def _gl_data(n: int = 300, m: int = 1000, d: int = 24, seed: int = 1):
    """Reference bank and samples: a third are noisy copies of training rows, the rest new."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(m, d, generator=g, dtype=torch.float64)
    samples = torch.randn(n, d, generator=g, dtype=torch.float64)
    k = n // 3
    idx = torch.randint(0, m, (k,), generator=g)
    scale = torch.rand(k, 1, generator=g, dtype=torch.float64)
    samples[:k] = ref[idx] + scale * torch.randn(k, d, generator=g, dtype=torch.float64)
    return samples, ref


def _np_gl(samples: torch.Tensor, ref: torch.Tensor, t: float):
    s = _np_normalize(samples.numpy()) @ _np_normalize(ref.numpy()).T
    return 1.0 - float((s.max(axis=1) > t).mean()), s.max(axis=1), s.argmax(axis=1)


# ----------------------------------------------------------------------------- scores vs NumPy


def test_rp_equals_numpy_exactly():
    a, b = _paired_features()
    sims = (_np_normalize(a.numpy()) * _np_normalize(b.numpy())).sum(1)
    assert 0.2 < (sims > 0.6).mean() < 0.8  # the data straddles the threshold
    for t in (0.6, 0.3, 0.9):
        m = ReproducibilityScore(threshold=t)
        for i in range(0, len(a), 64):  # several updates
            m.update(a[i : i + 64], b[i : i + 64])
        expected = float((sims > t).mean())
        assert float(m.compute()) == expected
        assert rp_score(a, b, threshold=t) == expected
        assert m.mean_similarity.item() == pytest.approx(sims.mean(), abs=1e-12)
        assert m.summary()["num_pairs"] == len(a)


def test_mae_equals_numpy_for_uint8_and_float_images():
    g = torch.Generator().manual_seed(2)
    ia = torch.randint(0, 256, (50, 3, 8, 8), generator=g, dtype=torch.uint8)
    delta = torch.randint(-25, 26, (50, 1, 1, 1), generator=g) * torch.randint(-1, 2, ia.shape, generator=g)
    ib = (ia.long() + delta).clamp(0, 255).to(torch.uint8)
    mae = np.abs(ia.numpy().astype(np.float64) - ib.numpy().astype(np.float64)).reshape(50, -1).mean(1)
    assert 0.2 < (mae < DEFAULT_MAE_THRESHOLD).mean() < 0.9
    m = MAEScore()
    m.update(ia[:20], ib[:20])
    m.update(ia[20:], ib[20:])
    out = m.compute()
    assert float(out["mae_score"]) == float((mae < DEFAULT_MAE_THRESHOLD).mean())
    assert float(out["mae_mean"]) == pytest.approx(mae.mean(), abs=1e-12)
    assert mae_score(ia, ib)["mae_score"] == float((mae < DEFAULT_MAE_THRESHOLD).mean())
    # float [-1, 1] images map to [0, 255] by (x + 1) * 127.5
    fa, fb = ia.double() / 127.5 - 1, ib.double() / 127.5 - 1
    out_f = mae_score(fa, fb, threshold=5.0)
    assert out_f["mae_mean"] == pytest.approx(mae.mean(), abs=1e-9)
    assert out_f["mae_score"] == float((mae < 5.0).mean())


def test_gl_equals_numpy_and_memorized_fraction_is_its_complement():
    samples, ref = _gl_data()
    gl_np, _, _ = _np_gl(samples, ref, 0.6)
    assert 0.3 < gl_np < 0.9
    m = GeneralizationScore(ref, threshold=0.6, chunk_size=64, ref_chunk_size=300)
    m.update(samples[:100])
    m.update(samples[100:])
    assert float(m.compute()) == gl_np
    assert float(m.memorized_fraction) == 1.0 - gl_np
    s = m.summary()
    assert (
        s["gl"] == gl_np and s["memorized_fraction"] == pytest.approx(1 - gl_np) and s["num_samples"] == 300
    )
    assert gl_score(samples, ref, threshold=0.6, chunk_size=50) == gl_np


def test_nearest_indices_equal_brute_force():
    samples, ref = _gl_data(n=257, m=531)
    _, max_np, arg_np = _np_gl(samples, ref, 0.6)
    for cs, rcs in ((64, 100), (1024, 16384), (257, 531), (1, 600), (300, 1)):
        best, idx = nearest_neighbours(samples, ref, chunk_size=cs, ref_chunk_size=rcs)
        assert torch.equal(idx, torch.from_numpy(arg_np))
        np.testing.assert_allclose(best.numpy(), max_np, rtol=0, atol=1e-12)
    # float32 path (the descriptors' dtype) finds the same neighbours here
    best32, idx32 = GeneralizationScore(ref.float(), chunk_size=16, ref_chunk_size=100).nearest(
        samples.float()
    )
    assert best32.dtype == torch.float32 and torch.equal(idx32, torch.from_numpy(arg_np))


def test_gl_reference_bank_survives_reset_and_keeps_dtype():
    samples, ref = _gl_data()
    m = GeneralizationScore(ref.float())
    m.update(samples.float())
    first = float(m.compute())
    m.reset()
    assert int(m.num_samples) == 0 and int(m.num_memorized) == 0
    assert m.reference.shape == ref.shape
    m.update(samples.float())
    assert float(m.compute()) == first
    m.to("cpu", torch.float16)  # a dtype change of the module (states) does not touch the bank
    assert m.reference.dtype == torch.float32 and m.reference.shape == ref.shape
    assert "reference" not in m.state_dict()


def test_conditional_rp_per_class_equals_numpy():
    a, b = _paired_features(n=300, seed=3)
    labels = torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(4))
    labels[labels == 4] = 3  # class 4 gets no pair
    sims = (_np_normalize(a.numpy()) * _np_normalize(b.numpy())).sum(1)
    m = ConditionalReproducibilityScore(num_classes=5, threshold=0.6)
    m.update(a[:150], b[:150], labels[:150])
    m.update(a[150:], b[150:], labels[150:])
    out = m.compute()
    for c in range(4):
        sel = labels.numpy() == c
        assert float(out["per_class"][c]) == float((sims[sel] > 0.6).mean())
        assert int(out["counts"][c]) == sel.sum()
    assert torch.isnan(out["per_class"][4]) and int(out["counts"][4]) == 0
    assert float(out["overall"]) == float((sims > 0.6).mean())


# ----------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str, data: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        a, b, samples, ref, labels = data["a"], data["b"], data["samples"], data["ref"], data["labels"]
        rp, gl = ReproducibilityScore(), GeneralizationScore(ref, chunk_size=32)
        crp, mae = ConditionalReproducibilityScore(3), MAEScore()
        sl = slice(0, 51) if rank == 0 else slice(51, None)  # uneven halves
        rp.update(a[sl], b[sl])
        crp.update(a[sl], b[sl], labels[sl])
        ia, ib = (((a[sl, :12] > 0).to(torch.uint8) * 200).view(-1, 3, 2, 2) for a in (a, b))
        mae.update(ia, ib)
        gsl = slice(0, 150) if rank == 0 else slice(150, None)
        gl.update(samples[gsl])
        result = {
            "rp": rp.compute(),
            "gl": gl.compute(),
            "mem": gl.memorized_fraction,
            "crp": crp.compute(),
            "mae": mae.compute(),
            "rp_mean": rp.mean_similarity,
        }
        if rank == 0:
            torch.save(result, out_file)
    finally:
        dist.destroy_process_group()


def test_ddp_two_process_gloo_equals_single_process(tmp_path: Path):
    import torch.multiprocessing as mp

    a, b = _paired_features(n=101, seed=5)
    samples, ref = _gl_data(n=301, m=400)
    labels = torch.randint(0, 3, (101,), generator=torch.Generator().manual_seed(6))
    data = {"a": a, "b": b, "samples": samples, "ref": ref, "labels": labels}
    out_file = tmp_path / "ddp.pt"
    # fork: the children inherit the imported modules (spawn would re-import torch and torchmetrics in
    # each, ~10 s on 2 busy cores); a deadline guards against a hung process group
    ctx = mp.start_processes(
        _ddp_worker,
        args=(2, str(tmp_path / "pg_init"), str(out_file), data),
        nprocs=2,
        join=False,
        start_method="fork",
    )
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-process gloo evaluation did not finish within 120 s")
    got = torch.load(out_file, weights_only=False)

    rp, gl = ReproducibilityScore(), GeneralizationScore(ref)
    crp, mae = ConditionalReproducibilityScore(3), MAEScore()
    rp.update(a, b)
    crp.update(a, b, labels)
    ia, ib = (((x[:, :12] > 0).to(torch.uint8) * 200).view(-1, 3, 2, 2) for x in (a, b))
    mae.update(ia, ib)
    gl.update(samples)
    assert float(got["rp"]) == float(rp.compute())
    assert float(got["gl"]) == float(gl.compute())
    assert float(got["mem"]) == float(gl.memorized_fraction)
    assert float(got["rp_mean"]) == pytest.approx(float(rp.mean_similarity), abs=1e-12)
    c = crp.compute()
    assert torch.equal(got["crp"]["counts"], c["counts"]) and float(got["crp"]["overall"]) == float(
        c["overall"]
    )
    assert torch.equal(got["crp"]["per_class"], c["per_class"])
    assert float(got["mae"]["mae_score"]) == float(mae.compute()["mae_score"])


# ----------------------------------------------------------------------------- SSCD descriptor (offline)


class _TinyDescriptorNet(nn.Module):
    """Stand-in for an SSCD TorchScript file: conv + pooling + linear, 8-d output (not normalised)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=8, stride=8)
        self.fc = nn.Linear(4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1))


@pytest.fixture()
def tiny_model(tmp_path: Path) -> tuple[Path, str, nn.Module]:
    torch.manual_seed(0)
    net = _TinyDescriptorNet().eval()
    file = tmp_path / "tiny.torchscript.pt"
    with warnings.catch_warnings():  # torch.jit.script's deprecation notice (SSCD ships as TorchScript)
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(net).save(str(file))
    return file, hashlib.sha256(file.read_bytes()).hexdigest(), net


def _one_sentence(msg: str) -> bool:
    return msg.endswith(".") and len(re.findall(r"[.;] [A-Z]", msg)) == 0


def _reference_sscd(net: nn.Module, images_unit: torch.Tensor) -> torch.Tensor:
    x = images_unit.expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(320, 320), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(D.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(D.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return F.normalize(net((x - mean) / std), dim=1)


def test_sscd_loads_local_file_with_checksum_and_preprocesses_like_the_paper(tiny_model):
    file, digest, net = tiny_model
    desc = SSCDDescriptor("sscd_disc_mixup", path=file, sha256=digest, device="cpu", batch_size=3)
    assert desc.default_threshold == 0.6
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (7, 3, 32, 32), generator=g, dtype=torch.uint8)
    f = desc(img)
    assert f.shape == (7, 8) and f.dtype == torch.float32
    torch.testing.assert_close(f.norm(dim=1), torch.ones(7))
    torch.testing.assert_close(f, _reference_sscd(net, img.float() / 255), atol=1e-5, rtol=1e-5)
    # float [-1, 1] input gives the same features as the uint8 image
    torch.testing.assert_close(desc(img.float() / 127.5 - 1), f, atol=1e-5, rtol=1e-5)
    # grey images are repeated to 3 channels
    grey = img[:, :1]
    torch.testing.assert_close(desc(grey), desc(grey.expand(-1, 3, -1, -1)), atol=1e-6, rtol=1e-6)
    # batching does not change the result, and the descriptor never leaves eval mode
    desc.batch_size = 100
    torch.testing.assert_close(desc(img), f, atol=1e-6, rtol=1e-6)
    desc.train()
    assert not desc.training and not desc.model.training
    assert not any(p.requires_grad for p in desc.parameters())


def test_sscd_from_hub_cache_refuses_wrong_checksum(tiny_model, tmp_path, monkeypatch):
    file, digest, _ = tiny_model
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    cached = hub / "checkpoints" / "sscd_disc_mixup.torchscript.pt"
    cached.write_bytes(file.read_bytes())
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setattr(
        torch.hub, "download_url_to_file", pytest.fail
    )  # the cached file is used, no download
    with pytest.raises(ValueError) as err:
        SSCDDescriptor("sscd_disc_mixup", device="cpu")
    msg = str(err.value)
    assert digest in msg and D.SSCD_MODELS["sscd_disc_mixup"].sha256 in msg and str(cached) in msg
    assert "download it again" in msg and _one_sentence(msg)
    # the user's own digest is accepted, and a wrong one refused
    assert SSCDDescriptor("sscd_disc_mixup", sha256=digest, device="cpu")(torch.zeros(1, 3, 8, 8)).shape == (
        1,
        8,
    )
    with pytest.raises(ValueError, match="the sha256= you passed"):
        SSCDDescriptor("sscd_disc_mixup", path=file, sha256="0" * 64, device="cpu")


def test_sscd_unpinned_model_records_first_download_and_checks_it_later(tiny_model, tmp_path, monkeypatch):
    file, digest, _ = tiny_model
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    calls = []

    def fake_download(url: str, dst: str, *args, **kwargs) -> None:
        calls.append(url)
        Path(dst).write_bytes(file.read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    target = hub / "checkpoints" / "sscd_disc_large.torchscript.pt"
    sidecar = target.with_name(target.name + ".sha256")
    # without trust_unpinned the unpinned file is refused (downloaded, never loaded, nothing recorded)
    with pytest.raises(ValueError) as err:
        get_descriptor("sscd", device="cpu")
    assert str(err.value) == (
        f"SSCD weights {target} (SHA-256 {digest}) cannot be verified because no published digest of "
        "sscd_disc_large.torchscript.pt exists; pass sha256= of a copy you trust, or trust_unpinned=True to load "
        "it unverified."
    )
    assert _one_sentence(str(err.value)) and not sidecar.exists()
    with pytest.warns(UserWarning, match=r"No published SHA-256.*\(trust_unpinned=True\)"):
        d = get_descriptor("sscd", device="cpu", trust_unpinned=True)  # the paper's model: sscd_disc_large
    assert calls == ["https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_large.torchscript.pt"]
    assert d.weights_path == target and sidecar.read_text().split()[0] == digest
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SSCDDescriptor("sscd_disc_large", device="cpu", trust_unpinned=True)  # checked against the sidecar, silently
    with pytest.raises(ValueError, match=re.escape(f"(SHA-256 {digest}) cannot be verified")):
        SSCDDescriptor("sscd_disc_large", device="cpu")  # a sidecar alone is no trust: it sits next to the file
    assert len(calls) == 1
    target.write_bytes(target.read_bytes() + b"tampered")
    with pytest.raises(ValueError) as err:
        SSCDDescriptor("sscd_disc_large", device="cpu", trust_unpinned=True)
    msg = str(err.value)
    assert str(sidecar) in msg and digest in msg and "first trusted" in msg and _one_sentence(msg)


def test_sscd_unpinned_file_needs_its_sha256_or_trust(tiny_model, monkeypatch):
    file, digest, net = tiny_model
    monkeypatch.setattr(torch.hub, "download_url_to_file", pytest.fail)  # path= is used, nothing downloaded
    loads = []
    real_load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    with pytest.raises(ValueError) as err:
        SSCDDescriptor("sscd_disc_large", path=file, device="cpu")
    msg = str(err.value)
    assert msg.startswith(f"SSCD weights {file} (SHA-256 {digest}) cannot be verified") and _one_sentence(msg)
    assert "pass sha256= of a copy you trust, or trust_unpinned=True" in msg and loads == []
    img = torch.randint(0, 256, (2, 3, 16, 16), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    expected = _reference_sscd(net, img.float() / 255)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a digest the caller vouches for is a verified load: no warning
        pinned = SSCDDescriptor("sscd_disc_large", path=file, sha256=digest.upper(), device="cpu")
    torch.testing.assert_close(pinned(img), expected, atol=1e-5, rtol=1e-5)
    with pytest.warns(UserWarning, match="loaded unverified"):
        trusted = get_descriptor("sscd_disc_large", path=file, trust_unpinned=True, device="cpu")
    torch.testing.assert_close(trusted(img), expected, atol=1e-5, rtol=1e-5)
    assert len(loads) == 2
    wrong = "ab" * 32
    with pytest.raises(ValueError) as err:
        SSCDDescriptor("sscd_disc_large", path=file, sha256=wrong, device="cpu", trust_unpinned=True)
    assert str(err.value) == (
        f"SSCD weights {file} have SHA-256 {digest} but {wrong} was expected (the sha256= you passed); delete the "
        f"file and download it again from {D.SSCD_MODELS['sscd_disc_large'].url}, or pass sha256= of a file you trust."
    )
    with pytest.raises(ValueError, match=r"^sha256 must be 64 hexadecimal digits \(a SHA-256 digest\), got 'abc'\.$"):
        SSCDDescriptor("sscd_disc_large", path=file, sha256="abc", device="cpu")
    assert len(loads) == 2


def test_check_descriptor_weights_verifies_without_loading(tiny_model, monkeypatch):
    file, digest, _ = tiny_model
    monkeypatch.setattr(torch.jit, "load", pytest.fail)  # resolving and hashing only
    assert D.check_descriptor_weights("pixel") is None
    assert D.check_descriptor_weights("pixel", trust_unpinned=True) is None
    assert D.check_descriptor_weights("sscd", path=file, sha256=digest) == file
    with pytest.warns(UserWarning, match="No published SHA-256"):
        assert D.check_descriptor_weights("SSCD_DISC_LARGE", path=file, trust_unpinned=True) == file
    assert file.with_name(file.name + ".sha256").read_text().split()[0] == digest
    with pytest.raises(ValueError, match=re.escape(f"(SHA-256 {digest}) cannot be verified")):
        D.check_descriptor_weights("sscd", path=file)
    with pytest.raises(ValueError, match=re.escape(f"{digest} but {D.SSCD_MODELS['sscd_disc_mixup'].sha256}")):
        D.check_descriptor_weights("sscd_disc_mixup", path=file, trust_unpinned=True)  # trust never beats a pin
    with pytest.raises(ValueError) as err:
        D.check_descriptor_weights("pixel", path=file)
    assert str(err.value) == "The pixel descriptor has no weights file, so path= is only for the SSCD descriptors."
    with pytest.raises(ValueError, match=r"so sha256= is only for the SSCD descriptors\.$"):
        get_descriptor("pixel", sha256=digest)
    assert isinstance(get_descriptor("pixel", trust_unpinned=True), PixelDescriptor)
    with pytest.raises(ValueError, match=r"^Unknown descriptor 'clip'; expected one of \['pixel', 'sscd', "):
        D.check_descriptor_weights("clip")


def test_sscd_missing_file_without_network_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(FileNotFoundError) as err:
        SSCDDescriptor("sscd_disc_mixup", device="cpu")
    msg = str(err.value)
    url = D.SSCD_MODELS["sscd_disc_mixup"].url
    target = tmp_path / "hub" / "checkpoints" / "sscd_disc_mixup.torchscript.pt"
    assert f"download {url} to {target}" in msg and "path=" in msg and _one_sentence(msg)
    with pytest.raises(FileNotFoundError, match=re.escape(f"download {url} to it")):
        SSCDDescriptor("sscd_disc_mixup", path=tmp_path / "nope.pt", device="cpu")


def test_sscd_not_torchscript_and_bad_images(tiny_model, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a loadable TorchScript model"):
        SSCDDescriptor(
            "sscd_disc_large", path=junk, sha256=hashlib.sha256(b"not a model").hexdigest(), device="cpu"
        )
    with pytest.raises(ValueError, match="Unknown SSCD model"):
        SSCDDescriptor("sscd_nope", device="cpu")
    with pytest.raises(ValueError, match="Unknown descriptor"):
        get_descriptor("clip")
    file, digest, _ = tiny_model
    d = SSCDDescriptor("sscd_disc_mixup", path=file, sha256=digest, device="cpu")
    with pytest.raises(ValueError, match="1 or 3 channels"):
        d(torch.zeros(2, 2, 8, 8))
    with pytest.raises(ValueError, match=r"N x C x H x W, got shape \(8, 8, 3\)"):
        d(torch.zeros(8, 8, 3))
    with pytest.raises(ValueError, match="uint8 in \\[0, 255\\] or float in \\[-1, 1\\]"):
        d(torch.zeros(1, 3, 8, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="empty batch"):
        d(torch.zeros(0, 3, 8, 8))


# ----------------------------------------------------------------------------- pixel descriptor


def test_pixel_descriptor_is_normalised_correlation():
    g = torch.Generator().manual_seed(7)
    x = torch.rand(6, 3, 5, 5, generator=g) * 2 - 1
    f = PixelDescriptor(batch_size=4)(x)
    flat = x.flatten(1).double()
    ref = F.normalize(flat - flat.mean(1, keepdim=True), dim=1)
    torch.testing.assert_close(f.double(), ref, atol=1e-6, rtol=0)
    # invariant to per-image offset and contrast, and uint8 vs [-1, 1]
    u8 = ((x + 1) * 127.5).round().to(torch.uint8)
    torch.testing.assert_close(
        PixelDescriptor()(u8), PixelDescriptor()(u8.float() / 127.5 - 1), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(PixelDescriptor()(0.5 * x + 0.2), f, atol=1e-6, rtol=0)
    assert PixelDescriptor(size=4)(x).shape == (6, 48)
    assert PixelDescriptor()(torch.zeros(1, 1, 4, 4)).abs().sum() == 0  # constant image -> zero feature


def test_pixel_threshold_calibration():
    """The numbers in PixelDescriptor's docstring (on fewer random images)."""
    t = PixelDescriptor.default_threshold
    rep = D.pixel_calibration(n_random=300, seed=0)
    # a noisy copy (std 0.05 and 0.1 in [-1, 1] units) is "the same" on every set
    for row in rep.values():
        assert row["noise_0.05_min"] > t and row["noise_0.1_min"] > t
    # distinct 32 x 32 images are never "the same"; distinct digits rarely (8 x 8 near-duplicates)
    assert rep["smooth32"]["distinct_max"] < 0.5 and rep["uniform32"]["distinct_max"] < 0.3
    assert rep["digits"]["distinct_frac_above"] < 0.12 and rep["digits"]["distinct_max"] == pytest.approx(
        0.9942, abs=1e-4
    )
    # documented limitation: a one-pixel shift is below the threshold (0.89 on smooth images, ~0.06 on digits)
    assert 0.85 < rep["smooth32"]["shift_min"] < t and rep["digits"]["shift_min"] < 0.1
    # the module computes the same features as the calibration
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().images[:50] / 8.0 - 1.0)[:, None]
    flat = x.flatten(1)
    torch.testing.assert_close(
        PixelDescriptor()(x).double(),
        F.normalize(flat - flat.mean(1, keepdim=True), dim=1),
        atol=1e-6,
        rtol=0,
    )


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("t", [-1.0, 1.5, float("nan")])
def test_threshold_outside_range_is_refused(t):
    for make in (
        lambda: ReproducibilityScore(threshold=t),
        lambda: GeneralizationScore(torch.randn(3, 4), threshold=t),
        lambda: ConditionalReproducibilityScore(2, threshold=t),
        lambda: rp_score(torch.randn(2, 4), torch.randn(2, 4), threshold=t),
    ):
        with pytest.raises(ValueError, match=r"threshold must be a cosine similarity in \(-1, 1\]"):
            make()
    for bad in (0.0, 300.0):
        with pytest.raises(ValueError, match=r"threshold must be a mean absolute difference in \(0, 255\]"):
            MAEScore(threshold=bad)


def test_mismatched_features_are_refused():
    with pytest.raises(ValueError, match="feats_a has dimension 4 but feats_b has 5"):
        ReproducibilityScore().update(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="feats_a has 3 rows but feats_b has 2"):
        rp_score(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="sample_feats has dimension 5 but the reference features have 4"):
        GeneralizationScore(torch.randn(10, 4)).update(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"floating-point \(N, D\) feature tensor"):
        GeneralizationScore(torch.randn(10))
    with pytest.raises(ValueError, match="images_a has shape"):
        MAEScore().update(torch.zeros(2, 3, 4, 4), torch.zeros(3, 3, 4, 4))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        ConditionalReproducibilityScore(3).update(torch.randn(2, 4), torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"labels must be an integer tensor of shape \(2,\)"):
        ConditionalReproducibilityScore(3).update(torch.randn(2, 4), torch.randn(2, 4), torch.tensor([0]))


def test_copy_chance_is_the_sum_over_training_images_of_the_two_copy_frequencies():
    """p = A's copy frequencies, q = B's (a sample below the threshold copies nothing): chance = sum_i p_i q_i."""
    from lightning_repro.evaluation.scoring import copy_chance

    train = torch.eye(4)
    a = train[[0, 0, 1, 2]]  # p = (1/2, 1/4, 1/4, 0)
    b = torch.cat([train[[0, 1, 1, 3]], torch.tensor([[1.0, 1.0, 1.0, 1.0]]) / 2])  # q = (1/5, 2/5, 0, 1/5); 1 new
    assert copy_chance(a, b, train, 0.97) == pytest.approx(0.5 * 0.2 + 0.25 * 0.4)
    assert copy_chance(a, a, train, 0.97) == pytest.approx(0.25 + 0.0625 + 0.0625)
    assert copy_chance(b[4:], a, train, 0.97) == 0.0  # no copies: no chance agreement through copying
