"""Sample generation and the pair / matrix evaluation of Zhang et al., ICML 2024 (Sec. 2.1, Figs. 2-6).

Model reproducibility is measured by sampling two models from the *same* initial noise with the same
deterministic sampler and comparing the outputs seed by seed:

    RP  = P( <f(x_A(z)), f(x_B(z))> > tau )          (descriptor f: SSCD, tau = 0.6; or pixel, 0.97)
    MAE = E | x_A(z) - x_B(z) |  in [0, 255] levels   (mean, and the fraction of pairs below a threshold)
    GL  = 1 - P( max_j <f(x), f(y_j)> > tau )         (y_j: the model's own training images)

Commands (``python evaluate.py ...``; ``-h`` on each for every option)::

    evaluate.py sample CKPT --seeds 0-9999 [--sampler heun --steps 18 --grid native] [--class K | --labels L]
                            [--guidance 1.0] [--batch-size 256] [--shard-size 1000] --out DIR
    evaluate.py --pair A B [--seeds 0-9999] [--descriptor sscd|pixel] [--threshold T] [--gl] --out DIR
    evaluate.py --matrix A B C ... [same options] --out DIR

A model ``A`` / ``B`` is one of

* a checkpoint of ``DiffusionModule`` (its EMA denoiser is sampled; its training subset is
  ``SubsetDataModule(**ckpt["lightning_repro"]["data"])``);
* a sample folder or ``.npz`` file written by ``evaluate.py sample`` (compared seed by seed; its
  training set is the one its provenance records);
* ``optimal:<data spec>``: the optimal denoiser of the empirical distribution (Prop. 1,
  ``EmpiricalOptimalDenoiser``), see *Data specs* below.

Sample files (one per shard of ``--shard-size`` consecutive seeds of the list, named by seed range,
``samples_000000-000999.npz``; ``samples_<first>-<last>_<hash>.npz`` when the shard's seeds are not one
ascending run), readable with ``np.load(path, allow_pickle=False)``:

* ``images`` uint8 N x H x W x C, ``seeds`` int64 (N,), ``labels`` int64 (N,) (conditional models only),
  ``sigmas`` float64, the noise levels of the sampler's grid;
* provenance as 0-d arrays: ``checkpoint_sha256`` (str; for ``optimal:`` the SHA-256 of its canonical
  data spec), ``sampler``, ``grid``, ``kernel`` (JSON of the kernel's constants), ``version`` (this
  package's), ``steps`` (int64), ``guidance`` (float64), and ``provenance``: one JSON string with all of
  these plus the model description (arch, kernel, size, subset_seed, seed, training-data config).

Shards are written atomically (temp file + rename), so an interrupted run leaves only whole shards.
A rerun skips every shard whose file holds the same seeds, labels and provenance (checkpoint SHA-256,
sampler, steps, grid, guidance, kernel, image shape) and says so ("skipped N finished shards").  A shard
that exists but was made by a different checkpoint or sampler configuration is an **error** naming the
file and the differing field, unless ``--overwrite`` is given, which regenerates it.  A shard that
cannot be read at all (not a sample file) is regenerated with a warning.

Data specs (``optimal:``): ``optimal:`` alone is the training subset of the other model of the pair (for
``--matrix``, of the first model in the list that records one), sampled with that model's kernel.
``optimal:SOURCE?key=value&key=value`` builds ``SubsetDataModule(source=SOURCE, ...)``: keys that are
``SubsetDataModule`` arguments (``size``, ``subset_seed``, ``class_balanced``, ``conditional``,
``classes``, ...) go there, ``kernel=NAME`` picks the sampling kernel (default: the partner's, else
``edm``), any other key goes to the source (``root=``, ``resolution=``, ``path=``).  Values are JSON
(``true``, ``64``, ``[0,1]``) or plain strings; ``classes=0,1`` is a list.  ``optimal:?size=16`` takes
the partner's data config and overrides its size.  Example: ``optimal:digits?size=64&subset_seed=0``.

Seeds are compared as sets: two sample files with different seeds are an error unless ``--seeds``
picks seeds both hold.  Without ``--seeds`` a pair of models uses 0-9999 (the paper's 10K), or the
seeds of the sample file(s) given.

Descriptor: ``sscd`` (the paper's, threshold 0.6) for 3-channel images of at least 32 px, ``pixel``
(normalised correlation, threshold 0.97; see ``PixelDescriptor``) otherwise; ``--descriptor`` overrides
and the choice is printed.  If SSCD weights are unavailable offline the descriptor module's error
sentence is shown; there is no silent fallback.

Outputs of ``--pair``: ``DIR/results.json`` (``rp``, ``mae_mean``, ``mae_score``, ``gl_a``, ``gl_b``
(null without ``--gl``), ``n``, ``descriptor``, ``threshold``, ``mean_similarity``, ``memorized_a`` /
``memorized_b``, ``sampler``, ``steps``, ``model_a`` / ``model_b`` ...), ``DIR/pair.png`` (rows: A, B, and
the training image nearest to A's sample), the cached samples under ``DIR/samples/<name>/``, and a W&B
run (project ``lightning_repro``, group ``evaluate``; offline without credentials; ``--no-wandb``).
``--matrix`` writes ``rp_matrix.csv``, ``mae_matrix.csv``, ``rp_matrix.png``, ``mae_matrix.png``
(annotated heatmaps in the style of the paper's Fig. 6) and ``matrix.json``.

Precision: ``--precision bf16`` runs the network evaluations of checkpoints under bf16 autocast (the ODE
solver stays in float32); it is recorded in the shards' provenance, so bf16 and float32 samples are never
mixed.  ``optimal:`` denoisers always run in their own (float64) precision.

Several processes (``torchrun --nproc_per_node N evaluate.py ...``, any number of nodes): the shards still
to be sampled are dealt round robin to the ranks, each rank samples and writes its own shards, and after
a barrier every rank reads the others' shards from the output folder (on several nodes ``--out`` must be on
a file system they all see).  Descriptor features are computed in fixed chunks of ``FEATURE_CHUNK`` images,
dealt round robin too and all-gathered, and the scores are then computed from the gathered features exactly
as one process computes them (one process computes features in the same chunks), so the numbers equal the
single-process ones exactly (summing per-rank metric states would not: float partial sums depend on the
split, only the counts would be exact).  Rank 0
alone prints, writes ``results.json`` / the grids / the matrices and logs to W&B.  Each rank uses
``cuda:LOCAL_RANK`` (``--device`` overrides); ranks talk through a gloo process group (only host data is
exchanged), which ``evaluate.py`` sets up itself from torchrun's environment.

Bad input (malformed seeds, a missing or truncated checkpoint, ``--steps`` < 1, an unknown sampler, a
pair of different image shapes or seed sets, a threshold outside (-1, 1], ...) ends the program with
one sentence ``error: ...`` on stderr and exit status 2, without a stack trace.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import io
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import numpy as np
import torch
from torch import Tensor

from .data import SubsetDataModule
from .data.sources import float_to_uint8, uint8_to_float
from .kernels import Kernel, get_kernel
from .sampling import DEFAULT_GRID, GRIDS, SAMPLERS, autocast_dtype, get_sigmas, parse_seeds, sample
from .sampling.grids import _ALIASES as _GRID_ALIASES
from .viz import atomic_write_bytes, save_grid

__all__ = [
    "main",
    "ModelRef",
    "SampleSet",
    "resolve_model",
    "parse_data_spec",
    "generate_samples",
    "load_samples",
    "choose_descriptor",
    "pair_scores",
    "shard_name",
    "FORMAT",
    "FEATURE_CHUNK",
    "init_distributed",
]

FORMAT = "lightning_repro.samples/1"
#: provenance fields that must agree for a shard to be reused
MATCH_KEYS = (
    "format",
    "checkpoint_sha256",
    "sampler",
    "steps",
    "grid",
    "guidance",
    "kernel",
    "image_shape",
    "precision",
)
#: value of a provenance field in shards written before the field existed
MATCH_DEFAULTS = {"precision": "fp32"}
#: images per descriptor call (and per rank's share of the feature work); fixed so that one process and N
#: processes run the descriptor on the same batches and get bit-identical features
FEATURE_CHUNK = 1024
DEFAULT_SEEDS = "0-9999"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lightning_repro")
    except Exception:  # not installed (running from a source tree)
        return "unknown"


def _seed_text(seeds: Sequence[int]) -> str:
    """Compact text of a seed list: ``0-9,20,30-31``."""
    parts, i = [], 0
    seeds = list(seeds)
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if i == j else f"{seeds[i]}-{seeds[j]}")
        i = j + 1
    text = ",".join(parts)
    return text if len(text) <= 60 else text[:57] + "..."


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def _canonical_sampler(name: str) -> str:
    key = str(name).lower().replace("-", "_").replace("++", "pp")
    if key not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r} (--sampler); valid samplers are: {', '.join(SAMPLERS)}.")
    return key


def _canonical_grid(grid: str | None, sampler: str) -> str:
    if grid is None:
        return DEFAULT_GRID.get(sampler, "native")
    key = str(grid).lower().replace("-", "_")
    key = _GRID_ALIASES.get(key, key)
    if key not in GRIDS:
        raise ValueError(f"Unknown sigma grid {grid!r} (--grid); valid grids are: {', '.join(GRIDS)}.")
    return key


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"--steps must be an integer >= 1, got {steps!r}.")
    return steps


def _check_positive(value: int, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option} must be an integer >= 1, got {value!r}.")
    return value


def _check_threshold(t: float | None) -> float | None:
    if t is None:
        return None
    if not -1.0 < float(t) <= 1.0:  # also rejects NaN
        raise ValueError(f"--threshold must be a cosine similarity in (-1, 1], got {t}.")
    return float(t)


def _json_safe(obj: Any) -> Any:
    """NaN / inf -> None, tensors / numpy scalars -> Python values, tuples -> lists (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Tensor):
        return _json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(_json_safe(obj), indent=2, allow_nan=False) + "\n").encode())


