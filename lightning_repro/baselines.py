"""GAN and VAE baselines: the "other generative models" of Zhang et al. (ICML 2024, Sec. 2.3, Fig. 3).

The paper contrasts diffusion models with GANs and VAEs: two diffusion models trained with different seeds
and sampled from the same noise with a deterministic sampler produce nearly the same images (high RP),
whereas two GANs (or two VAEs) trained with different seeds and fed the *same* latent codes produce
unrelated images (low RP): their latent-to-image maps are arbitrary up to the symmetries of the prior.

* ``DCGAN`` (Radford et al. 2016; networks in ``nets/gan.py``): manual optimisation with two Adam optimisers
  (lr 2e-4, betas (0.5, 0.999), the DCGAN paper's), one discriminator step then one generator step per batch,
  with the non-saturating loss of Goodfellow et al. (2014, Sec. 3):
  ``L_D = -log sigmoid(D(x)) - log(1 - sigmoid(D(G(z))))``, ``L_G = -log sigmoid(D(G(z)))``
  (``discriminator_loss``, ``generator_loss``; softplus forms, stable for any logit).
  Lightning counts every optimiser step in ``trainer.global_step``, so ``max_steps`` of a ``DCGAN`` run is
  ``DCGAN.optimizer_steps_per_batch = 2`` times its number of iterations.
* ``VAE`` (Kingma & Welling 2014; networks in ``nets/vae.py``): minimises the negative ELBO per image,
  ``-log p(x | z) + beta * KL(q(z | x) || N(0, I))`` with one reparameterised draw ``z = mu + exp(logvar / 2) eps``
  (Eq. 10 with the closed-form KL of App. B, ``kl_standard_normal``), averaged over the batch.  The
  likelihood is ``gaussian`` (mean ``tanh(h)``, fixed std ``obs_sigma``: ``gaussian_nll``, with its constant)
  or ``bernoulli`` (the pixel in [0, 1] as the target of a Bernoulli with logits ``2 h``, i.e. mean
  ``(tanh(h) + 1) / 2``: ``bernoulli_nll``, a cross-entropy that is a proper likelihood on binary images and
  "Bernoulli-like" on grey ones).  ``beta = 1`` is the ELBO; other values the beta-VAE of Higgins et al. 2017.

Both take ``latent_dim``, ``seed``, ``image_shape`` and have ``generate(z) -> images in [-1, 1]`` (GAN: the
generator in eval mode, i.e. batch norm with its running statistics; VAE: the decoder mean, deterministic)
and ``sample(seeds)``, which generates from ``latent_codes(seeds, latent_dim)`` = ``seed_noise(seeds,
(latent_dim,))``: the latent code of a seed is the same for every model (the suite's "noise is a function
of the seed" invariant), and with ``latent_dim = C * H * W`` it is exactly the flattened initial noise the
diffusion models of the same seed start from.  The training draws (latent batches, reparameterisation noise)
of step ``k`` come from a generator seeded by ``(seed, k)``, and the initial weights from
``seed_everything(seed)``, so a seeded run is reproducible.

Checkpoints carry the same ``lightning_repro`` metadata as ``DiffusionModule``'s; ``load_baseline(path)``
rebuilds the module from a ``weights_only=True`` load.  Data: ``SubsetDataModule`` (batches ``(images in
[-1, 1], labels)``; labels are ignored).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from .nets.gan import DCGANDiscriminator, DCGANGenerator
from .nets.vae import VAEDecoder, VAEEncoder
from .sampling import seed_noise

__all__ = [
    "DCGAN",
    "VAE",
    "BASELINES",
    "latent_codes",
    "discriminator_loss",
    "generator_loss",
    "kl_standard_normal",
    "gaussian_nll",
    "bernoulli_nll",
    "load_baseline",
]

CKPT_KEY = "lightning_repro"  # the checkpoint metadata key of module.py
LIKELIHOODS = ("gaussian", "bernoulli")


# -- latent codes and losses -------------------------------------------------------------------
def latent_codes(seeds: str | int | Sequence[int] | Tensor, latent_dim: int) -> Tensor:
    """``(len(seeds), latent_dim)`` standard normal codes; row ``i`` depends only on ``seeds[i]`` (``seed_noise``)."""
    return seed_noise(seeds, (int(latent_dim),))


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """``mean(-log sigmoid(D(x))) + mean(-log(1 - sigmoid(D(G(z)))))`` (Goodfellow et al. 2014, Eq. 1)."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss ``mean(-log sigmoid(D(G(z))))`` (Goodfellow et al. 2014, Sec. 3)."""
    return F.softplus(-fake_logits).mean()


