"""The ``evaluate.py`` command line: ``sample`` (shards), ``--pair A B`` and ``--matrix A B C ...`` (Zhang et al.,
ICML 2024, Sec. 2.1: RP / MAE between seed-paired samples, GL against the training set).  The README documents
the commands and files; bad input ends in one sentence ``error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..sampling import GRIDS, SAMPLERS, parse_seeds
from ..sampling.solvers import LOWER_ORDER_FINAL
from ..viz import save_grid
from .common import exit_with_sentence, output_folder, seed_text, version, write_json, writing
from .distributed import finish_distributed, init_distributed, is_main
from .references import Reference, resolve_model, resolve_models, training_key
from .report import heatmap, log_wandb, print_matrix, print_pair, write_csv
from .scoring import FeatureSet, choose_descriptor, featurize, generalization, nearest_training, score_pair
from .shards import SampleSet, SamplingOptions, generate_samples

__all__ = ["main", "run_sample", "run_pair", "run_matrix", "DEFAULT_SEEDS"]

DEFAULT_SEEDS = "0-9999"  # the paper's 10K


# ---------------------------------------------------------------------------- the shared set-up of --pair / --matrix


@dataclass
class Comparison:
    """Models sampled at the same seeds and described by one descriptor: what ``--pair`` and ``--matrix`` score."""

    out: Path
    options: SamplingOptions
    refs: list[Reference]
    seeds: list[int]
    descriptor_name: str
    descriptor: Any
    threshold: float
    sets: list[SampleSet]
    feats: list[FeatureSet]
    _train: dict[str, FeatureSet] = field(default_factory=dict)

    def training(self, ref: Reference) -> FeatureSet:
        """The described training set of ``ref`` (once per distinct training subset)."""
        key = training_key(ref)
        if key not in self._train:
            self._train[key] = featurize(self.descriptor, ref.training_set()[0])
        return self._train[key]

    def gl(self, i: int) -> dict[str, float]:
        return generalization(self.feats[i], self.training(self.refs[i]), self.threshold, self.refs[i].text)


def _seed_list(seeds: list[int] | None, refs: Sequence[Reference]) -> list[int]:
    """``--seeds``, else the seeds every stored sample set holds, else ``DEFAULT_SEEDS``."""
    stored = [r for r in refs if r.stored is not None]
    if seeds is not None:
        return seeds
    if not stored:
        return parse_seeds(DEFAULT_SEEDS)
    first = stored[0].stored.seeds.tolist()  # type: ignore[union-attr]
    for other in stored[1:]:
        theirs = other.stored.seeds.tolist()  # type: ignore[union-attr]
        if set(first) != set(theirs):
            raise ValueError(
                f"{stored[0].text} holds seeds {seed_text(first)} but {other.text} holds {seed_text(theirs)}; pairs "
                "are compared seed by seed, so both must hold the same seeds (pass --seeds to pick seeds both hold)."
            )
    return first


def _descriptor(args, shape: Sequence[int], log) -> tuple[str, Any, float]:
    """(name, descriptor, threshold), built before any sampling so missing or unverified weights fail first."""
    from ..metrics import get_descriptor

    name, why = choose_descriptor(args.descriptor, shape)
    kwargs: dict[str, Any] = {}
    if name.lower() != "pixel":
        if args.sha256 is not None:
            kwargs["sha256"] = args.sha256.lower()
        if args.trust_descriptor:
            kwargs["trust_unpinned"] = True
    elif args.sha256 is not None:
        raise ValueError("--sha256 pins the SSCD weights file; it does not apply to the pixel descriptor.")
    desc = get_descriptor(name, **kwargs)
    threshold = args.threshold if args.threshold is not None else float(desc.default_threshold)
    log(f"descriptor: {name} ({why}), threshold {threshold:g}")
    return name, desc, threshold


def _sample_all(
    refs: Sequence[Reference], seeds: list[int], options: SamplingOptions, out: Path, log
) -> list[SampleSet]:
    sets, sampled = [], any(r.stored is None for r in refs)
    for r in refs:
        own = options.recorded(r.sampling)
        if own is not options and r.stored is None:
            log(f"{r.label}: sampled with its recorded sampler {own.sampler} / {own.steps} steps / {own.grid} grid "
                "(no --sampler / --steps / --grid given).")
        s = r.samples_at(seeds, out, options, log)
        p = s.provenance
        if (
            r.stored is not None
            and sampled
            and (p.get("sampler"), p.get("steps")) != (options.sampler, options.steps)
        ):
            log(
                f"note: {r.text} was sampled with {p.get('sampler')} / {p.get('steps')} steps, the other models "
                f"with {options.sampler} / {options.steps} steps."
            )
        sets.append(s)
    return sets


def set_up(args, specs: Sequence[str], options: SamplingOptions, seeds: list[int] | None, log) -> Comparison:
    """Check ``--out``, resolve the models, build the descriptor, then sample (or load) and describe every model."""
    out = output_folder(args.out)
    refs = resolve_models(specs)
    seeds = _seed_list(seeds, refs)
    name, desc, threshold = _descriptor(args, refs[0].image_shape, log)
    sets = _sample_all(refs, seeds, options, out, log)
    feats = [featurize(desc, s.images) for s in sets]
    return Comparison(out, options, refs, seeds, name, desc, threshold, sets, feats)


def _common_results(c: Comparison) -> dict[str, Any]:
    return {
        "seeds": seed_text(c.seeds),
        "descriptor": c.descriptor_name,
        "threshold": c.threshold,
        "sampler": c.options.sampler,
        "steps": c.options.steps,
    }


# ---------------------------------------------------------------------------- commands


def _pair_grid(c: Comparison) -> tuple[Path, str]:
    """``pair.png``: rows A, B and the training image nearest to A's sample (when A records its training set)."""
    k = min(len(c.seeds), 16)
    a = c.refs[0]
    rows = [c.sets[0].float_images(k), c.sets[1].float_images(k)]
    note = "nearest training image of A"
    if a.data is not None:
        rows.append(
            nearest_training(
                FeatureSet(c.feats[0].images[:k], c.feats[0].features[:k]), c.training(a), c.threshold
            )
        )
    else:
        note = "(no third row: A records no training set)"
    path = c.out / "pair.png"
    if is_main():
        with writing(path):
            save_grid(torch.cat(rows), path, nrow=k)
    return path, note


