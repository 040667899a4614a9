"""NVlabs/edm network pickles (Karras et al. 2022) read as data, mapped onto the suite's ``SongUNet`` and kernels.

An edm snapshot (``network-snapshot-*.pkl``) is a plain pickle of ``{"ema": net, "loss_fn": ..., ...}`` whose
networks are ``torch_utils.persistence`` objects: each reduces to ``_reconstruct_persistent_obj(meta)`` with
``meta = {type, version, module_src, class_name, state}`` (``state`` is the module's ``__dict__``, holding its
``_init_kwargs``, ``_parameters``, ``_buffers`` and ``_modules``).  ``EDMUnpickler`` turns each such call into an
inert ``PersistentRecord`` (the embedded source is kept as text and never executed) and refuses every global
outside a short allow-list, naming it.  The suite's own ``SongUNet`` (DDPM++, NCSN++) or ``DhariwalUNet``
(ADM) is then built from the record's class name and init kwargs and loaded with its tensors.

Preconditionings (edm ``training/networks.py``), with ``F`` the network:

* ``EDMPrecond``: ``c_skip = sd^2/(s^2+sd^2)``, ``c_out = s sd/sqrt(s^2+sd^2)``, ``c_in = 1/sqrt(s^2+sd^2)``,
  ``c_noise = ln(s)/4``: the suite's ``EDMPrecond`` on ``EDMKernel(sigma_data=sd)``.
* ``VPPrecond``: ``c_skip = 1``, ``c_out = -s``, ``c_in = 1/sqrt(s^2+1)``, ``c_noise = (M-1) t(s)``: the suite's
  ``EpsPrecond`` on ``VPKernel(beta_min, beta_min + beta_d, epsilon_t)`` (``c_in = s(t) = 1/sqrt(1+s^2)``; M = 1000).
* ``VEPrecond``: ``c_skip = 1``, ``c_out = +s``, ``c_in = 1``, ``c_noise = ln(s/2)``: the suite's ``EpsPrecond``
  on ``VEKernel(sigma_min, sigma_max)`` (``c_out = -s``) with the output conv negated, which is exact.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .network import PublishedNet, sha256_of

__all__ = ["PersistentRecord", "TorchContainer", "EDMUnpickler", "read_edm_pickle", "EDM_PRECONDS"]

EDM_PRECONDS = ("EDMPrecond", "VPPrecond", "VEPrecond")
_SONG_KEYS = {  # edm SongUNet argument -> the suite's SongUNet argument
    "label_dim": "num_classes", "augment_dim": "augment_dim", "model_channels": "model_channels",
    "channel_mult": "channel_mult", "channel_mult_emb": "channel_mult_emb", "num_blocks": "num_blocks",
    "attn_resolutions": "attn_resolutions", "dropout": "dropout", "embedding_type": "embedding_type",
    "channel_mult_noise": "channel_mult_noise", "encoder_type": "encoder_type", "resample_filter": "resample_filter",
}
_ADM_KEYS = ("label_dim", "augment_dim", "model_channels", "channel_mult", "channel_mult_emb", "num_blocks",
             "attn_resolutions", "dropout")
_SONG_IGNORED = ("img_resolution", "in_channels", "out_channels", "label_dropout", "decoder_type")


class _ModuleState:
    """An ``nn.Module``'s pickled ``__dict__`` as data: tensors by ``state_dict`` name."""

    state: dict[str, Any]

    def tensors(self, prefix: str = "") -> dict[str, Tensor]:
        """Parameters and buffers of this module and its sub-modules, by their ``state_dict`` names."""
        out: dict[str, Tensor] = {}
        state = getattr(self, "state", None) or {}  # a container pickled without BUILD has none
        for group in ("_parameters", "_buffers"):
            for k, v in (state.get(group) or {}).items():
                if v is not None:
                    out[prefix + k] = v.detach() if isinstance(v, Tensor) else v
        for k, child in (state.get("_modules") or {}).items():
            if isinstance(child, _ModuleState):
                out.update(child.tensors(f"{prefix}{k}."))
        return out


@dataclass
class PersistentRecord(_ModuleState):
    """One ``torch_utils.persistence`` object as data: its class name, init arguments and state (never run)."""

    class_name: str
    module_src: str
    state: dict[str, Any] = field(repr=False)

    @property
    def init_kwargs(self) -> dict[str, Any]:
        return dict(self.state.get("_init_kwargs") or {})


