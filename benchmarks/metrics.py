"""Benchmark: the generalization score's nearest-neighbour search, and descriptor throughput, on CPU.

GL (Zhang et al. 2024, Sec. 2.1) needs, for each of N generated images, the most similar of M training
features.  Target: N = 10,000 samples x M = 50,000 training features x D = 512 on 2 CPU cores in at most
10 s and 2 GB peak memory.  ``GeneralizationScore`` computes it exactly with blocked matrix products
(1024 samples x 16384 training rows per block, running max); the baseline measured in the same run is the
straightforward broadcast of the paper's script, ``(samples[i:i+B, None, :] * train[None]).sum(-1).max(1)``.
With B = 128 that broadcast materialises a (128, 50000, 512) float32 tensor, 13.1 GB, more than this kind of
machine can spare; the baseline therefore uses B = ``--baseline-block`` (8: 0.82 GB per block), which does
exactly the same work per (sample, training row) pair, times the first ``--baseline-chunks`` blocks and
extrapolates linearly to N samples (the output says so).  Each variant runs in its own subprocess, so its
peak resident memory (``ru_maxrss``, including the Python + torch interpreter) is its own.

Descriptor throughput: ``SSCDDescriptor`` on a stand-in TorchScript model of the same size as
``sscd_disc_mixup`` (torchvision ResNet-50 with random weights and a 512-d head; the real file cannot be
downloaded here), 32 x 32 uint8 inputs resized to 320 x 320 as in the paper; and ``PixelDescriptor`` on
32 x 32 x 3 images.

Usage:  python benchmarks/metrics.py [--n 10000] [--m 50000] [--d 512] [--threads 2]
                                     [--baseline-block 8] [--baseline-chunks 4] [--sscd-images 8]
Prints wall-clock and process CPU times (CPU time is less sensitive to other load on a shared machine),
peak memory, the GL value of both variants on the measured blocks, and the speed ratio.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _features(n: int, m: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm float32 training bank and samples, 10% of them noisy copies of training rows."""
    g = torch.Generator().manual_seed(seed)
    ref = F.normalize(torch.randn(m, d, generator=g), dim=1)
    samples = torch.randn(n, d, generator=g)
    k = n // 10
    idx = torch.randint(0, m, (k,), generator=g)
    samples[:k] = ref[idx] + 0.03 * torch.randn(k, d, generator=g)
    return F.normalize(samples, dim=1), ref


def worker_gl(args: argparse.Namespace) -> dict:
    from lightning_repro.metrics import GeneralizationScore

    rss_import = _maxrss_mb()
    samples, ref = _features(args.n, args.m, args.d)
    rss0 = _maxrss_mb()
    metric = GeneralizationScore(ref, threshold=0.6)
    w0, c0 = time.perf_counter(), time.process_time()
    metric.update(samples)
    gl = float(metric.compute())
    w1, c1 = time.perf_counter(), time.process_time()
    best, _ = metric.nearest(samples[: args.baseline_block * args.baseline_chunks])
    return {
        "wall_s": w1 - w0,
        "cpu_s": c1 - c0,
        "gl": gl,
        "maxrss_mb": _maxrss_mb(),
        "maxrss_before_mb": rss0,
        "maxrss_import_mb": rss_import,
        "check_best": best.tolist(),
    }


def worker_baseline(args: argparse.Namespace) -> dict:
    samples, ref = _features(args.n, args.m, args.d)
    rss0 = _maxrss_mb()
    b, chunks = args.baseline_block, args.baseline_chunks
    best = []
    w0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for i in range(0, b * chunks, b):
            sims = (samples[i : i + b, None, :] * ref[None]).sum(dim=2)  # (b, m, d) broadcast, then reduce
            best.append(sims.max(dim=1).values)
    w1, c1 = time.perf_counter(), time.process_time()
    best = torch.cat(best)
    measured = b * chunks
    return {
        "wall_s_measured": w1 - w0,
        "cpu_s_measured": c1 - c0,
        "samples_measured": measured,
        "wall_s": (w1 - w0) * args.n / measured,
        "cpu_s": (c1 - c0) * args.n / measured,
        "maxrss_mb": _maxrss_mb(),
        "maxrss_before_mb": rss0,
        "check_best": best.tolist(),
        "block_gb_at_128": 128 * args.m * args.d * 4 / 1e9,
        "block_gb": b * args.m * args.d * 4 / 1e9,
    }