def _wandb_config(c: Comparison, job: str, models: dict) -> dict[str, Any]:
    """The W&B config of a ``--pair`` / ``--matrix`` run."""
    return {"mode": job, **models, "descriptor": c.descriptor_name, "threshold": c.threshold,
            "sampler": c.options.sampler, "steps": c.options.steps, "n": len(c.seeds)}  # fmt: skip


def _pair_results(c: Comparison, scores: dict, gl: list[dict | None], grid_path: Path) -> dict[str, Any]:
    """The ``results.json`` of ``--pair``."""
    (a, b), (sa, sb), opt = c.refs, c.sets, c.options
    ga, gb = (g or {"gl": None, "memorized": None, "mean_max_similarity": None} for g in gl)
    return {
        **{k: scores[k] for k in ("rp", "mean_similarity", "mae_mean", "mae_score", "mae_threshold")},
        "gl_a": ga["gl"],
        "gl_b": gb["gl"],
        "memorized_a": ga["memorized"],
        "memorized_b": gb["memorized"],
        "mean_max_similarity_a": ga["mean_max_similarity"],
        "mean_max_similarity_b": gb["mean_max_similarity"],
        "n": scores["n"],
        **_common_results(c),
        "grid": opt.grid,
        "guidance": opt.guidance,
        "precision": opt.precision,
        "model_a": a.describe(),
        "model_b": b.describe(),
        "samples_a": str(sa.files[0].parent) if sa.files else None,
        "samples_b": str(sb.files[0].parent) if sb.files else None,
        "grid_png": str(grid_path),
        "version": version(),
    }


