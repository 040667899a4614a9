"""GAN / VAE baselines (Sec. 2.3, Fig. 3): network shapes at 8 x 8 and 32 x 32, the loss formulas on constructed
cases, seeded latent codes, deterministic generation, manual optimisation of the DCGAN, reproducible seeded
training with checkpoints rebuilt by ``load_baseline``, and the ``--quick`` contrast study's CSV / PNG / W&B run."""

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image
from torch.distributions import Bernoulli, Normal, kl_divergence
from wandb_offline import read_offline_run

from lightning_repro.baselines import (
    DCGAN,
    VAE,
    bernoulli_nll,
    discriminator_loss,
    gaussian_nll,
    generator_loss,
    kl_standard_normal,
    latent_codes,
    load_baseline,
)
from lightning_repro.nets.gan import DCGANDiscriminator, DCGANGenerator, num_stages
from lightning_repro.nets.vae import VAEDecoder, VAEEncoder
from lightning_repro.sampling import seed_noise
from lightning_repro.studies import TrainJob, run_training_jobs
from lightning_repro.studies import baselines as study

ROOT = Path(__file__).resolve().parents[1]
YAML = ROOT / "configs" / "studies" / "gan_vae_contrast.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# -- networks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("res,channels,stages", [(8, 1, 1), (32, 3, 3)])
def test_network_shapes_at_digits_and_cifar_resolution(res, channels, stages):
    assert num_stages(res) == stages
    z = torch.randn(5, 12)
    g = DCGANGenerator(12, res, channels, base_channels=8, extra_layers=1)
    x = g(z)
    assert x.shape == (5, channels, res, res) and x.abs().max() < 1  # Tanh output
    d = DCGANDiscriminator(res, channels, base_channels=8, extra_layers=1)
    assert d(x).shape == (5,)
    # one up-sampling (down-sampling) stage per doubling from 4 x 4: k stride-2 layers plus the 4 x 4 projection
    ups = [m for m in g.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(ups) == stages + 1 and ups[0].stride == (1, 1)
    downs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert len(downs) == stages
    # Radford et al.: no batch norm on the generator output or the discriminator input layer
    assert isinstance(g.main[-1], torch.nn.Tanh) and isinstance(g.main[-2], torch.nn.ConvTranspose2d)
    assert isinstance(d.main[1], torch.nn.LeakyReLU) and d.main[1].negative_slope == 0.2
    enc, dec = VAEEncoder(12, res, channels, 4), VAEDecoder(12, res, channels, 4)
    mu, logvar = enc(x)
    assert mu.shape == logvar.shape == (5, 12)
    assert dec(mu).shape == (5, channels, res, res) and dec.mean(mu).abs().max() < 1


def test_networks_reject_bad_sizes_with_one_sentence():
    with pytest.raises(ValueError, match=r"DCGAN needs a square image of side 4 \* 2\^k >= 8.*got 12"):
        DCGANGenerator(8, 12, 1)
    with pytest.raises(ValueError, match=r"expected x of shape \(B, 1, 8, 8\), got \(2, 1, 16, 16\)"):
        DCGANDiscriminator(8, 1, 4)(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"expected z of shape \(B, 8\), got \(2, 7\)"):
        VAEDecoder(8, 8, 1, 4)(torch.zeros(2, 7))
    with pytest.raises(ValueError, match="likelihood must be one of gaussian, bernoulli"):
        VAE(likelihood="laplace")


# -- latent codes and generation ----------------------------------------------------------------
def test_same_seed_gives_the_same_latent_for_every_model():
    z = latent_codes([3, 5, 7], 64)
    assert torch.equal(z[1:2], latent_codes([5], 64))  # a function of the seed, not of the batch
    assert not torch.equal(z[0], z[1])
    # latent_dim = C*H*W: the code of a seed is exactly the diffusion models' flattened initial noise
    assert torch.equal(z, seed_noise([3, 5, 7], (1, 8, 8)).flatten(1))
    gan, vae = DCGAN(latent_dim=16, base_channels=4), VAE(latent_dim=16, base_channels=4)
    assert torch.equal(gan.sample([3, 5]), gan.generate(latent_codes([3, 5], 16)))
    assert torch.equal(vae.sample([3, 5]), vae.generate(latent_codes([3, 5], 16)))


def test_vae_generate_is_the_deterministic_decoder_mean():
    vae = VAE(latent_dim=8, base_channels=4).train()
    z = latent_codes(range(6), 8)
    a = vae.generate(z)
    assert torch.equal(a, vae.generate(z)) and a.shape == (6, 1, 8, 8) and a.abs().max() <= 1
    assert torch.allclose(a, vae.generate(z, batch_size=4), atol=1e-6)  # row i depends on z[i] only
    assert torch.allclose(a, vae.decoder(z).tanh())
    assert vae.training  # the mode is restored


def test_gan_generate_uses_eval_mode_and_leaves_batch_norm_statistics_alone():
    torch.manual_seed(0)
    gan = DCGAN(latent_dim=8, base_channels=4).train()
    bn = next(m for m in gan.generator.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_mean.normal_()  # make eval and train mode differ visibly
    before = bn.running_mean.clone()
    z = latent_codes(range(4), 8)
    x = gan.generate(z)
    assert torch.equal(bn.running_mean, before) and gan.training
    assert torch.allclose(x, gan.generator.eval()(z))
    assert not torch.allclose(x, gan.generator.train()(z))
    with pytest.raises(ValueError, match=r"expected z of shape \(B, 8\)"):
        gan.generate(torch.zeros(2, 3))


# -- losses ---------------------------------------------------------------------------------------
def test_gan_losses_on_constructed_logits():
    zero = torch.zeros(4)
    assert discriminator_loss(zero, zero).item() == pytest.approx(2 * math.log(2))
    assert generator_loss(zero).item() == pytest.approx(math.log(2))
    real, fake = torch.tensor([3.0, -1.0]), torch.tensor([0.5, -2.0])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    assert discriminator_loss(real, fake).item() == pytest.approx(
        (bce(real, torch.ones(2)) + bce(fake, torch.zeros(2))).item()
    )
    # non-saturating: -log D(G(z)), not log(1 - D(G(z)))
    assert generator_loss(fake).item() == pytest.approx(-torch.sigmoid(fake).log().mean().item())
    assert discriminator_loss(torch.full((2,), 50.0), torch.full((2,), -50.0)).item() < 1e-12  # stable, ~0


def test_elbo_terms_have_their_closed_forms():
    assert kl_standard_normal(torch.zeros(3, 5), torch.zeros(3, 5)).tolist() == [0.0, 0.0, 0.0]
    mu, logvar = torch.tensor([[1.0, 2.0]]), torch.tensor([[math.log(2.0), 0.0]])
    assert kl_standard_normal(mu, logvar).item() == pytest.approx(3.0 - 0.5 * math.log(2.0))
    q = Normal(mu, (0.5 * logvar).exp())
    assert kl_standard_normal(mu, logvar).item() == pytest.approx(kl_divergence(q, Normal(0.0, 1.0)).sum().item())
    x, mean = torch.rand(2, 1, 8, 8) * 2 - 1, torch.rand(2, 1, 8, 8) * 2 - 1
    ref = -Normal(mean, 0.2).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(gaussian_nll(mean, x, 0.2), ref, atol=1e-3)
    xb = torch.randint(0, 2, (2, 1, 8, 8)).float() * 2 - 1  # binary images in {-1, 1}
    logits = torch.randn(2, 1, 8, 8)
    ref = -Bernoulli(logits=logits).log_prob((xb + 1) / 2).flatten(1).sum(1)
    assert torch.allclose(bernoulli_nll(logits, xb), ref, atol=1e-4)
    # the module's ELBO: recon + beta * KL, with the Bernoulli mean (tanh(h) + 1) / 2 = sigmoid(2 h)
    vae = VAE(latent_dim=4, base_channels=4, beta=0.5, likelihood="bernoulli")
    eps = torch.randn(2, 4)
    terms = vae.negative_elbo(xb, eps)
    mu, logvar = vae.encoder(xb)
    h = vae.decoder(mu + (0.5 * logvar).exp() * eps)
    ref = -Bernoulli(probs=(h.tanh() + 1) / 2).log_prob((xb + 1) / 2).flatten(1).sum(1)
    assert torch.allclose(terms["recon"], ref, atol=1e-3)
    assert torch.allclose(terms["loss"], terms["recon"] + 0.5 * kl_standard_normal(mu, logvar))


# -- training -------------------------------------------------------------------------------------
def _fit(module, iterations, seed=0, size=32):
    from lightning_repro.data import SubsetDataModule

    dm = SubsetDataModule(source="digits", size=size, batch_size=8, data_seed=seed)
    trainer = L.Trainer(max_steps=iterations * module.optimizer_steps_per_batch, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(module, datamodule=dm)
    return trainer


def test_one_dcgan_iteration_steps_both_optimisers():
    L.seed_everything(0, verbose=False)
    gan = DCGAN(latent_dim=8, base_channels=4)
    g0 = [p.detach().clone() for p in gan.generator.parameters()]
    d0 = [p.detach().clone() for p in gan.discriminator.parameters()]
    trainer = _fit(gan, 1)
    assert trainer.global_step == 2 and gan.iteration() == 1  # one D step and one G step
    opt_g, opt_d = (o.optimizer for o in gan.optimizers())
    for opt, net in ((opt_g, gan.generator), (opt_d, gan.discriminator)):
        assert isinstance(opt, torch.optim.Adam)
        assert opt.defaults["lr"] == 2e-4 and opt.defaults["betas"] == (0.5, 0.999)
        assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in net.parameters()}
        assert all(opt.state[p]["step"] == 1 for p in net.parameters())  # each optimiser stepped once
    assert all(not torch.equal(a, b) for a, b in zip(g0, gan.generator.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(d0, gan.discriminator.parameters()))
    assert {"train/loss_d", "train/loss_g"} <= set(trainer.callback_metrics)


def _job(tmp_path, cls_name, seed, tag):
    spec = {"class_path": cls_name, "init_args": {"base_channels": 4}}
    steps = 3 * (DCGAN.optimizer_steps_per_batch if cls_name == "DCGAN" else 1)
    data = dict(source="digits", size=32, subset_seed=0, batch_size=8, data_seed=seed)
    return TrainJob(f"{cls_name} {tag}", spec, (1, 8, 8), {"seed": seed, "latent_dim": 8}, data,
                    str(tmp_path / f"{cls_name}_{tag}.ckpt"), steps, {"accelerator": "cpu"}, 1, False)


@pytest.mark.parametrize("cls_name", ["DCGAN", "VAE"])
def test_seeded_training_is_reproducible_and_checkpoints_rebuild(tmp_path, cls_name):
    jobs = [_job(tmp_path, cls_name, 0, "a"), _job(tmp_path, cls_name, 0, "b"), _job(tmp_path, cls_name, 1, "c")]
    assert run_training_jobs(jobs, log=lambda _: None) == 3
    a, b, c = (load_baseline(j.ckpt) for j in jobs)
    assert type(a).__name__ == cls_name and a.seed == 0 and c.seed == 1 and not a.training
    assert a.checkpoint_meta["latent_dim"] == 8
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # same seed: the same weights
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    assert torch.equal(a.sample(range(4)), b.sample(range(4)))


def test_load_baseline_rejects_other_checkpoints(tmp_path):
    path = tmp_path / "dit.ckpt"
    meta = {"class_path": "lightning_repro.module.DiT", "hparams": {}}
    torch.save({"lightning_repro": meta, "state_dict": {}}, path)
    with pytest.raises(ValueError, match="holds a 'lightning_repro.module.DiT', not a GAN / VAE baseline"):
        load_baseline(path)


# -- the study ------------------------------------------------------------------------------------
def test_quick_study_writes_three_rp_values_and_rerun_skips_training(tmp_path, monkeypatch, capsys):
    out = tmp_path / "contrast"
    rows = study.main(["--config", str(YAML), "--quick", "--out", str(out)])
    with open(out / "gan_vae_contrast.csv") as f:
        reader = csv.DictReader(f)
        header, body = reader.fieldnames, list(reader)
    assert header == study.COLUMNS
    assert [r["family"] for r in body] == ["gan", "vae", "diffusion"]
    for r in body:
        assert 0.0 <= float(r["rp"]) <= 1.0 and -1.0 <= float(r["mean_similarity"]) <= 1.0
        assert float(r["threshold"]) == 0.97 and int(r["num_seeds"]) == study.QUICK["sample"]["seeds"]
        assert (int(r["seed_a"]), int(r["seed_b"])) == (0, 1)
        assert int(r["iterations"]) == study.QUICK["families"][r["family"]]["steps"]
    with Image.open(out / "gan_vae_contrast.png") as im:
        assert im.format == "PNG" and min(im.size) >= 200
    assert len(list((out / "checkpoints").glob("*.ckpt"))) == 6
    text = capsys.readouterr().out
    assert "RP(GAN, GAN)=" in text and "RP(VAE, VAE)=" in text and "RP(diffusion, diffusion)=" in text
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    run = read_offline_run(run_dir)
    assert run["group"] == "gan_vae_contrast" and run["summary"]["rp_gan"] == pytest.approx(rows[0]["rp"])

    def fail(*a, **k):
        raise AssertionError("a rerun must load the finished checkpoints, not train")

    monkeypatch.setattr(L.Trainer, "fit", fail)
    rows2 = study.main(["--config", str(YAML), "--quick", "--out", str(out)])
    assert capsys.readouterr().out.count("checkpoint exists, skipping training") == 6
    assert [(r["rp"], r["mae"]) for r in rows2] == [(r["rp"], r["mae"]) for r in rows]


def test_study_config_errors_are_one_sentence(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("families:\n  gan: {class_path: StyleGAN, init_args: {}, steps: 1, batch_size: 4}\n")
    with pytest.raises(SystemExit, match="error: unknown architecture 'StyleGAN'; valid architectures are: DCGAN"):
        study.main(["--config", str(bad), "--out", str(tmp_path / "o")])
    bad.write_text("seeds: [0, 0]\n")
    with pytest.raises(SystemExit, match="error: seeds must be a list of two different non-negative integers"):
        study.main(["--config", str(bad), "--out", str(tmp_path / "o")])