def worker_sscd(args: argparse.Namespace) -> dict:
    import torchvision

    from lightning_repro.metrics import SSCDDescriptor

    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None)
    net.fc = torch.nn.Linear(2048, 512)
    net.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "resnet50_standin.torchscript.pt")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.script(net).save(path)
        digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
        desc = SSCDDescriptor("sscd_disc_mixup", path=path, sha256=digest, device="cpu", batch_size=4)
    images = torch.randint(0, 256, (args.sscd_images, 3, 32, 32), dtype=torch.uint8)
    desc(images[:2])  # warm-up
    w0, c0 = time.perf_counter(), time.process_time()
    feats = desc(images)
    w1, c1 = time.perf_counter(), time.process_time()
    assert feats.shape == (args.sscd_images, 512)
    return {
        "images": args.sscd_images,
        "wall_s": w1 - w0,
        "cpu_s": c1 - c0,
        "images_per_s": args.sscd_images / (w1 - w0),
    }


def worker_pixel(args: argparse.Namespace) -> dict:
    from lightning_repro.metrics import PixelDescriptor

    images = torch.randint(0, 256, (args.pixel_images, 3, 32, 32), dtype=torch.uint8)
    desc = PixelDescriptor()
    desc(images[:100])
    w0, c0 = time.perf_counter(), time.process_time()
    desc(images)
    w1, c1 = time.perf_counter(), time.process_time()
    return {
        "images": args.pixel_images,
        "wall_s": w1 - w0,
        "cpu_s": c1 - c0,
        "images_per_s": args.pixel_images / (w1 - w0),
    }


WORKERS = {"gl": worker_gl, "baseline": worker_baseline, "sscd": worker_sscd, "pixel": worker_pixel}


def run_worker(name: str, argv: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", name, *argv],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10_000, help="generated samples")
    p.add_argument("--m", type=int, default=50_000, help="training features")
    p.add_argument("--d", type=int, default=512, help="feature dimension")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--baseline-block", type=int, default=8, help="samples per broadcast block of the baseline"
    )
    p.add_argument("--baseline-chunks", type=int, default=4, help="baseline blocks timed (then extrapolated)")
    p.add_argument("--sscd-images", type=int, default=8)
    p.add_argument("--pixel-images", type=int, default=20_000)
    p.add_argument("--worker", choices=sorted(WORKERS), default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    if args.worker is not None:
        print(json.dumps(WORKERS[args.worker](args)))
        return

    argv = [a for a in sys.argv[1:]]
    print(
        f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs visible, load {os.getloadavg()}"
    )
    print(f"GL: {args.n} samples x {args.m} training features x {args.d}-d, float32")
    gl = run_worker("gl", argv)
    base = run_worker("baseline", argv)
    diff = max(abs(a - b) for a, b in zip(gl["check_best"], base["check_best"]))
    print(
        f"  blocked matmul (GeneralizationScore): wall {gl['wall_s']:.2f} s, CPU {gl['cpu_s']:.2f} s, "
        f"GL = {gl['gl']:.4f}, peak RSS {gl['maxrss_mb']:.0f} MB (after imports {gl['maxrss_import_mb']:.0f} MB, "
        f"after making the features {gl['maxrss_before_mb']:.0f} MB)"
    )
    print(
        f"  broadcast baseline: {base['samples_measured']} samples timed in {base['wall_s_measured']:.2f} s wall "
        f"({args.baseline_chunks} blocks of ({args.baseline_block}, {args.m}, {args.d}) = {base['block_gb']:.2f} GB; "
        f"the script's (128, {args.m}, {args.d}) block would be {base['block_gb_at_128']:.1f} GB), "
        f"EXTRAPOLATED to {args.n} samples: wall {base['wall_s']:.1f} s, CPU {base['cpu_s']:.1f} s, "
        f"peak RSS {base['maxrss_mb']:.0f} MB"
    )
    print(f"  max |max-sim difference| on the {base['samples_measured']} shared samples: {diff:.2e}")
    print(
        f"  speed-up vs broadcast: wall x{base['wall_s'] / gl['wall_s']:.1f}, CPU x{base['cpu_s'] / gl['cpu_s']:.1f}; "
        f"target wall <= 10 s: {'PASS' if gl['wall_s'] <= 10 else 'FAIL'}, "
        f"peak RSS <= 2048 MB: {'PASS' if gl['maxrss_mb'] <= 2048 else 'FAIL'}"
    )
    sscd = run_worker("sscd", argv)
    print(
        f"SSCD descriptor (ResNet-50 random-weight TorchScript stand-in, 32x32 -> 320x320, batch 4): "
        f"{sscd['images']} images in {sscd['wall_s']:.2f} s wall -> {sscd['images_per_s']:.2f} images/s "
        f"(CPU {sscd['cpu_s']:.2f} s)"
    )
    pix = run_worker("pixel", argv)
    print(
        f"Pixel descriptor (32x32x3 uint8): {pix['images']} images in {pix['wall_s']:.3f} s -> "
        f"{pix['images_per_s']:.0f} images/s"
    )


if __name__ == "__main__":
    main()
