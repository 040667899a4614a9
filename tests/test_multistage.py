"""The multi-decoder DDPM++ U-Net (Zhang et al., CVPR 2024) and its ``Multistage`` preset: per-sample routing to
the decoder of each sigma interval, SongUNet's decoders, boundary sentences, parameter counts of the reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lightning_repro.module import CKPT_KEY, Multistage, load_denoiser
from lightning_repro.multistage import STAGE_PRESETS
from lightning_repro.nets.edm_unet import SongUNet
from lightning_repro.nets.multistage import MultistageUNet

pytestmark = pytest.mark.usefixtures("one_thread_module")

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0,
            image_shape=(1, 8, 8))
#: one sigma per row: three in each of the paper's intervals (0, 2.5103], (2.5103, 7.6577], (7.6577, inf)
SIGMAS = torch.tensor([0.01, 0.5, 2.5, 2.52, 5.0, 7.65, 7.7, 20.0, 79.0])
STAGE = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])


def test_each_sample_goes_to_the_decoder_of_its_interval():
    """Zeroing one stage's decoder changes exactly the rows whose sigma lies in that stage's interval."""
    m = Multistage(**TINY, stages=3, decoder_channels=[16, 8, 4])
    net, x = m.model.net, torch.randn(len(SIGMAS), 1, 8, 8)
    assert torch.equal(net.stage_of(m.model.coefficients(SIGMAS.double())[3].float()), STAGE)
    with torch.no_grad():
        for p in net.parameters():  # a visible output from every decoder (EDM zero-initialises the last convs)
            p.add_(0.05 * torch.randn_like(p))
        before = m.model(x, SIGMAS)
        for k in range(3):
            saved = [p.clone() for p in net.decoders[k].parameters()]
            for p in net.decoders[k].parameters():
                p.zero_()
            after = m.model(x, SIGMAS)
            changed = (after != before).flatten(1).any(1)
            assert torch.equal(changed, STAGE == k), k
            for p, q in zip(net.decoders[k].parameters(), saved):
                p.copy_(q)


def test_a_one_stage_net_with_a_songunets_weights_is_that_songunet():
    """The shared encoder and each decoder are SongUNet's own: bit-identical outputs with copied weights."""
    cfg = dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), num_classes=3, dropout=0.0)
    song = SongUNet(8, 1, 1, **cfg).eval()
    multi = MultistageUNet(8, 1, 1, **cfg, decoder_channels=[16], stage_boundaries=[]).eval()
    x, c, y = torch.randn(4, 1, 8, 8), torch.randn(4), torch.tensor([0, 2, -1, 1])
    with torch.no_grad():
        for p in song.parameters():
            p.add_(0.05 * torch.randn_like(p))
        multi.load_state_dict({k.replace("dec.", "decoders.0.blocks.").replace("out_", "decoders.0.out_"): v
                               for k, v in song.state_dict().items()})  # strict: the same modules, other names
        assert torch.equal(multi(x, c, y), song(x, c, y))
    assert sum(p.numel() for p in multi.parameters()) == sum(p.numel() for p in song.parameters())


def test_stage_boundaries_outside_the_kernel_range_are_one_sentence():
    with pytest.raises(ValueError) as err:
        Multistage(**TINY, stage_sigmas=[1.0, 100.0], decoder_channels=[8, 8, 8])
    assert str(err.value) == ("stage boundary sigma=100 lies outside the edm kernel's noise range (0.002, 80); every "
                              "boundary must split it.")
    with pytest.raises(ValueError, match=r"^stage boundary sigma=0\.0001 lies outside the vp kernel's noise range "):
        Multistage(**TINY, kernel="vp", stage_sigmas=[1e-4], decoder_channels=[8, 8])
    with pytest.raises(ValueError, match=r"^stages must be one of \[3, 4, 5\] \(the presets\), or null with "):
        Multistage(**TINY, stages=2)
    with pytest.raises(ValueError, match=r"^Multistage needs one decoder width per stage, one more than the stage "
                                         r"boundaries; got stage_sigmas \[2\.5103, 7\.6577\] and decoder_channels \[8, 8\]\.$"):
        Multistage(**TINY, decoder_channels=[8, 8])
    with pytest.raises(ValueError, match=r"^stage_sigmas must increase strictly, got \[5\.0, 1\.0\]\.$"):
        Multistage(**TINY, stage_sigmas=[5.0, 1.0], decoder_channels=[8, 8, 8])


@pytest.mark.parametrize("stages,expected", [(3, 128_792_233), (4, 197_076_780), (5, 201_851_727)])
def test_cifar10_parameter_counts_equal_the_reference_code(stages, expected):
    """The reference's ``edm/training/networks.py`` ``MultistageUNet`` (LucasYFL/Multistage_Diffusion), built in a
    scratch script (not committed) with ``edm/train.py --arch=ddpmpp-multistage``'s settings: img_resolution 32,
    3 channels, en_model_channels 128, channel_mult [2, 2, 2], num_blocks 4, attn_resolutions [16], positional
    embedding, standard encoder / decoder, resample_filter [1, 1], augment_dim 0 (the suite has no augmentation),
    and de_model_channels / stage_num of our presets (3 stages: the reference's own 192, 128, 16) counts these
    parameters; its SongUNet counts 55,732,739, as does our one-decoder MultistageUNet of width 128."""
    sigmas, widths = STAGE_PRESETS[stages]
    with torch.device("meta"):  # counting only: no memory, no initialisation
        net = MultistageUNet(32, 3, 3, model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,),
                             decoder_channels=widths, stage_boundaries=sigmas)
        one = MultistageUNet(32, 3, 3, decoder_channels=[128], stage_boundaries=[])
    assert sum(p.numel() for p in net.parameters()) == expected
    assert sum(p.numel() for p in one.parameters()) == 55_732_739


def test_the_cifar10_config_is_the_reference_three_stage_network():
    init = yaml.safe_load((ROOT / "configs/train/cifar10_multistage.yaml").read_text())["model"]["init_args"]
    sigmas, widths = Multistage.stage_layout(init["stages"], init.get("stage_sigmas"), init.get("decoder_channels"))
    assert (sigmas, widths) == ([2.5103, 7.6577], [192, 128, 16])
    with torch.device("meta"):
        net = MultistageUNet(32, 3, 3, model_channels=init["model_channels"], channel_mult=init["channel_mult"],
                             num_blocks=init["num_blocks"], attn_resolutions=init["attn_resolutions"],
                             decoder_channels=widths, stage_boundaries=sigmas)
    assert sum(p.numel() for p in net.parameters()) == 128_792_233


def test_the_suites_loss_trains_only_the_decoders_of_the_drawn_stages(tmp_path):
    m = Multistage(**TINY, stages=3, decoder_channels=[8, 8, 8])
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    sigma = torch.tensor([0.1, 0.2, 3.0, 4.0])  # stages 0 and 1 only
    loss = m.loss_fn(x0, None, sigma, torch.randn_like(x0))
    loss.backward()
    grads = [any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in d.parameters())
             for d in m.model.net.decoders]
    assert grads == [True, True, False] and m.model.net.enc["8x8_conv"].weight.grad.abs().sum() > 0
    ckpt = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    assert ckpt[CKPT_KEY]["arch"] == "multistage"
    torch.save(ckpt, tmp_path / "ms.ckpt")
    den, kernel = load_denoiser(tmp_path / "ms.ckpt")
    x = torch.randn(len(SIGMAS), 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(den(x, SIGMAS), m.ema(x, SIGMAS)) and kernel.name == "edm"
