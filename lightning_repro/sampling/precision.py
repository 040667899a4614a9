"""How precisely a denoiser must know its training images to keep the optimal denoiser's choices.

Zhang et al. (ICML 2024, Prop. 1): in the memorisation regime a trained model should reproduce the optimal denoiser
``D*`` of its training images.  Which image a seed's ODE trajectory lands on is a sharp function of the images'
logits ``x . y_i / sigma^2``, so the question is quantitative.  Two measurements, both against ``D*`` on the same
seeds with the same deterministic Heun sampler:

* RP (Sec. 2.1) between ``D*`` and the optimal denoiser of ``perturbed_images``, the same images plus a fixed draw
  of ``std * N(0, I)`` per pixel, for each ``std``: the agreement any denoiser whose knowledge of the images is off
  by ``std`` per pixel can expect.
* ``TrajectoryErrors``: the rms error per pixel of other denoisers (trained networks) against ``D*`` at every noise
  level the sampler visits along ``D*``'s own trajectories, to read off where, and by how much, a network is off.

With ``--reference mog:`` (the closed form of a low-rank mixture, Prop. 2) only the second measurement is made:
the networks' errors along the mixture's own trajectories (the generalisation regime's counterpart).

Command (the evaluation stack resolves models and scores, so it is imported only by ``main``)::

    python -m lightning_repro.sampling.precision [CKPT ...] [--reference optimal:] --stds 0.02 0.05 0.1 \
        --seeds 0-255 --out DIR    # -> DIR/precision.csv, DIR/errors.csv, DIR/precision.png
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["TrajectoryErrors", "perturbed_images", "main", "DEFAULT_STDS"]

#: the perturbation stds of an ``optimal:`` reference when ``--stds`` is not given
DEFAULT_STDS = (0.01, 0.02, 0.05, 0.1, 0.2)


class TrajectoryErrors:
    """A Denoiser that returns ``reference(x, sigma)`` and records, per noise level, the squared error per pixel of
    each of ``others`` at the same ``(x, sigma)``: sampled with it, the errors are those along the reference's own
    trajectories.  ``rms()`` -> ``{name: {sigma: rms error per pixel}}``."""

    def __init__(self, reference, others: dict[str, object]):
        self.reference, self.others = reference, dict(others)
        self._sum: dict[str, dict[float, float]] = {k: defaultdict(float) for k in self.others}
        self._count: dict[float, int] = defaultdict(int)

    def __call__(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        d = self.reference(x, sigma, labels)
        sig = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).cpu()
        if sig.numel() != 1 and bool((sig != sig[0]).any()):
            raise ValueError("TrajectoryErrors records one noise level per call; the sampler passed several.")
        key = round(float(sig[0]), 6)
        for name, other in self.others.items():
            err = (other(x, sigma, labels).double() - d.double()).pow(2).flatten(1).mean(1)  # per sample, per pixel
            self._sum[name][key] += float(err.sum())
        self._count[key] += x.shape[0]
        return d

    def rms(self) -> dict[str, dict[float, float]]:
        return {name: {s: math.sqrt(v / self._count[s]) for s, v in sorted(sums.items(), reverse=True)}
                for name, sums in self._sum.items()}


def perturbed_images(images: Tensor, std: float, seed: int = 0) -> Tensor:
    """``images + std * z`` with one ``z ~ N(0, I)`` drawn from ``seed`` (the same direction for every ``std``)."""
    if not math.isfinite(std) or std < 0:
        raise ValueError(f"a perturbation std must be a finite number >= 0, got {std!r}.")
    z = torch.randn(images.shape, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
    return (images.double() + float(std) * z).to(images.dtype)


# ---------------------------------------------------------------------------- the command


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lightning_repro.sampling.precision",
                                description="RP of the optimal denoiser against itself with perturbed training "
                                            "images, and the error of trained networks along its trajectories.")
    p.add_argument("models", nargs="*", help="checkpoints (or other model specs) whose error to measure")
    p.add_argument("--reference", default="optimal:", help="a closed form: optimal: (the first model's training "
                   "subset), optimal:<data spec>, or mog: (the mixture of the first model's mog source; errors only) "
                   "(default optimal:)")
    p.add_argument("--stds", type=float, nargs="+", default=None,
                   help=f"per-pixel perturbation stds of the training images ([-1, 1] pixels; optimal: only; default "
                        f"{' '.join(map(str, DEFAULT_STDS))})")
    p.add_argument("--perturbation-seed", type=int, default=0)
    p.add_argument("--seeds", default="0-255", help="seeds (default 0-255)")
    p.add_argument("--steps", type=int, default=18, help="Heun noise levels (default 18)")
    p.add_argument("--threshold", type=float, default=None, help="similarity threshold (default: calibrated)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", required=True, help="output folder")
    return p


def run(args, log=print) -> dict:
    """``{"perturbed": [{"std", "rp", "mean_similarity"}], "errors": {model: {sigma: rms}}, "rp": {model: rp}}``."""
    from ..evaluation.common import output_folder
    from ..evaluation.references import resolve_models
    from ..evaluation.scoring import choose_descriptor, featurize, score_pair
    from ..metrics import get_descriptor
    from ..theory import EmpiricalOptimalDenoiser
    from . import parse_seeds
    from .hybrid import _sample_uint8

    out = output_folder(args.out)
    *models, ref = resolve_models([*args.models, args.reference])
    if ref.kind not in ("optimal", "mog"):
        raise ValueError(f"--reference must be an optimal: or mog: spec (a closed-form denoiser), got "
                         f"{args.reference!r}.")
    if ref.kind == "mog" and args.stds:
        raise ValueError("--stds perturbs the training images of an optimal: reference; a mog: reference has none "
                         "(leave --stds out).")
    stds = [] if ref.kind == "mog" else (DEFAULT_STDS if args.stds is None else args.stds)
    for spec, m in zip(args.models, models):
        if m.num_classes:
            raise ValueError(f"{spec} is class-conditional ({m.num_classes} classes); the precision command "
                             "compares unconditional models with the optimal denoiser of their training set.")
    seeds, kernel, device = parse_seeds(args.seeds), ref.kernel(), torch.device("cpu")
    name, _ = choose_descriptor(None, ref.image_shape)
    desc = get_descriptor(name)
    tau = float(args.threshold if args.threshold is not None else desc.default_threshold)
    images, _ = ref.training_set()

    def sample(den):
        return featurize(desc, _sample_uint8(den, kernel, seeds, ref.image_shape, args.steps, args.batch_size,
                                             None, device))

    nets = {m.label: m.denoiser(device) for m in models}
    probe = TrajectoryErrors(ref.denoiser(device), nets)
    ref_feats = sample(probe)
    result = {"perturbed": [], "errors": probe.rms(), "rp": {}}
    for m in models:
        result["rp"][m.label] = score_pair(sample(nets[m.label]), ref_feats, tau)["rp"]
        log(f"{m.label}: RP vs {ref.label} {result['rp'][m.label]:.4f} | rms error per pixel along its "
            "trajectories: " + " ".join(f"{s:g}:{e:.3f}" for s, e in result["errors"][m.label].items()))
    for std in stds:
        pert = EmpiricalOptimalDenoiser(perturbed_images(images, std, args.perturbation_seed), device=device)
        got = score_pair(sample(pert), ref_feats, tau)
        result["perturbed"].append({"std": float(std), "rp": got["rp"], "mean_similarity": got["mean_similarity"]})
        log(f"images + {std:g} * N(0, 1) per pixel: RP vs {ref.label} {got['rp']:.4f}")
    _write(result, out, f"{ref.label} | {name}@{tau:g}, {len(seeds)} seeds, Heun {args.steps}")
    log(f"done: {len(stds)} perturbations, {len(models)} model(s) | {out / 'precision.csv'} | "
        f"{out / 'errors.csv'} | {out / 'precision.png'}")
    return result


def _write(result: dict, out: Path, title: str) -> None:
    """``precision.csv`` (std, rp, mean_similarity), ``errors.csv`` (model, sigma, rms, rp) and ``precision.png``."""
    from matplotlib.figure import Figure

    from ..files import atomic_write_csv
    from ..viz import save_figure

    atomic_write_csv(out / "precision.csv", ("std", "rp", "mean_similarity"),
                     [(repr(r["std"]), repr(r["rp"]), repr(r["mean_similarity"])) for r in result["perturbed"]])
    atomic_write_csv(out / "errors.csv", ("model", "sigma", "rms_error_per_pixel", "rp"),
                     [(m, repr(s), repr(e), repr(result["rp"][m])) for m, errs in result["errors"].items()
                      for s, e in errs.items()])
    fig = Figure(figsize=(10, 3.8), dpi=120)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    stds = [r["std"] for r in result["perturbed"]]
    left.plot(stds, [r["rp"] for r in result["perturbed"]], marker="o", color="k", label="perturbed images")
    left.set(xlabel="perturbation std per pixel", ylabel="RP vs the optimal denoiser", ylim=(-0.02, 1.02),
             title="optimal denoiser of perturbed images")
    for m, errs in result["errors"].items():
        right.plot(list(errs), list(errs.values()), marker="o", ms=3, label=f"{m} (RP {result['rp'][m]:.2f})")
    for std in stds:
        right.axhline(std, color="k", lw=0.6, ls=":")
    right.set(xscale="log", xlabel="sigma (along the reference's trajectories)", ylabel="rms error per pixel",
              title="networks against the reference")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    if result["errors"]:
        right.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "precision.png")


def main(argv: list[str] | None = None) -> dict:
    return run(_parser().parse_args(argv))


if __name__ == "__main__":
    main()