class TorchContainer(_ModuleState):
    """A ``torch.nn`` container (``ModuleDict``, ``ModuleList``, ``Sequential``) read as data: ``NEWOBJ`` makes an
    empty one, ``BUILD`` hands it the module ``__dict__`` (no torch code runs)."""

    def __init__(self, *args):
        self.state = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.state = dict(state) if isinstance(state, dict) else {}


class _EasyDict(dict):
    """``dnnlib.EasyDict`` read as a plain dict."""


def _persistent(meta: dict[str, Any]) -> PersistentRecord:
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise pickle.UnpicklingError("a torch_utils.persistence record is not a {type: 'class', class_name, ...} dict")
    return PersistentRecord(meta["class_name"], str(meta.get("module_src", "")), dict(meta.get("state") or {}))


def _storage_from_bytes(data: bytes):
    """``torch.storage._load_from_bytes`` with ``weights_only=True`` (a storage in torch's legacy format)."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _parameter(data: Tensor, requires_grad: bool = False, *_hooks_or_state) -> Tensor:
    """``torch._utils._rebuild_parameter(_with_state)`` as the plain tensor (hooks and extra state are dropped)."""
    return data


def _allowed() -> dict[tuple[str, str], Any]:
    import numpy as np

    allowed: dict[tuple[str, str], Any] = {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
        ("collections", "OrderedDict"): OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("dnnlib.util", "EasyDict"): _EasyDict,
        ("numpy", "dtype"): np.dtype,
    }
    for name in ("ModuleDict", "ModuleList", "Sequential"):
        allowed[("torch.nn.modules.container", name)] = TorchContainer
    try:  # numpy >= 2 moved numpy.core to numpy._core; pickles name either
        from numpy._core.multiarray import scalar
    except ImportError:
        from numpy.core.multiarray import scalar
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "scalar")] = scalar
    return allowed


class EDMUnpickler(pickle.Unpickler):
    """A pickle reader that resolves only allow-listed globals (persistence records become ``PersistentRecord``)."""

    def __init__(self, file, name: str = "pickle"):
        super().__init__(file)
        self.name, self.allowed = name, _allowed()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        raise pickle.UnpicklingError(
            f"{self.name} refers to the global {module}.{name}, which is not on the edm pickle allow-list "
            "(tensors, torch.nn containers, OrderedDict, EasyDict, numpy scalars, torch_utils.persistence records); "
            "it was refused.")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(f"{self.name} uses persistent ids, which an edm network pickle does not.")


def read_edm_pickle(path: str | Path, key: str = "ema") -> PublishedNet:
    """Read ``path`` (an edm snapshot or a bare pickled network) as data and map its network ``key`` onto the suite."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"edm pickle {path} does not exist.")
    with open(path, "rb") as f:
        try:
            data = EDMUnpickler(f, name=f"edm pickle {path}").load()
        except pickle.UnpicklingError as err:
            msg = str(err) if str(err).startswith("edm pickle") else f"edm pickle {path}: {err}."
            raise ValueError(msg) from None
        except Exception as err:  # truncated file, not a pickle, ...
            reason = (str(err).splitlines() or [""])[0].rstrip(".")
            raise ValueError(f"edm pickle {path} could not be read (truncated or not a pickle?): "
                             f"{type(err).__name__}: {reason}.") from None
    net = data.get(key) if isinstance(data, dict) else data
    if not isinstance(net, PersistentRecord):
        raise ValueError(f"edm pickle {path} holds no persistent network under {key!r} (an edm snapshot has 'ema').")
    out = _map_network(net, str(path))
    out.info["sha256"] = sha256_of(path)
    return out


def _map_network(rec: PersistentRecord, where: str) -> PublishedNet:
    if rec.class_name not in EDM_PRECONDS:
        raise ValueError(f"{where}: network class {rec.class_name!r} is not supported (expected one of "
                         f"{', '.join(EDM_PRECONDS)}).")
    pk = rec.init_kwargs
    model = (rec.state.get("_modules") or {}).get("model")
    if not isinstance(model, PersistentRecord) or model.class_name not in ("SongUNet", "DhariwalUNet"):
        name = model.class_name if isinstance(model, PersistentRecord) else type(model).__name__
        raise ValueError(f"{where}: the {rec.class_name}'s model is {name}; only SongUNet (DDPM++, NCSN++) and "
                         "DhariwalUNet (ADM) are supported.")
    net_kwargs = _song_kwargs(model, where)
    state = _song_state(model.tensors(), net_kwargs["img_resolution"], negate_out=rec.class_name == "VEPrecond")
    kernel = _kernel_spec(rec.class_name, pk, where)
    arch = {("positional", "standard"): "ddpmpp", ("fourier", "residual"): "ncsnpp"}.get(
        (net_kwargs.get("embedding_type", "positional"), net_kwargs.get("encoder_type", "standard")), "songunet")
    arch = "adm" if model.class_name == "DhariwalUNet" else arch
    info = {"format": "edm-pickle", "arch": arch, "edm_precond": rec.class_name, "kernel": kernel["name"]}
    precond = "edm" if rec.class_name == "EDMPrecond" else "eps"
    return PublishedNet(model.class_name, net_kwargs, state, precond, kernel, info)


