"""Training step time per family with the suite's speed features on vs the float32 path with them off.

The speed features and where they engage (``speed_profile``):

=====================  =========================================  ==============================================
feature                on a GPU                                   on a CPU
=====================  =========================================  ==============================================
bf16 autocast          yes (``--trainer.precision bf16-mixed``)    no: a small transformer runs ~2x slower in bf16
channels_last          U-Nets (``model.channels_last: true``)      U-Nets (oneDNN prefers NHWC convolutions)
fused AdamW            yes (``configure_optimizers``)               no (no fused CPU kernel)
SDPA attention         always (``F.scaled_dot_product_attention``)  always
torch.compile          opt-in (``model.compile: true``; --compile)  opt-in (--compile)
data on the device     small subsets (``data.on_device``)           (the CPU is the device)
=====================  =========================================  ==============================================

"off" is the same module with all of them off: float32, contiguous tensors, the plain for-loop AdamW
(``foreach=False, fused=False``), no compile.  Both use the module's own ``draw_noise`` / ``loss_fn`` on a
batch already on the device, and are timed interleaved (``--repeats`` rounds of ``--steps`` steps each, the
fastest round kept) so that load from other processes hits both alike; on a CPU the ratio uses process CPU time,
which other load disturbs least.  ``speed-up = time off / time on`` (>= 1: not slower).

    python benchmarks/speed_features.py                      # CPU: 3x16x16, batch 32, small widths
    python benchmarks/speed_features.py --size cifar10       # the paper's CIFAR-10 sizes (meant for a GPU)
    python benchmarks/speed_features.py --each               # also each feature alone
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from lightning_repro.module import DDPM, EDM, DiT, UViT

SMALL = {
    "DDPM": (
        DDPM,
        dict(model_channels=32, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0),
    ),
    "DDPM++": (
        EDM,
        dict(model_channels=32, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0),
    ),
    "U-ViT": (UViT, dict(patch_size=2, embed_dim=64, depth=4, num_heads=4)),
    "DiT": (DiT, dict(patch_size=2, hidden_size=64, depth=4, num_heads=4)),
}
CIFAR10 = {
    "DDPM": (DDPM, dict(model_channels=128, channel_mult=[1, 2, 2, 2], num_blocks=2, attn_resolutions=[16])),
    "DDPM++": (EDM, dict(model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16])),
    "U-ViT": (UViT, dict(patch_size=2, embed_dim=512, depth=12, num_heads=8)),
    "DiT": (DiT, dict(patch_size=2, hidden_size=384, depth=12, num_heads=6)),
}
UNETS = ("DDPM", "DDPM++")
OFF = {"bf16": False, "channels_last": False, "fused_adamw": False, "compile": False}


def speed_profile(device: torch.device, family: str, compile: bool = False) -> dict[str, bool]:
    """The speed features the suite uses for ``family`` on ``device`` (see the module docstring)."""
    cuda = device.type == "cuda"
    return {"bf16": cuda, "channels_last": family in UNETS, "fused_adamw": cuda, "compile": compile}


def describe(features: dict[str, bool]) -> str:
    names = {
        "bf16": "bf16",
        "channels_last": "channels_last",
        "fused_adamw": "fused AdamW",
        "compile": "compile",
    }
    on = [names[k] for k, v in features.items() if v]
    return "+".join(on) if on else "fp32 (none)"


def make_step(
    family: str,
    table: dict,
    shape,
    batch: int,
    device: torch.device,
    features: dict[str, bool],
    seed: int = 0,
) -> tuple[Callable[[], torch.Tensor], torch.nn.Module]:
    """One optimisation step of ``family`` with ``features``: ``step() -> loss`` and the module."""
    cls, cfg = table[family]
    torch.manual_seed(seed)
    m = cls(
        kernel="edm",
        image_shape=shape,
        channels_last=features["channels_last"],
        compile=features["compile"],
        **cfg,
    ).to(device)
    m.train()
    if features["fused_adamw"]:
        opt = m.configure_optimizers()["optimizer"]  # the module's own choice: fused on CUDA
    else:
        opt = torch.optim.AdamW(m.model.parameters(), lr=2e-4, foreach=False, fused=False)
    x0 = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1).to(device)
    g = torch.Generator(device=device).manual_seed(seed)

    def step() -> torch.Tensor:
        sigma, noise, _ = m.draw_noise(x0, None, g)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=features["bf16"]):
            loss = m.loss_fn(x0, None, sigma, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step, m


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(steps: dict[str, Callable], device: torch.device, n: int, repeats: int, warmup: int = 2):
    """Interleaved timing: ``{name: (best wall s/step, best CPU s/step)}``."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    best = {k: [float("inf"), float("inf")] for k in steps}
    for _ in range(repeats):
        for k, fn in steps.items():
            _sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(n):
                fn()
            _sync(device)
            w, c = (time.perf_counter() - w0) / n, (time.process_time() - c0) / n
            best[k] = [min(best[k][0], w), min(best[k][1], c)]
    return {k: tuple(v) for k, v in best.items()}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--size", choices=["small", "cifar10"], default="small")
    p.add_argument("--batch", type=int, default=None, help="default 32 (small) / 128 (cifar10)")
    p.add_argument("--steps", type=int, default=1, help="timed steps per round")
    p.add_argument("--repeats", type=int, default=12, help="interleaved rounds (the fastest is kept)")
    p.add_argument("--families", nargs="*", default=list(SMALL))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--compile", action="store_true", help="also torch.compile the network (opt-in feature)")
    p.add_argument("--each", action="store_true", help="also time each feature of the profile alone")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.set_float32_matmul_precision("high")  # as the training CLI (TF32 on Ampere+ GPUs)
    device = torch.device(a.device)
    table, shape = (CIFAR10, (3, 32, 32)) if a.size == "cifar10" else (SMALL, (3, 16, 16))
    batch = a.batch or (128 if a.size == "cifar10" else 32)
    cpu = device.type == "cpu"
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} thread(s))"
    )
    print(
        f"device: {name}   torch {torch.__version__}   size: {a.size} {shape}   batch {batch}   "
        f"best of {a.repeats} x {a.steps} steps ({'process CPU' if cpu else 'wall'} time decides the ratio)"
    )
    print(f"{'family':7} {'params':>11} {'off ms':>9} {'on ms':>9} {'speed-up':>8}  features on")
    rows = []
    for fam in a.families:
        prof = speed_profile(device, fam, a.compile)
        variants = {"off": OFF, "on": prof}
        if a.each:
            for k, v in prof.items():
                if v and {**OFF, k: True} != prof:  # (a profile of one feature is that feature alone)
                    variants[k] = {**OFF, k: True}
        steps, params = {}, 0
        for k, feats in variants.items():
            steps[k], m = make_step(fam, table, shape, batch, device, feats)
            params = sum(q.numel() for q in m.model.parameters())
        t = time_steps(steps, device, a.steps, a.repeats)
        col = 1 if cpu else 0
        off, on = t["off"][col], t["on"][col]
        note = "" if prof != OFF else "  (same code path on this device)"
        print(
            f"{fam:7} {params:>11,} {1e3 * off:>9.1f} {1e3 * on:>9.1f} {off / on:>7.2f}x  {describe(prof)}{note}",
            flush=True,
        )
        row = {
            "family": fam,
            "params": params,
            "off_s": off,
            "on_s": on,
            "speedup": off / on,
            "features": describe(prof),
            "wall": {k: v[0] for k, v in t.items()},
        }
        for k in variants:
            if k not in ("off", "on"):
                print(f"{'':7} {'':>11} {'':>9} {1e3 * t[k][col]:>9.1f} {off / t[k][col]:>7.2f}x  {k} alone")
        rows.append(row)
    worst = min(r["speedup"] for r in rows)
    print(
        f"slowest speed-up {worst:.2f}x ({'no family slower than its float32 path' if worst >= 0.95 else 'SLOWER'}"
        f"; +-5% is timing noise on a shared machine)"
    )
    return rows


if __name__ == "__main__":
    main()
