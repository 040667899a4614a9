"""Sample shards: a model sampled at fixed seeds into seed-ranged ``.npz`` files (Zhang et al., ICML 2024, Sec. 2.1).

``generate_samples(ref, seeds, out, SamplingOptions(...))`` plans the shards of ``seeds`` (one per
``shard_size`` consecutive seeds), reuses every finished shard whose provenance and content hash match,
deals the rest round robin to the ranks, samples them from the shared seed noise and writes them atomically;
``load_samples`` reads a folder or file back.  Each shard records the SHA-256 of its ``images`` / ``seeds`` /
``labels`` arrays (``content_sha256``): a rewritten shard with a valid zip checksum but other content is
re-sampled (in a cache folder) or refused (a sample folder given as a model).
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..data.sources import float_to_uint8, uint8_to_float
from ..sampling import DEFAULT_GRID, GRIDS, SAMPLERS, SolverConfig, autocast_dtype, get_sigmas, sample_seeds
from ..sampling.grids import _ALIASES as _GRID_ALIASES
from ..sampling.solvers import lower_order_rule
from .common import json_safe, seed_text, version, write_bytes
from .distributed import barrier, rank_world

if TYPE_CHECKING:
    from .references import Reference

__all__ = [
    "FORMAT",
    "MATCH_KEYS",
    "SampleSet",
    "SamplingOptions",
    "shard_name",
    "content_sha256",
    "generate_samples",
    "load_samples",
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
    "lower_order_final",
)
#: value of a provenance field in shards written before the field existed
MATCH_DEFAULTS = {"precision": "fp32", "lower_order_final": "dpm-solver"}


def _positive(value: Any, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option} must be an integer >= 1, got {value!r}.")
    return value


@dataclass(frozen=True)
class SamplingOptions:
    """How a model is sampled into shards (the sampling flags of ``evaluate.py``), validated and canonical."""

    sampler: str = "heun"  # one of sampling.SAMPLERS
    steps: int = 18  # noise levels of the grid
    grid: str | None = None  # sigma grid; None: the sampler's default (logsnr for DPM-Solver++, else native)
    guidance: float = 1.0  # classifier-free guidance weight
    class_label: int | None = (
        None  # one class for every seed (conditional models; default seed % num_classes)
    )
    batch_size: int = 256
    shard_size: int = 1000  # seeds per .npz shard
    precision: str = "fp32"  # fp32 | bf16: network evaluations under autocast, the solver in float32
    device: str | None = None  # default: cuda when available, else cpu
    overwrite: bool = False  # regenerate shards made with another configuration
    progress: bool = True
    model_sampling: bool = False  # a model recording its own sampler (Reference.sampling) is sampled with it
    lower_order_final: str = "dpm-solver"  # DPM-Solver++ samplers: dpm-solver | diffusers | off (sample_dpmpp)

    def __post_init__(self):
        key = str(self.sampler).lower().replace("-", "_").replace("++", "pp")
        if key not in SAMPLERS:
            raise ValueError(
                f"Unknown sampler {self.sampler!r} (--sampler); valid samplers are: {', '.join(SAMPLERS)}."
            )
        object.__setattr__(self, "sampler", key)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"--steps must be an integer >= 1, got {self.steps!r}.")
        grid = (
            DEFAULT_GRID.get(key, "native") if self.grid is None else str(self.grid).lower().replace("-", "_")
        )
        grid = _GRID_ALIASES.get(grid, grid)
        if grid not in GRIDS:
            raise ValueError(
                f"Unknown sigma grid {self.grid!r} (--grid); valid grids are: {', '.join(GRIDS)}."
            )
        object.__setattr__(self, "grid", grid)
        _positive(self.batch_size, "--batch-size")
        _positive(self.shard_size, "--shard-size")
        object.__setattr__(self, "precision", autocast_dtype(self.precision)[0])
        object.__setattr__(self, "guidance", float(self.guidance))
        rule = lower_order_rule(self.lower_order_final)
        if rule != "dpm-solver" and not key.startswith("dpmpp"):
            raise ValueError(f"--lower-order-final {rule} applies to the DPM-Solver++ samplers (dpmpp, dpmpp_2m, "
                             f"dpmpp_3m), not to {key}.")
        object.__setattr__(self, "lower_order_final", rule)

    @property
    def cache_tag(self) -> str:
        """Suffix of a model's cache folder: ``heun18``, ``euler10_karras_g2_c3_bf16``."""
        tag = f"{self.sampler}{self.steps}"
        if self.grid != DEFAULT_GRID.get(self.sampler, "native"):
            tag += f"_{self.grid}"
        if self.guidance != 1.0:
            tag += f"_g{self.guidance:g}"
        if self.class_label is not None:
            tag += f"_c{self.class_label}"
        if self.lower_order_final != "dpm-solver":
            tag += f"_lof-{self.lower_order_final}"
        return tag + ("" if self.precision == "fp32" else f"_{self.precision}")

    def recorded(self, sampling: dict[str, Any] | None) -> SamplingOptions:
        """These options, or, when ``model_sampling`` is on and a model records ``sampling`` (``{"sampler", "steps",
        "grid"}``, e.g. a progressive-distillation student's DDIM at its step count), with its sampler, steps, grid."""
        if not self.model_sampling or not sampling:
            return self
        own = {k: sampling[k] for k in ("sampler", "steps") if sampling.get(k) is not None}
        lof = self.lower_order_final if str(own.get("sampler", self.sampler)).startswith("dpmpp") else "dpm-solver"
        return replace(self, **own, grid=sampling.get("grid"), model_sampling=False,  # grid None: the sampler's
                       lower_order_final=lof)

    def solver(self, precision: str) -> SolverConfig:
        return SolverConfig(
            sampler=self.sampler,
            steps=self.steps,
            grid=self.grid,
            guidance=self.guidance,
            batch_size=self.batch_size,
            precision=precision,
            opts={"lower_order_final": self.lower_order_final} if self.sampler.startswith("dpmpp") else {},
        )

    def torch_device(self) -> torch.device:
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            return torch.device(self.device)
        except RuntimeError:
            raise ValueError(
                f"--device {self.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)."
            ) from None


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
                f"{what} holds seeds {seed_text(sorted(pos))} but not {seed_text(missing)}; sample them first or "
                "pass --seeds that it holds."
            )
        idx = np.array([pos[s] for s in seeds], dtype=np.int64)
        labels = None if self.labels is None else self.labels[idx]
        return SampleSet(self.images[idx], self.seeds[idx], labels, self.provenance, files=self.files)