def _song_kwargs(model: PersistentRecord, where: str) -> dict[str, Any]:
    """edm ``SongUNet`` / ``DhariwalUNet`` init kwargs -> the suite's (EDM's sin/cos order for SongUNet)."""
    kw, cls = model.init_kwargs, model.class_name
    if model.state.get("_init_args"):
        raise ValueError(f"{where}: the {cls} was built with positional arguments, which this reader does not map.")
    keys = _SONG_KEYS if cls == "SongUNet" else {k: v for k, v in _SONG_KEYS.items() if k in _ADM_KEYS}
    unknown = sorted(k for k in kw if k not in keys and k not in _SONG_IGNORED)
    if unknown:
        raise ValueError(f"{where}: {cls} argument(s) {', '.join(unknown)} are not supported.")
    if kw.get("decoder_type", "standard") != "standard" or kw.get("encoder_type", "standard") == "skip":
        raise ValueError(f"{where}: SongUNet encoder_type {kw.get('encoder_type')!r} / decoder_type "
                         f"{kw.get('decoder_type')!r} is not supported (DDPM++ and NCSN++ use standard / residual "
                         "encoders and the standard decoder).")
    out = {_SONG_KEYS[k]: v for k, v in kw.items() if k in _SONG_KEYS}
    for k in ("channel_mult", "attn_resolutions", "resample_filter"):
        if k in out:
            out[k] = [int(v) for v in out[k]]
    if int(kw["in_channels"]) != int(kw["out_channels"]):
        raise ValueError(f"{where}: {cls} in_channels {kw['in_channels']} != out_channels {kw['out_channels']}.")
    head = {"img_resolution": int(kw["img_resolution"]), "in_channels": int(kw["in_channels"]),
            "out_channels": int(kw["out_channels"])}
    if cls == "DhariwalUNet":  # the suite's defaults are edm's (channel_mult [1, 2, 3, 4], ...)
        return {**head, **out}
    out.setdefault("channel_mult", [1, 2, 2, 2])  # edm's SongUNet default
    return {**head, **out, "swap_sin_cos": True}


def _song_state(tensors: dict[str, Tensor], res: int, negate_out: bool) -> dict[str, Tensor]:
    """edm parameter names -> the suite's: the level-0 ``aux_norm`` / ``aux_conv`` are ``out_norm`` / ``out_conv``;
    the resampling filters (fixed by ``resample_filter``) are dropped; VE's ``c_out = +sigma`` negates ``out_conv``."""
    out = {}
    for k, v in tensors.items():
        if k.endswith("resample_filter"):
            continue
        k = k.replace(f"dec.{res}x{res}_aux_norm.", "out_norm.").replace(f"dec.{res}x{res}_aux_conv.", "out_conv.")
        out[k] = -v if negate_out and k.startswith("out_conv.") else v
    return out


def _kernel_spec(precond: str, pk: dict[str, Any], where: str) -> dict[str, Any]:
    """The suite kernel whose ``network_time`` / ``c_in`` reproduce the edm preconditioning (see the module doc)."""
    if precond == "EDMPrecond":
        return {"name": "edm", "kwargs": {"sigma_data": float(pk.get("sigma_data", 0.5))}}
    if precond == "VEPrecond":
        return {"name": "ve", "kwargs": {"sigma_min": float(pk.get("sigma_min", 0.02)),
                                         "sigma_max": float(pk.get("sigma_max", 100))}}
    if int(pk.get("M", 1000)) != 1000:
        raise ValueError(f"{where}: VPPrecond with M={pk.get('M')} is not supported (the suite's VP time is 999 t).")
    beta_min, beta_d = float(pk.get("beta_min", 0.1)), float(pk.get("beta_d", 19.9))
    return {"name": "vp", "kwargs": {"beta_min": beta_min, "beta_max": beta_min + beta_d,
                                     "epsilon_t": float(pk.get("epsilon_t", 1e-5))}}
