"""Consistency models (Song et al. 2023; iCT, Song & Dhariwal 2023): the boundary condition f(x, sigma_min) = x, the
papers' schedules, consistency distillation of the optimal denoiser of 8 digits into a one-step map that lands on
the training images the teacher's ODE reaches, seed-pure multistep sampling, and one-sentence errors."""

import math

import lightning as L
import pytest
import torch

import lightning_repro.evaluation as ev
from lightning_repro.checkpoints import CKPT_KEY, load_checkpoint, load_denoiser, preset_class
from lightning_repro.consistency import (
    CDDiT,
    ConsistencyPrecond,
    ConsistencyRecipe,
    CTDDPMpp,
    CTDiT,
    cm_steps,
    cm_target_decay,
    ict_steps,
    karras_discretisation,
    lognormal_index_probs,
    pseudo_huber,
)
from lightning_repro.data import SubsetDataModule
from lightning_repro.kernels import EDMKernel
from lightning_repro.presets import DiT
from lightning_repro.sampling import sample, seed_noise
from lightning_repro.sampling.consistency import consistency_noise

pytestmark = pytest.mark.usefixtures("one_thread_module")

TINY_DIT = dict(patch_size=8, hidden_size=32, depth=1, num_heads=2)
TINY_UNET = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
DIGITS8 = {"source": "digits", "size": 8, "subset_seed": 0}


def _random(m):
    """The consistency model of ``m`` with every weight redrawn (DiT's adaLN-Zero starts with F = 0)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in m.ema.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return m.ema.eval()


@pytest.mark.parametrize("cls, kw", [(CTDiT, TINY_DIT), (CTDDPMpp, TINY_UNET)])
def test_f_at_sigma_min_is_exactly_x_for_any_network(cls, kw):
    f = _random(cls(image_shape=(1, 8, 8), **kw))
    assert isinstance(f, ConsistencyPrecond)
    x = 3 * torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(f.net(x, torch.zeros(5), None), torch.zeros(5, 1, 8, 8))  # a non-zero network
    for sigma in (0.002, torch.full((5,), 0.002), torch.full((5,), 0.002, dtype=torch.float64)):
        assert torch.equal(f(x, sigma), x)
    assert not torch.allclose(f(x, 0.5), x)
    s = torch.tensor([0.5, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = f.coefficients(s)
    torch.testing.assert_close(c_skip, 0.25 / ((s - 0.002) ** 2 + 0.25), rtol=1e-9, atol=0)
    torch.testing.assert_close(c_out, (s - 0.002) * 0.5 / (0.25 + s**2).sqrt(), rtol=1e-9, atol=0)
    torch.testing.assert_close(c_in, 1 / (s**2 + 0.25).sqrt())
    torch.testing.assert_close(c_noise, s.log() / 4)


def test_the_schedules_are_the_papers_closed_forms():
    # iCT: K' = floor(400000 / (log2(128) + 1)) = 50000; N doubles from 11 to 1281
    assert [ict_steps(k, 400_000, 10, 1280) for k in (0, 49_999, 50_000, 100_000, 399_999)] == [11, 11, 21, 41, 1281]
    # CM CT (CIFAR-10: s0 = 2, s1 = 150): N(0) = 2, N(K) = 151; mu(k) = exp(s0 ln mu0 / N)
    assert cm_steps(0, 800_000, 2, 150) == 2 and cm_steps(800_000, 800_000, 2, 150) == 151
    assert cm_steps(200_000, 800_000, 2, 150) == math.ceil(math.sqrt(0.25 * (151**2 - 4) + 4) - 1) + 1
    assert cm_target_decay(2, 2, 0.9) == pytest.approx(0.9) and cm_target_decay(151, 2, 0.9) == pytest.approx(
        math.exp(2 * math.log(0.9) / 151))
    s = karras_discretisation(18, 0.002, 80.0)
    assert s[0] == pytest.approx(0.002) and s[-1] == pytest.approx(80.0) and bool((s[1:] > s[:-1]).all())


def test_the_pairs_distances_and_weights_of_the_objective():
    """Adjacent levels (sigma_i, sigma_{i+1}) and one z per image, drawn for the global batch (a rank's rows of a
    2-rank run are those of one process), iCT's pseudo-Huber and 1/(sigma_{i+1} - sigma_i) weights."""
    s = karras_discretisation(10, 0.002, 80.0)
    x0 = torch.zeros(8, 1, 8, 8)
    for how in ("lognormal", "uniform"):
        r = ConsistencyRecipe(index_sampling=how)
        lo, hi, z = r.draw(x0, s, torch.Generator().manual_seed(1))
        i = torch.searchsorted(s.float(), lo)
        assert torch.equal(s[i].float(), lo) and torch.equal(s[i + 1].float(), hi)
        parts = [r.draw(x0[:4], s, torch.Generator().manual_seed(1), rank, 2) for rank in (0, 1)]
        assert all(torch.equal(torch.cat([p[k] for p in parts]), full) for k, full in enumerate((lo, hi, z)))
    p = lognormal_index_probs(s)
    cdf = torch.erf((s.log() + 1.1) / (2.0 * math.sqrt(2.0)))
    torch.testing.assert_close(p, (cdf[1:] - cdf[:-1]) / (cdf[-1] - cdf[0]))
    a, b = torch.zeros(2, 1, 8, 8), torch.full((2, 1, 8, 8), 0.5)  # |a - b| = 4
    torch.testing.assert_close(pseudo_huber(a, b, 3.0), torch.full((2,), 2.0))
    c = 0.00054 * 8
    loss = ConsistencyRecipe().loss(a, b, torch.tensor([1.0, 2.0]), torch.tensor([2.0, 6.0]))
    assert float(loss) == pytest.approx((math.sqrt(16 + c * c) - c) * (1.0 + 0.25) / 2, rel=1e-6)