# ============================================================================ several processes (torchrun)


def init_distributed() -> bool:
    """Join the gloo process group of a ``torchrun`` launch (``WORLD_SIZE`` > 1) and pick ``cuda:LOCAL_RANK``.

    Returns True when this call created the group (the caller then destroys it at the end).
    """
    from datetime import timedelta

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    dist.init_process_group("gloo", timeout=timedelta(hours=6))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return True


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if _rank_world()[1] > 1:
        dist.barrier()


def _all_gather(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (just ``[obj]`` in one process)."""
    import torch.distributed as dist

    world = _rank_world()[1]
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


# ============================================================================ data specs (optimal:)

_DM_KEYS = tuple(p for p in inspect.signature(SubsetDataModule.__init__).parameters if p != "self")
_DM_DROP = (
    "batch_size",
    "val_seeds",
    "flip",
    "data_seed",
    "on_device",
)  # do not change which images form the subset


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
    kwargs = {k: v for k, v in data.items() if k in _DM_KEYS and k not in _DM_DROP}
    return SubsetDataModule(**kwargs)


def _data_identity(data: dict[str, Any]) -> dict[str, Any]:
    """The fields that decide which images form a training subset (for hashing / provenance)."""
    keep = ("source", "size", "subset_seed", "class_balanced", "conditional", "source_kwargs", "classes")
    defaults = inspect.signature(SubsetDataModule.__init__).parameters
    out = {k: data.get(k, defaults[k].default) for k in keep}
    out["source_kwargs"] = dict(out["source_kwargs"] or {})
    return out


# ============================================================================ models


@dataclass
class ModelRef:
    """One side of a comparison: a checkpoint, the empirical optimal denoiser, or stored samples."""

    kind: str  # "checkpoint" | "optimal" | "samples"
    text: str  # as given on the command line
    label: str  # short display name
    name: str  # cache folder name
    sha256: str  # identity: checkpoint file digest, digest of the optimal spec, or the samples' checkpoint
    image_shape: tuple[int, int, int]
    num_classes: int = 0
    info: dict[str, Any] = field(default_factory=dict)  # arch, kernel, size, subset_seed, seed, source, path
    data: dict[str, Any] | None = None  # SubsetDataModule kwargs of its training set
    kernel_spec: dict[str, Any] | None = None  # {"name", "kwargs"} to rebuild the sampling kernel
    samples: SampleSet | None = None  # for kind == "samples"
    _den: Any = None
    _train: tuple[Tensor, Tensor | None] | None = None

    def kernel(self) -> Kernel:
        if self.kernel_spec is None:
            raise ValueError(f"{self.text} records no noise kernel.")
        return get_kernel(self.kernel_spec["name"], **(self.kernel_spec.get("kwargs") or {}))

    def denoiser(self, device: torch.device):
        """The denoiser (loaded on first use, so cached samples never load weights)."""
        if self.kind == "samples":
            raise ValueError(f"{self.text} holds stored samples and cannot generate new seeds.")
        if self._den is None:
            if self.kind == "checkpoint":
                from .module import load_denoiser

                self._den, _ = load_denoiser(self.info["path"], device)
            else:
                from .theory import EmpiricalOptimalDenoiser

                images, labels = self.training_set()
                self._den = EmpiricalOptimalDenoiser(
                    images, labels if self.num_classes else None, device=device
                )
        return self._den

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


def _checkpoint_ref(text: str) -> ModelRef:
    from .module import CKPT_KEY, file_sha256, load_checkpoint

    path = Path(text).expanduser()
    ckpt = load_checkpoint(path)
    meta = ckpt[CKPT_KEY]
    del ckpt
    hp = meta.get("hparams", {})
    sha = file_sha256(path)
    kernel_spec = {"name": hp.get("kernel", meta.get("kernel")), "kwargs": hp.get("kernel_kwargs") or {}}
    info = {"kind": "checkpoint", "path": str(path.resolve()), "sha256": sha}
    info.update(
        {k: meta.get(k) for k in ("arch", "kernel", "precond", "size", "subset_seed", "seed", "source")}
    )
    return ModelRef(
        kind="checkpoint",
        text=text,
        label=path.stem,
        name=f"{_safe(path.stem)}-{sha[:10]}",
        sha256=sha,
        image_shape=tuple(int(v) for v in meta["image_shape"]),
        num_classes=int(meta.get("num_classes") or 0),
        info=info,
        data=meta.get("data"),
        kernel_spec=kernel_spec,
    )


def _optimal_ref(text: str, partner: ModelRef | None) -> ModelRef:
    spec = text[len("optimal:") :]
    data, kernel_name = parse_data_spec(spec, partner.data if partner is not None else None)
    dm = _datamodule(data)
    d = dm.describe()
    if kernel_name is not None:
        kernel_spec = {"name": kernel_name, "kwargs": {}}
    elif partner is not None and partner.kernel_spec is not None:
        kernel_spec = partner.kernel_spec
    else:
        kernel_spec = {"name": "edm", "kwargs": {}}
    get_kernel(kernel_spec["name"], **kernel_spec["kwargs"])  # validate now
    ident = _data_identity({**data, "size": d["size"]})
    sha = hashlib.sha256(
        json.dumps({"optimal": ident, "kernel": kernel_spec}, sort_keys=True).encode()
    ).hexdigest()
    info = {
        "kind": "optimal",
        "spec": text,
        "arch": "optimal",
        "kernel": kernel_spec["name"],
        "size": d["size"],
        "subset_seed": d["subset_seed"],
        "seed": None,
        "source": d["source"],
        "sha256": sha,
    }
    label = f"optimal[{d['source']},N={d['size']}]"
    ref = ModelRef(
        kind="optimal",
        text=text,
        label=label,
        name=f"optimal-{_safe(d['source'])}-n{d['size']}-{sha[:10]}",
        sha256=sha,
        image_shape=tuple(int(v) for v in d["image_shape"]),
        num_classes=int(d["num_classes"]),
        info=info,
        data={**data, "size": d["size"]},
        kernel_spec=kernel_spec,
    )
    ref._train = (dm.images, dm.labels)
    return ref


def _samples_ref(text: str) -> ModelRef:
    s = load_samples(text)
    prov = s.provenance
    path = Path(text).expanduser()
    info = dict(prov.get("model") or {})
    info.update(kind="samples", path=str(path), sha256=prov.get("checkpoint_sha256"))
    return ModelRef(
        kind="samples",
        text=text,
        label=path.stem if path.is_file() else path.name,
        name=_safe(path.name),
        sha256=str(prov.get("checkpoint_sha256")),
        image_shape=tuple(s.images.shape[i] for i in (3, 1, 2)),
        num_classes=int(prov.get("num_classes") or 0),
        info=info,
        data=prov.get("data"),
        kernel_spec=prov.get("kernel_spec"),
        samples=s,
    )


def resolve_model(text: str, partner: ModelRef | None = None) -> ModelRef:
    """Command-line model text -> ``ModelRef`` (``partner`` feeds ``optimal:`` without a source)."""
    if text.startswith("optimal:"):
        return _optimal_ref(text, partner)
    path = Path(text).expanduser()
    if path.is_dir() or path.suffix == ".npz":
        return _samples_ref(text)
    return _checkpoint_ref(text)


def resolve_models(texts: Sequence[str]) -> list[ModelRef]:
    """Resolve checkpoints and sample files first, then ``optimal:`` specs against the first of them with data."""
    refs: list[ModelRef | None] = [None] * len(texts)
    for i, t in enumerate(texts):
        if not t.startswith("optimal:"):
            refs[i] = resolve_model(t)
    partner = next((r for r in refs if r is not None and r.data is not None), None)
    for i, t in enumerate(texts):
        if t.startswith("optimal:"):
            refs[i] = resolve_model(t, partner)
    labels = [r.label for r in refs]  # type: ignore[union-attr]
    for i, r in enumerate(refs):
        if labels.count(r.label) > 1:  # type: ignore[union-attr]
            r.label = f"{r.label}#{i}"  # type: ignore[union-attr]
    return refs  # type: ignore[return-value]


# ============================================================================ sample shards


@dataclass
class SampleSet:
    """Samples of one model: ``images`` uint8 N x H x W x C, ``seeds`` int64 (N,), ``labels`` or None."""

    images: np.ndarray
    seeds: np.ndarray
    labels: np.ndarray | None
    provenance: dict[str, Any]
    generated: int = 0  # shards written by this call
    skipped: int = 0  # finished shards reused
    new_images: int = 0  # images sampled by this call
    seconds: float = 0.0  # time spent sampling
    files: list[Path] = field(default_factory=list)

    def float_images(self, n: int | None = None) -> Tensor:
        return uint8_to_float(self.images[:n])

    def select(self, seeds: Sequence[int], what: str) -> SampleSet:
        """The rows of ``seeds`` in that order; one clear sentence if some are missing."""
        pos = {int(s): i for i, s in reversed(list(enumerate(self.seeds.tolist())))}
        missing = [s for s in seeds if s not in pos]
        if missing:
            raise ValueError(
                f"{what} holds seeds {_seed_text(sorted(pos))} but not {_seed_text(missing)}; sample them first or "
                "pass --seeds that it holds."
            )
        idx = np.array([pos[s] for s in seeds], dtype=np.int64)
        return SampleSet(
            self.images[idx],
            self.seeds[idx],
            None if self.labels is None else self.labels[idx],
            self.provenance,
            files=self.files,
        )


def shard_name(seeds: Sequence[int]) -> str:
    """``samples_<first>-<last>.npz`` (6-digit, zero padded); a hash suffix when not one ascending run."""
    first, last = int(seeds[0]), int(seeds[-1])
    base = f"samples_{first:06d}-{last:06d}"
    if list(seeds) != list(range(first, last + 1)):
        digest = hashlib.sha256(np.asarray(seeds, dtype=np.int64).tobytes()).hexdigest()[:8]
        base += f"_{digest}"
    return base + ".npz"


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _shard_provenance(arrays: dict[str, np.ndarray], path: Path) -> dict[str, Any]:
    if "provenance" not in arrays or "images" not in arrays or "seeds" not in arrays:
        raise ValueError(
            f"{path} is not a lightning_repro sample file (expected arrays 'images', 'seeds' and 'provenance')."
        )
    try:
        return json.loads(str(arrays["provenance"]))
    except ValueError:
        raise ValueError(f"{path}: its 'provenance' entry is not valid JSON.") from None


def _write_shard(
    path: Path,
    images: np.ndarray,
    seeds: Sequence[int],
    labels: np.ndarray | None,
    sigmas: Tensor,
    prov: dict[str, Any],
) -> None:
    arrays: dict[str, np.ndarray] = {
        "images": images,
        "seeds": np.asarray(seeds, dtype=np.int64),
        "sigmas": sigmas.double().cpu().numpy(),
        "provenance": np.array(json.dumps(_json_safe(prov), sort_keys=True)),
        "checkpoint_sha256": np.array(prov["checkpoint_sha256"]),
        "sampler": np.array(prov["sampler"]),
        "grid": np.array(prov["grid"]),
        "kernel": np.array(json.dumps(_json_safe(prov["kernel"]), sort_keys=True)),
        "version": np.array(prov["version"]),
        "steps": np.array(prov["steps"], dtype=np.int64),
        "guidance": np.array(prov["guidance"], dtype=np.float64),
    }
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _labels_for(
    ref: ModelRef, seeds: Sequence[int], class_label: int | None, labels: Sequence[int] | None
) -> np.ndarray | None:
    """Labels of a conditional model: ``--class K`` for all, an explicit list, or ``seed % num_classes``."""
    if not ref.num_classes:
        if class_label is not None or labels is not None:
            raise ValueError(f"--class / --labels: {ref.text} is an unconditional model (num_classes = 0).")
        return None
    if labels is not None:
        lab = np.asarray(list(labels), dtype=np.int64)
        if lab.size != len(seeds):
            raise ValueError(f"--labels gives {lab.size} labels for {len(seeds)} seeds; give one per seed.")
    elif class_label is not None:
        lab = np.full(len(seeds), int(class_label), dtype=np.int64)
    else:
        lab = np.asarray(seeds, dtype=np.int64) % ref.num_classes
    bad = lab[(lab < -1) | (lab >= ref.num_classes)]
    if bad.size:
        raise ValueError(
            f"--class / --labels: label {int(bad[0])} is outside 0..{ref.num_classes - 1} (or -1, unconditional) "
            f"for {ref.text}."
        )
    return lab


def _device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1).") from None


def generate_samples(
    ref: ModelRef,
    seeds: Sequence[int],
    out: str | os.PathLike,
    sampler: str = "heun",
    steps: int = 18,
    grid: str | None = None,
    guidance: float = 1.0,
    class_label: int | None = None,
    labels: Sequence[int] | None = None,
    batch_size: int = 256,
    shard_size: int = 1000,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log=print,
    precision: str = "fp32",
) -> SampleSet:
    """Sample ``ref`` at ``seeds`` into seed-ranged shards under ``out``, skipping finished shards.

    Returns all requested samples (loaded from the shards) with counts of shards generated / skipped.
    Under ``torch.distributed`` (torchrun) the shards to sample are dealt round robin to the ranks; every
    rank returns all the samples (it reads the other ranks' shards after a barrier).
    """
    if ref.kind == "samples":
        raise ValueError(f"{ref.text} holds stored samples; it cannot be sampled again.")
    seeds = parse_seeds(list(seeds))
    sampler = _canonical_sampler(sampler)
    steps = _check_steps(steps)
    grid = _canonical_grid(grid, sampler)
    _check_positive(batch_size, "--batch-size")
    _check_positive(shard_size, "--shard-size")
    precision, _ = autocast_dtype(precision)
    if ref.kind == "optimal" and precision != "fp32":
        log(
            f"note: --precision {precision} does not apply to {ref.text}; the optimal denoiser runs in float64."
        )
        precision = "fp32"
    kernel = ref.kernel()
    sigmas = get_sigmas(grid, steps, kernel)
    lab_all = _labels_for(ref, seeds, class_label, labels)
    if float(guidance) != 1.0 and lab_all is None:
        raise ValueError(
            f"--guidance {guidance} needs a class-conditional model, but {ref.text} is unconditional."
        )
    dev = device if isinstance(device, torch.device) else _device(device)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    c, h, w = ref.image_shape
    prov = {
        "format": FORMAT,
        "checkpoint": ref.text,
        "checkpoint_sha256": ref.sha256,
        "sampler": sampler,
        "steps": steps,
        "grid": grid,
        "guidance": float(guidance),
        "kernel": kernel.config(),
        "kernel_spec": ref.kernel_spec,
        "image_shape": [c, h, w],
        "precision": precision,
        "num_classes": ref.num_classes,
        "model": ref.info,
        "data": None if ref.data is None else _json_safe(ref.data),
        "version": _version(),
        "torch": torch.__version__,
    }
    want = json.loads(json.dumps(_json_safe({k: prov[k] for k in MATCH_KEYS})))

    # plan: which shards exist and match
    chunks = [seeds[i : i + shard_size] for i in range(0, len(seeds), shard_size)]
    todo, results = [], {}
    for k, chunk in enumerate(chunks):
        path = out / shard_name(chunk)
        lab = None if lab_all is None else lab_all[k * shard_size : k * shard_size + len(chunk)]
        if path.exists() and not overwrite:
            try:
                arrays = _read_npz(path)
                have = _shard_provenance(arrays, path)
            except Exception as err:  # unreadable: our own file format, so regenerate it
                log(f"warning: {path} is unreadable ({type(err).__name__}); regenerating it.")
            else:
                for key in MATCH_KEYS:
                    if have.get(key, MATCH_DEFAULTS.get(key)) != want[key]:
                        raise ValueError(
                            f"shard {path} was made with {key}={have.get(key, MATCH_DEFAULTS.get(key))!r} but this "
                            f"run uses {want[key]!r}; "
                            "write to another --out folder, or pass --overwrite to regenerate it."
                        )
                same_labels = (lab is None and "labels" not in arrays) or (
                    lab is not None and "labels" in arrays and np.array_equal(arrays["labels"], lab)
                )
                if not np.array_equal(arrays["seeds"], np.asarray(chunk)) or not same_labels:
                    raise ValueError(
                        f"shard {path} holds other seeds or labels than this run asks for; write to another --out "
                        "folder, or pass --overwrite to regenerate it."
                    )
                results[k] = arrays
                continue
        todo.append((k, chunk, lab, path))

    total = sum(len(c) for _, c, _, _ in todo)
    rank, world = _rank_world()
    _barrier()  # every rank has planned from the same files before any rank writes one
    mine = todo[rank::world]
    t0 = time.perf_counter()
    if mine:
        from tqdm.auto import tqdm

        den = ref.denoiser(dev)
        bar = tqdm(
            total=sum(len(c) for _, c, _, _ in mine),
            unit="img",
            desc=f"sampling {ref.label} ({sampler}, {steps} steps)",
            disable=not progress or rank != 0,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        with torch.inference_mode():
            for k, chunk, lab, path in mine:
                parts = []
                for i in range(0, len(chunk), batch_size):
                    sub = chunk[i : i + batch_size]
                    sub_lab = None if lab is None else torch.from_numpy(lab[i : i + batch_size])
                    x = sample(
                        den,
                        kernel,
                        sub,
                        (c, h, w),
                        sampler=sampler,
                        steps=steps,
                        labels=sub_lab,
                        grid=grid,
                        guidance=guidance,
                        batch_size=len(sub),
                        device=dev,
                        precision=precision,
                    )
                    parts.append(float_to_uint8(x))
                    bar.update(len(sub))
                images = np.concatenate(parts)
                _write_shard(path, images, chunk, lab, sigmas, prov)
                results[k] = {
                    "images": images,
                    "seeds": np.asarray(chunk, dtype=np.int64),
                    **({"labels": lab} if lab is not None else {}),
                }
        bar.close()
    _barrier()  # the other ranks' shards are written
    for k, _, _, path in todo:
        if k not in results:
            results[k] = _read_npz(path)
    seconds = time.perf_counter() - t0
    order = range(len(chunks))
    s = SampleSet(
        images=np.concatenate([results[k]["images"] for k in order]),
        seeds=np.concatenate([np.asarray(results[k]["seeds"], dtype=np.int64) for k in order]),
        labels=None if lab_all is None else np.concatenate([results[k]["labels"] for k in order]),
        provenance=prov,
        generated=len(todo),
        skipped=len(chunks) - len(todo),
        new_images=total,
        seconds=seconds,
        files=[out / shard_name(c) for c in chunks],
    )
    return s


def load_samples(path: str | os.PathLike) -> SampleSet:
    """A sample ``.npz`` file or a folder of ``samples_*.npz`` shards -> ``SampleSet`` (seeds deduplicated)."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(path.glob("samples_*.npz"))
        if not files:
            raise FileNotFoundError(f"sample folder {path} holds no samples_*.npz shards.")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"sample file {path} does not exist.")
    images, seeds, labels, prov0, seen = [], [], [], None, set()
    for f in files:
        try:
            arrays = _read_npz(f)
        except Exception as err:
            raise ValueError(
                f"sample file {f} could not be read ({type(err).__name__}); is it truncated?"
            ) from None
        prov = _shard_provenance(arrays, f)
        if prov0 is None:
            prov0 = prov
        else:
            for key in MATCH_KEYS:
                if prov.get(key, MATCH_DEFAULTS.get(key)) != prov0.get(key, MATCH_DEFAULTS.get(key)):
                    raise ValueError(
                        f"sample folder {path} mixes shards with different {key} ({prov0.get(key)!r} in {files[0].name}, "
                        f"{prov.get(key)!r} in {f.name}); keep one model and sampler per folder."
                    )
        im, sd = arrays["images"], arrays["seeds"].astype(np.int64)
        if im.dtype != np.uint8 or im.ndim != 4 or len(im) != len(sd):
            raise ValueError(f"sample file {f}: 'images' must be uint8 N x H x W x C with one row per seed.")
        keep = np.array([int(s) not in seen for s in sd], dtype=bool)
        seen.update(int(s) for s in sd)
        images.append(im[keep])
        seeds.append(sd[keep])
        labels.append(arrays["labels"][keep] if "labels" in arrays else None)
    lab = None if any(v is None for v in labels) else np.concatenate(labels)
    return SampleSet(np.concatenate(images), np.concatenate(seeds), lab, prov0 or {}, files=files)


# ============================================================================ descriptors and scores


def choose_descriptor(name: str | None, image_shape: Sequence[int]) -> tuple[str, str]:
    """(descriptor name, reason): SSCD for 3-channel images of >= 32 px (the paper), pixel otherwise."""
    c, h, w = image_shape
    if name is not None:
        return name, "--descriptor"
    if c == 3 and min(h, w) >= 32:
        return "sscd", f"{c}x{h}x{w} colour images, as the paper"
    return "pixel", f"{c}x{h}x{w} images: SSCD needs 3-channel images of >= 32 px"


def _nchw(images: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


def _features(descriptor, images: np.ndarray | Tensor) -> Tensor:
    """Descriptor features (float32, CPU) of ``images``, computed in chunks of ``FEATURE_CHUNK`` images that are
    dealt round robin to the ranks and all-gathered (one process computes the same chunks itself)."""
    x = _nchw(images) if isinstance(images, np.ndarray) else images
    if x.shape[0] == 0:
        return descriptor(x).float().cpu()  # the descriptor's own sentence about an empty batch
    rank, world = _rank_world()
    chunks = range(0, x.shape[0], FEATURE_CHUNK)
    mine = {i: descriptor(x[i : i + FEATURE_CHUNK]).float().cpu() for i in chunks[rank::world]}
    parts: dict[int, Tensor] = {}
    for got in _all_gather(mine):
        parts.update(got)
    return torch.cat([parts[i] for i in chunks])


def pair_scores(
    feats_a: Tensor,
    feats_b: Tensor,
    images_a: np.ndarray,
    images_b: np.ndarray,
    threshold: float,
    names: tuple[str, str] = ("A", "B"),
) -> dict[str, float]:
    """RP (+ mean similarity) and MAE of seed-paired samples, with the torchmetrics of ``metrics.scores``."""
    from .metrics import MAEScore, ReproducibilityScore

    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(
            f"the features of {names[0]} have dimension {feats_a.shape[1]} but those of {names[1]} have "
            f"{feats_b.shape[1]}; both sides must be described by the same descriptor."
        )
    # every rank holds all the (gathered) features, so the metric states must not be summed across ranks again
    rp = ReproducibilityScore(threshold=threshold, sync_on_compute=False)
    rp.update(feats_a, feats_b)
    mae = MAEScore(sync_on_compute=False)
    mae.update(_nchw(images_a), _nchw(images_b))
    s_rp, s_mae = rp.summary(), mae.summary()
    return {
        "rp": s_rp["rp"],
        "mean_similarity": s_rp["mean_similarity"],
        "mae_mean": s_mae["mae_mean"],
        "mae_score": s_mae["mae_score"],
        "mae_threshold": s_mae["threshold"],
        "n": int(s_rp["num_pairs"]),
    }


def _reference(ref: ModelRef, descriptor, cache: dict) -> Tensor:
    key = json.dumps(_json_safe(_data_identity(ref.data or {})), sort_keys=True)
    if key not in cache:
        images, _ = ref.training_set()
        cache[key] = (_features(descriptor, images), images)
    return cache[key]


def _gl(ref: ModelRef, feats: Tensor, descriptor, threshold: float, cache: dict) -> dict[str, float]:
    from .metrics import GeneralizationScore

    ref_feats, _ = _reference(ref, descriptor, cache)
    if ref_feats.shape[1] != feats.shape[1]:
        raise ValueError(
            f"the samples of {ref.text} have feature dimension {feats.shape[1]} but its training images have "
            f"{ref_feats.shape[1]}; they must have the same image shape."
        )
    gl = GeneralizationScore(ref_feats, threshold=threshold, sync_on_compute=False)  # features are gathered
    gl.update(feats)
    s = gl.summary()
    return {
        "gl": s["gl"],
        "memorized": s["memorized_fraction"],
        "mean_max_similarity": s["mean_max_similarity"],
    }


# ============================================================================ W&B


def _log_wandb(
    out: Path, name: str, job: str, config: dict, metrics: dict, images: dict[str, Path], log=print
) -> str | None:
    """One W&B run (project lightning_repro, group evaluate); offline without credentials; never fatal."""
    from .cli import wandb_offline

    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    try:
        import wandb

        mode = "offline" if wandb_offline() else "online"
        run = wandb.init(
            project="lightning_repro",
            group="evaluate",
            job_type=job,
            name=name,
            dir=str(out),
            mode=mode,
            config=_json_safe(config),
            settings=wandb.Settings(silent=True, console="off", init_timeout=30),
            reinit="finish_previous",
        )
        run.log(
            {
                **{k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None},
                **{k: wandb.Image(str(p)) for k, p in images.items()},
            }
        )
        for k, v in metrics.items():
            run.summary[k] = v
        run_dir = run.dir
        run.finish()
        return f"W&B run {mode}: {Path(run_dir).parent}"
    except Exception as err:  # W&B must never stop an evaluation
        log(
            f"warning: W&B logging failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            f"results are in {out}."
        )
        return None


# ============================================================================ commands


def _seed_list(text: str | None, refs: Sequence[ModelRef]) -> list[int]:
    stored = [r for r in refs if r.kind == "samples"]
    if text is not None:
        return parse_seeds(text)
    if not stored:
        return parse_seeds(DEFAULT_SEEDS)
    first = stored[0]
    for other in stored[1:]:
        if set(first.samples.seeds.tolist()) != set(other.samples.seeds.tolist()):  # type: ignore[union-attr]
            raise ValueError(
                f"{first.text} holds seeds {_seed_text(first.samples.seeds.tolist())} but {other.text} holds "  # type: ignore[union-attr]
                f"{_seed_text(other.samples.seeds.tolist())}; pairs are compared seed by seed, so both must hold "  # type: ignore[union-attr]
                "the same seeds (pass --seeds to pick seeds both hold)."
            )
    return first.samples.seeds.tolist()  # type: ignore[union-attr]


def _check_shapes(refs: Sequence[ModelRef]) -> None:
    a = refs[0]
    for b in refs[1:]:
        if tuple(a.image_shape) != tuple(b.image_shape):
            sa, sb = "x".join(map(str, a.image_shape)), "x".join(map(str, b.image_shape))
            raise ValueError(
                f"{a.text} makes {sa} images but {b.text} makes {sb}; compared models must have one image shape."
            )


def _sampling_options(args, log) -> dict[str, Any]:
    """The ``generate_samples`` keyword arguments the sampling flags (shared by every subcommand) map to."""
    return dict(sampler=args.sampler, steps=args.steps, grid=args.grid, guidance=args.guidance,
                class_label=args.class_label, batch_size=args.batch_size, shard_size=args.shard_size,
                device=args.device, overwrite=args.overwrite, progress=not args.no_progress, log=log,
                precision=args.precision)


def _cache_tag(args) -> str:
    tag = f"{args.sampler}{args.steps}"
    if args.grid is not None and args.grid != DEFAULT_GRID.get(args.sampler, "native"):
        tag += f"_{args.grid}"
    if args.guidance != 1.0:
        tag += f"_g{args.guidance:g}"
    if args.class_label is not None:
        tag += f"_c{args.class_label}"
    if autocast_dtype(getattr(args, "precision", "fp32"))[0] != "fp32":
        tag += f"_{autocast_dtype(args.precision)[0]}"
    return tag


def _samples_for(refs: Sequence[ModelRef], seeds: list[int], args, out: Path, log) -> list[SampleSet]:
    sets = []
    for r in refs:
        if r.kind == "samples":
            s = r.samples.select(seeds, r.text)  # type: ignore[union-attr]
            p = s.provenance
            log(
                f"{r.label}: {len(seeds)} stored samples from {r.text} ({p.get('sampler')}, {p.get('steps')} steps)"
            )
            if any(x.kind != "samples" for x in refs) and (p.get("sampler"), p.get("steps")) != (
                args.sampler,
                args.steps,
            ):
                log(
                    f"note: {r.text} was sampled with {p.get('sampler')} / {p.get('steps')} steps, the other models "
                    f"with {args.sampler} / {args.steps} steps."
                )
        else:
            folder = out / "samples" / f"{r.name}_{_cache_tag(args)}"
            s = generate_samples(r, seeds, folder, **_sampling_options(args, log))
            how = f"reused {s.skipped} cached shard(s)" + (
                f", generated {s.generated}" if s.generated else ""
            )
            log(f"{r.label}: {how} in {folder}")
        sets.append(s)
    return sets


def _descriptor(args, shape, log):
    from .metrics import get_descriptor

    name, why = choose_descriptor(args.descriptor, shape)
    desc = get_descriptor(name)
    threshold = args.threshold if args.threshold is not None else float(desc.default_threshold)
    log(f"descriptor: {name} ({why}), threshold {threshold:g}")
    return name, desc, threshold


def _model_config(r: ModelRef) -> dict[str, Any]:
    return {
        k: r.info.get(k)
        for k in ("kind", "arch", "kernel", "size", "subset_seed", "seed", "source", "sha256")
    } | {"text": r.text}


def run_pair(args, log=print) -> dict[str, Any]:
    out = Path(args.out).expanduser()
    refs = resolve_models(args.pair)
    _check_shapes(refs)
    seeds = _seed_list(args.seeds, refs)
    a, b = refs
    sa, sb = _samples_for(refs, seeds, args, out, log)
    name, desc, threshold = _descriptor(args, a.image_shape, log)
    fa, fb = _features(desc, sa.images), _features(desc, sb.images)
    scores = pair_scores(fa, fb, sa.images, sb.images, threshold, names=(a.text, b.text))
    cache: dict = {}
    gl_a = gl_b = None
    if args.gl:
        gl_a, gl_b = (_gl(r, f, desc, threshold, cache) for r, f in ((a, fa), (b, fb)))
    # grid: A, B, nearest training image of A's sample
    k = min(len(seeds), 16)
    rows = [sa.float_images(k), sb.float_images(k)]
    nearest_note = "nearest training image of A"
    if a.data is not None:
        from .metrics import GeneralizationScore

        ref_feats, train = _reference(a, desc, cache)
        _, idx = GeneralizationScore(ref_feats, threshold=threshold).nearest(fa[:k])
        rows.append(train[idx.cpu()].float())
    else:
        nearest_note = "(no third row: A records no training set)"
    main_rank = _rank_world()[0] == 0
    grid_path = out / "pair.png"
    if main_rank:
        save_grid(torch.cat(rows), grid_path, nrow=k)
    results = {
        "rp": scores["rp"],
        "mean_similarity": scores["mean_similarity"],
        "mae_mean": scores["mae_mean"],
        "mae_score": scores["mae_score"],
        "mae_threshold": scores["mae_threshold"],
        "gl_a": None if gl_a is None else gl_a["gl"],
        "gl_b": None if gl_b is None else gl_b["gl"],
        "memorized_a": None if gl_a is None else gl_a["memorized"],
        "memorized_b": None if gl_b is None else gl_b["memorized"],
        "mean_max_similarity_a": None if gl_a is None else gl_a["mean_max_similarity"],
        "mean_max_similarity_b": None if gl_b is None else gl_b["mean_max_similarity"],
        "n": scores["n"],
        "seeds": _seed_text(seeds),
        "descriptor": name,
        "threshold": threshold,
        "sampler": args.sampler,
        "steps": args.steps,
        "grid": _canonical_grid(args.grid, args.sampler),
        "guidance": args.guidance,
        "precision": autocast_dtype(args.precision)[0],
        "model_a": {**a.info, "label": a.label, "text": a.text},
        "model_b": {**b.info, "label": b.label, "text": b.text},
        "samples_a": str(sa.files[0].parent) if sa.files else None,
        "samples_b": str(sb.files[0].parent) if sb.files else None,
        "grid_png": str(grid_path),
        "version": _version(),
    }
    if not main_rank:  # the other ranks computed the same numbers; rank 0 reports them
        return results
    _write_json(out / "results.json", results)

    def fmt(v, spec=".4f"):
        return "-" if v is None else format(v, spec)

    log(f"  A  {a.label:<28} {a.text}")
    log(f"  B  {b.label:<28} {b.text}")
    log(f"  {'n pairs':<26}{scores['n']}")
    log(f"  {'RP (sim > ' + format(threshold, 'g') + ')':<26}{fmt(scores['rp'])}")
    log(f"  {'mean similarity':<26}{fmt(scores['mean_similarity'])}")
    log(f"  {'MAE mean [0-255]':<26}{fmt(scores['mae_mean'], '.3f')}")
    log(f"  {'MAE score (< ' + format(scores['mae_threshold'], 'g') + ')':<26}{fmt(scores['mae_score'])}")
    log(f"  {'GL A / memorised A':<26}{fmt(results['gl_a'])} / {fmt(results['memorized_a'])}")
    log(f"  {'GL B / memorised B':<26}{fmt(results['gl_b'])} / {fmt(results['memorized_b'])}")
    log(f"  grid (rows: A, B, {nearest_note}): {grid_path}")
    if not args.no_wandb:
        cfg = {
            "mode": "pair",
            "model_a": _model_config(a),
            "model_b": _model_config(b),
            "descriptor": name,
            "threshold": threshold,
            "sampler": args.sampler,
            "steps": args.steps,
            "n": scores["n"],
        }
        metrics = {
            k: results[k]
            for k in (
                "rp",
                "mean_similarity",
                "mae_mean",
                "mae_score",
                "gl_a",
                "gl_b",
                "memorized_a",
                "memorized_b",
                "n",
            )
        }
        where = _log_wandb(
            out, f"pair:{a.label}|{b.label}", "pair", cfg, metrics, {"pair_grid": grid_path}, log
        )
        if where:
            log(where)
    gl_txt = "" if gl_a is None else f" GL_A={results['gl_a']:.3f} GL_B={results['gl_b']:.3f}"
    log(
        f"done: RP={scores['rp']:.4f} MAE={scores['mae_mean']:.3f} (score {scores['mae_score']:.3f}){gl_txt} | "
        f"n={scores['n']} {name}@{threshold:g} | {out / 'results.json'}"
    )
    return results


def _heatmap(
    matrix: np.ndarray,
    labels: list[str],
    title: str,
    path: Path,
    fmt: str,
    vmin=None,
    vmax=None,
    cmap: str = "viridis",
) -> None:
    from matplotlib.figure import Figure

    k = len(labels)
    size = max(3.0, 0.8 * k + 1.5)
    fig = Figure(figsize=(size + 1.0, size), dpi=120)
    ax = fig.subplots()
    im = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(k), labels=labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), labels=labels, fontsize=8)
    lo, hi = (np.nanmin(matrix), np.nanmax(matrix)) if vmin is None else (vmin, vmax)
    for i in range(k):
        for j in range(k):
            v = matrix[i, j]
            light = (v - lo) / (hi - lo + 1e-12) < 0.6 if np.isfinite(v) else True
            ax.text(
                j,
                i,
                "-" if not np.isfinite(v) else format(v, fmt),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if light else "black",
            )
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def _write_csv(path: Path, matrix: np.ndarray, labels: list[str]) -> None:
    import csv

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", *labels])
    for lab, row in zip(labels, matrix):
        w.writerow([lab, *(f"{v:.6f}" for v in row)])
    atomic_write_bytes(path, buf.getvalue().encode())


