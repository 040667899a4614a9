"""Published model specs on every command: latent U-ViT / DiT with a VAE (``dit:FILE.pt?vae=DIR``), published
teachers of the ``generated`` source, ``init_from`` of a published file, the hyperplane study's model entries.

Files are written here with each library's own save function (``torch.save`` of state dicts in the reference
layouts, diffusers' ``save_pretrained``, the edm pickle format of ``tests/test_published.py``); tiny configs.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from lightning_repro.evaluation import resolve_model
from lightning_repro.nets.dit import DiT
from lightning_repro.published import read_dit
from lightning_repro.sampling import SolverConfig, get_sigmas, sample_seeds, seed_noise
from lightning_repro.sampling.solvers import get_sampler

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_thread")]
CPU = torch.device("cpu")
SEEDS = [0, 1]


def _randomised(net, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net.eval()


def _vae(path, seed: int = 0):
    """A tiny random AutoencoderKL (4 latent channels, factor 2) saved with ``save_pretrained``."""
    from lightning_repro.published.tiny_pipelines import _tiny_vae

    torch.manual_seed(seed)
    vae = _tiny_vae(16).eval()
    vae.save_pretrained(path)
    return path


def _latent_dit(path):
    """A class-conditional latent DiT (4 x 8 x 8, learned sigma, null row last) in the facebookresearch/DiT layout."""
    src = _randomised(DiT(8, 4, 4, num_classes=4, patch_size=2, hidden_size=32, depth=1, num_heads=2,
                          learn_sigma=True), 21)
    torch.save(src.state_dict(), path)
    return path


# ------------------------------------------------------------------------------ latent U-ViT / DiT with a VAE


def test_latent_dit_with_a_vae_decodes_the_latents_the_suite_samples(tmp_path):
    from diffusers import AutoencoderKL

    path, vae_dir = _latent_dit(tmp_path / "DiT-latent.pt"), _vae(tmp_path / "vae")
    ref = resolve_model(f"dit:{path}?num_heads=2&vae={vae_dir}")
    assert (ref.image_shape, ref.sample_shape, ref.num_classes) == ((3, 16, 16), (4, 8, 8), 4)
    d = ref.describe()
    assert d["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and d["vae"] == str(vae_dir.resolve())
    assert d["sha256"] == ref.sha256 != d["file_sha256"] and d["vae_scaling_factor"] == 0.18215
    labels = torch.tensor([1, 3])
    got = sample_seeds(ref.denoiser(CPU), ref.kernel(), SEEDS, ref.sample_shape, SolverConfig("heun", 4),
                       labels=labels, device=CPU, decode=ref.decoder(CPU))
    # the same DiT sampled by the suite without the VAE (latents, unclamped), decoded by diffusers
    plain = read_dit(path, num_heads=2, latent=True)
    kernel = ref.kernel()
    sigmas = get_sigmas("native", 4, kernel)
    assert float(sigmas[-1]) == 0.0  # so the final state is the latent itself (no VP rescaling)
    x_T = kernel.start_scale(sigmas) * seed_noise(SEEDS, (4, 8, 8))
    vae = AutoencoderKL.from_pretrained(vae_dir)
    with torch.no_grad():
        latents = get_sampler("heun")(plain.denoiser(CPU), x_T, sigmas, labels)
        want = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
    assert got.shape == (2, 3, 16, 16) and float(latents.abs().max()) > 0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # another VAE is another model (cache identity); without a VAE the latent file is refused as before
    other = resolve_model(f"dit:{path}?num_heads=2&vae={_vae(tmp_path / 'vae2', seed=1)}")
    assert other.sha256 != ref.sha256 and other.info["file_sha256"] == d["file_sha256"]
    with pytest.raises(ValueError) as err:
        resolve_model(f"dit:{path}?num_heads=2")
    assert str(err.value) == (f"{path} is a latent DiT (4 channels), which needs the Stable Diffusion VAE decoder; "
                              "only pixel-space models are supported here.")


def test_vae_option_bad_input_sentences(tmp_path):
    pixel = tmp_path / "DiT-pixel.pt"
    torch.save(DiT(8, 3, 3, patch_size=2, hidden_size=32, depth=1, num_heads=2).state_dict(), pixel)
    vae_dir = _vae(tmp_path / "vae")
    with pytest.raises(ValueError) as err:
        resolve_model(f"dit:{pixel}?num_heads=2&vae={vae_dir}")
    assert str(err.value) == (f"{pixel} is a pixel-space DiT (3 channels); a VAE (?vae=) applies to latent models "
                              "(4 channels) only.")
    empty = tmp_path / "empty"
    empty.mkdir()
    spec = f"dit:{_latent_dit(tmp_path / 'l.pt')}?num_heads=2&vae={empty}"
    with pytest.raises(ValueError) as err:
        resolve_model(spec)
    assert str(err.value) == (f"{spec}: vae={empty} is not an AutoencoderKL folder (config.json with _class_name "
                              "AutoencoderKL) nor a pipeline folder holding vae/.")
