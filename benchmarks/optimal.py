"""Benchmark: one call of the empirical optimal denoiser (Prop. 1), one-pass online log-sum-exp vs two passes.

One batch of 64 queries against N = 50,000 training images of 3x32x32, float64 accumulation, on CPU.
``EmpiricalOptimalDenoiser`` streams the training set once (online LSE: running max, rescaled sum and
weighted sum), so each chunk costs two matrix products (the dot products ``x . y_i`` and the weighted sum
``w @ Y``) on data that is still in cache.  The baseline measured in the same run is the classic two-pass
softmax: pass 1 computes every logit to find the max, pass 2 recomputes them, exponentiates and
accumulates, i.e. three matrix products per chunk and two sweeps over the 1.2 GB training set.  Both use
the same centred float64 training matrix, so the outputs agree to rounding.

Usage:  python benchmarks/optimal.py [--n 50000] [--batch 64] [--chunks 256,512,1024] [--sigmas 80,2,0.5]
Prints, per chunk size and sigma, both times (best of ``--repeats`` alternating runs; wall-clock and process
CPU time), their ratio and the max abs difference of the outputs.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from lightning_repro.theory import EmpiricalOptimalDenoiser
from lightning_repro.theory.optimal import _exp_cut


def two_pass(den: EmpiricalOptimalDenoiser, x: torch.Tensor, sigma: float, chunk: int) -> torch.Tensor:
    """Baseline: max pass over the training set, then an exp / weighted-sum pass (logits computed twice)."""
    xc = x.reshape(x.shape[0], -1).to(den.dtype) - den.mean
    inv = 1.0 / (sigma * sigma)
    n = den.num_images
    m = xc.new_full((xc.shape[0],), -math.inf)
    for i in range(0, n, chunk):  # pass 1: the max logit
        j = min(i + chunk, n)
        logits = torch.addmm(den._half_sq[i:j], xc, den._y[i:j].T, beta=-1.0).mul_(inv)
        m = torch.maximum(m, logits.amax(1))
    s = xc.new_zeros(xc.shape[0])
    a = torch.zeros_like(xc)
    for i in range(0, n, chunk):  # pass 2: recompute the logits, exponentiate, accumulate
        j = min(i + chunk, n)
        logits = torch.addmm(den._half_sq[i:j], xc, den._y[i:j].T, beta=-1.0).mul_(inv)
        w = _exp_cut(logits.sub_(m.unsqueeze(1)))  # same subnormal guard as the one-pass
        s += w.sum(1)
        a.addmm_(w, den._y[i:j])
    return (a / s.unsqueeze(1) + den.mean).reshape(x.shape).to(x.dtype)


def interleaved_best(fns: dict, repeats: int) -> dict:
    """Run the candidates alternately ``repeats`` times; per candidate keep the best wall-clock and
    process (CPU) time and the last output.  Alternating and taking the minimum makes the ratio robust
    to other load on a shared machine."""
    res = {k: [math.inf, math.inf, None] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            w1, c1 = time.perf_counter(), time.process_time()
            r = res[k]
            r[0], r[1], r[2] = min(r[0], w1 - w0), min(r[1], c1 - c0), out
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50_000, help="training images")
    p.add_argument("--batch", type=int, default=64, help="queries per call")
    p.add_argument("--chunks", default="512", help="comma-separated chunk sizes to try")
    p.add_argument("--sigmas", default="80,2,0.5", help="comma-separated noise levels")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0 = torch default); 1 is least disturbed by other load",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    # Smooth-ish random "images" in [-1, 1]: a low-resolution pattern upsampled plus pixel noise.
    train = torch.empty(args.n, 3, 32, 32)
    for i in range(0, args.n, 5000):
        b = min(5000, args.n - i)
        low = torch.rand(b, 3, 8, 8, generator=g) * 2 - 1
        img = torch.nn.functional.interpolate(low, size=32, mode="bilinear", align_corners=False)
        train[i : i + b] = (0.8 * img + 0.2 * (torch.rand(b, 3, 32, 32, generator=g) * 2 - 1)).clamp_(-1, 1)
    clean = train[torch.randint(args.n, (args.batch,), generator=g)].double()
    noise = torch.randn(args.batch, 3, 32, 32, generator=g, dtype=torch.float64)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; N={args.n} images 3x32x32, batch {args.batch}, "
        f"float64 accumulation, best of {args.repeats}"
    )
    den = EmpiricalOptimalDenoiser(train, dtype=torch.float64)
    del train
    for chunk in [int(c) for c in args.chunks.split(",")]:
        den.chunk_size = chunk
        for sigma in [float(s) for s in args.sigmas.split(",")]:
            x = clean + sigma * noise
            res = interleaved_best(
                {
                    "one": lambda x=x, sigma=sigma: den(x, sigma),
                    "two": lambda x=x, sigma=sigma, chunk=chunk: two_pass(den, x, sigma, chunk),
                },
                args.repeats,
            )
            (w1, c1, o1), (w2, c2, o2) = res["one"], res["two"]
            diff = (o1 - o2).abs().max().item()
            print(
                f"chunk {chunk:5d}  sigma {sigma:6g}:  one-pass {w1:6.3f} s (cpu {c1:6.3f})   "
                f"two-pass {w2:6.3f} s (cpu {c2:6.3f})   ratio {w2 / w1:4.2f}x (cpu {c2 / c1:4.2f}x)   "
                f"max|diff| {diff:.2e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
