"""Published checkpoints: NVlabs/edm pickles read as data, U-ViT / DiT state dicts, converted checkpoints, specs.

The edm pickles are written here in the ``torch_utils.persistence`` format (each network module reduces to
``torch_utils.persistence._reconstruct_persistent_obj(meta)``, ``meta`` holding the module source, class name and
``__dict__`` with ``_init_kwargs``, parameters, buffers and sub-modules; containers are plain ``torch.nn``
objects), with an embedded source that would write a marker file and raise if it were ever executed.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from lightning_repro.nets.adm_unet import DhariwalUNet
from lightning_repro.nets.dit import DiT
from lightning_repro.nets.edm_unet import SongUNet
from lightning_repro.nets.uvit import UViT
from lightning_repro.published import read_dit, read_edm_pickle, read_published, read_uvit
from lightning_repro.published.__main__ import main as published_main

# ------------------------------------------------------------------------------- the persistence format


def _reconstruct_persistent_obj(meta):  # only its name is pickled; the loader must never call it
    raise AssertionError("the real torch_utils.persistence reconstruct function was called")


class _Persistent(nn.Module):
    """Pickles the way an edm ``@persistent_class`` instance does (``persistence.py``'s ``__reduce__``)."""

    def __init__(self, class_name: str, init_kwargs: dict, src: str):
        super().__init__()
        self._orig_class_name, self._orig_module_src = class_name, src
        self._init_args, self._init_kwargs = (), dict(init_kwargs)

    def __reduce__(self):
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_orig")}
        meta = dict(type="class", version=6, module_src=self._orig_module_src,
                    class_name=self._orig_class_name, state=state)
        return (_reconstruct_persistent_obj, (meta,))


class EasyDict(dict):  # pickled by reference as dnnlib.util.EasyDict, as edm's dataset_kwargs are
    pass


def _edm_tree(flat: dict[str, torch.Tensor], root: _Persistent, src: str) -> _Persistent:
    """Nest edm-named tensors into modules: ``enc`` / ``dec`` are ``nn.ModuleDict``s, the rest persistent."""
    for name, t in flat.items():
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if part not in mod._modules:
                mod.add_module(part, nn.ModuleDict() if part in ("enc", "dec") else _Persistent("Conv2d", {}, src))
            mod = mod._modules[part]
        if leaf == "resample_filter":
            mod.register_buffer(leaf, t.clone())
        else:
            mod.register_parameter(leaf, nn.Parameter(t.clone(), requires_grad=False))
    return root


def _edm_names(sd: dict[str, torch.Tensor], res: int, filt: list[int], out_layer: bool) -> dict[str, torch.Tensor]:
    """The suite's names -> edm's (SongUNet's output layer; resampling-filter buffers of up/down convs)."""
    f = torch.tensor(filt, dtype=torch.float32)
    f = torch.outer(f, f)[None, None] / f.sum().square()
    out = {}
    for k, v in sd.items():
        if out_layer:
            k = k.replace("out_norm.", f"dec.{res}x{res}_aux_norm.").replace("out_conv.", f"dec.{res}x{res}_aux_conv.")
        out[k] = v
        mod = k.rsplit(".", 1)[0]
        if k.endswith(".weight") and (("_down." in k or "_up." in k) and mod.endswith(("conv0", "skip"))
                                      or "aux_residual" in mod):
            out[f"{mod}.resample_filter"] = f
    return out


def _write_edm_pickle(path, monkeypatch, marker, precond: str, pk: dict, song: dict, sd: dict, res: int,
                      model_type: str = "SongUNet") -> None:
    src = (f"import pathlib\npathlib.Path({str(marker)!r}).write_text('executed')\n"
           "raise RuntimeError('embedded source executed')\n")
    names = _edm_names(sd, res, song.get("resample_filter", [1, 1]), out_layer=model_type == "SongUNet")
    model = _edm_tree(names, _Persistent(model_type, {"img_resolution": res, "in_channels": 3, "out_channels": 3,
                                                      **song}, src), src)
    net = _Persistent(precond, {"img_resolution": res, "img_channels": 3, "label_dim": song.get("label_dim", 0),
                                "use_fp16": False, **pk, "model_type": model_type}, src)
    net.add_module("model", model)
    fake = types.ModuleType("torch_utils.persistence")
    fake._reconstruct_persistent_obj = _reconstruct_persistent_obj
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    util = types.ModuleType("dnnlib.util")
    util.EasyDict, EasyDict.__module__ = EasyDict, "dnnlib.util"
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
        m.setitem(sys.modules, "torch_utils.persistence", fake)
        m.setitem(sys.modules, "dnnlib", types.ModuleType("dnnlib"))
        m.setitem(sys.modules, "dnnlib.util", util)
        kwargs = EasyDict(resolution=np.int64(res), xflip=False)  # numpy scalars, as edm's dataset_kwargs hold
        data = {"ema": net, "loss_fn": None, "augment_pipe": None, "dataset_kwargs": kwargs}
        path.write_bytes(pickle.dumps(data))
    _reconstruct_persistent_obj.__module__ = EasyDict.__module__ = __name__
    raw = path.read_bytes()
    for name in (b"torch_utils.persistence", b"_reconstruct_persistent_obj", b"ModuleDict", b"dnnlib.util", b"scalar"):
        assert name in raw
    assert "torch_utils" not in sys.modules


def _randomised(net: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net.eval()


TINY = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.13)
NCSNPP = dict(embedding_type="fourier", encoder_type="residual", decoder_type="standard", channel_mult_noise=2,
              resample_filter=[1, 3, 3, 1])


def _edm_reference(precond: str, pk: dict, net: nn.Module, x, sigma, labels):
    """edm ``training/networks.py``'s formulas, written out: D = c_skip x + c_out F(c_in x, c_noise)."""
    s = sigma.reshape(-1, 1, 1, 1).double()
    if precond == "EDMPrecond":
        sd = pk.get("sigma_data", 0.5)
        c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
        c_in, c_noise = 1 / (sd**2 + s**2).sqrt(), s.log() / 4
    elif precond == "VEPrecond":
        c_skip, c_out, c_in, c_noise = 1.0, s, torch.ones_like(s), (0.5 * s).log()
    else:
        bmin, bd = pk.get("beta_min", 0.1), pk.get("beta_d", 19.9)
        t = ((bmin**2 + 2 * bd * (1 + s**2).log()).sqrt() - bmin) / bd
        c_skip, c_out, c_in, c_noise = 1.0, -s, 1 / (s**2 + 1).sqrt(), 999 * t
    f = net((c_in * x).float(), c_noise.flatten().float(), labels)
    return (c_skip * x.double() + c_out * f.double()).float()


CASES = {
    "ddpmpp-edm": ("EDMPrecond", {"sigma_data": 0.5}, {**TINY, "augment_dim": 9}, None),
    "ncsnpp-ve": ("VEPrecond", {"sigma_min": 0.02, "sigma_max": 100}, {**TINY, **NCSNPP, "label_dim": 3}, [0, 2, -1]),
    "ddpmpp-vp": ("VPPrecond", {"beta_d": 19.9, "beta_min": 0.1, "M": 1000, "epsilon_t": 1e-5},
                  {**TINY, "label_dim": 3}, [1, -1, 2]),
    "adm-edm": ("EDMPrecond", {"sigma_data": 0.5}, {**TINY, "model_channels": 64, "label_dim": 3, "augment_dim": 9},
                [2, 0, -1]),
}


def _suite_net(song: dict, adm: bool) -> nn.Module:
    kw = {("num_classes" if k == "label_dim" else k): v for k, v in song.items() if k != "decoder_type"}
    return _randomised(DhariwalUNet(8, 3, 3, **kw) if adm else SongUNet(8, 3, 3, swap_sin_cos=True, **kw), 0)


def _case(name, tmp_path, monkeypatch):
    precond, pk, song, labels = CASES[name]
    adm = name.startswith("adm")
    src = _suite_net(song, adm)
    path, marker = tmp_path / f"{name}.pkl", tmp_path / "marker.txt"
    _write_edm_pickle(path, monkeypatch, marker, precond, pk, song, src.state_dict(), 8,
                      "DhariwalUNet" if adm else "SongUNet")
    return path, marker, src, precond, pk, (torch.tensor(labels) if labels else None)


@pytest.mark.parametrize("name", list(CASES))
def test_edm_pickle_loads_as_data_and_matches_the_edm_formulas(name, tmp_path, monkeypatch):
    path, marker, src, precond, pk, labels = _case(name, tmp_path, monkeypatch)
    pub = read_edm_pickle(path)
    assert not marker.exists()  # the embedded module source never ran
    assert pub.info["edm_precond"] == precond and pub.info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert pub.info["arch"] == name.split("-")[0]
    den = pub.denoiser("cpu")
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.05, 1.3, 40.0])
    with torch.no_grad():
        ref = _edm_reference(precond, pk, src, x, sigma, labels)
        out = den(x, sigma, labels)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert not marker.exists()


