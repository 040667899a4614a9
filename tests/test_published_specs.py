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


# ------------------------------------------------------------------------------ the generated source


def _evaluate_sample(spec: str, seeds: str, out, *extra: str):
    from lightning_repro.evaluation import main as evaluate_main

    return evaluate_main(["sample", spec, "--seeds", seeds, "--steps", "3", "--out", str(out), "--device", "cpu",
                          "--no-progress", *extra])


def test_generated_with_an_edm_pickle_teacher_equals_evaluate_sample(tmp_path, monkeypatch):
    from test_published import _case

    from lightning_repro.data import get_source
    from lightning_repro.data.sources import source_info, uint8_to_float
    from lightning_repro.teachers import generated_cache_path

    path, marker, *_ = _case("ddpmpp-edm", tmp_path, monkeypatch)
    spec, seeds = f"edm:{path}", "1000000-1000003"
    src = get_source("generated", checkpoint=spec, seeds=seeds, steps=3)
    assert src.images.shape == (4, 3, 8, 8) and src.labels is None and not marker.exists()
    assert source_info("generated", checkpoint=spec, seeds=seeds).image_shape == (3, 8, 8)
    ev = _evaluate_sample(spec, seeds, tmp_path / "ev")
    assert torch.equal(src.images, uint8_to_float(ev.images)) and float(src.images.std()) > 0
    cache = generated_cache_path(spec, seeds, "heun", 3, 1.0)
    assert cache.parent == path.resolve().parent and cache.name.startswith("ddpmpp-edm.generated_")
    with np.load(cache, allow_pickle=False) as f:
        assert np.array_equal(f["images"], ev.images)
        assert str(f["teacher_sha256"]) == hashlib.sha256(path.read_bytes()).hexdigest()
        assert (str(f["teacher_kind"]), str(f["teacher_format"]), str(f["teacher_checkpoint"])) == (
            "edm", "edm-pickle", spec)
    # evaluate.py's --lower-order-final (DPM-Solver++ only)
    s = _evaluate_sample(spec, seeds, tmp_path / "lof", "--sampler", "dpmpp", "--lower-order-final", "diffusers")
    assert (s.provenance["sampler"], s.provenance["lower_order_final"]) == ("dpmpp", "diffusers")
    with pytest.raises(SystemExit) as err:
        _evaluate_sample(spec, seeds, tmp_path / "bad", "--lower-order-final", "off")
    assert str(err.value).endswith("--lower-order-final off applies to the DPM-Solver++ samplers (dpmpp, dpmpp_2m, "
                                   "dpmpp_3m), not to heun.")


def test_generated_with_a_latent_dit_teacher_is_decoded_as_evaluate_sample(tmp_path):
    from lightning_repro.data import get_source
    from lightning_repro.data.sources import uint8_to_float

    spec = f"dit:{_latent_dit(tmp_path / 'DiT-latent.pt')}?num_heads=2&vae={_vae(tmp_path / 'vae')}"
    seeds = "1000000-1000002"
    src = get_source("generated", checkpoint=spec, seeds=seeds, steps=3, cache_dir=tmp_path / "cache")
    assert src.images.shape == (3, 3, 16, 16) and src.labels.tolist() == [0, 1, 2] and src.num_classes == 4
    ev = _evaluate_sample(spec, seeds, tmp_path / "ev")
    assert torch.equal(src.images, uint8_to_float(ev.images)) and ev.labels.tolist() == [0, 1, 2]
    with pytest.raises(ValueError) as err:
        get_source("generated", checkpoint="optimal:digits?size=4", seeds=seeds, steps=3)
    assert str(err.value) == ("generated source: optimal:digits?size=4 is not a local file, so its samples have no "
                              "folder to be cached next to; give source_kwargs cache_dir: DIR.")


# ------------------------------------------------------------------------------ init_from a published file


def _file_dit(path, seed: int = 31):
    src = _randomised(DiT(8, 1, 1, num_classes=4, patch_size=4, hidden_size=16, depth=1, num_heads=1), seed)
    torch.save(src.state_dict(), path)
    return src.state_dict()


def test_init_from_a_dit_state_dict_gives_its_tensors(tmp_path):
    from lightning_repro.module import DiT as DiTPreset

    want = _file_dit(tmp_path / "DiT-tiny.pt")
    spec = f"dit:{tmp_path / 'DiT-tiny.pt'}?num_heads=1"
    kw = dict(patch_size=4, hidden_size=16, depth=1, num_heads=1, image_shape=(1, 8, 8), num_classes=4)
    m = DiTPreset(**kw, kernel="vp_discrete", precond="ddpm", init_from=spec)
    m.load_init_weights()
    for net in (m.model.net, m.ema.net):
        sd = net.state_dict()
        assert sd.keys() == want.keys() and all(torch.equal(sd[k], want[k]) for k in want)
    cfg = m.run_config()
    assert (cfg["init_from"], cfg["init_from_format"]) == (spec, "dit-state-dict")
    assert cfg["init_from_sha256"] == hashlib.sha256((tmp_path / "DiT-tiny.pt").read_bytes()).hexdigest()
    with pytest.raises(ValueError) as err:
        DiTPreset(**kw, init_from=spec).load_init_weights()  # the preset's default kernel: edm
    assert str(err.value) == (f"init_from {spec} was trained with kernel 'vp', but this model uses 'edm'; "
                              "fine-tuning needs the same kernel and preconditioning (kernel_kwargs may differ).")


