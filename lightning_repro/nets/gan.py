"""DCGAN generator and discriminator (Radford, Metz & Chintala, "Unsupervised Representation Learning with
Deep Convolutional Generative Adversarial Networks", ICLR 2016), sized from the image resolution.

Used by the GAN baseline of Zhang et al. (ICML 2024, Sec. 2.3 / Fig. 3): two GANs trained with different
seeds, fed the *same* latent codes, produce unrelated images (low RP), unlike two diffusion models.

The architecture guidelines of Radford et al. (Sec. 3): no pooling (strided convolutions in the
discriminator, fractionally-strided = transposed convolutions in the generator), batch norm in both
networks except the generator's output layer and the discriminator's input layer, ReLU in the generator
with Tanh at its output, LeakyReLU (slope 0.2) in the discriminator; weights initialised from N(0, 0.02)
(batch-norm scales from N(1, 0.02)).  As in the reference implementations the generator projects the
latent vector to a 4 x 4 map (a 4 x 4 transposed convolution) and doubles the resolution with
``ConvTranspose2d(k=4, s=2, p=1)`` until ``img_resolution``, halving the channels each time; the
discriminator mirrors it with ``Conv2d(k=4, s=2, p=1)`` down to 4 x 4 and a final 4 x 4 convolution to one
logit.  So a resolution ``R = 4 * 2^k`` (8 for digits: k = 1; 32 for CIFAR-10: k = 3, the paper's DCGAN
``64-128-256`` widths with ``base_channels=64``) gets ``k`` up / down stages, the widest ``base_channels *
2^(k-1)`` channels at 4 x 4.  ``extra_layers`` adds 3 x 3 stride-1 conv + BN + activation layers at resolution
R / 2, before the generator's output stage and after the discriminator's input stage (the
``n_extra_layers`` option of the DCGAN reference code of Arjovsky et al. 2017), useful at 8 x 8 where
``k = 1`` leaves both networks two layers deep.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from lightning_repro.nets.uvit import check_input

__all__ = ["DCGANGenerator", "DCGANDiscriminator", "num_stages", "dcgan_init_"]


def num_stages(img_resolution: int) -> int:
    """``k`` with ``img_resolution = 4 * 2^k`` (k >= 1); ValueError for other resolutions."""
    r = int(img_resolution)
    k = int(round(math.log2(r / 4))) if r >= 8 else 0
    if k < 1 or 4 * 2**k != r:
        raise ValueError(
            f"DCGAN needs a square image of side 4 * 2^k >= 8 (8, 16, 32, 64, ...), got {img_resolution}."
        )
    return k


def dcgan_init_(module: nn.Module) -> nn.Module:
    """Radford et al. 2016 initialisation: conv weights ~ N(0, 0.02), batch-norm scale ~ N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    return module


class DCGANGenerator(nn.Module):
    """``G(z)``: latent ``(B, latent_dim)`` -> images ``(B, channels, R, R)`` in (-1, 1) (Tanh output)."""

    def __init__(self, latent_dim: int = 100, img_resolution: int = 32, channels: int = 3, base_channels: int = 64,
                 extra_layers: int = 0):
        super().__init__()
        if latent_dim < 1 or base_channels < 1 or extra_layers < 0:
            raise ValueError(f"DCGANGenerator: latent_dim and base_channels must be >= 1 and extra_layers >= 0, got "
                             f"{latent_dim}, {base_channels}, {extra_layers}.")
        self.latent_dim, self.img_resolution, self.channels = int(latent_dim), int(img_resolution), int(channels)
        k = num_stages(img_resolution)
        ch = base_channels * 2 ** (k - 1)
        layers: list[nn.Module] = [  # project z (as a 1 x 1 map) to 4 x 4
            nn.ConvTranspose2d(latent_dim, ch, 4, 1, 0, bias=False), nn.BatchNorm2d(ch), nn.ReLU(True)]
        for _ in range(k - 1):  # 4 -> R/2, halving the channels
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
        for _ in range(extra_layers):  # at R/2, as the reference code's n_extra_layers
            layers += [nn.Conv2d(ch, ch, 3, 1, 1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(True)]
        # the last up-sampling stage writes the image (no batch norm on the output layer)
        layers += [nn.ConvTranspose2d(ch, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)
        dcgan_init_(self)

    def forward(self, z: Tensor) -> Tensor:
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"DCGANGenerator: expected z of shape (B, {self.latent_dim}), got {tuple(z.shape)}.")
        return self.main(z[:, :, None, None])


class DCGANDiscriminator(nn.Module):
    """``D(x)``: images ``(B, channels, R, R)`` -> real/fake logits ``(B,)`` (no sigmoid; the loss applies it)."""

    def __init__(self, img_resolution: int = 32, channels: int = 3, base_channels: int = 64, extra_layers: int = 0):
        super().__init__()
        if base_channels < 1 or extra_layers < 0:
            raise ValueError(f"DCGANDiscriminator: base_channels must be >= 1 and extra_layers >= 0, got "
                             f"{base_channels}, {extra_layers}.")
        self.img_resolution, self.channels = int(img_resolution), int(channels)
        k = num_stages(img_resolution)
        ch = base_channels
        # the input layer (R -> R/2) has no batch norm
        layers: list[nn.Module] = [nn.Conv2d(channels, ch, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for _ in range(extra_layers):  # at R/2, as the reference code's n_extra_layers
            layers += [nn.Conv2d(ch, ch, 3, 1, 1, bias=False), nn.BatchNorm2d(ch), nn.LeakyReLU(0.2, True)]
        for _ in range(k - 1):  # R/2 -> 4, doubling the channels
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch * 2), nn.LeakyReLU(0.2, True)]
            ch *= 2
        layers += [nn.Conv2d(ch, 1, 4, 1, 0)]  # 4 x 4 -> one logit
        self.main = nn.Sequential(*layers)
        dcgan_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        check_input("DCGANDiscriminator", x, self.channels, self.img_resolution)
        return self.main(x).flatten()
