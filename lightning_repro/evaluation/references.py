"""Model references: what one side of a comparison is, as a type (Zhang et al., ICML 2024, Sec. 2.1).

A command-line model spec (``path.ckpt``, ``optimal:<data spec>``, a sample folder / ``.npz``) resolves to a
``Reference``: its denoiser, kernel, image shape, training set and provenance.  Each kind is one class in
``REFERENCES``, keyed by its spec prefix (``@register_reference("optimal")`` handles ``optimal:...``); plain
paths are ``samples`` (a folder or ``.npz``) or ``checkpoint``.  ``optimal:`` is the empirical optimal
denoiser of Prop. 1 (``theory.EmpiricalOptimalDenoiser``); ``mog:`` the closed-form denoiser of the low-rank mixture a
``mog`` source draws from (Prop. 2, ``theory.LowRankMoG``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote_plus

import torch
from torch import Tensor

from ..data import SubsetDataModule
from ..kernels import Kernel, get_kernel
from .common import json_safe, safe_name
from .shards import SampleSet, SamplingOptions, generate_samples, load_samples

__all__ = [
    "is_model_spec",
    "Reference",
    "CheckpointReference",
    "OptimalReference",
    "MoGReference",
    "SamplesReference",
    "REFERENCES",
    "register_reference",
    "resolve_model",
    "resolve_models",
    "parse_data_spec",
    "data_identity",
]

_DM_KEYS = tuple(p for p in inspect.signature(SubsetDataModule.__init__).parameters if p != "self")
_DM_DROP = (
    "batch_size",
    "val_seeds",
    "flip",
    "data_seed",
    "on_device",
)  # do not change which images form the subset


# ---------------------------------------------------------------------------- data specs (optimal:)


def _parse_value(key: str, text: str) -> Any:
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    try:
        return json.loads(text)
    except ValueError:
        pass
    if key == "classes" and re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", text):
        return [int(v) for v in text.split(",")]
    return text


def parse_data_spec(spec: str, base: dict[str, Any] | None = None) -> tuple[dict[str, Any], str | None]:
    """``optimal:`` data spec -> (``SubsetDataModule`` kwargs, sampling-kernel name or None).

    ``spec`` is the text after ``optimal:`` (``"digits?size=64&subset_seed=0"``, ``"?size=16"``, ``""``);
    ``base`` is the partner model's data config, used when the source is omitted.
    """
    source, _, query = spec.partition("?")
    source = source.strip()
    if source:
        data: dict[str, Any] = {"source": source}
    else:
        if base is None:
            raise ValueError(
                f"'optimal:{spec}' names no data source and there is no other model whose training set it could "
                "take; write e.g. 'optimal:digits?size=64&subset_seed=0'."
            )
        data = {k: v for k, v in base.items() if k in _DM_KEYS}
        data["source_kwargs"] = dict(data.get("source_kwargs") or {})
    kernel = None
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        key, value = unquote_plus(key).strip(), unquote_plus(value)
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(
                f"'optimal:{spec}': {part!r} is not a key=value pair (write e.g. optimal:digits?size=64&subset_seed=0)."
            )
        val = _parse_value(key, value)
        if key == "kernel":
            kernel = str(val)
        elif key in _DM_KEYS:
            data[key] = val
        else:
            data["source_kwargs"] = {**(data.get("source_kwargs") or {}), key: val}
    return data, kernel


def _datamodule(data: dict[str, Any]) -> SubsetDataModule:
    return SubsetDataModule(**{k: v for k, v in data.items() if k in _DM_KEYS and k not in _DM_DROP})


def data_identity(data: dict[str, Any]) -> dict[str, Any]:
    """The fields that decide which images form a training subset (for hashing / provenance)."""
    keep = ("source", "size", "subset_seed", "class_balanced", "conditional", "source_kwargs", "classes")
    defaults = inspect.signature(SubsetDataModule.__init__).parameters
    out = {k: data.get(k, defaults[k].default) for k in keep}
    out["source_kwargs"] = dict(out["source_kwargs"] or {})
    return out


# ---------------------------------------------------------------------------- references


@dataclass
class Reference:
    """One side of a comparison.  Subclasses implement ``from_spec`` and ``_load_denoiser``."""

    kind: ClassVar[str] = ""  # the registry key, set by ``register_reference``
    partnered: ClassVar[bool] = False  # resolved after the others, with a partner (``optimal:`` alone)

    text: str  # as given on the command line
    label: str  # short display name
    name: str  # cache folder name
    sha256: str  # identity: checkpoint digest, digest of the optimal spec, or the samples' checkpoint digest
    image_shape: tuple[int, int, int]
    num_classes: int = 0
    info: dict[str, Any] = field(
        default_factory=dict
    )  # provenance: kind, arch, kernel, size, subset_seed, ...
    data: dict[str, Any] | None = None  # SubsetDataModule kwargs of its training set
    kernel_spec: dict[str, Any] | None = None  # {"name", "kwargs"} to rebuild the sampling kernel
    sampling: dict[str, Any] | None = None  # the sampler / steps / grid the model records as its own, if any
    _den: Any = field(default=None, repr=False)
    _train: tuple[Tensor, Tensor | None] | None = field(default=None, repr=False)

    @classmethod
    def from_spec(cls, spec: str, text: str, partner: Reference | None) -> Reference:
        """``text`` (``spec`` is ``text`` without the ``kind:`` prefix) -> a reference."""
        raise NotImplementedError

    @property
    def stored(self) -> SampleSet | None:
        """The samples this reference holds (None: it is a model that samples new seeds)."""
        return None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape the sampler works in: ``image_shape``, or a latent model's latent shape."""
        return self.image_shape

    def decoder(self, device: torch.device) -> Callable[[Tensor, float], Tensor] | None:
        """``decode(x, sigma_end)``: final sampler states -> images in [-1, 1] (latent models); None: identity."""
        return None

    def kernel(self) -> Kernel:
        if self.kernel_spec is None:
            raise ValueError(f"{self.text} records no noise kernel.")
        return get_kernel(self.kernel_spec["name"], **(self.kernel_spec.get("kwargs") or {}))

    def denoiser(self, device: torch.device):
        """The denoiser, loaded on first use (so cached samples never load weights)."""
        if self._den is None:
            self._den = self._load_denoiser(device)
        return self._den

    def _load_denoiser(self, device: torch.device):
        raise NotImplementedError

    def precision(self, requested: str, log: Callable[[str], None]) -> str:
        """The precision its network evaluations run in when ``requested``."""
        return requested

    def training_set(self) -> tuple[Tensor, Tensor | None]:
        """(images float [-1, 1] N x C x H x W, labels or None) of the model's training subset."""
        if self._train is None:
            if self.data is None:
                raise ValueError(
                    f"{self.text} records no training-data config, so its training set (for GL and the nearest "
                    "training image) is unknown."
                )
            dm = _datamodule(self.data)
            self._train = (dm.images, dm.labels)
        return self._train

    def describe(self) -> dict[str, Any]:
        """Provenance for ``results.json``: kind, arch, kernel, size, subset_seed, seed, source, sha256, ..."""
        return {**self.info, "label": self.label, "text": self.text}

    def config(self) -> dict[str, Any]:
        """The short description logged to W&B."""
        keys = ("kind", "arch", "kernel", "size", "subset_seed", "seed", "source", "sha256")
        return {k: self.info.get(k) for k in keys} | {"text": self.text}

    def samples_at(self, seeds: list[int], out: Path, options: SamplingOptions, log=print) -> SampleSet:
        """Its samples at ``seeds``: cached shards under ``out/samples/<name>_<tag>``, sampled where missing
        (with its own recorded sampler when ``options.model_sampling``)."""
        options = options.recorded(self.sampling)
        folder = out / "samples" / f"{self.name}_{options.cache_tag}"
        s = generate_samples(self, seeds, folder, options, log=log)
        log(
            f"{self.label}: reused {s.skipped} cached shard(s)"
            + (f", generated {s.generated}" if s.generated else "")
            + f" in {folder}"
        )
        return s