def run_pair(args, options: SamplingOptions, seeds: list[int] | None, log=print) -> dict[str, Any]:
    """``--pair A B``: RP / MAE (and with ``--gl`` GL) of two models; ``results.json`` and ``pair.png``."""
    c = set_up(args, args.pair, options, seeds, log)
    a, b = c.refs
    scores = score_pair(c.feats[0], c.feats[1], c.threshold, names=(a.text, b.text))
    gl = [c.gl(0), c.gl(1)] if args.gl else [None, None]
    grid_path, nearest_note = _pair_grid(c)
    results = _pair_results(c, scores, gl, grid_path)
    if not is_main():  # the other ranks computed the same numbers; rank 0 reports them
        return results
    write_json(c.out / "results.json", results)
    print_pair(results, nearest_note, log)
    keys = (
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
    if not args.no_wandb:
        cfg = _wandb_config(c, "pair", {"model_a": a.config(), "model_b": b.config()})
        metrics = {k: results[k] for k in keys}
        log(log_wandb(c.out, f"pair:{a.label}|{b.label}", "pair", cfg, metrics, {"pair_grid": grid_path}))
    gl_txt = "" if gl[0] is None else f" GL_A={results['gl_a']:.3f} GL_B={results['gl_b']:.3f}"
    log(
        f"done: RP={scores['rp']:.4f} MAE={scores['mae_mean']:.3f} (score {scores['mae_score']:.3f}){gl_txt} | "
        f"n={scores['n']} {c.descriptor_name}@{c.threshold:g} | {c.out / 'results.json'}"
    )
    return results


def _matrices(c: Comparison) -> dict[str, np.ndarray]:
    """Symmetric k x k matrices of ``rp``, ``mae_mean``, ``mae_score`` and ``mean_similarity``."""
    k = len(c.refs)
    m = {key: np.full((k, k), np.nan) for key in ("rp", "mae_mean", "mae_score", "mean_similarity")}
    for i in range(k):
        for j in range(i, k):
            s = score_pair(c.feats[i], c.feats[j], c.threshold, names=(c.refs[i].text, c.refs[j].text))
            for key, matrix in m.items():
                matrix[i, j] = matrix[j, i] = s[key]
    return m


def _write_matrices(c: Comparison, m: dict[str, np.ndarray], labels: list[str]) -> None:
    """``rp_matrix.csv`` / ``mae_matrix.csv`` and their annotated heatmaps (the style of the paper's Fig. 6)."""
    n = len(c.seeds)
    write_csv(c.out / "rp_matrix.csv", m["rp"], labels)
    write_csv(c.out / "mae_matrix.csv", m["mae_mean"], labels)
    title = f"RP ({c.descriptor_name} > {c.threshold:g}, n={n})"
    heatmap(m["rp"], labels, title, c.out / "rp_matrix.png", ".2f", 0.0, 1.0)
    heatmap(m["mae_mean"], labels, f"MAE [0-255] (n={n})", c.out / "mae_matrix.png", ".1f", cmap="viridis_r")


def run_matrix(args, options: SamplingOptions, seeds: list[int] | None, log=print) -> dict[str, Any]:
    """``--matrix A B C ...``: pairwise RP / MAE of every two models; CSV, heatmaps and ``matrix.json``."""
    if len(args.matrix) < 2:
        raise ValueError(f"--matrix needs at least two models, got {len(args.matrix)}.")
    c = set_up(args, args.matrix, options, seeds, log)
    m, k, n = _matrices(c), len(c.refs), len(c.seeds)
    gl = [c.gl(i)["gl"] for i in range(k)] if args.gl else None
    labels = [r.label for r in c.refs]
    if is_main():
        _write_matrices(c, m, labels)
    off = ~np.eye(k, dtype=bool)
    results = {
        "models": [r.describe() for r in c.refs],
        "labels": labels,
        **{key: m[key].tolist() for key in ("rp", "mae_mean", "mae_score", "mean_similarity")},
        "gl": gl,
        "rp_offdiag_mean": float(m["rp"][off].mean()),
        "mae_offdiag_mean": float(m["mae_mean"][off].mean()),
        "n": n,
        **_common_results(c),
        "precision": options.precision,
        "version": version(),
    }
    if not is_main():
        return results
    write_json(c.out / "matrix.json", results)
    print_matrix(labels, m["rp"], gl, log)
    metrics = {key: results[key] for key in ("rp_offdiag_mean", "mae_offdiag_mean", "n")}
    images = {"rp_matrix": c.out / "rp_matrix.png", "mae_matrix": c.out / "mae_matrix.png"}
    if not args.no_wandb:
        cfg = _wandb_config(c, "matrix", {"models": [r.config() for r in c.refs]})
        log(log_wandb(c.out, f"matrix:{k} models", "matrix", cfg, metrics, images))
    log(
        f"done: {k}x{k} matrix, mean off-diagonal RP={results['rp_offdiag_mean']:.4f} "
        f"MAE={results['mae_offdiag_mean']:.3f} | n={n} {c.descriptor_name}@{c.threshold:g} | "
        f"{c.out / 'rp_matrix.csv'}"
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


def run_sample(args, options: SamplingOptions, seeds: list[int], log=print) -> SampleSet:
    ref = resolve_model(args.model)
    if ref.stored is not None:
        raise ValueError(
            f"{args.model} holds stored samples; 'sample' needs a checkpoint or optimal:<data spec>."
        )
    out = output_folder(args.out)
    options = options.recorded(ref.sampling)
    s = generate_samples(ref, seeds, out, options, labels=_read_labels(args.labels), log=log)
    grid_path = out / "samples_grid.png"
    if is_main():
        with writing(grid_path):
            save_grid(
                s.float_images(64),
                grid_path,
                nrow=10 if ref.num_classes == 10 and len(s.seeds) >= 10 else None,
            )
    rate = f"{s.new_images / s.seconds:.1f} img/s" if s.new_images and s.seconds > 0 else "no new images"
    log(
        f"done: {len(s.seeds)} images (seeds {seed_text(s.seeds.tolist())}) of {ref.label} -> {out}: "
        f"generated {s.generated} shard(s), skipped {s.skipped} finished shard(s) | {s.provenance['sampler']} "
        f"{s.provenance['steps']} steps, {s.provenance['grid']} grid | {rate} | grid: {grid_path}"
    )
    return s


# ---------------------------------------------------------------------------- argument parsing


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one sentence, no usage dump
        raise ValueError(f"{message} (see {self.prog} --help).")


def _add_sampling(p: argparse.ArgumentParser, seeds_help: str) -> None:
    p.add_argument("--seeds", default=None, help=seeds_help)
    own = "; a model that records its own sampler (a progressive-distillation student) uses it when none of " \
          "--sampler / --steps / --grid is given"
    p.add_argument("--sampler", default=None, help=f"one of {', '.join(SAMPLERS)} (default heun{own})")
    p.add_argument("--steps", type=int, default=None, help="noise levels of the grid (default 18)")
    p.add_argument("--grid", default=None, help=f"sigma grid: {', '.join(GRIDS)} (default: the sampler's)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance weight (default 1)")
    p.add_argument(
        "--class",
        dest="class_label",
        type=int,
        default=None,
        help="one class for every seed (conditional models; default: seed %% num_classes)",
    )
    p.add_argument(
        "--lower-order-final",
        default="dpm-solver",
        choices=LOWER_ORDER_FINAL,
        help="DPM-Solver++ below 15 steps: lower the order of the last steps between non-zero noise levels "
        "(dpm-solver, default), of the last steps counting the one into sigma = 0 (diffusers' "
        "DPMSolverMultistepScheduler), or never (off)",
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


def _options(args) -> SamplingOptions:
    given = (args.sampler, args.steps, args.grid)
    return SamplingOptions(
        sampler="heun" if args.sampler is None else args.sampler,
        steps=18 if args.steps is None else args.steps,
        grid=args.grid,
        guidance=args.guidance,
        class_label=args.class_label,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        precision=args.precision,
        device=args.device,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        model_sampling=all(v is None for v in given),
        lower_order_final=args.lower_order_final,
    )


def _sample_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="evaluate.py sample", description="Sample a model at fixed seeds into .npz shards.")
    p.add_argument("model", help="checkpoint, optimal:<data spec>, or edm: / uvit: / dit: / diffusers: spec")
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
    p.add_argument("--sha256", default=None, metavar="HEX", help="expected SHA-256 of the SSCD weights file")
    p.add_argument(
        "--trust-descriptor",
        action="store_true",
        help="accept SSCD weights that have no published SHA-256 (recorded on first use)",
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


def _check_compare(args) -> None:
    if args.threshold is not None and not -1.0 < float(args.threshold) <= 1.0:  # also rejects NaN
        raise ValueError(f"--threshold must be a cosine similarity in (-1, 1], got {args.threshold}.")
    if args.descriptor is not None:
        from ..metrics.descriptors import DESCRIPTORS

        if args.descriptor.lower() not in DESCRIPTORS:
            raise ValueError(
                f"Unknown descriptor {args.descriptor!r} (--descriptor); expected one of "
                f"{', '.join(DESCRIPTORS)}."
            )
    if args.sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", args.sha256):
        raise ValueError(f"--sha256 must be 64 hexadecimal digits (a SHA-256), got {args.sha256!r}.")


def _run(argv: list[str], log=print):
    if not is_main():
        log = lambda msg: None  # noqa: E731 - rank 0 speaks for all ranks
    if argv and argv[0] == "sample":
        args = _sample_parser().parse_args(argv[1:])
        options = _options(args)
        return run_sample(
            args, options, parse_seeds(DEFAULT_SEEDS if args.seeds is None else args.seeds), log
        )
    args = _compare_parser().parse_args(argv)
    options = _options(args)
    seeds = None if args.seeds is None else parse_seeds(args.seeds)  # parsed once, here
    _check_compare(args)
    return (run_pair if args.pair is not None else run_matrix)(args, options, seeds, log)


def main(argv: Sequence[str] | None = None):
    """Entry point of ``evaluate.py``; bad input ends with ``SystemExit`` (status 2) whose text is one sentence."""
    argv = list(sys.argv[1:] if argv is None else argv)
    created = init_distributed()
    try:
        return _run(argv, log=lambda msg: print(msg, flush=True))
    except (ValueError, OSError) as err:
        raise exit_with_sentence(err) from None
    finally:
        finish_distributed(created)