def kl_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """``KL(N(mu, diag(exp(logvar))) || N(0, I))`` per row: ``0.5 * sum(mu^2 + exp(logvar) - 1 - logvar)``
    (Kingma & Welling 2014, App. B)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def gaussian_nll(mean: Tensor, x: Tensor, sigma: float) -> Tensor:
    """``-log N(x; mean, sigma^2 I)`` per image, summed over pixels (with the ``log(2 pi sigma^2) / 2`` constant)."""
    d = x[0].numel()
    sq = (x - mean).pow(2).flatten(1).sum(1)
    return sq / (2.0 * sigma**2) + 0.5 * d * math.log(2.0 * math.pi * sigma**2)


def bernoulli_nll(logits: Tensor, x: Tensor) -> Tensor:
    """``-sum log Bernoulli((x + 1) / 2; sigmoid(logits))`` per image for ``x`` in [-1, 1] (cross-entropy)."""
    target = ((x + 1.0) / 2.0).clamp(0.0, 1.0)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).sum(1)


# -- modules ------------------------------------------------------------------------------------
class _Baseline(L.LightningModule):
    """What the GAN and VAE share: seeded step generator, latent codes, ``generate`` / ``sample``, metadata."""

    arch: str = "baseline"

    def _init_common(self, latent_dim: int, image_shape: Sequence[int], seed: int) -> None:
        self.latent_dim = int(latent_dim)
        self.image_shape = tuple(int(v) for v in image_shape)
        if len(self.image_shape) != 3 or self.image_shape[1] != self.image_shape[2]:
            raise ValueError(f"image_shape must be (C, H, W) with H == W, got {tuple(image_shape)}.")
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim!r}.")
        self.seed = int(seed)

    def step_generator(self, step: int, device) -> torch.Generator:
        """Generator of the training draws of step ``step``, seeded by ``(seed, step)``."""
        g = torch.Generator(device=device)
        g.manual_seed((self.seed * 1_000_003 + int(step)) * 1009 + 17)
        return g

    def decode(self, z: Tensor) -> Tensor:  # latent codes -> images, in the current train/eval mode
        raise NotImplementedError

    @torch.no_grad()
    def generate(self, z: Tensor, batch_size: int = 1024) -> Tensor:
        """Images in [-1, 1] (float32, CPU) from latent codes ``z`` ``(B, latent_dim)``, in eval mode."""
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"{type(self).__name__}.generate: expected z of shape (B, {self.latent_dim}), "
                             f"got {tuple(z.shape)}.")
        was_training = self.training
        self.eval()
        try:
            dev = next(self.parameters()).device
            out = [self.decode(z[i : i + batch_size].to(dev)).float().clamp(-1, 1).cpu()
                   for i in range(0, len(z), batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(out)

    def sample(self, seeds: str | int | Sequence[int] | Tensor, batch_size: int = 1024) -> Tensor:
        """``generate(latent_codes(seeds, latent_dim))``: the same seed gives every model the same code."""
        return self.generate(latent_codes(seeds, self.latent_dim), batch_size=batch_size)

    def run_config(self, dm=None) -> dict[str, Any]:
        """The keys a run carries (W&B config, checkpoint metadata), as ``DiffusionModule.run_config``."""
        if dm is None and self._trainer is not None:
            dm = getattr(self.trainer, "datamodule", None)
        cfg: dict[str, Any] = {"arch": self.arch, "image_shape": list(self.image_shape),
                               "latent_dim": self.latent_dim, "seed": self.seed}
        if dm is not None and hasattr(dm, "describe"):
            d = dm.describe()
            cfg.update(size=d["size"], subset_seed=d["subset_seed"], source=d["source"])
        return cfg

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        cls = type(self)
        hparams = {k: v for k, v in self.hparams.items() if not k.startswith("_")}
        checkpoint[CKPT_KEY] = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "hparams": hparams,
                                **self.run_config()}


class DCGAN(_Baseline):
    """DCGAN (Radford et al. 2016) trained with the non-saturating loss and manual optimisation.

    Args:
        latent_dim: size of the latent code z ~ N(0, I).
        image_shape: C, H, W with H = W = 4 * 2^k.
        base_channels: generator width at R / 2 and discriminator width after its input layer.
        extra_layers: 3 x 3 conv layers at R / 2 in each network (see ``nets/gan.py``).
        lr, betas: both Adam optimisers (DCGAN: 2e-4, (0.5, 0.999)).
        seed: initial weights (via ``seed_everything`` in the trainer script) and training draws.
    """

    arch = "dcgan"
    #: Lightning increments ``global_step`` once per optimiser step: one iteration is two steps.
    optimizer_steps_per_batch = 2

    def __init__(self, latent_dim: int = 100, image_shape: Sequence[int] = (1, 8, 8), base_channels: int = 64,
                 extra_layers: int = 0, lr: float = 2e-4, betas: Sequence[float] = (0.5, 0.999), seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self._init_common(latent_dim, image_shape, seed)
        self.automatic_optimization = False
        c, r, _ = self.image_shape
        self.generator = DCGANGenerator(self.latent_dim, r, c, base_channels, extra_layers)
        self.discriminator = DCGANDiscriminator(r, c, base_channels, extra_layers)

    def decode(self, z: Tensor) -> Tensor:
        return self.generator(z)

    def iteration(self) -> int:
        """Training iterations done (``global_step / 2``)."""
        return int(self.global_step) // self.optimizer_steps_per_batch

    def training_step(self, batch, batch_idx):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        opt_g, opt_d = self.optimizers()
        g = self.step_generator(self.iteration(), x.device)
        z = torch.randn((x.shape[0], self.latent_dim), generator=g, device=x.device, dtype=x.dtype)
        fake = self.generator(z)
        # discriminator step: real -> 1, fake -> 0 (the generator is not updated: fake is detached)
        loss_d = discriminator_loss(self.discriminator(x), self.discriminator(fake.detach()))
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(loss_d)
        opt_d.step()
        # generator step: non-saturating loss through the freshly updated discriminator
        loss_g = generator_loss(self.discriminator(fake))
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss_g)
        opt_g.step()
        self.log_dict({"train/loss": loss_d.detach(), "train/loss_d": loss_d.detach(),
                       "train/loss_g": loss_g.detach()}, prog_bar=True)
        return None

    def configure_optimizers(self):
        betas = tuple(float(b) for b in self.hparams.betas)
        lr = float(self.hparams.lr)
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=lr, betas=betas)
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=betas)
        return [opt_g, opt_d]


class VAE(_Baseline):
    """VAE (Kingma & Welling 2014) with a convolutional encoder / decoder, trained on the (beta-)ELBO.

    Args:
        latent_dim: size of z; prior N(0, I).
        image_shape: C, H, W with H = W = 4 * 2^k.
        base_channels: width of the first encoder stage (doubled at each halving of the resolution).
        beta: weight of the KL term (1: the ELBO).
        likelihood: ``gaussian`` (fixed std ``obs_sigma`` in [-1, 1] pixel units) or ``bernoulli``.
        lr: Adam learning rate.
        seed: initial weights (via ``seed_everything``) and reparameterisation noise.
    """

    arch = "vae"
    optimizer_steps_per_batch = 1

    def __init__(self, latent_dim: int = 64, image_shape: Sequence[int] = (1, 8, 8), base_channels: int = 32,
                 beta: float = 1.0, likelihood: str = "gaussian", obs_sigma: float = 0.1, lr: float = 1e-3,
                 seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self._init_common(latent_dim, image_shape, seed)
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"VAE likelihood must be one of {', '.join(LIKELIHOODS)}, got {likelihood!r}.")
        if not obs_sigma > 0 or not beta >= 0:
            raise ValueError(f"VAE needs obs_sigma > 0 and beta >= 0, got obs_sigma={obs_sigma!r}, beta={beta!r}.")
        self.likelihood, self.obs_sigma, self.beta = likelihood, float(obs_sigma), float(beta)
        c, r, _ = self.image_shape
        self.encoder = VAEEncoder(self.latent_dim, r, c, base_channels)
        self.decoder = VAEDecoder(self.latent_dim, r, c, base_channels)

    def decode(self, z: Tensor) -> Tensor:
        """The decoder mean ``tanh(h(z))`` (deterministic)."""
        return self.decoder.mean(z)

    def reconstruction_nll(self, logits: Tensor, x: Tensor) -> Tensor:
        """``-log p(x | z)`` per image from the decoder logits ``h``."""
        if self.likelihood == "gaussian":
            return gaussian_nll(logits.tanh(), x, self.obs_sigma)
        return bernoulli_nll(2.0 * logits, x)

    def negative_elbo(self, x: Tensor, eps: Tensor) -> dict[str, Tensor]:
        """Per-image ``recon`` (-log p(x|z)), ``kl`` and ``loss = recon + beta kl`` for the draw ``eps``."""
        mu, logvar = self.encoder(x)
        z = mu + (0.5 * logvar).exp() * eps
        recon = self.reconstruction_nll(self.decoder(z), x)
        kl = kl_standard_normal(mu, logvar)
        return {"recon": recon, "kl": kl, "loss": recon + self.beta * kl}

    def training_step(self, batch, batch_idx):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        g = self.step_generator(self.global_step, x.device)
        eps = torch.randn((x.shape[0], self.latent_dim), generator=g, device=x.device, dtype=x.dtype)
        terms = {k: v.mean() for k, v in self.negative_elbo(x, eps).items()}
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, prog_bar=True)
        return terms["loss"]

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=float(self.hparams.lr))


BASELINES: dict[str, type[_Baseline]] = {"dcgan": DCGAN, "vae": VAE}


def load_baseline(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> _Baseline:
    """Rebuild a ``DCGAN`` / ``VAE`` from its checkpoint (read with ``weights_only=True``), in eval mode."""
    from .module import load_checkpoint

    ckpt = load_checkpoint(path)
    meta = ckpt[CKPT_KEY]
    name = str(meta.get("class_path", "")).rsplit(".", 1)[-1]
    classes = {cls.__name__: cls for cls in BASELINES.values()}
    if name not in classes or not str(meta.get("class_path", "")).startswith(f"{__name__}."):
        raise ValueError(f"checkpoint {path} holds a {meta.get('class_path')!r}, not a GAN / VAE baseline "
                         f"(expected one of {', '.join(sorted(classes))}).")
    module = classes[name](**meta["hparams"])
    module.load_state_dict(ckpt["state_dict"])
    module.checkpoint_meta = meta
    return module.to(map_location).eval()
