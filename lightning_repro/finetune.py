"""Fine-tuning a pretrained ``DiffusionModule``: ``init_from`` + ``trainable`` (Zhang et al. 2024, Sec. 4.3, Fig. 11,
App. G: attention-only fine-tuning), and the check that a checkpoint holds this model's network.

``init_from`` names a lightning_repro checkpoint of the same architecture, or a published network file of that
preset's network (``edm:`` DDPM++ pickle -> ``DDPMpp``, ``uvit:`` / ``dit:`` state dicts -> ``UViT`` / ``DiT``;
``evaluation.resolve_model``, ``published.network.preset_module``); its *EMA* weights initialise both the
trained weights and the EMA at the start of ``fit`` (not when resuming, and never when a checkpoint is rebuilt:
its own ``state_dict`` wins).  ``trainable`` lists ``fnmatch`` patterns over the network's parameter names (as in
``nets/``, e.g. ``blocks.0.attn.qkv.weight``; ``model.net.<name>`` matches too): the others are frozen and stay out
of the optimiser.  ``None`` trains everything from scratch and the family's ``attention_patterns`` with
``init_from``; ``["*"]`` trains everything.
"""

from __future__ import annotations

import json
import os
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from .checkpoints import CKPT_KEY, file_sha256, load_checkpoint

__all__ = ["FineTuning"]