def test_edm_pickle_refuses_a_global_outside_the_allow_list(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(b"cos\nsystem\n(S'touch pwned'\ntR.")
    with pytest.raises(ValueError) as err:
        read_edm_pickle(path)
    assert str(err.value) == (
        f"edm pickle {path} refers to the global os.system, which is not on the edm pickle allow-list (tensors, "
        "torch.nn containers, OrderedDict, EasyDict, numpy scalars, torch_utils.persistence records); it was refused.")
    assert not (tmp_path / "pwned").exists()
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(pickle.dumps({"ema": [torch.zeros(3)] * 2})[:40])
    with pytest.raises(ValueError) as err:
        read_edm_pickle(cut)
    assert str(err.value) == f"edm pickle {cut}: pickle data was truncated."


def test_augment_layer_matches_the_released_parameter_count_and_is_inert_at_zero_labels():
    with torch.device("meta"):
        big = SongUNet(32, 3, 3, model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, augment_dim=9)
    assert sum(p.numel() for p in big.parameters()) == 55_733_891
    with_aug = _randomised(SongUNet(8, 3, 3, **TINY, augment_dim=9), 3)
    plain = SongUNet(8, 3, 3, **TINY).eval()
    plain.load_state_dict({k: v for k, v in with_aug.state_dict().items() if not k.startswith("map_augment")})
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.1, -0.7])
    with torch.no_grad():
        assert torch.equal(with_aug(x, t, augment_labels=torch.zeros(2, 9)), plain(x, t))