def run_matrix(args, log=print) -> dict[str, Any]:
    out = Path(args.out).expanduser()
    if len(args.matrix) < 2:
        raise ValueError(f"--matrix needs at least two models, got {len(args.matrix)}.")
    refs = resolve_models(args.matrix)
    _check_shapes(refs)
    seeds = _seed_list(args.seeds, refs)
    sets = _samples_for(refs, seeds, args, out, log)
    name, desc, threshold = _descriptor(args, refs[0].image_shape, log)
    feats = [_features(desc, s.images) for s in sets]
    k = len(refs)
    rp = np.full((k, k), np.nan)
    mae = np.full((k, k), np.nan)
    mae_score = np.full((k, k), np.nan)
    sim = np.full((k, k), np.nan)
    for i in range(k):
        for j in range(i, k):
            s = pair_scores(
                feats[i],
                feats[j],
                sets[i].images,
                sets[j].images,
                threshold,
                names=(refs[i].text, refs[j].text),
            )
            rp[i, j] = rp[j, i] = s["rp"]
            mae[i, j] = mae[j, i] = s["mae_mean"]
            mae_score[i, j] = mae_score[j, i] = s["mae_score"]
            sim[i, j] = sim[j, i] = s["mean_similarity"]
    gl = None
    if args.gl:
        cache: dict = {}
        gl = [_gl(r, f, desc, threshold, cache)["gl"] for r, f in zip(refs, feats)]
    labels = [r.label for r in refs]
    main_rank = _rank_world()[0] == 0
    if main_rank:
        _write_csv(out / "rp_matrix.csv", rp, labels)
        _write_csv(out / "mae_matrix.csv", mae, labels)
        _heatmap(
            rp, labels, f"RP ({name} > {threshold:g}, n={len(seeds)})", out / "rp_matrix.png", ".2f", 0.0, 1.0
        )
        _heatmap(
            mae, labels, f"MAE [0-255] (n={len(seeds)})", out / "mae_matrix.png", ".1f", cmap="viridis_r"
        )
    off = ~np.eye(k, dtype=bool)
    results = {
        "models": [{**r.info, "label": r.label, "text": r.text} for r in refs],
        "labels": labels,
        "rp": rp.tolist(),
        "mae_mean": mae.tolist(),
        "mae_score": mae_score.tolist(),
        "mean_similarity": sim.tolist(),
        "gl": gl,
        "rp_offdiag_mean": float(rp[off].mean()),
        "mae_offdiag_mean": float(mae[off].mean()),
        "n": len(seeds),
        "seeds": _seed_text(seeds),
        "descriptor": name,
        "threshold": threshold,
        "sampler": args.sampler,
        "steps": args.steps,
        "precision": autocast_dtype(args.precision)[0],
        "version": _version(),
    }
    if not main_rank:
        return results
    _write_json(out / "matrix.json", results)
    width = max(8, *(len(x) for x in labels))
    log("RP matrix:")
    log(" " * (width + 2) + " ".join(f"{x[:width]:>{width}}" for x in labels))
    for lab, row in zip(labels, rp):
        log(f"  {lab:<{width}}" + " ".join(f"{v:>{width}.3f}" for v in row))
    if gl is not None:
        log("GL: " + ", ".join(f"{lab}={v:.3f}" for lab, v in zip(labels, gl)))
    if not args.no_wandb:
        cfg = {
            "mode": "matrix",
            "models": [_model_config(r) for r in refs],
            "descriptor": name,
            "threshold": threshold,
            "sampler": args.sampler,
            "steps": args.steps,
            "n": len(seeds),
        }
        metrics = {
            "rp_offdiag_mean": results["rp_offdiag_mean"],
            "mae_offdiag_mean": results["mae_offdiag_mean"],
            "n": len(seeds),
        }
        where = _log_wandb(
            out,
            f"matrix:{len(refs)} models",
            "matrix",
            cfg,
            metrics,
            {"rp_matrix": out / "rp_matrix.png", "mae_matrix": out / "mae_matrix.png"},
            log,
        )
        if where:
            log(where)
    log(
        f"done: {k}x{k} matrix, mean off-diagonal RP={results['rp_offdiag_mean']:.4f} "
        f"MAE={results['mae_offdiag_mean']:.3f} | n={len(seeds)} {name}@{threshold:g} | {out / 'rp_matrix.csv'}"
    )
    return results