def test_init_from_an_edm_ddpmpp_pickle_initialises_ddpmpp(tmp_path, monkeypatch):
    from test_published import TINY, _case

    from lightning_repro.module import DDPMpp
    from lightning_repro.published import read_edm_pickle

    path, *_ = _case("ddpmpp-edm", tmp_path, monkeypatch)  # with map_augment (dropped: inert at zero labels)
    m = DDPMpp(**{k: v for k, v in TINY.items() if k != "dropout"}, image_shape=(3, 8, 8), init_from=f"edm:{path}")
    m.load_init_weights()
    want = {k: v for k, v in read_edm_pickle(path).state_dict.items() if not k.startswith("map_augment.")}
    sd = m.ema.net.state_dict()
    assert sd.keys() == want.keys() and all(torch.equal(sd[k], want[k]) for k in want)
    assert m.run_config()["init_from_format"] == "edm-pickle"


def test_init_from_bad_specs_are_one_sentence(tmp_path, monkeypatch):
    from test_published import _case

    from lightning_repro.module import DDPMpp
    from lightning_repro.published.tiny_pipelines import write_unet_pipeline

    def init(spec):
        with pytest.raises((ValueError, FileNotFoundError)) as err:
            DDPMpp(model_channels=16, image_shape=(3, 8, 8), init_from=spec).load_init_weights()
        return str(err.value)

    ncsn, *_ = _case("ncsnpp-ve", tmp_path, monkeypatch)
    assert init(f"edm:{ncsn}") == (
        f"init_from edm:{ncsn}: its ncsnpp SongUNet is not the DDPMpp preset's network (the DDPMpp preset builds "
        "embedding_type='positional', this network has 'fourier'), so no suite preset can start from it.")
    adm, *_ = _case("adm-edm", tmp_path, monkeypatch)
    assert init(f"edm:{adm}") == (f"init_from edm:{adm}: its adm DhariwalUNet is built by no suite preset, so none "
                                  "can start from it.")
    assert init("optimal:digits?size=4") == (
        "init_from optimal:digits?size=4 is the optimal denoiser of a training set, which has no network weights; "
        "init_from takes a suite checkpoint or a published network file (edm:, uvit:, dit:).")
    from diffusers import DDIMScheduler

    pipe = write_unet_pipeline(tmp_path / "pipe", DDIMScheduler())
    assert init(f"diffusers:{pipe}") == (
        f"init_from diffusers:{pipe} is a diffusers model (UNet2DModel), not a network a suite preset builds; "
        "init_from takes a suite checkpoint or an edm:, uvit: or dit: file.")
    assert init(f"dit:{tmp_path / 'nope.pt'}") == f"init_from: DiT state dict {tmp_path / 'nope.pt'} does not exist."
    _file_dit(tmp_path / "d.pt")
    assert init(f"dit:{tmp_path / 'd.pt'}?num_heads=1") == (
        f"init_from dit:{tmp_path / 'd.pt'}?num_heads=1 holds a 'dit' model (lightning_repro.module.DiT), but this "
        "model is 'ddpmpp' (lightning_repro.module.DDPMpp); init_from needs a checkpoint of the same architecture.")


# ------------------------------------------------------------------------------ the studies' model entries


def test_hyperplane_takes_a_published_model_spec(tmp_path):
    import yaml

    from lightning_repro.nets.uvit import UViT
    from lightning_repro.studies import hyperplane

    torch.save(_randomised(UViT(8, 1, 1, patch_size=4, embed_dim=16, depth=2, num_heads=1), 41).state_dict(),
               tmp_path / "u.pth")
    cfg = {"models": {"uvit": f"uvit:{tmp_path / 'u.pth'}?num_heads=1", "optimal": "optimal"}, "size": 16,
           "wandb": False, "plane": {"resolution": 3, "margin": 0.0}, "sample": {"steps": 3}}
    path = tmp_path / "hp.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    (row,) = hyperplane.main(["--config", str(path), "--out", str(tmp_path / "out")])
    assert (row["model_a"], row["model_b"]) == ("uvit", "optimal") and 0.0 <= row["agreement"] <= 1.0
    with np.load(tmp_path / "out" / "labels.npz") as f:  # margin 0: the corners are the anchors
        lab = f["labels_uvit"]
        assert [lab[0, 0], lab[0, 2], lab[2, 0]] == [0, 1, 2]
    spec = f"dit:{tmp_path / 'd.pt'}?num_heads=1"
    _file_dit(tmp_path / "d.pt")  # class-conditional
    path.write_text(yaml.safe_dump({**cfg, "models": {"x": spec}}))
    with pytest.raises(SystemExit) as err:
        hyperplane.main(["--config", str(path), "--out", str(tmp_path / "out2")])
    assert str(err.value) == f"error: models.x: {spec} is class-conditional; the plane maps need unconditional models."
