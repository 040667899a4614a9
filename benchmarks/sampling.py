"""Sampler throughput and solver overhead (issue 4): images/s and NFE per solver, and the share of wall time
spent outside the network.

For each solver at ``sample()``'s default of 18 steps it times, on the same machine in the same run:

* ``net``      ``sample()`` with a small EDM-preconditioned DDPM++ U-Net (``SongUNet``; a tiny conv net if
               that is not importable) — images/s and NFE per sample;
* ``trivial``  the same solver with a zero-cost denoiser ``D(x, sigma) = x``: everything but the network;
* ``net only`` the network's forward passes alone, as many as the solver made.

Overhead = trivial time (per evaluation, so the adaptive ODE solver is comparable) / net time, in % of wall
time (target < 5%); ``1 - net only / net`` is printed as a second estimate.

    .venv/bin/python benchmarks/sampling.py [--n 16] [--res 16] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from lightning_repro.kernels import EDMKernel
from lightning_repro.precond import EDMPrecond
from lightning_repro.sampling import sample, seed_noise
from lightning_repro.sampling.solvers import CountingDenoiser

SOLVERS = ("euler", "heun", "dpmpp_2m", "dpmpp_3m", "ode")


class TinyConvNet(nn.Module):
    def __init__(self, channels: int = 3, width: int = 64):
        super().__init__()
        self.inp, self.mid = nn.Conv2d(channels, width, 3, padding=1), nn.Conv2d(width, width, 3, padding=1)
        self.out, self.emb = nn.Conv2d(width, channels, 3, padding=1), nn.Linear(1, width)

    def forward(self, x, noise_labels, class_labels=None):
        h = torch.relu(self.inp(x) + self.emb(noise_labels.reshape(-1, 1))[:, :, None, None])
        return self.out(torch.relu(self.mid(h)))


def make_net(res: int) -> tuple[nn.Module, str]:
    try:
        from lightning_repro.nets.edm_unet import SongUNet

        net = SongUNet(
            img_resolution=res,
            in_channels=3,
            out_channels=3,
            model_channels=32,
            channel_mult=(1, 2),
            num_blocks=1,
            attn_resolutions=(res // 2,),
            dropout=0.0,
        )
        return net, "SongUNet(model_channels=32, channel_mult=(1,2), num_blocks=1)"
    except Exception as e:  # noqa: BLE001 - the U-Net is written by another helper; fall back
        print(f"(SongUNet unavailable: {type(e).__name__}: {e}; using a tiny conv net)")
        return TinyConvNet(), "TinyConvNet(width=64)"


def timed(fn, sync) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16, help="images per solver (one batch)")
    ap.add_argument("--res", type=int, default=16)
    ap.add_argument("--steps", type=int, default=18)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=2, help="best of this many timings")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    net, desc = make_net(args.res)
    D = EDMPrecond(net.to(dev).eval(), EDMKernel())
    shape, seeds = (3, args.res, args.res), range(args.n)
    n_params = sum(p.numel() for p in net.parameters())
    print(
        f"device={dev} threads={torch.get_num_threads()} net={desc} params={n_params / 1e6:.2f}M "
        f"batch={args.n} shape={shape} steps={args.steps}"
    )

    def trivial(x, sigma, labels=None):
        return x

    z = EDMKernel().prior_scale * seed_noise(seeds, shape, device=dev)
    print(
        f"{'solver':10s} {'NFE':>5s} {'img/s':>8s} {'net s':>8s} {'trivial s':>10s} {'overhead':>9s} {'1-netonly/net':>14s}"
    )

    def run(denoiser, kw) -> tuple[float, dict]:
        best, st = float("inf"), {}
        for _ in range(args.repeat):
            st = {}
            best = min(best, timed(lambda st=st: sample(denoiser, "edm", seeds, shape, stats=st, **kw), sync))
        return best, st

    with torch.inference_mode():
        sample(D, "edm", seeds, shape, sampler="euler", steps=2, device=dev)  # warm-up
        for name in SOLVERS:
            kw = dict(sampler=name, steps=args.steps, batch_size=args.n, device=dev)
            t_net, st = run(D, kw)
            t_triv, st_triv = run(trivial, kw)
            calls = st["calls"]
            sig = torch.tensor(1.0, dtype=torch.float64, device=dev)
            cnt = CountingDenoiser(D)
            zz = [z[i : i + 1] for i in range(args.n)] if name == "ode" else [z]  # the ode solves per sample

            def net_only(calls=calls, zz=zz, cnt=cnt, sig=sig):
                for i in range(calls):
                    cnt(zz[i % len(zz)], sig)

            t_only = min(timed(net_only, sync) for _ in range(args.repeat))
            overhead = (t_triv / st_triv["calls"]) * calls / t_net
            print(
                f"{name:10s} {st['nfe']:5d} {args.n / t_net:8.1f} {t_net:8.3f} {t_triv:10.4f} "
                f"{100 * overhead:8.2f}% {100 * (1 - t_only / t_net):13.2f}%"
            )


if __name__ == "__main__":
    main()