class FineTuning:
    """Mixin of ``DiffusionModule``: ``init_from`` / ``trainable`` and ``check_compatible``."""

    #: ``fnmatch`` patterns of the attention layers' parameters (names relative to the network): what
    #: ``trainable`` means by default when fine-tuning from ``init_from`` (paper App. G).
    attention_patterns: tuple[str, ...] = ()
    #: network settings that may differ between an ``init_from`` checkpoint and the model (not architecture)
    init_free_keys: tuple[str, ...] = ("dropout",)
    #: ``arch -> preset class name`` of the presets that hold this very network (a renamed preset and its old name)
    network_aliases: dict[str, str] = {}

    def same_network(self, arch: Any, class_name: str) -> bool:
        """Whether a checkpoint of ``arch`` written by preset ``class_name`` holds this preset's network."""
        cls = type(self)
        if (arch, class_name) == (self.arch, cls.__qualname__):
            return True
        return self.arch in self.network_aliases and self.network_aliases.get(arch) == class_name

    def network_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of the trained network; names relative to it (``blocks.0.attn.qkv.weight``)."""
        out = []
        for name, p in self.model.named_parameters():
            out.append((name[4:] if name.startswith("net.") else name, p))
        return out

    def _resolve_trainable(self, trainable, init_from) -> list[str] | None:
        if trainable is None:
            if not init_from:
                return None  # training from scratch: every parameter, exactly as without fine-tuning support
            if not self.attention_patterns:
                raise ValueError(f"{type(self).__name__} defines no attention layers to fine-tune by default; "
                                 f"set trainable (e.g. ['*'] for all parameters).")
            return list(self.attention_patterns)
        if isinstance(trainable, str):
            trainable = [trainable]
        pats = list(trainable)
        if not pats or not all(isinstance(p, str) and p for p in pats):
            raise ValueError(f"trainable must be a non-empty list of parameter-name patterns (e.g. ['*.attn.*'] or "
                             f"['*']), got {trainable!r}.")
        return pats

    @staticmethod
    def _matches(name: str, pattern: str) -> bool:
        return fnmatchcase(name, pattern) or fnmatchcase(f"model.net.{name}", pattern)

    def _freeze_untrainable(self) -> None:
        """``requires_grad=False`` on every network parameter no ``trainable`` pattern selects (one sentence on a
        pattern that matches nothing).  Parameters the network itself keeps fixed (DiT's ``pos_embed``) stay fixed."""
        pats = self.trainable_patterns
        if pats is None:
            return
        named = self.network_parameters()
        for pat in pats:
            if not any(self._matches(n, pat) for n, _ in named):
                hint = [n for n in (n for n, _ in named) if any(self._matches(n, a) for a in self.attention_patterns)]
                hint = (hint or [n for n, _ in named])[:3]
                extra = ""
                if self.hparams.get("init_from") and self.hparams.get("trainable") is None:
                    extra = " (the default attention patterns: this configuration has no attention layers)"
                raise ValueError(f"trainable pattern {pat!r} matches no parameter of the {type(self).__name__} "
                                 f"network{extra}; names look like {', '.join(hint)} (see network_parameters()).")
        selected = 0
        for name, p in named:
            keep = p.requires_grad and any(self._matches(name, pat) for pat in pats)
            p.requires_grad_(keep)
            selected += int(keep)
        if not selected:
            raise ValueError(f"trainable patterns {pats} select only parameters the {type(self).__name__} network "
                             f"keeps fixed; nothing would be trained.")

    def parameter_counts(self) -> tuple[int, int]:
        """``(trainable, total)`` numbers of network parameters (elements)."""
        params = list(self.model.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def trainable_summary(self) -> str:
        """``"trainable N / total M parameters (x%)"``."""
        n, m = self.parameter_counts()
        return f"trainable {n:,} / total {m:,} parameters ({100.0 * n / max(m, 1):.2f}%)"

    def check_compatible(self, meta: dict[str, Any], path: str, what: str = "init_from") -> None:
        """One sentence unless checkpoint ``path`` (metadata ``meta``) holds the same architecture, network settings
        (but ``init_free_keys``), kernel and preconditioning; ``what="ckpt_path"`` (resuming) also needs the same
        image shape and number of classes.  ``what`` names the option in the sentence."""
        cls = type(self)
        mine = cls.class_path()
        theirs = str(meta.get("class_path", "?"))
        needs = "init_from needs" if what == "init_from" else "resuming needs"
        if not self.same_network(meta.get("arch"), theirs.rsplit(".", 1)[-1]):
            raise ValueError(f"{what} {path} holds a {meta.get('arch')!r} model ({theirs}), but this model is "
                             f"{self.arch!r} ({mine}); {needs} a checkpoint of the same architecture.")

        def norm(v):
            return json.loads(json.dumps(v, default=str))  # tuples -> lists, as a config file would give them

        hp = meta.get("hparams") or {}
        net_cfg = getattr(self, "_net_cfg", {})
        diffs = [f"{k}={norm(hp.get(k))!r} (this model: {norm(v)!r})" for k, v in net_cfg.items()
                 if k not in self.init_free_keys and norm(hp.get(k)) != norm(v)]
        if diffs:
            raise ValueError(f"{what} {path} has a different {cls.__qualname__} network: {'; '.join(diffs)}; "
                             f"{needs} the same architecture settings.")
        if what != "init_from":
            for key, own in (("image_shape", list(self.image_shape)), ("num_classes", self.num_classes)):
                if norm(meta.get(key)) != own:
                    raise ValueError(f"{what} {path} was trained with {key} {norm(meta.get(key))!r}, but this model "
                                     f"has {own!r} (from the data module); {needs} the same data shape.")
        for key, own in (("kernel", self.kernel.name), ("precond", self.precond_name)):
            if meta.get(key) != own:
                raise ValueError(f"{what} {path} was trained with {key} {meta.get(key)!r}, but this model uses "
                                 f"{own!r}; {'fine-tuning' if what == 'init_from' else 'resuming'} needs the same "
                                 f"kernel and preconditioning (kernel_kwargs may differ).")

    @torch.no_grad()
    def load_init_weights(self, path: str | os.PathLike | None = None) -> None:
        """Copy the EMA weights of checkpoint ``path`` (default: ``init_from``) into both the model and the EMA.

        Called by ``on_fit_start`` (not when resuming).  Raises one sentence on a missing / unreadable file, a
        different architecture, or parameters whose names or shapes differ (naming the first few).
        """
        path = str(path if path is not None else self.hparams.init_from)
        from .evaluation.references import is_model_spec

        meta, state, provenance = _published_init(path) if is_model_spec(path) else _checkpoint_init(path)
        self.check_compatible(meta, path)
        own = self.ema.state_dict()
        shape = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                 if k in state and state[k].shape != v.shape]
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]

        def first(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

        if shape:
            raise ValueError(f"init_from {path}: {len(shape)} parameter(s) differ in shape from this model "
                             f"(checkpoint vs model): {first(shape)}.")
        if missing or unexpected:
            parts = ([f"missing {first(missing)}"] if missing else []) + (
                [f"unexpected {first(unexpected)}"] if unexpected else [])
            raise ValueError(f"init_from {path}: parameter names differ from this model: {'; '.join(parts)}.")
        self.model.load_state_dict(state)
        self.ema.load_state_dict(state)
        self._init_loaded = True
        self.init_provenance = provenance

    #: ``{"init_from_sha256", "init_from_format"}`` of the loaded ``init_from`` (kept in the checkpoint metadata)
    init_provenance: dict[str, Any] = {}

    def on_fit_start(self) -> None:
        """Fine-tuning: load ``init_from`` (unless this fit resumes a checkpoint) and print the trainable count."""
        resuming = self._trainer is not None and bool(self.trainer.ckpt_path)
        if self.hparams.get("init_from") and not self._init_loaded and not resuming:
            self.load_init_weights()
        if self.trainable_patterns is not None and (self._trainer is None or self.trainer.is_global_zero):
            src = f"from {self.hparams.init_from}" if self.hparams.get("init_from") else "from scratch"
            print(f"fine-tuning {src}: {self.trainable_summary()}; trainable patterns {self.trainable_patterns}",
                  flush=True)


# ------------------------------------------------------------------------------------------- init_from sources




def _checkpoint_init(path: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(metadata, EMA state, provenance) of a suite checkpoint."""
    try:
        ckpt = load_checkpoint(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"init_from checkpoint {path} does not exist.") from None
    except ValueError as err:
        raise ValueError(f"init_from: {err}") from None
    state = {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.")}
    return ckpt[CKPT_KEY], state, {"init_from_sha256": file_sha256(path), "init_from_format": "lightning_repro"}


def _published_init(spec: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(metadata, EMA state, provenance) of a published network (``evaluation.resolve_model``) in the suite preset
    that builds it (``published.network.preset_module``), or one sentence on why it initialises no preset."""
    from .evaluation.references import resolve_model
    from .published.network import PRESET_OF, preset_mismatch, preset_module

    if spec.startswith("optimal:"):
        raise ValueError(f"init_from {spec} is the optimal denoiser of a training set, which has no network "
                         "weights; init_from takes a suite checkpoint or a published network file (edm:, uvit:, dit:).")
    try:
        ref = resolve_model(spec)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"init_from: {err}") from None
    except ValueError as err:
        raise ValueError(f"init_from: {err}") from None
    net = getattr(ref, "_net", None)
    if net is None:
        raise ValueError(f"init_from {spec} is a {ref.kind} model ({ref.info.get('arch')}), not a network a suite "
                         f"preset builds; init_from takes a suite checkpoint or an edm:, uvit: or dit: file.")
    why = preset_mismatch(net)
    if why is not None:
        what = f"its {net.info.get('arch', net.net)} {net.net}"
        if net.net in PRESET_OF:
            raise ValueError(f"init_from {spec}: {what} is not the {PRESET_OF[net.net]} preset's network ({why}), so "
                             "no suite preset can start from it.")
        raise ValueError(f"init_from {spec}: {what} is built by no suite preset, so none can start from it.")
    module = preset_module(net)
    ckpt: dict[str, Any] = {}
    module.on_save_checkpoint(ckpt)
    fmt = net.info.get("format", ref.kind)
    return ckpt[CKPT_KEY], dict(module.ema.state_dict()), {"init_from_sha256": ref.sha256, "init_from_format": fmt}