REFERENCES: dict[str, type[Reference]] = {}


def register_reference(kind: str):
    """Class decorator: specs ``<kind>:...`` resolve to this class."""

    def add(cls: type[Reference]) -> type[Reference]:
        cls.kind = kind
        REFERENCES[kind] = cls
        return cls

    return add


@register_reference("checkpoint")
@dataclass
class CheckpointReference(Reference):
    """A ``DiffusionModule`` checkpoint: its EMA denoiser; its training set ``SubsetDataModule(**meta["data"])``."""

    @classmethod
    def from_spec(cls, spec: str, text: str, partner: Reference | None) -> Reference:
        from ..module import CKPT_KEY, file_sha256, load_checkpoint

        path = Path(spec).expanduser()
        meta = load_checkpoint(path)[CKPT_KEY]
        hp = meta.get("hparams", {})
        sha = file_sha256(path)
        info = {"kind": cls.kind, "path": str(path.resolve()), "sha256": sha}
        info.update(
            {k: meta.get(k) for k in ("arch", "kernel", "precond", "size", "subset_seed", "seed", "source")}
        )
        sampling = meta.get("sampling") if isinstance(meta.get("sampling"), dict) else None
        if sampling:
            info["sampling"] = sampling
        return cls(
            text=text,
            label=checkpoint_label(path),
            name=f"{safe_name(path.stem)}-{sha[:10]}",
            sha256=sha,
            image_shape=tuple(int(v) for v in meta["image_shape"]),
            num_classes=int(meta.get("num_classes") or 0),
            info=info,
            data=meta.get("data"),
            kernel_spec={
                "name": hp.get("kernel", meta.get("kernel")),
                "kwargs": hp.get("kernel_kwargs") or {},
            },
            sampling=sampling,
        )

    def _load_denoiser(self, device: torch.device):
        from ..module import load_denoiser

        return load_denoiser(self.info["path"], device)[0]