def test_convert_ddpmpp_is_a_suite_checkpoint_and_ncsnpp_an_edm_reference(tmp_path, monkeypatch, capsys):
    from lightning_repro.evaluation import resolve_model
    from lightning_repro.module import load_denoiser

    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 7.0])
    for name, preset in (("ddpmpp-edm", True), ("ncsnpp-ve", False)):
        path, _, _, _, _, labels = _case(name, tmp_path, monkeypatch)
        labels = labels[:2] if labels is not None else None
        out = tmp_path / f"{name}.ckpt"
        assert published_main(["convert", str(path), str(out)]) == 0
        assert f"-> {out}; loadable by " + ("module.load_denoiser and " if preset else "") in capsys.readouterr().out
        torch.load(out, weights_only=True)
        with torch.no_grad():
            want = read_edm_pickle(path).denoiser()(x, sigma, labels)
            ref = resolve_model(f"edm:{out}")
            torch.testing.assert_close(ref.denoiser(torch.device("cpu"))(x, sigma, labels), want, rtol=0, atol=1e-5)
            if preset:
                den, kernel = load_denoiser(out)
                assert kernel.name == "edm"
                torch.testing.assert_close(den(x, sigma, labels), want, rtol=0, atol=1e-5)
            else:
                with pytest.raises(ValueError, match="no 'lightning_repro' metadata"):
                    load_denoiser(out)