def _read_labels(text: str | None) -> list[int] | None:
    if text is None:
        return None
    p = Path(text).expanduser()
    if p.suffix in (".npy", ".txt") and p.is_file():
        arr = np.load(p, allow_pickle=False) if p.suffix == ".npy" else np.loadtxt(p, dtype=np.int64, ndmin=1)
        return [int(v) for v in np.asarray(arr).reshape(-1)]
    if p.suffix in (".npy", ".txt"):
        raise FileNotFoundError(f"--labels file {p} does not exist.")
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(
            f"--labels {text!r} is not a comma-separated list of class ids or a .npy / .txt file."
        ) from None


def run_sample(args, log=print) -> SampleSet:
    _canonical_sampler(args.sampler)
    _check_steps(args.steps)
    seeds = parse_seeds(args.seeds)
    ref = resolve_model(args.model)
    if ref.kind == "samples":
        raise ValueError(
            f"{args.model} holds stored samples; 'sample' needs a checkpoint or optimal:<data spec>."
        )
    out = Path(args.out).expanduser()
    s = generate_samples(ref, seeds, out, labels=_read_labels(args.labels), **_sampling_options(args, log))
    grid_path = out / "samples_grid.png"
    if _rank_world()[0] == 0:
        save_grid(
            s.float_images(64),
            grid_path,
            nrow=10 if ref.num_classes == 10 and len(s.seeds) >= 10 else None,
        )
    rate = f"{s.new_images / s.seconds:.1f} img/s" if s.new_images and s.seconds > 0 else "no new images"
    log(
        f"done: {len(s.seeds)} images (seeds {_seed_text(s.seeds.tolist())}) of {ref.label} -> {out}: "
        f"generated {s.generated} shard(s), skipped {s.skipped} finished shard(s) | {s.provenance['sampler']} "
        f"{s.provenance['steps']} steps, {s.provenance['grid']} grid | {rate} | grid: {grid_path}"
    )
    return s


