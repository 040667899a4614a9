"""Convolutional VAE encoder / decoder (Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014).

Used by the VAE baseline of Zhang et al. (ICML 2024, Sec. 2.3 / Fig. 3): two VAEs trained with different
seeds, decoding the *same* latent codes, produce unrelated images (low RP), unlike two diffusion models.

* ``VAEEncoder``: ``q(z | x) = N(mu(x), diag(exp(logvar(x))))`` (Kingma & Welling, Sec. 3 / App. C.2, with
  convolutions instead of their MLP): a 3 x 3 stem, then ``Conv2d(k=4, s=2, p=1)`` stages halving the
  resolution down to 4 x 4 (doubling the channels), SiLU activations, and one linear layer to
  ``(mu, logvar)``.
* ``VAEDecoder``: the mirror image, ``z -> (B, channels, R, R)`` *logits* ``h`` (unbounded); the image mean
  is ``tanh(h)`` in (-1, 1) (``VAEDecoder.mean``).  The training module turns ``h`` into a Gaussian mean
  ``tanh(h)`` or Bernoulli-like probabilities ``sigmoid(2 h) = (tanh(h) + 1) / 2``, so both likelihoods
  share one decoder and one mean image.

Resolutions ``R = 4 * 2^k`` (8 for digits: one stage; 32 for CIFAR-10: three); no normalisation layers,
so encoder and decoder act on each image independently (the decoder mean is a deterministic function of z).
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_repro.nets.gan import num_stages
from lightning_repro.nets.uvit import check_input

__all__ = ["VAEEncoder", "VAEDecoder"]


class VAEEncoder(nn.Module):
    """``x (B, C, R, R) -> (mu, logvar)``, each ``(B, latent_dim)``."""

    def __init__(self, latent_dim: int = 64, img_resolution: int = 32, channels: int = 3, base_channels: int = 32):
        super().__init__()
        if latent_dim < 1 or base_channels < 1:
            raise ValueError(
                f"VAEEncoder: latent_dim and base_channels must be >= 1, got {latent_dim}, {base_channels}."
            )
        self.latent_dim, self.img_resolution, self.channels = int(latent_dim), int(img_resolution), int(channels)
        k = num_stages(img_resolution)
        ch = base_channels
        layers: list[nn.Module] = [nn.Conv2d(channels, ch, 3, 1, 1), nn.SiLU()]
        for _ in range(k):  # R -> 4
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1), nn.SiLU()]
            ch *= 2
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.to_moments = nn.Linear(ch * 16, 2 * latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_input("VAEEncoder", x, self.channels, self.img_resolution)
        mu, logvar = self.to_moments(self.features(x)).chunk(2, dim=1)
        return mu, logvar


class VAEDecoder(nn.Module):
    """``z (B, latent_dim) -> logits h (B, C, R, R)``; the image mean is ``tanh(h)`` (``mean``)."""

    def __init__(self, latent_dim: int = 64, img_resolution: int = 32, channels: int = 3, base_channels: int = 32):
        super().__init__()
        if latent_dim < 1 or base_channels < 1:
            raise ValueError(
                f"VAEDecoder: latent_dim and base_channels must be >= 1, got {latent_dim}, {base_channels}."
            )
        self.latent_dim, self.img_resolution, self.channels = int(latent_dim), int(img_resolution), int(channels)
        k = num_stages(img_resolution)
        ch = base_channels * 2**k
        self.top_channels = ch
        self.from_latent = nn.Linear(latent_dim, ch * 16)
        layers: list[nn.Module] = [nn.SiLU()]
        for _ in range(k):  # 4 -> R
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1), nn.SiLU()]
            ch //= 2
        layers += [nn.Conv2d(ch, channels, 3, 1, 1)]
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"VAEDecoder: expected z of shape (B, {self.latent_dim}), got {tuple(z.shape)}.")
        return self.body(self.from_latent(z).view(-1, self.top_channels, 4, 4))

    def mean(self, z: Tensor) -> Tensor:
        """The decoder mean ``tanh(h(z))``: images in (-1, 1)."""
        return self.forward(z).tanh()
