"""Tests for the two U-Nets: ``SongUNet`` (DDPM++ as in EDM) and ``DDPMUNet`` (Ho et al. 2020)."""

from __future__ import annotations

import pytest
import torch

from lightning_repro.nets.ddpm_unet import DDPMUNet
from lightning_repro.nets.edm_unet import SongUNet, group_norm

NETS = {"song": SongUNet, "ddpm": DDPMUNet}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny(
    kind: str, res: int = 8, ch: int = 1, num_classes: int = 0, width: int = 16, **kw
) -> torch.nn.Module:
    """A tiny CPU preset: channel_mult (1, 2), one block, attention at res/2 (so attention is exercised)."""
    torch.manual_seed(0)
    opts = dict(model_channels=width, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(res // 2,))
    opts.update(kw)
    return NETS[kind](res, ch, ch, num_classes=num_classes, **opts)


def randomize_(net: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Replace the (near-zero-output) initialisation by random weights so every path affects the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net.eval()


# ---------------------------------------------------------------- parameter counts (reference configs)


@pytest.mark.parametrize("model_channels, expected", [(128, 55_732_739), (64, 13_956_355)])
def test_songunet_cifar10_parameter_count_matches_edm(model_channels, expected):
    with torch.device("meta"):
        net = SongUNet(
            32,
            3,
            3,
            model_channels=model_channels,
            channel_mult=(2, 2, 2),
            num_blocks=4,
            attn_resolutions=(16,),
        )
    assert n_params(net) == expected


def test_ddpmunet_cifar10_parameter_count_matches_ho_et_al():
    with torch.device("meta"):
        net = DDPMUNet(
            32, 3, 3, model_channels=128, channel_mult=(1, 2, 2, 2), num_blocks=2, attn_resolutions=(16,)
        )
    assert n_params(net) == 35_746_307


def test_class_conditioning_adds_one_linear_map():
    with torch.device("meta"):
        song = SongUNet(32, 3, 3, num_classes=10)
        ddpm = DDPMUNet(32, 3, 3, num_classes=10)
    assert (
        n_params(song) == 55_732_739 + 10 * 128 + 128
    )  # Linear(10 -> noise channels) with bias (EDM map_label)
    assert n_params(ddpm) == 35_746_307 + 10 * 512  # Linear(10 -> 4 ch) added to the time embedding


def test_group_norm_groups_adapt_to_width():
    assert group_norm(256).num_groups == 32
    assert group_norm(64).num_groups == 16
    assert group_norm(16).num_groups == 4
    assert group_norm(2).num_groups == 1


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("kind", sorted(NETS))
@pytest.mark.parametrize("res, ch", [(8, 1), (32, 3)])
def test_output_shape_equals_input_shape(kind, res, ch):
    net = tiny(kind, res=res, ch=ch).eval()
    x = torch.randn(2, ch, res, res)
    out = net(x, torch.tensor([0.3, -1.2]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", sorted(NETS))
def test_out_channels_may_differ_from_in_channels(kind):
    net = NETS[kind](8, 1, 2, model_channels=16, channel_mult=(1, 2), num_blocks=1).eval()
    assert net(torch.randn(3, 1, 8, 8), torch.zeros(3)).shape == (3, 2, 8, 8)


@pytest.mark.parametrize("kind", sorted(NETS))
def test_initial_output_is_near_zero(kind):
    # The last conv of every branch is initialised with gain 1e-5 (EDM / DDPM "init_scale=0").
    net = tiny(kind, res=8).eval()
    assert net(torch.randn(2, 1, 8, 8), torch.ones(2)).abs().max() < 1e-3


# ---------------------------------------------------------------- class conditioning


@pytest.mark.parametrize("kind", sorted(NETS))
def test_conditional_output_depends_on_label_and_null_label_differs(kind):
    net = randomize_(tiny(kind, num_classes=3))
    x, t = torch.randn(1, 1, 8, 8).expand(4, -1, -1, -1), torch.full((4,), 0.5)
    out = net(x, t, torch.tensor([0, 1, 2, -1]))
    for i in range(4):
        for j in range(i + 1, 4):
            assert (out[i] - out[j]).abs().max() > 1e-3, (i, j)
    # the same label gives the same output; None means "no label" for every sample
    assert torch.allclose(net(x, t, torch.tensor([1, 1, 1, 1]))[0], out[1], atol=1e-5)
    assert torch.allclose(net(x, t, None), net(x, t, torch.full((4,), -1)), atol=1e-6)


@pytest.mark.parametrize("kind", sorted(NETS))
def test_unconditional_net_ignores_labels(kind):
    net = randomize_(tiny(kind, num_classes=0))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.1, 2.0])
    ref = net(x, t)
    assert torch.equal(net(x, t, torch.tensor([0, 7])), ref)
    assert torch.equal(net(x, t, torch.tensor([-1, -1])), ref)


@pytest.mark.parametrize("kind", sorted(NETS))
def test_label_out_of_range_raises(kind):
    net = tiny(kind, num_classes=3).eval()
    with pytest.raises(ValueError, match=r"class labels must lie in \[-1, 2\]"):
        net(torch.randn(2, 1, 8, 8), torch.zeros(2), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="class_labels must be 2 integers"):
        net(torch.randn(2, 1, 8, 8), torch.zeros(2), torch.tensor([0.0, 1.0]))


# ---------------------------------------------------------------- bad input


def test_bad_resolution_message_songunet():
    with pytest.raises(
        ValueError, match=r"img_resolution 30 is not divisible by 4 \(the U-Net downsamples 2 times\)"
    ):
        SongUNet(30, 3, 3, model_channels=16, channel_mult=(2, 2, 2), num_blocks=1)


def test_bad_resolution_message_ddpmunet():
    with pytest.raises(
        ValueError, match=r"img_resolution 30 is not divisible by 8 \(the U-Net downsamples 3 times\)"
    ):
        DDPMUNet(30, 3, 3, model_channels=16, channel_mult=(1, 2, 2, 2), num_blocks=1)


def test_attention_resolution_that_never_occurs_is_fine():
    net = SongUNet(
        8, 1, 1, model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(64,)
    ).eval()
    assert net(torch.randn(1, 1, 8, 8), torch.zeros(1)).shape == (1, 1, 8, 8)


@pytest.mark.parametrize("kind", sorted(NETS))
def test_forward_rejects_input_it_cannot_take(kind):
    net = tiny(kind).eval()  # downsamples once: sizes must be even
    with pytest.raises(
        ValueError, match=r"input size 7x7 is not divisible by 2 \(the U-Net downsamples 1 times\)"
    ):
        net(torch.randn(1, 1, 7, 7), torch.zeros(1))
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 1, H, W\)"):
        net(torch.randn(1, 3, 8, 8), torch.zeros(1))
    with pytest.raises(ValueError, match="got 3 noise labels for a batch of 2 images"):
        net(torch.randn(2, 1, 8, 8), torch.zeros(3))
    # any divisible size works (the network is fully convolutional)
    assert net(torch.randn(1, 1, 12, 6), torch.zeros(1)).shape == (1, 1, 12, 6)


# ---------------------------------------------------------------- noise labels, determinism, layout


@pytest.mark.parametrize("kind", sorted(NETS))
def test_fractional_and_integer_noise_labels(kind):
    net = randomize_(tiny(kind))
    x = torch.randn(1, 1, 8, 8).expand(3, -1, -1, -1)
    out = net(x, torch.tensor([10.0, 10.5, 999 * 0.37]))
    assert (out[0] - out[1]).abs().max() > 1e-4  # a fractional step is a different input
    assert torch.allclose(
        net(x, torch.tensor([10, 10, 10])), out[0].expand_as(out), atol=1e-5
    )  # int64 accepted
    assert torch.allclose(net(x, 10.0), out[0].expand_as(out), atol=1e-5)  # a scalar is broadcast


@pytest.mark.parametrize("kind", sorted(NETS))
def test_deterministic_in_eval_mode_and_dropout_in_train_mode(kind):
    net = tiny(kind, dropout=0.5)
    randomize_(net)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.2, 0.9])
    assert torch.equal(net(x, t), net(x, t))
    net.train()
    assert not torch.equal(net(x, t), net(x, t))


@pytest.mark.parametrize("kind", sorted(NETS))
def test_channels_last_input_gives_same_output(kind):
    net = randomize_(tiny(kind, res=16, ch=3, num_classes=2))
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([0.2, 3.0]), torch.tensor([1, -1])
    ref = net(x, t, y)
    net_cl = net.to(memory_format=torch.channels_last)
    out = net_cl(x.contiguous(memory_format=torch.channels_last), t, y)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.contiguous(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", sorted(NETS))
def test_bf16_autocast_and_gradients(kind):
    net = randomize_(tiny(kind, num_classes=2))
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([0.2, 3.0]), torch.tensor([0, -1])
    ref = net(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t, y)
    assert ((out.float() - ref).norm() / ref.norm()) < 0.1
    net.train()
    net(x, t, y).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
