"""Cost model of the paper's figures at their published scale (issue 18), from throughputs measured on this device.

Measured in this run, per network at the paper's CIFAR-10 size (3x32x32): training images/s (one AdamW step of
``train_step.bench``: float32 on a CPU, bf16 autocast on a GPU) and sampling network evaluations/s (forward, no
grad), with their FLOPs per image (``torch.utils.flop_counter``); the optimal denoiser's (query x training image)
pairs/s; descriptor images/s of an SSCD stand-in of ``sscd_disc_large``'s architecture (timm ResNeXt101 32x4d,
random weights, 320 px: the real file cannot be downloaded here and timing does not need it).

Each figure's workload (``WORKLOADS``) is the suite's documented full-scale configuration (the "Full scale"
comments of ``configs/studies/*.yaml``): trainings x images seen (``--mimg`` per training, default 51.2 = 100k steps
of batch 512, the low end of those comments' 100k-400k), models x 10,000 seeds x 35 network evaluations (Heun 18),
the optimal denoiser's queries against its N images, and the descriptor images (samples + training images for GL).
Hours = workload / throughput on this device; PFLOP = workload x counted FLOPs, the device-free size of the job
(GPU-hours = PFLOP / (peak x MFU); ``benchmarks/gpu_check.sh`` measures the MFU when a device is lent).

    python benchmarks/cost_model.py                       # measure here, print the table (--json F keeps it)
    python benchmarks/cost_model.py --throughputs F.json  # the table from throughputs measured elsewhere
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from lightning_repro.module import DDPM, DDPMpp, DiT, UViT

SHAPE = (3, 32, 32)
SIZES = [2**k for k in range(6, 16)]  # 64 ... 32768, the full-scale grids of Fig. 2 and Fig. 4
SEEDS, NFE = 10_000, 35  # 10,000 seeds, Heun 18 (2 x 18 - 1 evaluations)
U_NET = dict(channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16])
#: the networks the figures train (configs/model/*_cifar10.yaml and the studies' full-scale comments)
NETS = {
    "ddpmpp64": (DDPMpp, dict(model_channels=64, **U_NET)),  # the paper's U-Net runs (cifar10_ddpmpp64_vp)
    "ddpmpp128": (DDPMpp, dict(model_channels=128, **U_NET)),  # EDM's ddpmpp config, 55.7M
    "ddpm": (DDPM, dict(model_channels=128, channel_mult=[1, 2, 2, 2], num_blocks=2, attn_resolutions=[16])),
    "dit_s2": (DiT, dict(patch_size=2, hidden_size=384, depth=12, num_heads=6)),
    "uvit_s2": (UViT, dict(patch_size=2, embed_dim=512, depth=12, num_heads=8)),
}


def grid(nets: list[str], sizes: list[int]) -> list[tuple[str, int]]:
    return [(n, s) for n in nets for s in sizes]


#: figure -> (trainings [(net, N)], sampled models [(net, N or 0 for a released model)], optimal-denoiser sizes)
WORKLOADS = {
    "Fig. 2 (phase transition: U-Net widths 64/128 and DiT-S/2 x 10 sizes)":
        (grid(["ddpmpp64", "ddpmpp128", "dit_s2"], SIZES), grid(["ddpmpp64", "ddpmpp128", "dit_s2"], SIZES), []),
    "Fig. 4 (memorization: U-Net 64, DiT-S/2, U-ViT-S/2 x 10 sizes, vs the optimal denoiser)":
        (grid(["ddpmpp64", "dit_s2", "uvit_s2"], SIZES), grid(["ddpmpp64", "dit_s2", "uvit_s2"], SIZES), SIZES),
    "Fig. 6 (20 released models x 10k seeds; DDPM++-sized, 35 NFE each: an upper bound)":
        ([], [("ddpmpp128", 0)] * 20, []),
    "one training (DDPM++ 55.7M, 51.2 Mimg) + its 10k samples": ([("ddpmpp128", 50_000)], [("ddpmpp128", 50_000)], []),
}


#: where the throughputs are measured (``--device``)
DEVICE = [torch.device("cpu")]


def sync() -> None:
    if DEVICE[0].type == "cuda":
        torch.cuda.synchronize()


def autocast():
    """bf16 autocast on a GPU (the suite's speed profile there), float32 on a CPU."""
    return torch.autocast(DEVICE[0].type, dtype=torch.bfloat16, enabled=DEVICE[0].type == "cuda")


def flops_per_image(module, train: bool) -> float:
    """FLOPs of one image through the network (forward, or forward + backward), counted by torch."""
    x, sigma = torch.randn(2, *SHAPE, device=DEVICE[0]), torch.ones(2, device=DEVICE[0])
    with FlopCounterMode(display=False) as fc:
        if train:
            module.model(x, sigma).square().mean().backward()
        else:
            with torch.no_grad():
                module.model(x, sigma)
    return fc.get_total_flops() / 2


def forward_rate(module, batch: int, reps: int) -> float:
    """Network evaluations (images) per second in sampling: forward, no grad, median of ``reps``."""
    x, sigma = torch.randn(batch, *SHAPE, device=DEVICE[0]), torch.ones(batch, device=DEVICE[0])
    times = []
    with torch.no_grad(), autocast():
        module.model(x, sigma)
        for _ in range(reps):
            t = time.perf_counter()
            module.model(x, sigma)
            sync()
            times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def measure_nets(batch: int, steps: int) -> dict:
    from train_step import bench

    out = {}
    for name, (cls, cfg) in NETS.items():
        rate, m = bench(name, cls, cfg, SHAPE, batch, steps, DEVICE[0], bf16=DEVICE[0].type == "cuda")
        m = m.eval()
        out[name] = {"params": sum(p.numel() for p in m.model.parameters()), "train_img_s": rate,
                     "sample_nfe_s": forward_rate(m, batch, steps), "train_flop": flops_per_image(m, True),
                     "sample_flop": flops_per_image(m, False)}
        print(f"  {name:10} {out[name]['params']:>11,} params  train {rate:7.2f} img/s  sample "
              f"{out[name]['sample_nfe_s']:7.2f} NFE/s  {out[name]['train_flop'] / 1e9:6.1f} / "
              f"{out[name]['sample_flop'] / 1e9:5.1f} GFLOP per image", flush=True)
    return out


def measure_optimal(n: int = 4096, batch: int = 64) -> dict:
    """(query x training image) pairs per second of ``EmpiricalOptimalDenoiser`` (float64 accumulation)."""
    from lightning_repro.theory import EmpiricalOptimalDenoiser

    dev = DEVICE[0]
    d = EmpiricalOptimalDenoiser(torch.rand(n, *SHAPE, device=dev) * 2 - 1)
    x, sigma = torch.randn(batch, *SHAPE, device=dev), torch.full((batch,), 2.0, device=dev)
    d(x, sigma)
    sync()
    t = time.perf_counter()
    d(x, sigma)
    sync()
    rate = batch * n / (time.perf_counter() - t)
    print(f"  optimal denoiser: {rate:.3g} (query x image) pairs/s (N = {n})", flush=True)
    return {"pairs_s": rate, "flop_per_pair": 4 * SHAPE[0] * SHAPE[1] * SHAPE[2]}  # two products of D per pair


def measure_descriptor(batch: int = 4, reps: int = 2) -> dict:
    """Images/s of the SSCD stand-in (ResNeXt101 32x4d at 320 px, 1024-d head), with its FLOPs per image."""
    import timm

    net = timm.create_model("resnext101_32x4d", pretrained=False, num_classes=1024).eval().to(DEVICE[0])
    x = torch.randn(batch, 3, 320, 320, device=DEVICE[0])
    with torch.no_grad(), autocast():
        net(x)  # warm-up
        with FlopCounterMode(display=False) as fc:
            net(x[:1])
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            net(x)
            sync()
            times.append(time.perf_counter() - t)
    rate = batch / statistics.median(times)
    print(f"  SSCD stand-in (ResNeXt101 32x4d, 320 px): {rate:.2f} img/s, {fc.get_total_flops() / 1e9:.1f} GFLOP",
          flush=True)
    return {"img_s": rate, "flop": float(fc.get_total_flops())}


def cost(workload, t: dict, mimg: float) -> dict[str, float]:
    """Seconds on the measured device and FLOPs of one figure's workload, by part."""
    trainings, sampled, optimal_sizes = workload
    nets, opt, desc = t["nets"], t["optimal"], t["descriptor"]
    train_s = sum(mimg * 1e6 / nets[n]["train_img_s"] for n, _ in trainings)
    train_f = sum(mimg * 1e6 * nets[n]["train_flop"] for n, _ in trainings)
    sample_s = sum(SEEDS * NFE / nets[n]["sample_nfe_s"] for n, _ in sampled)
    sample_f = sum(SEEDS * NFE * nets[n]["sample_flop"] for n, _ in sampled)
    pairs = sum(SEEDS * NFE * n for n in optimal_sizes)
    images = SEEDS * (len(sampled) + len(optimal_sizes)) + sum(n for _, n in sampled)  # samples + training sets
    return {"train_h": train_s / 3600, "sample_h": (sample_s + pairs / opt["pairs_s"]) / 3600,
            "describe_h": images / desc["img_s"] / 3600,
            "pflop": (train_f + sample_f + pairs * opt["flop_per_pair"] + images * desc["flop"]) / 1e15}


def table(t: dict, mimg: float) -> None:
    print(f"\ncost at published scale on {t['device']} ({mimg:g} Mimg per training, {SEEDS:,} seeds x {NFE} NFE):")
    print("| figure | train h | sample h | describe h | total h | PFLOP |\n|---|---|---|---|---|---|")
    for name, workload in WORKLOADS.items():
        c = cost(workload, t, mimg)
        total = c["train_h"] + c["sample_h"] + c["describe_h"]
        print(f"| {name} | {c['train_h']:,.0f} | {c['sample_h']:,.1f} | {c['describe_h']:,.1f} | {total:,.0f} | "
              f"{c['pflop']:,.0f} |")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--throughputs", type=Path, help="a --json file of an earlier run (e.g. on a GPU): no timing")
    p.add_argument("--json", type=Path, help="write the measured throughputs here")
    p.add_argument("--mimg", type=float, default=51.2, help="million training images per training")
    p.add_argument("--batch", type=int, default=4, help="training / sampling batch of the timed steps")
    p.add_argument("--steps", type=int, default=2, help="timed steps per network")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if a.throughputs:
        t = json.loads(a.throughputs.read_text())
    else:
        DEVICE[0] = torch.device(a.device)
        if DEVICE[0].type == "cuda":
            device = f"{torch.cuda.get_device_name(DEVICE[0])}, bf16 autocast"
        else:
            from train_loop import cpu_model

            torch.set_num_threads(a.threads)
            device = f"{cpu_model()}, {a.threads} torch threads, float32"
        print(f"measuring on {device} (batch {a.batch}, {a.steps} timed steps):", flush=True)
        t = {"device": device, "nets": measure_nets(a.batch, a.steps), "optimal": measure_optimal(),
             "descriptor": measure_descriptor(a.batch)}
        if a.json:
            a.json.write_text(json.dumps(t, indent=1))
    table(t, a.mimg)
    return t


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