# ============================================================================ argument parsing


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one sentence, no usage dump
        raise ValueError(f"{message} (see {self.prog} --help).")


def _add_sampling(p: argparse.ArgumentParser, seeds_help: str) -> None:
    p.add_argument("--seeds", default=None, help=seeds_help)
    p.add_argument("--sampler", default="heun", help=f"one of {', '.join(SAMPLERS)} (default heun)")
    p.add_argument("--steps", type=int, default=18, help="noise levels of the grid (default 18)")
    p.add_argument("--grid", default=None, help=f"sigma grid: {', '.join(GRIDS)} (default: the sampler's)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance weight (default 1)")
    p.add_argument(
        "--class",
        dest="class_label",
        type=int,
        default=None,
        help="one class for every seed (conditional models; default: seed %% num_classes)",
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=1000, help="seeds per .npz shard (default 1000)")
    p.add_argument(
        "--device",
        default=None,
        help="default: cuda when available (cuda:LOCAL_RANK under torchrun), else cpu",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        help="fp32 | bf16: network evaluations under bf16 autocast, the solver in float32 (default fp32)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="regenerate shards made with another configuration"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="output folder")


def _sample_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="evaluate.py sample", description="Sample a model at fixed seeds into .npz shards.")
    p.add_argument("model", help="checkpoint, or optimal:<data spec>")
    _add_sampling(p, f"seeds, e.g. 0-9999 or 0,5,7-9 (default {DEFAULT_SEEDS})")
    p.add_argument(
        "--labels", default=None, help="class ids, one per seed: a comma list or a .npy / .txt file"
    )
    return p


