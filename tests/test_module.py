"""DiffusionModule: every preset x kernel overfits one fixed batch; EMA; conditioning; loading."""

import pytest
import torch

from lightning_repro.data import get_source
from lightning_repro.module import DDPM, EDM, DiT, UViT

TINY = {
    "ddpm": (DDPM, dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)),
    "edm": (EDM, dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)),
    "uvit": (UViT, dict(patch_size=2, embed_dim=32, depth=2, num_heads=2)),
    "dit": (DiT, dict(patch_size=2, hidden_size=32, depth=2, num_heads=2)),
}
KERNELS = ["vp", "vp_discrete", "subvp", "ve", "edm"]


def tiny(arch, kernel="edm", num_classes=0, **kw):
    cls, cfg = TINY[arch]
    return cls(kernel=kernel, image_shape=(1, 8, 8), num_classes=num_classes, **cfg, **kw)


@pytest.fixture(scope="module")
def batch():
    src = get_source("digits")
    return src.images[:8], src.labels[:8]


def overfit(m, x0, labels, max_steps=500, lr=3e-3):
    """Adam on one fixed batch (fixed sigma and noise) until the loss fell 10x or max_steps."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    sigma = m.kernel.sample_sigma(len(x0), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    opt = torch.optim.Adam(m.model.parameters(), lr=lr)
    with torch.no_grad():
        first = m.loss_fn(x0, labels, sigma, noise).item()
    for step in range(max_steps):
        loss = m.loss_fn(x0, labels, sigma, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 24:
            with torch.no_grad():
                last = m.loss_fn(x0, labels, sigma, noise).item()
            if last < first / 10:
                break
    return first, last


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("arch", list(TINY))
def test_every_preset_and_kernel_overfits_one_batch(arch, kernel, batch):
    torch.set_num_threads(1)
    m = tiny(arch, kernel)
    first, last = overfit(m, batch[0], None)
    assert last < first / 10, (first, last)


@pytest.mark.parametrize("arch", list(TINY))
def test_conditional_overfits_and_uses_labels(arch, batch):
    torch.set_num_threads(1)
    x0, labels = batch
    m = tiny(arch, "edm", num_classes=10)
    first, last = overfit(m, x0, labels)
    assert last < first / 10, (first, last)
    x = torch.randn(4, 1, 8, 8)
    a = m.model(x, 1.0, torch.tensor([0, 1, 2, 3]))
    b = m.model(x, 1.0, torch.tensor([4, 5, 6, 7]))
    assert (a - b).abs().max() > 1e-4
    u = tiny(arch, "edm")  # unconditional ignores labels
    assert torch.equal(u.model(x, 1.0, torch.tensor([0, 1, 2, 3])), u.model(x, 1.0, None))


def test_default_preconditionings():
    assert tiny("edm", "edm").precond_name == "edm"
    assert tiny("edm", "vp").precond_name == "eps"
    assert tiny("ddpm", "vp_discrete").precond_name == "ddpm"
    assert tiny("dit", "ve").precond_name == "eps"


def test_ema_follows_halflife():
    m = tiny("edm")
    with torch.no_grad():
        for p in m.model.parameters():
            p.add_(1.0)
    before = [p.clone() for p in m.ema.parameters()]
    m.update_ema(0.75)
    for e, b, p in zip(m.ema.parameters(), before, m.model.parameters()):
        assert torch.allclose(e, 0.75 * b + 0.25 * p)
    # EDM: beta = 0.5 ** (batch / halflife_images); ramp-up limits the half-life early on
    m2 = tiny("edm", ema_halflife_kimg=0.5, ema_rampup_ratio=None)
    assert abs(m2.ema_beta() - 0.5 ** (1 / 500)) < 1e-12


def test_label_dropout_uses_null_class():
    m = tiny("dit", num_classes=10, label_dropout=1.0)
    x0 = torch.zeros(5, 1, 8, 8)
    _, _, lab = m.draw_noise(x0, torch.arange(5), torch.Generator().manual_seed(0))
    assert torch.all(lab == -1)


def test_bad_image_size_is_one_sentence():
    with pytest.raises(ValueError, match="not divisible"):
        EDM(image_shape=(1, 6, 6), model_channels=16, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[])
    with pytest.raises(ValueError, match="Unknown kernel 'foo'"):
        tiny("edm", "foo")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import lightning as L

    from lightning_repro.data import SubsetDataModule

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("ckpt")
    m = tiny("edm", "vp")
    dm = SubsetDataModule("digits", size=32, batch_size=8, val_seeds=4)
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, precision="bf16-mixed", default_root_dir=str(tmp))
    trainer.fit(m, dm)
    path = tmp / "m.ckpt"
    trainer.save_checkpoint(path)
    return m, path


def test_bf16_mixed_training_and_load_denoiser(trained):
    from lightning_repro.kernels import VPKernel
    from lightning_repro.module import load_denoiser

    m, path = trained
    assert m.global_step == 4 and all(torch.isfinite(p).all() for p in m.model.parameters())
    den, kernel = load_denoiser(path)
    assert isinstance(kernel, VPKernel) and not den.training
    assert den.checkpoint_meta["size"] == 32 and den.checkpoint_meta["arch"] == "edm"
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(den(x, 2.0), m.ema.float().eval()(x, 2.0))
    # the EMA moved away from the raw weights' initial copy but is not the raw model
    assert any(not torch.equal(a, b) for a, b in zip(den.parameters(), m.model.parameters()))


def test_truncated_or_missing_checkpoint_is_one_sentence(trained, tmp_path):
    from lightning_repro.module import load_denoiser

    _, path = trained
    bad = tmp_path / "cut.ckpt"
    bad.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"checkpoint .*cut.ckpt could not be read \(truncated or not a "):
        load_denoiser(bad)
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*nope.ckpt does not exist"):
        load_denoiser(tmp_path / "nope.ckpt")


# -- the loss, the presets' names, the public namespace ---------------------------------------------------------
def test_denoising_loss_is_its_draws_then_the_weighted_error(batch):
    """``DenoisingLoss`` = draw (sigma, noise, label dropout) from the step generator, then lambda(sigma) ||D - x0||^2."""
    x0, labels = batch
    m = tiny("edm", "vp", num_classes=10, label_dropout=0.5)
    with torch.no_grad():
        loss = m.loss(m.denoise, x0, labels, torch.Generator().manual_seed(3))
        sigma, noise, lab = m.draw_noise(x0, labels, torch.Generator().manual_seed(3))
        assert torch.equal(loss, m.loss_fn(x0, lab, sigma, noise))
        g = torch.Generator().manual_seed(3)  # the draw order: sigma, noise, then the dropout coin of each label
        assert torch.equal(sigma, m.kernel.sample_sigma(8, generator=g))
        assert torch.equal(noise, torch.randn(x0.shape, generator=g))
        assert torch.equal(lab == -1, torch.rand(8, generator=g) < 0.5) and bool((lab == -1).any())
        D = m.model(x0 + sigma.view(-1, 1, 1, 1) * noise, sigma, lab)
        w = m.kernel.loss_weight(sigma.double()).float().view(-1, 1, 1, 1)
        assert torch.allclose(loss, (w * (D - x0) ** 2).mean(), rtol=1e-6)


def test_ddpmpp_is_the_network_the_old_name_edm_builds(recwarn):
    """``EDM`` is the deprecated name of ``DDPMpp``: the same network and weights, its own arch / class path, one
    FutureWarning per process; checkpoints of either name fit the other (init_from, --ckpt_path)."""
    from lightning_repro import presets
    from lightning_repro.module import DDPMpp, preset_class

    presets._warned.clear()
    torch.manual_seed(0)
    new = DDPMpp(**TINY["edm"][1])
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]
    torch.manual_seed(0)
    old = EDM(**TINY["edm"][1])
    EDM(**TINY["edm"][1])
    warned = [w for w in recwarn if issubclass(w.category, FutureWarning)]
    assert len(warned) == 1 and "now called DDPMpp" in str(warned[0].message)
    assert isinstance(old, DDPMpp) and old.state_dict().keys() == new.state_dict().keys()
    assert all(torch.equal(v, new.state_dict()[k]) for k, v in old.state_dict().items())
    assert (new.arch, new.class_path(), old.arch, old.class_path()) == (
        "ddpmpp", "lightning_repro.module.DDPMpp", "edm", "lightning_repro.module.EDM")
    meta = {"kernel": "edm", "precond": "edm", "hparams": dict(new.hparams)}
    new.check_compatible({**meta, "arch": "edm", "class_path": "lightning_repro.module.EDM"}, "old.ckpt")
    old.check_compatible({**meta, "arch": "ddpmpp", "class_path": "lightning_repro.module.DDPMpp"}, "new.ckpt")
    with pytest.raises(ValueError, match=r"holds a 'dit' model .* but this model is 'ddpmpp'"):
        new.check_compatible({**meta, "arch": "dit", "class_path": "lightning_repro.module.DiT"}, "dit.ckpt")
    assert preset_class("lightning_repro.module.EDM") is EDM and preset_class("lightning_repro.module.DDPMpp") is DDPMpp
    assert preset_class("lightning_repro.presets.DDPMpp") is DDPMpp  # the defining file's path works too


def test_module_reexports_the_public_names_and_nets_keep_their_old_names():
    import lightning_repro.module as module
    from lightning_repro import checkpoints, diffusion_module, losses, presets
    from lightning_repro.nets import dit, uvit

    for name in module.__all__:
        homes = [m for m in (checkpoints, diffusion_module, losses, presets) if hasattr(m, name)]
        assert homes and getattr(module, name) is getattr(homes[0], name), name
    assert (module.DDPM, module.EDM, module.UViT, module.DiT) == (DDPM, EDM, UViT, DiT)
    assert dit.DiT is dit.DiTNet and uvit.UViT is uvit.UViTNet and DiT is not dit.DiTNet
    assert set(module.ARCHS) == {"ddpm", "ddpmpp", "edm", "uvit", "dit", "multistage", "progressive"}
    assert module.ARCHS["edm"] is EDM


def test_a_checkpoint_of_the_old_name_initialises_and_rebuilds_under_either_name(tmp_path):
    """``init_from`` an ``EDM`` checkpoint (``arch: edm``, ``lightning_repro.module.EDM``) into a ``DDPMpp``, and a
    ``DDPMpp`` checkpoint rebuilt by ``module_from_checkpoint`` / ``load_denoiser``: the same weights throughout."""
    from lightning_repro.module import CKPT_KEY, DDPMpp, load_denoiser, module_from_checkpoint

    cfg = dict(TINY["edm"][1], image_shape=(1, 8, 8))
    old = EDM(**cfg)
    with torch.no_grad():
        for p in old.ema.parameters():
            p.add_(0.5)  # an EMA that differs from a fresh initialisation
    ckpt = {"state_dict": old.state_dict()}
    old.on_save_checkpoint(ckpt)
    assert (ckpt[CKPT_KEY]["arch"], ckpt[CKPT_KEY]["class_path"]) == ("edm", "lightning_repro.module.EDM")
    torch.save(ckpt, tmp_path / "old.ckpt")
    new = DDPMpp(**cfg, init_from=str(tmp_path / "old.ckpt"), trainable=["*"])
    new.load_init_weights()
    assert all(torch.equal(a, b) for a, b in zip(new.model.state_dict().values(), old.ema.state_dict().values()))
    ckpt = {"state_dict": new.state_dict()}
    new.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "new.ckpt")
    rebuilt = module_from_checkpoint(tmp_path / "new.ckpt")
    den, _ = load_denoiser(tmp_path / "new.ckpt")
    assert type(rebuilt) is DDPMpp and den.checkpoint_meta["arch"] == "ddpmpp"
    assert all(torch.equal(a, b) for a, b in zip(den.state_dict().values(), old.ema.state_dict().values()))
