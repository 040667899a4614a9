"""Training throughput per preset: images/s of one optimisation step, float32 vs bf16 autocast.

    python benchmarks/train_step.py                  # small configs on this device (CPU: 8x8x1 digits size)
    python benchmarks/train_step.py --size cifar10   # the paper's CIFAR-10 sizes (55.7M DDPM++, 35.7M DDPM,
                                                     # U-ViT-S/2, DiT-S/2) at 32x32x3; meant for a GPU

Each row: the preset, its parameter count, images/s in float32 and under ``torch.autocast(bfloat16)``, the
ratio bf16/fp32 measured in the same run, and for the transformers the scaled-dot-product-attention
kernel that actually ran (read from the profiler).
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_repro.module import DDPM, EDM, DiT, UViT

SMALL = {
    "DDPM": (DDPM, dict(model_channels=32, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)),
    "EDM": (EDM, dict(model_channels=32, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)),
    "UViT": (UViT, dict(patch_size=2, embed_dim=64, depth=4, num_heads=4)),
    "DiT": (DiT, dict(patch_size=2, hidden_size=64, depth=4, num_heads=4)),
}
CIFAR10 = {
    "DDPM": (DDPM, dict(model_channels=128, channel_mult=[1, 2, 2, 2], num_blocks=2, attn_resolutions=[16])),
    "EDM": (EDM, dict(model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16])),
    "UViT": (UViT, dict(patch_size=2, embed_dim=512, depth=12, num_heads=8)),
    "DiT": (DiT, dict(patch_size=2, hidden_size=384, depth=12, num_heads=6)),
}


def sdpa_backend(module, x, sigma) -> str:
    """Name of the attention kernel the profiler saw (flash / efficient / cudnn / math), or '-'."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with torch.no_grad(), profile(activities=acts) as prof:
        module.model(x[:2], sigma[:2])
    names = {e.key for e in prof.key_averages()}
    for key in ("flash_attention", "efficient_attention", "cudnn_attention", "_scaled_dot_product_attention_math"):
        hit = [n for n in names if key in n]
        if hit:
            return hit[0].replace("aten::", "")
    return "-"


def bench(name, cls, cfg, shape, batch, steps, device, bf16: bool) -> float:
    torch.manual_seed(0)
    m = cls(kernel="edm", image_shape=shape, channels_last=device.type == "cuda" and name in ("DDPM", "EDM"), **cfg)
    m = m.to(device)
    opt = torch.optim.AdamW(m.model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    x0 = torch.randn(batch, *shape, device=device)
    g = torch.Generator(device=device).manual_seed(0)

    def step():
        sigma, noise, _ = m.draw_noise(x0, torch.full((batch,), -1, device=device), g)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = m.loss_fn(x0, None, sigma, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0), m


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["small", "cifar10"], default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--presets", nargs="*", default=list(SMALL))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    size = a.size or ("cifar10" if device.type == "cuda" else "small")
    table, shape = (CIFAR10, (3, 32, 32)) if size == "cifar10" else (SMALL, (1, 8, 8))
    steps = a.steps or (20 if device.type == "cuda" else 5)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {dev_name}   size: {size} {shape}   batch {a.batch}   {steps} timed steps")
    print(f"{'preset':6} {'params':>12} {'fp32 img/s':>11} {'bf16 img/s':>11} {'bf16/fp32':>9}  attention")
    for name in a.presets:
        cls, cfg = table[name]
        fp32, m = bench(name, cls, cfg, shape, a.batch, steps, device, bf16=False)
        bf16, _ = bench(name, cls, cfg, shape, a.batch, steps, device, bf16=True)
        n = sum(p.numel() for p in m.model.parameters())
        attn = "-"
        if name in ("UViT", "DiT"):
            x = torch.randn(2, *shape, device=device)
            attn = sdpa_backend(m, x, torch.ones(2, device=device))
        print(f"{name:6} {n:>12,} {fp32:>11.1f} {bf16:>11.1f} {bf16 / fp32:>9.2f}  {attn}", flush=True)


if __name__ == "__main__":
    main()