def _compare_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="evaluate.py",
        description=(
            "Reproducibility (RP, MAE) and generalization (GL) of diffusion models (Zhang et al., ICML 2024). "
            "Use 'evaluate.py sample -h' for sampling to shards."
        ),
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument(
        "--pair",
        nargs=2,
        metavar=("A", "B"),
        help="two models: checkpoints, sample folders / .npz, or optimal:<data spec>",
    )
    g.add_argument("--matrix", nargs="+", metavar="M", help="two or more models: pairwise RP / MAE")
    _add_sampling(p, f"seeds (default {DEFAULT_SEEDS}, or the seeds of the sample files given)")
    p.add_argument(
        "--descriptor",
        default=None,
        help="sscd | sscd_disc_mixup | pixel (default: sscd for 3-channel >= 32 px images, else pixel)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="similarity threshold in (-1, 1] (default: the descriptor's, 0.6 for SSCD, 0.97 for pixel)",
    )
    p.add_argument("--gl", action="store_true", help="also GL of each model against its own training set")
    p.add_argument("--no-wandb", action="store_true", help="do not log to W&B")
    return p


def _run(argv: list[str], log=print):
    if _rank_world()[0] != 0:
        log = lambda msg: None  # noqa: E731 - rank 0 speaks for all ranks
    if argv and argv[0] == "sample":
        args = _sample_parser().parse_args(argv[1:])
        if args.seeds is None:
            args.seeds = DEFAULT_SEEDS
        return run_sample(args, log)
    args = _compare_parser().parse_args(argv)
    _check_threshold(args.threshold)
    args.sampler = _canonical_sampler(args.sampler)
    _check_steps(args.steps)
    _canonical_grid(args.grid, args.sampler)
    _check_positive(args.batch_size, "--batch-size")
    _check_positive(args.shard_size, "--shard-size")
    autocast_dtype(args.precision)
    if args.seeds is not None:
        parse_seeds(args.seeds)
    if args.descriptor is not None:
        from .metrics.descriptors import DESCRIPTORS

        if args.descriptor.lower() not in DESCRIPTORS:
            raise ValueError(
                f"Unknown descriptor {args.descriptor!r} (--descriptor); expected one of "
                f"{', '.join(DESCRIPTORS)}."
            )
    if args.pair is not None:
        return run_pair(args, log)
    return run_matrix(args, log)


def main(argv: Sequence[str] | None = None):
    """Entry point of ``evaluate.py``; bad input ends with ``SystemExit`` (status 2) whose text is one sentence."""
    argv = list(sys.argv[1:] if argv is None else argv)
    created = init_distributed()
    try:
        return _run(argv, log=lambda msg: print(msg, flush=True))
    except (ValueError, FileNotFoundError) as err:
        msg = f"error: {err}"
        print(msg, file=sys.stderr, flush=True)
        exc = SystemExit(msg)
        exc.code = 2
        raise exc from None
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
