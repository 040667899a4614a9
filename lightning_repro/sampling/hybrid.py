"""Where models part ways: the probability-flow ODE with one denoiser above a switch level and another below it.

``SwitchedDenoiser(high, low, sigma_switch)`` is the Denoiser ``D(x, sigma) = high(x, sigma)`` for
``sigma > sigma_switch`` and ``low(x, sigma)`` otherwise, sample by sample.  Run with a network above and the
optimal denoiser of its training set (Zhang et al., ICML 2024, Prop. 1) below, the RP of the hybrid's samples
against the reference's own (Sec. 2.1) as a function of ``sigma_switch`` shows at which noise levels the network
decides a different image: ``sigma_switch = inf`` is the reference alone (RP = 1), ``0`` the network alone.

Command (the evaluation stack resolves the models and scores, so it is imported only by ``main``)::

    python -m lightning_repro.sampling.hybrid CKPT [--reference optimal:] --switch 40 20 10 5 2.5 1.2 0.6 0.3 0.1 0 \
        --seeds 0-255 --out DIR          # -> DIR/hybrid.csv, DIR/hybrid.png (RP vs sigma_switch, log x-axis)
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["SwitchedDenoiser", "main"]


class SwitchedDenoiser:
    """``high(x, sigma)`` where ``sigma > sigma_switch``, ``low(x, sigma)`` elsewhere; per-sample ``sigma`` (B,).

    A batch whose samples all fall on one side goes to that denoiser unchanged (same arguments, same result as
    calling it directly); a mixed batch is split, each part evaluated on its own rows.
    """

    def __init__(self, high, low, sigma_switch: float):
        s = float(sigma_switch)
        if math.isnan(s) or s < 0:
            raise ValueError(f"sigma_switch must be a noise level >= 0 (inf allowed), got {sigma_switch!r}.")
        self.high, self.low, self.sigma_switch = high, low, s

    def __call__(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        sig = torch.as_tensor(sigma, dtype=torch.float64).detach().reshape(-1).cpu()
        above = (sig > self.sigma_switch).expand(x.shape[0]) if sig.numel() == 1 else sig > self.sigma_switch
        if bool(above.all()):
            return self.high(x, sigma, labels)
        if not bool(above.any()):
            return self.low(x, sigma, labels)
        rows_hi, rows_lo = above.nonzero().reshape(-1).to(x.device), (~above).nonzero().reshape(-1).to(x.device)
        sig_t = torch.as_tensor(sigma, device=x.device).reshape(-1)

        def part(den, rows):
            return den(x[rows], sig_t if sig_t.numel() == 1 else sig_t[rows], None if labels is None else labels[rows])

        hi, lo = part(self.high, rows_hi), part(self.low, rows_lo)
        out = hi.new_empty((x.shape[0], *hi.shape[1:]))
        out[rows_hi], out[rows_lo] = hi, lo.to(hi.dtype)
        return out


# ---------------------------------------------------------------------------- the command


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lightning_repro.sampling.hybrid",
                                description="RP against the reference of samples that switch from the network to "
                                            "the reference below sigma_switch.")
    p.add_argument("model", help="checkpoint (the network, used above the switch)")
    p.add_argument("--reference", default="optimal:", help="model spec used below the switch (default optimal:)")
    p.add_argument("--switch", type=float, nargs="+", required=True, help="switch levels sigma_s (0 allowed)")
    p.add_argument("--seeds", default="0-255", help="seeds (default 0-255)")
    p.add_argument("--steps", type=int, default=18, help="Heun noise levels (default 18)")
    p.add_argument("--descriptor", default=None, help="pixel | sscd (default: evaluation.choose_descriptor)")
    p.add_argument("--threshold", type=float, default=None, help="similarity threshold (default: calibrated)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", required=True, help="output folder")
    return p


def _sample_uint8(den, kernel, seeds, shape, steps, batch_size, labels, device):
    from ..data.sources import float_to_uint8
    from . import SolverConfig, sample_seeds

    config = SolverConfig(sampler="heun", steps=steps, batch_size=batch_size)
    return float_to_uint8(sample_seeds(den, kernel, seeds, shape, config, labels=labels, device=device))


def run(args, log=print) -> list[dict[str, float]]:
    """The rows of ``hybrid.csv`` (``sigma_switch``, ``rp``, ``mean_similarity``, ``mae_mean``, ``n``); writes both files."""
    from ..evaluation.common import output_folder
    from ..evaluation.references import resolve_model
    from ..evaluation.scoring import choose_descriptor, featurize, score_pair
    from ..metrics import get_descriptor
    from . import parse_seeds

    out = output_folder(args.out)
    net_ref = resolve_model(args.model)
    ref = resolve_model(args.reference, partner=net_ref)
    if tuple(ref.image_shape) != tuple(net_ref.image_shape):
        raise ValueError(f"{args.model} makes {net_ref.image_shape} images but {args.reference} makes "
                         f"{ref.image_shape}; the two denoisers must share one image shape.")
    seeds = parse_seeds(args.seeds)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name, _ = choose_descriptor(args.descriptor, net_ref.image_shape)
    desc = get_descriptor(name)
    tau = float(args.threshold if args.threshold is not None else desc.default_threshold)
    labels = torch.as_tensor(seeds) % net_ref.num_classes if net_ref.num_classes else None
    net, low, kernel = net_ref.denoiser(device), ref.denoiser(device), net_ref.kernel()

    def images(den):
        return _sample_uint8(den, kernel, seeds, net_ref.image_shape, args.steps, args.batch_size, labels, device)

    ref_feats = featurize(desc, images(low))
    rows = []
    for s in args.switch:
        got = score_pair(featurize(desc, images(SwitchedDenoiser(net, low, s))), ref_feats, tau)
        rows.append({"sigma_switch": float(s), "rp": got["rp"], "mean_similarity": got["mean_similarity"],
                     "mae_mean": got["mae_mean"], "n": got["n"]})
        log(f"sigma_switch={s:g}: RP={got['rp']:.4f} mean similarity={got['mean_similarity']:.4f}")
    _write(rows, out, f"{net_ref.label} above, {ref.label} below | {name}@{tau:g}, {len(seeds)} seeds")
    log(f"done: {len(rows)} switch levels | {out / 'hybrid.csv'} | {out / 'hybrid.png'}")
    return rows


def _write(rows: list[dict[str, float]], out: Path, title: str) -> None:
    """``hybrid.csv`` and ``hybrid.png``: RP vs sigma_switch on a log axis; sigma_switch = 0 as a dashed line."""
    from matplotlib.figure import Figure

    from ..files import atomic_write_csv
    from ..viz import save_figure

    atomic_write_csv(out / "hybrid.csv", ("sigma_switch", "rp", "mean_similarity", "mae_mean", "n"),
                     ((repr(r["sigma_switch"]), repr(r["rp"]), repr(r["mean_similarity"]), repr(r["mae_mean"]), r["n"])
                      for r in rows))
    fig = Figure(figsize=(6, 3.6), dpi=120)
    ax = fig.add_subplot()
    pos = sorted((r for r in rows if 0 < r["sigma_switch"] < math.inf), key=lambda r: r["sigma_switch"])
    ax.plot([r["sigma_switch"] for r in pos], [r["rp"] for r in pos], marker="o", label="network above, reference below")
    for r in rows:
        if r["sigma_switch"] == 0:
            ax.axhline(r["rp"], ls="--", color="gray", label="network alone (sigma_s = 0)")
    ax.set_xscale("log")
    ax.set(xlabel="switch level sigma_s", ylabel="RP vs the reference alone", ylim=(-0.02, 1.02))
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "hybrid.png")


def main(argv: Sequence[str] | None = None) -> list[dict[str, float]]:
    """Entry point; bad input ends with ``SystemExit`` (status 2) whose text is one sentence."""
    args = _parser().parse_args(argv)
    try:
        return run(args, log=lambda m: print(m, flush=True))
    except (ValueError, OSError) as err:
        from ..evaluation.common import exit_with_sentence  # the evaluation CLI's one-sentence exit

        raise exit_with_sentence(err) from None


if __name__ == "__main__":
    main()