class _Wave(torch.nn.Module):
    """An elementwise "network" (exactly batch-independent, unlike a matrix product's round-off)."""

    def forward(self, x, c_noise, labels=None):
        return torch.sin(3 * x + c_noise.view(-1, 1, 1, 1))


def test_multistep_consistency_sampling_is_a_pure_function_of_the_seed():
    run = dict(sampler="consistency", steps=4)
    f = ConsistencyPrecond(_Wave(), EDMKernel())
    st: dict = {}
    a = sample(f, "edm", "0-6", (1, 8, 8), batch_size=7, stats=st, **run)
    assert st["nfe"] == 3  # levels 80 > 9.7 > 0.47 > 0.002; f(x, 0.002) = x costs nothing
    for batch_size in (2, 3):
        assert torch.equal(sample(f, "edm", "0-6", (1, 8, 8), batch_size=batch_size, **run), a)
    assert torch.equal(sample(f, "edm", [5, 2], (1, 8, 8), **run), a[[5, 2]])
    net = _random(CTDiT(image_shape=(1, 8, 8), **TINY_DIT))  # a network: bit-identical run to run
    b = sample(net, "edm", "0-6", (1, 8, 8), batch_size=3, **run)
    assert torch.equal(sample(net, "edm", "0-6", (1, 8, 8), batch_size=3, **run), b)
    assert (sample(net, "edm", "0-6", (1, 8, 8), batch_size=7, **run) - b).abs().max() <= 1e-5
    one = sample(net, "edm", "0-6", (1, 8, 8), sampler="consistency", steps=1)
    with torch.no_grad():
        assert torch.equal(one, net(80 * seed_noise("0-6", (1, 8, 8)), 80.0).clamp(-1, 1))
    assert not torch.allclose(one, b)
    x_T = 80 * seed_noise("0-2", (1, 8, 8))
    z1, z2 = consistency_noise(x_T, 1), consistency_noise(x_T, 2)
    assert torch.equal(consistency_noise(x_T[1:], 1), z1[1:]) and not torch.equal(z1, z2)
    assert abs(float(z1.mean())) < 0.2 and abs(float(z1.std()) - 1) < 0.2


# ---------------------------------------------------------------------------- consistency distillation on 8 digits

#: the recipe of configs/model/digits_cd.yaml (1,200 steps at batch 1024: the bulk of this file's time)
# lr 3e-3 for 1,200 steps: RP vs the teacher's ODE 0.930 / 0.915 / 0.935 over training seeds 0 / 1 / 2 on one CPU;
# the earlier lr 7e-3 for 600 steps gave 0.89 / 0.86 / 0.915 there (it passed the bar on another CPU's rounding)
CD_RECIPE = dict(patch_size=8, hidden_size=64, depth=2, num_heads=4, mlp_ratio=8.0, schedule="fixed", s1=10,
                 mu0=0.0, distance="pseudo_huber", index_sampling="uniform", weighting="ict", lr=3e-3,
                 warmup_steps=50, lr_decay="cosine", ema_halflife_kimg=40)