def _partner_kernel(kernel_name: str | None, partner: Reference | None) -> dict[str, Any]:
    """A closed form's sampling kernel: the one its spec names, else its partner's, else EDM's."""
    if kernel_name is not None:
        spec = {"name": kernel_name, "kwargs": {}}
    elif partner is not None and partner.kernel_spec is not None:
        spec = partner.kernel_spec
    else:
        spec = {"name": "edm", "kwargs": {}}
    get_kernel(spec["name"], **spec["kwargs"])  # validate now
    return spec


@register_reference("optimal")
@dataclass
class OptimalReference(Reference):
    """``optimal:<data spec>``: the optimal denoiser of the empirical distribution of a training subset (Prop. 1)."""

    partnered: ClassVar[bool] = True

    @classmethod
    def _identity(cls, data: dict[str, Any], d: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """(what the closed form is a function of, its label) for the subset ``data`` that ``d`` describes."""
        return data_identity({**data, "size": d["size"]}), f"optimal[{d['source']},N={d['size']}]"

    @classmethod
    def from_spec(cls, spec: str, text: str, partner: Reference | None) -> Reference:
        data, kernel_name = parse_data_spec(spec, partner.data if partner is not None else None)
        dm = _datamodule(data)
        d = dm.describe()
        kernel_spec = _partner_kernel(kernel_name, partner)
        ident, label = cls._identity(data, d)
        sha = hashlib.sha256(json.dumps({cls.kind: ident, "kernel": kernel_spec}, sort_keys=True).encode()).hexdigest()
        info = {"kind": cls.kind, "spec": text, "arch": cls.kind, "kernel": kernel_spec["name"], "size": d["size"],
                "subset_seed": d["subset_seed"], "seed": None, "source": d["source"], "sha256": sha}
        return cls(
            text=text,
            label=label,
            name=f"{cls.kind}-{safe_name(d['source'])}-n{d['size']}-{sha[:10]}",
            sha256=sha,
            image_shape=tuple(int(v) for v in d["image_shape"]),
            num_classes=int(d["num_classes"]),
            info=info,
            data={**data, "size": d["size"]},
            kernel_spec=kernel_spec,
            _train=(dm.images, dm.labels),
        )

    def _load_denoiser(self, device: torch.device):
        from ..theory import EmpiricalOptimalDenoiser

        images, labels = self.training_set()
        return EmpiricalOptimalDenoiser(images, labels if self.num_classes else None, device=device)

    def precision(self, requested: str, log: Callable[[str], None]) -> str:
        if requested != "fp32":
            log(f"note: --precision {requested} does not apply to {self.text}; the closed form runs in float64.")
        return "fp32"


@register_reference("mog")
@dataclass
class MoGReference(OptimalReference):
    """``mog:<data spec>``: the closed-form denoiser (Prop. 2) of the low-rank mixture a ``mog`` source draws from,
    the generalisation mapping; its training set (for GL) is the subset the spec (or its partner) names."""

    @classmethod
    def _identity(cls, data: dict[str, Any], d: dict[str, Any]) -> tuple[dict[str, Any], str]:
        if data.get("source") != "mog":
            raise ValueError(f"'mog:' is the closed form of a mog source's mixture, but its data source is "
                             f"{data.get('source')!r}; write e.g. 'mog:mog?rank=6' or pair it with a model trained "
                             "on the mog source.")
        mog = _mixture(data)
        kw = {k: v for k, v in (data.get("source_kwargs") or {}).items() if k != "num_samples"}
        return {"mixture": kw}, f"mog[K={mog.K},d={mog.d}]"

    def _load_denoiser(self, device: torch.device):
        return _mixture(self.data, device)


def _mixture(data: dict[str, Any], device: torch.device | str | None = None):
    from ..data.sources import mog_mixture

    return mog_mixture(**(data.get("source_kwargs") or {}), device=device)


@register_reference("samples")
@dataclass
class SamplesReference(Reference):
    """A sample folder or ``.npz`` written by ``evaluate.py sample``; compared seed by seed, never re-sampled."""

    samples: SampleSet | None = None

    @classmethod
    def from_spec(cls, spec: str, text: str, partner: Reference | None) -> Reference:
        s = load_samples(spec)
        prov = s.provenance
        path = Path(spec).expanduser()
        info = dict(prov.get("model") or {})
        info.update(kind=cls.kind, path=str(path), sha256=prov.get("checkpoint_sha256"))
        return cls(
            text=text,
            label=path.stem if path.is_file() else path.name,
            name=safe_name(path.name),
            sha256=str(prov.get("checkpoint_sha256")),
            image_shape=tuple(s.images.shape[i] for i in (3, 1, 2)),
            num_classes=int(prov.get("num_classes") or 0),
            info=info,
            data=prov.get("data"),
            kernel_spec=prov.get("kernel_spec"),
            samples=s,
        )

    @property
    def stored(self) -> SampleSet | None:
        return self.samples

    def _load_denoiser(self, device: torch.device):
        raise ValueError(f"{self.text} holds stored samples and cannot generate new seeds.")

    def samples_at(self, seeds: list[int], out: Path, options: SamplingOptions, log=print) -> SampleSet:
        s = self.samples.select(seeds, self.text)  # type: ignore[union-attr]
        p = s.provenance
        log(
            f"{self.label}: {len(seeds)} stored samples from {self.text} ({p.get('sampler')}, {p.get('steps')} steps)"
        )
        return s


def is_model_spec(text: str) -> bool:
    """Whether ``text`` is a ``kind:`` model spec (``edm:``, ``dit:``, ``optimal:``, ...) rather than a file path."""
    kind, sep, _ = str(text).partition(":")
    return bool(sep) and kind in REFERENCES


def _kind_of(text: str) -> tuple[type[Reference], str]:
    prefix, sep, rest = text.partition(":")
    if sep and prefix in REFERENCES:
        return REFERENCES[prefix], rest
    path = Path(text).expanduser()
    return REFERENCES["samples" if path.is_dir() or path.suffix == ".npz" else "checkpoint"], text


def checkpoint_label(path: Path) -> str:
    """A checkpoint's label in tables and plots: ``RUN/last`` for Lightning's ``RUN/checkpoints/last.ckpt`` layout
    (so the ``last.ckpt`` of two runs are told apart by their run folder), else the file's stem."""
    run = path.parent.parent.name if path.parent.name == "checkpoints" else ""
    return f"{run}/{path.stem}" if run else path.stem


def resolve_model(text: str, partner: Reference | None = None, *, data: dict[str, Any] | None = None,
                  kernel_spec: dict[str, Any] | None = None) -> Reference:
    """Command-line model spec -> ``Reference``.  ``partner`` feeds ``optimal:`` / ``mog:`` without a source; with
    no partner model, ``data`` (``SubsetDataModule`` kwargs) and ``kernel_spec`` (``{"name", "kwargs"}``) do."""
    if partner is None and (data is not None or kernel_spec is not None):
        from types import SimpleNamespace

        partner = SimpleNamespace(data=dict(data) if data is not None else None, kernel_spec=kernel_spec)
    cls, spec = _kind_of(text)
    return cls.from_spec(spec, text, partner)


def resolve_models(texts: Sequence[str]) -> list[Reference]:
    """Resolve the specs, the partnered ones (``optimal:``) last, against the first reference that records data;
    repeated labels get ``#i`` suffixes; all must make one image shape."""
    refs: list[Reference | None] = [None if _kind_of(t)[0].partnered else resolve_model(t) for t in texts]
    partner = next((r for r in refs if r is not None and r.data is not None), None)
    done = [r if r is not None else resolve_model(t, partner) for r, t in zip(refs, texts)]
    labels = [r.label for r in done]
    for i, r in enumerate(done):
        if labels.count(r.label) > 1:
            r.label = f"{r.label}#{i}"
    a = done[0]
    for b in done[1:]:
        if tuple(a.image_shape) != tuple(b.image_shape):
            sa, sb = "x".join(map(str, a.image_shape)), "x".join(map(str, b.image_shape))
            raise ValueError(
                f"{a.text} makes {sa} images but {b.text} makes {sb}; compared models must have one image shape."
            )
    return done


def training_key(ref: Reference) -> str:
    """A key equal for references with the same training subset (to describe it once)."""
    return json.dumps(json_safe(data_identity(ref.data or {})), sort_keys=True)