def test_edm_reference_spec_provenance_and_training_set(tmp_path, monkeypatch):
    from lightning_repro.evaluation import resolve_model

    path, *_ = _case("ddpmpp-edm", tmp_path, monkeypatch)
    ref = resolve_model(f"edm:{path}")
    d = ref.describe()
    assert (d["kind"], d["format"], d["edm_precond"], d["precond"], d["kernel"]) == (
        "edm", "edm-pickle", "EDMPrecond", "edm", "edm")
    assert d["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and ref.image_shape == (3, 8, 8)
    assert ref.kernel().name == "edm" and ref.kernel().sigma_data == 0.5
    with pytest.raises(ValueError) as err:
        ref.training_set()
    assert str(err.value) == (f"edm:{path} is a published model that records no training set; name one to compute "
                              f"GL and nearest training images, e.g. 'edm:{path.resolve()}?data=cifar10'.")
    ref = resolve_model(f"edm:{path}?data=digits?size=16&subset_seed=0")
    images, _ = ref.training_set()
    assert images.shape == (16, 1, 8, 8)


# ------------------------------------------------------------------------------- U-ViT and DiT state dicts


def test_uvit_state_dict_in_the_reference_layout(tmp_path):
    src = _randomised(UViT(8, 3, 3, num_classes=4, patch_size=2, embed_dim=32, depth=2, num_heads=2), 5)
    sd = src.state_dict()
    for key in ("patch_embed.proj.weight", "in_blocks.0.attn.qkv.weight", "mid_block.mlp.fc1.weight",
                "out_blocks.0.skip_linear.weight", "decoder_pred.weight", "final_layer.weight", "pos_embed"):
        assert key in sd  # libs/uvit.py's names
    table = sd["label_emb.weight"]
    ref_sd = {**sd, "label_emb.weight": torch.cat([table[-1:], table[:-1]])}  # a null-row-first table
    path = tmp_path / "nnet_ema.pth"
    torch.save(ref_sd, path)
    pub = read_uvit(path, num_heads=2, null_row="first")
    assert pub.net_kwargs["num_classes"] == 4 and pub.kernel_spec["name"] == "vp" and pub.precond == "eps"
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([1.0, 400.0, 990.0]), torch.tensor([3, -1, 0])
    with torch.no_grad():
        torch.testing.assert_close(pub.build()(x, t, y), src(x, t, y), rtol=0, atol=1e-5)
    with pytest.raises(ValueError) as err:
        read_uvit(path)
    assert str(err.value) == f"{path}: width 32 is not a released configuration; give num_heads (e.g. ?num_heads=8)."


def test_dit_learn_sigma_keeps_the_epsilon_half(tmp_path):
    src = _randomised(DiT(8, 3, 3, num_classes=4, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                          learn_sigma=True), 6)
    path = tmp_path / "DiT-tiny.pt"
    torch.save(src.state_dict(), path)
    pub = read_dit(path, num_heads=2)
    assert pub.net_kwargs["num_classes"] == 4 and pub.info["learn_sigma"] and pub.kernel_spec["name"] == "vp_discrete"
    net = pub.build()
    assert net.out_channels == 3
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([3.0, 500.0, 999.0]), torch.tensor([1, -1, 3])
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, y), src(x, t, y)[:, :3], rtol=0, atol=1e-5)
    out = tmp_path / "dit.ckpt"
    assert published_main(["convert", str(path), str(out), "--num-heads", "2"]) == 0
    from lightning_repro.module import load_denoiser

    den, kernel = load_denoiser(out)
    sigma = kernel.sigma(t.double())[:, None, None, None]
    with torch.no_grad():  # DDPM epsilon-prediction: D = x - sigma eps(x / sqrt(1 + sigma^2), timestep)
        eps = src((x / (1 + sigma**2).sqrt()).float(), t, y)[:, :3]
        torch.testing.assert_close(((x - den(x, sigma.flatten(), y)) / sigma).float(), eps, rtol=0, atol=1e-5)
    lat = tmp_path / "latent.pt"
    torch.save(DiT(8, 4, 4, patch_size=2, hidden_size=32, depth=1, num_heads=2).state_dict(), lat)
    with pytest.raises(ValueError) as err:
        read_published("dit", str(lat), num_heads=2)
    assert str(err.value) == (f"{lat} is a latent DiT (4 channels), which needs the Stable Diffusion VAE decoder; "
                              "only pixel-space models are supported here.")


def test_uvit_and_dit_references_and_conversion(tmp_path):
    from lightning_repro.evaluation import resolve_model
    from lightning_repro.module import load_denoiser

    src = _randomised(UViT(8, 3, 3, patch_size=2, embed_dim=32, depth=2, num_heads=2), 7)
    path = tmp_path / "u.pth"
    torch.save(src.state_dict(), path)
    ref = resolve_model(f"uvit:{path}?num_heads=2")
    assert ref.describe()["format"] == "uvit-state-dict" and ref.kernel().name == "vp"
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.2, 3.0])
    out = tmp_path / "u.ckpt"
    assert published_main(["convert", str(path), str(out), "--num-heads", "2"]) == 0
    with torch.no_grad():
        want = ref.denoiser(torch.device("cpu"))(x, sigma)
        # epsilon-prediction on VP: D = x - sigma F(x / sqrt(1 + sigma^2), 999 t(sigma))
        t = ref.kernel().t_of_sigma(sigma.double())
        eps = src(x / (1 + sigma[:, None, None, None] ** 2).sqrt(), (999 * t).float())
        torch.testing.assert_close(want, x - sigma[:, None, None, None] * eps, rtol=0, atol=1e-5)
        torch.testing.assert_close(load_denoiser(out)[0](x, sigma), want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError) as err:
        resolve_model(f"dit:{path}?heads=2")
    assert str(err.value) == (f"'dit:{path}?heads=2': 'heads=2' is not one of the options num_heads=..., "
                              "null_row=..., kernel=..., vae=..., data=....")
    assert math.isfinite(float(want.abs().max()))