@pytest.fixture(scope="module")
def cd_checkpoint(tmp_path_factory, one_thread_module):
    """CD of ``optimal:`` (the optimal denoiser of the student's 8 digits) into a single-token DiT."""
    tmp = tmp_path_factory.mktemp("cd")
    torch.manual_seed(0)
    dm = SubsetDataModule(**DIGITS8, batch_size=1024, val_seeds=8)
    m = CDDiT(teacher="optimal:", image_shape=(1, 8, 8), **CD_RECIPE)
    trainer = L.Trainer(max_steps=1200, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu", default_root_dir=str(tmp))
    trainer.fit(m, dm)
    trainer.save_checkpoint(tmp / "cd.ckpt")
    return tmp / "cd.ckpt"


def test_cd_of_the_optimal_denoiser_lands_in_one_step_on_the_images_its_ode_reaches(cd_checkpoint, tmp_path):
    seeds = ["--seeds", "0-199", "--no-progress"]
    ev.main(["sample", str(cd_checkpoint), "--sampler", "consistency", "--steps", "1", "--out", str(tmp_path / "a"),
             *seeds])
    ev.main(["sample", "optimal:digits?size=8&subset_seed=0", "--sampler", "heun", "--steps", "18",
             "--out", str(tmp_path / "b"), *seeds])
    res = ev.main(["--pair", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "ab"), "--no-wandb",
                   *seeds])
    assert res["rp"] >= 0.9, res


def test_a_cd_checkpoint_is_a_denoiser_and_records_its_procedure_and_teacher(cd_checkpoint):
    meta = load_checkpoint(cd_checkpoint)[CKPT_KEY]
    assert preset_class(meta["class_path"]) is CDDiT and meta["class_path"] == "lightning_repro.module.CDDiT"
    assert (meta["procedure"], meta["arch"], meta["precond"], meta["discretisation_steps"]) == ("cd", "dit",
                                                                                                 "consistency", 10)
    assert meta["teacher"] == "optimal:" and meta["teacher_provenance"]["size"] == 8
    assert len(meta["teacher_sha256"]) == 64 and meta["hparams"]["val_sampler"] == "consistency"
    den, kernel = load_denoiser(cd_checkpoint)
    x = torch.randn(3, 1, 8, 8)
    assert isinstance(den, ConsistencyPrecond) and kernel.name == "edm" and torch.equal(den(x, 0.002), x)


def test_a_diffusion_checkpoint_initialises_student_ema_and_target_and_the_target_follows_mu(tmp_path):
    """CM's CD starts from the teacher's weights: ``init_from`` a DiT (EDM preconditioning) checkpoint of the same
    network; every parameter is then trained, and ``update_target`` is ``theta- <- mu theta- + (1 - mu) theta``."""
    teacher = DiT(image_shape=(1, 8, 8), **TINY_DIT)
    _random(teacher)
    ckpt = {"state_dict": teacher.state_dict()}
    teacher.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "dit.ckpt")
    m = CDDiT(teacher="optimal:", image_shape=(1, 8, 8), mu0=0.5, init_from=str(tmp_path / "dit.ckpt"), **TINY_DIT)
    m.load_init_weights()
    for net in (m.model, m.ema, m.target):
        assert all(torch.equal(a, b) for a, b in zip(net.net.state_dict().values(), teacher.ema.net.state_dict().values()))
    assert m.trainable_patterns == ["*"] and m.parameter_counts()[0] == m.parameter_counts()[1] - 32  # but pos_embed
    before = [p.clone() for p in m.target.parameters()]
    with torch.no_grad():
        for p in m.model.parameters():
            p.add_(1.0)
    m.update_target(0.5)
    for t, b, p in zip(m.target.parameters(), before, m.model.parameters()):
        torch.testing.assert_close(t, 0.5 * b + 0.5 * p)


# ---------------------------------------------------------------------------- one-sentence errors


def test_bad_teachers_procedures_and_distances_are_one_sentence():
    cd = CDDiT(teacher="optimal:", image_shape=(3, 8, 8), **TINY_DIT)
    with pytest.raises(ValueError, match=r"^teacher optimal: makes 1x8x8 images but the student's data are 3x8x8"):
        cd.load_teacher(DIGITS8, "cpu")
    cd = CDDiT(teacher="optimal:", image_shape=(1, 8, 8), num_classes=10, **TINY_DIT)
    with pytest.raises(ValueError, match=r"^teacher optimal: has 0 classes but the student's data have 10"):
        cd.load_teacher(DIGITS8, "cpu")
    with pytest.raises(ValueError, match=r"^consistency distillation needs a teacher \(model teacher: "):
        CDDiT(image_shape=(1, 8, 8), **TINY_DIT)
    with pytest.raises(ValueError, match=r"^Unknown distance 'l1'; valid ones are: pseudo_huber, l2\.$"):
        CTDiT(distance="l1", **TINY_DIT)
    with pytest.raises(ValueError, match=r"^Unknown distance 'lpips' \(LPIPS needs pretrained VGG / AlexNet weights"):
        CTDiT(distance="lpips", **TINY_DIT)
    with pytest.raises(ValueError, match=r"^a consistency model lives in the EDM variable: kernel must be 'edm'"):
        CTDiT(kernel="vp", **TINY_DIT)
    with pytest.raises(ValueError, match=r"needs the number of training steps K: set trainer.max_steps"):
        CTDiT(**TINY_DIT).discretisation(0)