def shard_name(seeds: Sequence[int]) -> str:
    """``samples_<first>-<last>.npz`` (6-digit, zero padded); a hash suffix when not one ascending run."""
    first, last = int(seeds[0]), int(seeds[-1])
    base = f"samples_{first:06d}-{last:06d}"
    if list(seeds) != list(range(first, last + 1)):
        base += "_" + hashlib.sha256(np.asarray(seeds, dtype=np.int64).tobytes()).hexdigest()[:8]
    return base + ".npz"


def content_sha256(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 of a shard's ``images``, ``seeds`` and (if any) ``labels``: name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for key in ("images", "seeds", "labels"):
        if key in arrays:
            a = np.ascontiguousarray(arrays[key])
            h.update(f"{key}:{a.dtype.str}:{a.shape};".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _provenance_of(arrays: dict[str, np.ndarray], path: Path) -> dict[str, Any]:
    """The provenance of a loaded sample file; ValueError if it is not one."""
    if "provenance" not in arrays or "images" not in arrays or "seeds" not in arrays:
        raise ValueError(
            f"{path} is not a lightning_repro sample file (expected arrays 'images', 'seeds' and 'provenance')."
        )
    try:
        return json.loads(str(arrays["provenance"]))
    except ValueError:
        raise ValueError(f"{path}: its 'provenance' entry is not valid JSON.") from None


def _intact(arrays: dict[str, np.ndarray]) -> bool:
    """Whether the arrays match the content hash they record (shards written before hashes existed have none)."""
    return "content_sha256" not in arrays or str(arrays["content_sha256"]) == content_sha256(arrays)


def _read_shard(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a sample file: loadable, with provenance and intact content, else one ValueError sentence."""
    try:
        arrays = _load_npz(path)
    except Exception as err:
        raise ValueError(
            f"sample file {path} could not be read ({type(err).__name__}); is it truncated?"
        ) from None
    _provenance_of(arrays, path)
    if not _intact(arrays):
        raise ValueError(
            f"sample file {path} holds images, seeds or labels whose SHA-256 differs from the content_sha256 it "
            "records (the file was rewritten or corrupted); sample it again."
        )
    return arrays


def _write_shard(path: Path, arrays: dict[str, np.ndarray], sigmas: Tensor, prov: dict[str, Any]) -> None:
    extra = {
        "sigmas": sigmas.double().cpu().numpy(),
        "provenance": np.array(json.dumps(json_safe(prov), sort_keys=True)),
        "checkpoint_sha256": np.array(prov["checkpoint_sha256"]),
        "sampler": np.array(prov["sampler"]),
        "grid": np.array(prov["grid"]),
        "kernel": np.array(json.dumps(json_safe(prov["kernel"]), sort_keys=True)),
        "version": np.array(prov["version"]),
        "steps": np.array(prov["steps"], dtype=np.int64),
        "guidance": np.array(prov["guidance"], dtype=np.float64),
        "content_sha256": np.array(content_sha256(arrays)),
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays, **extra)
    write_bytes(path, buf.getvalue())


def _labels_for(
    ref: Reference, seeds: Sequence[int], class_label: int | None, labels: Sequence[int] | None
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


def _provenance(ref: Reference, options: SamplingOptions, precision: str, kernel) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "checkpoint": ref.text,
        "checkpoint_sha256": ref.sha256,
        "sampler": options.sampler,
        "steps": options.steps,
        "grid": options.grid,
        "guidance": options.guidance,
        "kernel": kernel.config(),
        "kernel_spec": ref.kernel_spec,
        "image_shape": list(ref.image_shape),
        "precision": precision,
        "lower_order_final": options.lower_order_final,
        "num_classes": ref.num_classes,
        "model": ref.info,
        "data": None if ref.data is None else json_safe(ref.data),
        "version": version(),
        "torch": torch.__version__,
    }


@dataclass
class _Shard:
    index: int
    seeds: list[int]
    labels: np.ndarray | None
    path: Path

    def arrays(self, images: np.ndarray) -> dict[str, np.ndarray]:
        out = {"images": images, "seeds": np.asarray(self.seeds, dtype=np.int64)}
        return out if self.labels is None else {**out, "labels": self.labels}


def _reusable(shard: _Shard, want: dict[str, Any], log) -> dict[str, np.ndarray] | None:
    """The arrays of ``shard``'s finished file if it can be reused; None if it must be (re)sampled."""
    try:
        arrays = _load_npz(shard.path)
        have = _provenance_of(arrays, shard.path)
    except Exception as err:  # unreadable: our own file format, so regenerate it
        log(f"warning: {shard.path} is unreadable ({type(err).__name__}); regenerating it.")
        return None
    if not _intact(arrays):
        log(
            f"warning: {shard.path} does not match the content SHA-256 it records (rewritten or corrupted); "
            "regenerating it."
        )
        return None
    for key in MATCH_KEYS:
        got = have.get(key, MATCH_DEFAULTS.get(key))
        if got != want[key]:
            raise ValueError(
                f"shard {shard.path} was made with {key}={got!r} but this run uses {want[key]!r}; "
                "write to another --out folder, or pass --overwrite to regenerate it."
            )
    lab = shard.labels
    same_labels = (
        ("labels" not in arrays)
        if lab is None
        else ("labels" in arrays and np.array_equal(arrays["labels"], lab))
    )
    if not np.array_equal(arrays["seeds"], np.asarray(shard.seeds)) or not same_labels:
        raise ValueError(
            f"shard {shard.path} holds other seeds or labels than this run asks for; write to another --out "
            "folder, or pass --overwrite to regenerate it."
        )
    return arrays


def _sample_shards(
    ref: Reference,
    mine: list[_Shard],
    options: SamplingOptions,
    prov: dict[str, Any],
    results: dict[int, dict[str, np.ndarray]],
) -> None:
    """Sample and write this rank's shards (with the precision ``prov`` records), adding their arrays to
    ``results``."""
    from tqdm.auto import tqdm

    device = options.torch_device()
    den = ref.denoiser(device)
    decode = ref.decoder(device)
    kernel = ref.kernel()
    config = options.solver(prov["precision"])
    sigmas = get_sigmas(options.grid, options.steps, kernel)
    bar = tqdm(
        total=sum(len(s.seeds) for s in mine),
        unit="img",
        dynamic_ncols=True,
        file=sys.stderr,
        desc=f"sampling {ref.label} ({options.sampler}, {options.steps} steps)",
        disable=not options.progress or rank_world()[0] != 0,
    )
    with torch.inference_mode():
        for shard in mine:
            labels = None if shard.labels is None else torch.from_numpy(shard.labels)
            x = sample_seeds(
                den,
                kernel,
                shard.seeds,
                ref.sample_shape,
                config,
                labels=labels,
                device=device,
                callback=bar.update,
                decode=decode,
            )
            arrays = shard.arrays(float_to_uint8(x))
            _write_shard(shard.path, arrays, sigmas, prov)
            results[shard.index] = arrays
    bar.close()


def _plan(
    seeds: list[int],
    labels: np.ndarray | None,
    out: Path,
    options: SamplingOptions,
    prov: dict[str, Any],
    log,
) -> tuple[list[_Shard], dict[int, dict[str, np.ndarray]]]:
    """The shards of ``seeds`` under ``out`` and the arrays of those already finished (by index)."""
    want = json.loads(json.dumps(json_safe({k: prov[k] for k in MATCH_KEYS})))
    n = options.shard_size
    shards = [
        _Shard(k, seeds[i : i + n], None if labels is None else labels[i : i + n], out / shard_name(seeds[i : i + n]))
        for k, i in enumerate(range(0, len(seeds), n))
    ]  # fmt: skip
    done: dict[int, dict[str, np.ndarray]] = {}
    for s in shards:
        if s.path.exists() and not options.overwrite and (arrays := _reusable(s, want, log)) is not None:
            done[s.index] = arrays
    return shards, done


def generate_samples(
    ref: Reference,
    seeds: Sequence[int],
    out: str | Path,
    options: SamplingOptions = SamplingOptions(),
    labels: Sequence[int] | None = None,
    log=print,
) -> SampleSet:
    """Sample ``ref`` at ``seeds`` (parsed, e.g. by ``parse_seeds``) into seed-ranged shards under ``out``.

    Finished shards are reused.  Under torchrun the shards to sample are dealt round robin to the ranks, and
    every rank returns all the samples (it reads the other ranks' shards after a barrier).
    """
    if ref.stored is not None:
        raise ValueError(f"{ref.text} holds stored samples; it cannot be sampled again.")
    seeds = list(seeds)
    precision = ref.precision(options.precision, log)
    kernel = ref.kernel()
    lab_all = _labels_for(ref, seeds, options.class_label, labels)
    if options.guidance != 1.0 and lab_all is None:
        raise ValueError(
            f"--guidance {options.guidance} needs a class-conditional model, but {ref.text} is unconditional."
        )
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    prov = _provenance(ref, options, precision, kernel)
    shards, results = _plan(seeds, lab_all, out, options, prov, log)
    todo = [s for s in shards if s.index not in results]
    rank, world = rank_world()
    barrier()  # every rank has planned from the same files before any rank writes one
    t0 = time.perf_counter()
    if todo[rank::world]:
        _sample_shards(ref, todo[rank::world], options, prov, results)
    barrier()  # the other ranks' shards are written
    for s in todo:
        if s.index not in results:
            results[s.index] = _read_shard(s.path)
    parts = [results[s.index] for s in shards]
    return SampleSet(
        images=np.concatenate([p["images"] for p in parts]),
        seeds=np.concatenate([np.asarray(p["seeds"], dtype=np.int64) for p in parts]),
        labels=None if lab_all is None else np.concatenate([p["labels"] for p in parts]),
        provenance=prov,
        generated=len(todo),
        skipped=len(shards) - len(todo),
        new_images=sum(len(s.seeds) for s in todo),
        seconds=time.perf_counter() - t0,
        files=[s.path for s in shards],
    )


def load_samples(path: str | Path) -> SampleSet:
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
        arrays = _read_shard(f)
        prov = _provenance_of(arrays, f)
        prov0 = prov0 or prov
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