def test_ncsnpp_residual_down_is_one_strided_conv_with_the_composed_kernel():
    """edm's fused ``Conv2d(kernel=3, down=True, [1, 3, 3, 1])`` = conv(w, pad 3) then FIR stride 2 = one stride-2 conv
    with the 6x6 kernel ``K[c] = sum_{a + b = c} w[a] f[b]``, padding 2 (an independent formulation)."""
    from lightning_repro.nets.edm_unet import _ResidualDown

    m = _randomised(_ResidualDown(3, 5, [1, 3, 3, 1]), 9)
    f = torch.tensor([1.0, 3, 3, 1])
    f = torch.outer(f, f) / f.sum() ** 2
    k = torch.zeros(5, 3, 6, 6)
    for a0 in range(3):
        for a1 in range(3):
            k[:, :, a0:a0 + 4, a1:a1 + 4] += m.weight[:, :, a0, a1, None, None] * f
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(m(x), torch.nn.functional.conv2d(x, k, m.bias, stride=2, padding=2),
                                   rtol=0, atol=1e-5)


def test_adm_block_is_adaptive_group_norm_with_a_bare_resampled_skip():
    """ADM's down block (edm ``UNetBlock(adaptive_scale=True, skip_scale=1, eps=1e-5, resample_proj=False)``) written
    out: ``x' = avgpool(x) + conv1(silu(shift + GN(conv0(avgpool(silu(GN(x))))) (1 + scale)))``."""
    from lightning_repro.nets.edm_unet import SongUNetBlock

    b = _randomised(SongUNetBlock(8, 8, 12, down=True, adaptive_scale=True, skip_scale=1.0, eps=1e-5,
                                  resample_proj=False, channels_per_head=64), 10)
    assert b.skip is None and b.norm0.eps == 1e-5 and b.affine.out_features == 16
    x, emb = torch.randn(2, 8, 8, 8), torch.randn(2, 12)
    F = torch.nn.functional
    with torch.no_grad():
        h = b.conv0(F.avg_pool2d(F.silu(F.group_norm(x, 2, b.norm0.weight, b.norm0.bias, 1e-5)), 2))
        scale, shift = b.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(shift + F.group_norm(h, 2, b.norm1.weight, b.norm1.bias, 1e-5) * (1 + scale))
        torch.testing.assert_close(b(x, emb), b.conv1(h) + F.avg_pool2d(x, 2), rtol=0, atol=1e-5)


def test_class_tables_without_a_null_row(tmp_path):
    src = _randomised(UViT(8, 3, 3, num_classes=4, patch_size=2, embed_dim=32, depth=2, num_heads=2), 11)
    path = tmp_path / "u.pth"
    torch.save({**src.state_dict(), "label_emb.weight": src.label_emb.weight[:4].clone()}, path)  # 4 rows, no null
    pub = read_uvit(path, num_heads=2, null_row="none")
    assert pub.num_classes == 4 and torch.equal(pub.state_dict["label_emb.weight"][4], torch.zeros(32))
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([5.0, 700.0]), torch.tensor([3, 0])
    with torch.no_grad():
        torch.testing.assert_close(pub.build()(x, t, y), src(x, t, y), rtol=0, atol=1e-5)
    dit = _randomised(DiT(8, 3, 3, num_classes=4, patch_size=2, hidden_size=32, depth=1, num_heads=2,
                          class_dropout_prob=0.0), 12)
    torch.save(dit.state_dict(), tmp_path / "d.pt")
    pub = read_dit(tmp_path / "d.pt", num_heads=2, null_row="none")
    assert (pub.num_classes, pub.net_kwargs["class_dropout_prob"]) == (4, 0.0)
    with torch.no_grad():
        torch.testing.assert_close(pub.build()(x, t, y), dit(x, t, y), rtol=0, atol=1e-5)
    with pytest.raises(ValueError) as err:
        read_dit(tmp_path / "d.pt", num_heads=2, null_row="middle")
    assert str(err.value) == "null_row must be one of last, first, none, got 'middle'."
