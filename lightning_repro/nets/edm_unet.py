"""The DDPM++ U-Net of Song et al. 2021 ("Score-Based Generative Modeling through SDEs", App. H) in the form
used by EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
App. F.2 / Table 7, config ``ddpmpp``): ``SongUNet``.

Architecture (EDM ``ddpmpp`` config: standard encoder and decoder, ``resample_filter=[1,1]``,
positional noise embedding, ``channel_mult_noise=1``):

* mapping network: ``emb = silu(L1(silu(L0(PE(c_noise) [+ W y]))))`` with ``PE`` the sinusoidal
  positional embedding (``[sin, cos]`` order, frequency endpoint included) and, for class-conditional
  models (EDM App. D), ``y`` the one-hot class times ``sqrt(num_classes)`` (the null label -1 gives 0);
* encoder: a 3x3 input conv, then per resolution level a down-sampling residual block (levels > 0) and
  ``num_blocks`` residual blocks (self-attention at ``attn_resolutions``);
* decoder: two bottleneck blocks (the first with attention), then per level an up-sampling block
  (levels below the last) and ``num_blocks + 1`` residual blocks fed with the encoder skips;
* output: ``conv3x3(silu(GroupNorm(h)))``.

Every residual block is ``(h + skip(x)) / sqrt(2)`` with ``h = conv1(dropout(silu(GN(conv0(silu(GN(x)))
+ A emb))))``; attention is ``(x + proj(MHA(GN(x)))) / sqrt(2)``.  Initialisation follows EDM
(Xavier-uniform, 1e-5 gain on the last conv of each branch, sqrt(0.2) on ``qkv``).  The CIFAR-10
configuration (``model_channels=128``, ``channel_mult=(2,2,2)``, 4 blocks, attention at 16) has
55,732,739 parameters, exactly as EDM's.

Options for the released EDM networks (all off by default, so the configurations above are unchanged):
``augment_dim`` (EDM's bias-free ``map_augment`` of the augmentation labels; zero labels add exactly 0),
``encoder_type="residual"`` (NCSN++'s progressive-input branch ``x = (x + down(aux)) / sqrt(2)``, a 3x3 conv
followed by FIR down-sampling), ``swap_sin_cos`` (EDM feeds ``[sin, cos]`` for the Fourier embedding as well)
and ``fourier_scale``; NCSN++ is ``embedding_type="fourier", channel_mult_noise=2, resample_filter=[1, 3, 3, 1]``.

The network is fully convolutional: it accepts any input whose height and width are divisible by
``2 ** (len(channel_mult) - 1)``; ``channels_last`` inputs keep their memory format.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .embeddings import FourierEmbedding, PositionalEmbedding

__all__ = ["SongUNet", "group_norm", "check_resolution", "check_unet_input", "class_one_hot", "xavier_init"]


# ----------------------------------------------------------------------------------------------------
# Helpers shared with ``ddpm_unet``.


def group_norm(
    channels: int, eps: float = 1e-6, max_groups: int = 32, min_channels_per_group: int = 4
) -> nn.GroupNorm:
    """GroupNorm with ``min(32, channels // 4)`` groups (EDM's rule), at least 1, so tiny widths work."""
    groups = max(1, min(max_groups, channels // min_channels_per_group))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=eps)


def check_resolution(name: str, img_resolution: int, levels: int) -> int:
    """Raise unless ``img_resolution`` is divisible by ``2 ** (levels - 1)``; return that factor."""
    if levels < 1:
        raise ValueError(f"{name}: channel_mult must have at least one level, got {levels}.")
    factor = 2 ** (levels - 1)
    if img_resolution < 1 or img_resolution % factor:
        raise ValueError(
            f"{name}: img_resolution {img_resolution} is not divisible by {factor} (the U-Net downsamples "
            f"{levels - 1} times); use a multiple of {factor} or fewer channel_mult levels."
        )
    return factor


def check_unet_input(name: str, x: Tensor, noise_labels: Tensor, in_channels: int, factor: int) -> Tensor:
    """Validate ``x`` (B, C, H, W) and return ``noise_labels`` as a float (B,) tensor."""
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ValueError(f"{name}: expected input of shape (B, {in_channels}, H, W), got {tuple(x.shape)}.")
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        levels = int(math.log2(factor))
        raise ValueError(
            f"{name}: input size {h}x{w} is not divisible by {factor} (the U-Net downsamples {levels} times)."
        )
    noise_labels = torch.as_tensor(noise_labels, device=x.device).reshape(-1)
    if noise_labels.numel() == 1:
        noise_labels = noise_labels.expand(x.shape[0])
    if noise_labels.numel() != x.shape[0]:
        raise ValueError(
            f"{name}: got {noise_labels.numel()} noise labels for a batch of {x.shape[0]} images."
        )
    return noise_labels if noise_labels.is_floating_point() else noise_labels.float()


def class_one_hot(
    name: str, class_labels: Tensor | None, num_classes: int, batch: int, device: torch.device
) -> Tensor:
    """One-hot (B, num_classes) float32 encoding; label -1 (or ``None``) is the null class (zero vector)."""
    if class_labels is None:
        return torch.zeros(batch, num_classes, device=device)
    labels = torch.as_tensor(class_labels)
    if labels.is_floating_point() or labels.is_complex() or labels.reshape(-1).numel() != batch:
        raise ValueError(
            f"{name}: class_labels must be {batch} integers (-1 = no label), got {tuple(labels.shape)} {labels.dtype}."
        )
    labels = labels.reshape(-1).long()
    # The range check reads the labels, so it runs only on host tensors: labels already on an accelerator
    # were checked where they were made (``sampling.sample``, the data module) and a read would sync.
    if labels.numel() and labels.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = torch.stack(labels.aminmax()).tolist()
        if lo < -1 or hi >= num_classes:
            raise ValueError(
                f"{name}: class labels must lie in [-1, {num_classes - 1}] (-1 = no label), got [{lo}, {hi}]."
            )
    labels = labels.to(device)
    return (labels[:, None] == torch.arange(num_classes, device=device)[None]).float()


def memory_format_of(x: Tensor) -> torch.memory_format:
    """``channels_last`` if ``x`` is stored that way (and not also plain contiguous), else contiguous."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def self_attention(qkv: Tensor, num_heads: int, like: Tensor) -> Tensor:
    """Multi-head self-attention over the pixels of ``qkv`` (B, 3C, H, W) with ``F.scaled_dot_product_attention``.

    Channel layout of ``qkv`` follows EDM: channel ``(head * d + c) * 3 + j`` is component ``j`` (q, k, v).
    The result (B, C, H, W) has the memory format of ``like``.
    """
    b, c3, h, w = qkv.shape
    c = c3 // 3
    t = qkv.permute(0, 2, 3, 1).reshape(b, h * w, num_heads, c // num_heads, 3)
    q, k, v = (t[..., j].transpose(1, 2) for j in range(3))  # (B, heads, HW, d)
    a = F.scaled_dot_product_attention(q, k, v)
    a = a.transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)
    return a.contiguous(memory_format=memory_format_of(like))


def xavier_init(module: nn.Module, gain: float = 1.0) -> nn.Module:
    """Xavier-uniform weight times ``gain`` (= DDPM's "fan_avg uniform" with scale gain^2), zero bias."""
    nn.init.xavier_uniform_(module.weight, gain=gain)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


# ----------------------------------------------------------------------------------------------------
# Resampling with a separable FIR filter (EDM's ``Conv2d(up/down, resample_filter)``).


class _Resample(nn.Module):
    """2x up- or down-sampling with the normalised outer product of ``resample_filter``.

    ``[1, 1]`` is exactly 2x2 average pooling (down) / nearest-neighbour upsampling (up); other filters
    (e.g. NCSN++'s ``[1, 3, 3, 1]``) use a depthwise (transposed) convolution as EDM does.
    """

    def __init__(self, mode: str, resample_filter: Sequence[int]):
        super().__init__()
        self.mode = mode
        taps = [float(v) for v in resample_filter]
        if not taps or sum(taps) == 0:
            raise ValueError(
                f"SongUNet: resample_filter must be a non-empty list with a non-zero sum, got {taps}."
            )
        self.box = len(taps) == 2 and taps[0] == taps[1]
        f = torch.tensor(taps, dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum().square()
        self.register_buffer("filter", f, persistent=False)
        self.pad = (f.shape[-1] - 1) // 2

    def forward(self, x: Tensor) -> Tensor:
        if self.box:
            return (
                F.avg_pool2d(x, 2)
                if self.mode == "down"
                else F.interpolate(x, scale_factor=2.0, mode="nearest")
            )
        c = x.shape[1]
        f = self.filter.to(x.dtype)
        if self.mode == "down":
            return F.conv2d(x, f.tile(c, 1, 1, 1), groups=c, stride=2, padding=self.pad)
        return F.conv_transpose2d(x, (f * 4).tile(c, 1, 1, 1), groups=c, stride=2, padding=self.pad)


class _ResidualDown(nn.Conv2d):
    """NCSN++'s progressive-input ("residual") branch: a 3x3 conv, then 2x FIR down-sampling, then the bias
    (EDM's fused ``Conv2d(kernel=3, down=True, fused_resample=True)``)."""

    def __init__(self, in_channels: int, out_channels: int, resample_filter: Sequence[int]):
        super().__init__(in_channels, out_channels, 3)
        self.resample = _Resample("down", resample_filter)

    def forward(self, x: Tensor) -> Tensor:
        f = self.resample.filter.to(x.dtype)
        x = F.conv2d(x, self.weight.to(x.dtype), padding=1 + self.resample.pad)
        x = F.conv2d(x, f.tile(self.out_channels, 1, 1, 1), groups=self.out_channels, stride=2)
        return x + self.bias.to(x.dtype)[None, :, None, None]


class SongUNetBlock(nn.Module):
    """DDPM++ residual block with optional 2x resampling and self-attention (EDM ``UNetBlock`` with
    ``adaptive_scale=False``, ``resample_proj=True``, ``skip_scale=sqrt(0.5)``, ``eps=1e-6`` by default; ADM's
    block, ``nets.adm_unet``, sets ``adaptive_scale=True`` (``silu(shift + GN(h) (1 + scale))``), ``skip_scale=1``,
    ``eps=1e-5``, ``resample_proj=False`` (a bare resampled skip) and ``channels_per_head=64``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int = 1,
        dropout: float = 0.0,
        resample_filter: Sequence[int] = (1, 1),
        takes_skip: bool = False,
        adaptive_scale: bool = False,
        skip_scale: float = math.sqrt(0.5),
        eps: float = 1e-6,
        resample_proj: bool = True,
        channels_per_head: int = 0,  # > 0: num_heads = out_channels // channels_per_head (ADM)
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.takes_skip = takes_skip
        self.dropout = dropout
        self.skip_scale, self.adaptive_scale = skip_scale, adaptive_scale
        self.resample = _Resample("up" if up else "down", resample_filter) if (up or down) else None
        self.norm0 = group_norm(in_channels, eps)
        self.conv0 = xavier_init(nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.affine = xavier_init(nn.Linear(emb_channels, out_channels * (2 if adaptive_scale else 1)))
        self.norm1 = group_norm(out_channels, eps)
        self.conv1 = xavier_init(nn.Conv2d(out_channels, out_channels, 3, padding=1), gain=1e-5)
        self.skip = None
        if in_channels != out_channels or ((up or down) and resample_proj):
            self.skip = xavier_init(nn.Conv2d(in_channels, out_channels, 1))
        num_heads = out_channels // channels_per_head if channels_per_head else num_heads
        self.num_heads = num_heads if attention else 0
        if self.num_heads:
            if out_channels % num_heads:
                raise ValueError(
                    f"SongUNet: num_heads {num_heads} does not divide the block width {out_channels}."
                )
            self.norm2 = group_norm(out_channels, eps)
            self.qkv = xavier_init(nn.Conv2d(out_channels, out_channels * 3, 1), gain=math.sqrt(0.2))
            self.proj = xavier_init(nn.Conv2d(out_channels, out_channels, 1), gain=1e-5)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.norm0(x))
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = self.conv0(h)
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = (h + (self.skip(x) if self.skip is not None else x)) * self.skip_scale
        if self.num_heads:
            a = self_attention(self.qkv(self.norm2(x)), self.num_heads, like=x)
            x = (self.proj(a) + x) * self.skip_scale
        return x


class SongUNet(nn.Module):
    """DDPM++ U-Net (Song et al. 2021) as configured by EDM (Karras et al. 2022), a plain network.

    ``forward(x, noise_labels, class_labels=None)``: ``x`` (B, in_channels, H, W), ``noise_labels`` (B,)
    float (EDM's ``c_noise``), ``class_labels`` (B,) int64 with -1 = no label (ignored when
    ``num_classes == 0``; ``None`` means "no label" for every sample).  Returns (B, out_channels, H, W).
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        num_classes: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        resample_filter: Sequence[int] = (1, 1),
        num_heads: int = 1,
        augment_dim: int = 0,  # EDM's augmentation-label width (9 in the released CIFAR-10 nets), 0 = none
        encoder_type: str = "standard",  # "standard" (DDPM++) or "residual" (NCSN++'s progressive input)
        swap_sin_cos: bool | None = None,  # emb order [sin, cos]; None: positional only (EDM swaps both)
        fourier_scale: float = 16.0,  # std of the random Fourier frequencies (NCSN++)
    ):
        super().__init__()
        if encoder_type not in ("standard", "residual"):
            raise ValueError(f"SongUNet: encoder_type must be 'standard' or 'residual', got {encoder_type!r}.")
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(
                f"SongUNet: embedding_type must be 'positional' or 'fourier', got {embedding_type!r}."
            )
        if num_classes < 0:
            raise ValueError(f"SongUNet: num_classes must be >= 0 (0 = unconditional), got {num_classes}.")
        channel_mult = tuple(int(m) for m in channel_mult)
        self.factor = check_resolution("SongUNet", img_resolution, len(channel_mult))
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.num_classes = num_classes
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        block = dict(
            emb_channels=emb_channels, num_heads=num_heads, dropout=dropout, resample_filter=resample_filter
        )

        # Mapping network.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels, scale=fourier_scale)
        self.swap_sin_cos = embedding_type == "positional" if swap_sin_cos is None else bool(swap_sin_cos)
        self.map_label = xavier_init(nn.Linear(num_classes, noise_channels)) if num_classes else None
        if augment_dim:  # bias-free, so zero augmentation labels (sampling) contribute exactly nothing
            self.map_augment = xavier_init(nn.Linear(augment_dim, noise_channels, bias=False))
        self.augment_dim, self.encoder_type = int(augment_dim), encoder_type
        self.map_layer0 = xavier_init(nn.Linear(noise_channels, emb_channels))
        self.map_layer1 = xavier_init(nn.Linear(emb_channels, emb_channels))

        self.enc = self._encoder(in_channels, model_channels, channel_mult, num_blocks, attn_resolutions, block)
        cout = list(self.enc.values())[-1].out_channels
        self.dec = self._decoder(cout, model_channels, channel_mult, num_blocks, attn_resolutions, block)
        cout = list(self.dec.values())[-1].out_channels
        self.out_norm = group_norm(cout)
        self.out_conv = xavier_init(nn.Conv2d(cout, out_channels, 3, padding=1), gain=1e-5)

    def _encoder(self, in_channels, model_channels, channel_mult, num_blocks, attn_resolutions, block) -> nn.ModuleDict:
        """Per resolution: the input conv (first level) or a down-sampling block, then ``num_blocks`` blocks."""
        enc, cout, caux = nn.ModuleDict(), in_channels, in_channels
        for level, mult in enumerate(channel_mult):
            res = self.img_resolution >> level
            if level == 0:
                cout = model_channels
                enc[f"{res}x{res}_conv"] = xavier_init(nn.Conv2d(in_channels, cout, 3, padding=1))
            else:
                enc[f"{res}x{res}_down"] = SongUNetBlock(cout, cout, down=True, **block)
                if self.encoder_type == "residual":
                    enc[f"{res}x{res}_aux_residual"] = xavier_init(
                        _ResidualDown(caux, cout, block["resample_filter"]))
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                enc[f"{res}x{res}_block{idx}"] = SongUNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        return enc

    def _decoder(self, cout, model_channels, channel_mult, num_blocks, attn_resolutions, block) -> nn.ModuleDict:
        """Per resolution, coarsest first: two middle blocks or an up-sampling block, then ``num_blocks + 1``
        blocks that each take one encoder skip (popped in reverse order)."""
        skips = [m.out_channels for m in self.enc.values() if not isinstance(m, _ResidualDown)]
        dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = self.img_resolution >> level
            if level == len(channel_mult) - 1:
                dec[f"{res}x{res}_in0"] = SongUNetBlock(cout, cout, attention=True, **block)
                dec[f"{res}x{res}_in1"] = SongUNetBlock(cout, cout, **block)
            else:
                dec[f"{res}x{res}_up"] = SongUNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                dec[f"{res}x{res}_block{idx}"] = SongUNetBlock(
                    cin, cout, attention=idx == num_blocks and res in attn_resolutions, takes_skip=True, **block)
        return dec

    def embedding(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None,
                  augment_labels: Tensor | None = None) -> Tensor:
        """The mapping network: ``emb`` (B, emb_channels) of the checked noise labels (and classes)."""
        emb = self.map_noise(noise_labels)
        if self.swap_sin_cos:  # EDM's DDPM++ uses [sin, cos]
            emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)
        emb = emb.to(self.map_layer0.weight.dtype)
        if self.map_label is not None:
            y = class_one_hot(type(self).__name__, class_labels, self.num_classes, x.shape[0], x.device)
            emb = emb + self.map_label((y * math.sqrt(self.num_classes)).to(emb.dtype))
        if self.augment_dim and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def encode(self, x: Tensor, emb: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The encoder: the bottleneck features and the skips the decoder takes (in the order it pops them)."""
        skips, aux = [], x
        for m in self.enc.values():
            if isinstance(m, _ResidualDown):  # NCSN++: x = skips[-1] = aux = (x + down(aux)) / sqrt(2)
                x = skips[-1] = aux = (x + m(aux)) / math.sqrt(2)
                continue
            x = m(x, emb) if isinstance(m, SongUNetBlock) else m(x)
            skips.append(x)
        return x, skips

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        noise_labels = check_unet_input("SongUNet", x, noise_labels, self.in_channels, self.factor)
        emb = self.embedding(x, noise_labels, class_labels, augment_labels)
        x, skips = self.encode(x, emb)
        for m in self.dec.values():
            if m.takes_skip:
                x = torch.cat([x, skips.pop()], dim=1)
            x = m(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))
