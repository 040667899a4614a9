"""One-GPU check of the whole suite at full size, with one summary table (run by ``benchmarks/gpu_check.sh``).

Sections (each timed; a failing section is reported in the table and the others still run):

1. **train**     batch-128 optimisation steps of the four families at the paper's CIFAR-10 sizes (DDPM 35.7M,
                 DDPM++ 55.7M, U-ViT-S/2 44.3M, DiT-S/2 32.6M): images/s with the speed features on (bf16
                 autocast, channels_last U-Nets, fused AdamW; ``speed_features.speed_profile``), the speed-up
                 over the float32 path with them off, and model-FLOP utilisation (network forward + backward
                 FLOPs counted by ``torch.utils.flop_counter`` / step time / the GPU's dense bf16 peak).
2. **sample**    10,000 Heun-18 samples (35 evaluations each) of the DDPM++ CIFAR-10 configuration in bf16
                 (``sample(..., precision="bf16")``), its speed-up over float32 on ``--sample-baseline``
                 samples, and images/s of each fixed-grid solver (euler, heun, dpmpp_2m, dpmpp_3m).
3. **describe**  descriptor images/s: a ResNet-50 TorchScript stand-in of SSCD (same architecture and input
                 size, 320 px; the real weights are not needed for timing) and the pixel descriptor.
4. **GL**        ``GeneralizationScore`` over 10,000 x 50,000 512-d features on the GPU (vs the same code on CPU).
5. **optimal**   ``EmpiricalOptimalDenoiser`` over 50,000 3x32x32 training images (float64): queries/s.
6. **pipeline**  the real entry points on this device: ``train.py fit`` of a small EDM on digits with
                 ``bf16-mixed``, channels_last and the subset kept on the device (``data.on_device`` auto),
                 then ``evaluate.py sample --precision bf16`` of its checkpoint (1,000 seeds).
7. **compile**   the compiled paths: per family of ``--compile-families`` (default DDPM++ and DiT at the CIFAR-10
                 sizes), a ``DiffusionModule(compile=True)`` training step against the same step eager (both with
                 the speed features on): compile time (the first steps' excess), steady ms/step, ratio and the
                 break-even step count; then ``train.py fit`` of the pipeline's digits model with
                 ``--model.init_args.compile true`` against the same fit eager, end to end (compile included).
                 Each family runs only while the time budget (``--budget-s``) leaves room; a skipped one says so.

The sample section also counts host-device synchronisations inside the Heun loop on a GPU
(``torch.cuda.set_sync_debug_mode``): the count for 18 steps minus the count for 4 steps must be 0.

The networks have random weights: throughput does not depend on them.

    python benchmarks/gpu_check.py               # on a GPU: full size (target: under 10 minutes on one H200)
    python benchmarks/gpu_check.py --dry-run     # tiny sizes on any device (checks the script itself)
    python benchmarks/gpu_check.py --cpu-smoke   # tiny sizes on the CPU, compiled paths included (a few minutes)

The summary table is printed even when the time limit interrupts a section (``gpu_check.sh`` sends SIGINT).

The cost model of the paper's figures is ``benchmarks/cost_model.py`` (``gpu_check.sh`` runs it on the device
after this script, with throughputs measured there).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_features import CIFAR10, OFF, SMALL, make_step, speed_profile, time_steps  # noqa: E402

from lightning_repro.kernels import EDMKernel  # noqa: E402
from lightning_repro.module import EDM  # noqa: E402
from lightning_repro.sampling import sample  # noqa: E402

#: dense bf16 tensor-core peaks (TFLOP/s) by device-name substring, first match wins
PEAKS = (
    ("H200", 989.4),
    ("GH200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H800", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("A10G", 70.0),
)

ROWS: list[tuple[str, str, str, str, str]] = []  # section, what, result, vs baseline, seconds


def row(section: str, what: str, result: str, ratio: str = "-", seconds: float | None = None) -> None:
    ROWS.append((section, what, result, ratio, "-" if seconds is None else f"{seconds:.1f}"))
    print(f"  [{section}] {what}: {result}  {ratio if ratio != '-' else ''}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAKS if k in name), None)


def flops(x: float) -> str:
    return f"{x / 1e12:.1f} TFLOP/s" if x >= 1e11 else f"{x / 1e9:.1f} GFLOP/s"


def train_flops_per_image(cls, cfg, shape) -> float:
    """Forward + backward FLOPs of the network for one image (counted on the meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        m = cls(kernel="edm", image_shape=shape, **cfg)
    x = torch.randn(2, *shape, device="meta")
    with FlopCounterMode(display=False) as fc:
        m.model(x, torch.ones(2, device="meta")).float().pow(2).mean().backward()
    return fc.get_total_flops() / 2


# ---------------------------------------------------------------------------------------------------- sections


def section_train(a, device) -> None:
    table, shape = (SMALL, (3, 16, 16)) if a.dry_run else (CIFAR10, (3, 32, 32))
    batch = 8 if a.dry_run else a.batch
    peak = peak_tflops(device, a.peak_tflops)
    for fam in a.families:
        t0 = time.perf_counter()
        prof = speed_profile(device, fam, a.compile)
        steps = {}
        for k, feats in (("off", OFF), ("on", prof)):
            steps[k], _ = make_step(fam, table, shape, batch, device, feats)
        t = time_steps(steps, device, n=a.train_steps, repeats=a.train_repeats, warmup=3 if a.compile else 2)
        del steps
        if device.type == "cuda":
            torch.cuda.empty_cache()
        col = 0 if device.type == "cuda" else 1
        on, off = t["on"][col], t["off"][col]
        fl = train_flops_per_image(*table[fam], shape) * batch
        mfu = f", MFU {100 * fl / on / (peak * 1e12):.1f}% of {peak:g} TFLOP/s" if peak else ""
        row(
            "train",
            f"{fam} batch {batch} [{'+'.join(k for k, v in prof.items() if v) or 'fp32'}]",
            f"{batch / on:,.0f} img/s ({1e3 * on:.1f} ms/step, {flops(fl / on)}{mfu})",
            f"x{off / on:.2f} vs fp32 off ({batch / off:,.0f} img/s)",
            time.perf_counter() - t0,
        )


def _ddpmpp(device, dry: bool):
    cfg = (
        dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0)
        if dry
        else dict(
            model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.13
        )
    )
    shape = (3, 16, 16) if dry else (3, 32, 32)
    torch.manual_seed(0)
    m = EDM(kernel="edm", image_shape=shape, channels_last=device.type == "cuda", **cfg).to(device)
    return m.ema.eval().requires_grad_(False), shape


def section_sample(a, device) -> None:
    den, shape = _ddpmpp(device, a.dry_run)
    n, n_base, bs = (48, 16, 16) if a.dry_run else (a.samples, a.sample_baseline, a.sample_batch)
    kernel = EDMKernel()
    sample(den, kernel, range(bs), shape, steps=2, batch_size=bs, precision="bf16", device=device)  # warm-up
    sample(den, kernel, range(bs), shape, steps=2, batch_size=bs, device=device)
    times = {}
    for prec in ("fp32", "bf16"):
        sync(device)
        t0 = time.perf_counter()
        sample(
            den,
            kernel,
            range(n_base),
            shape,
            sampler="heun",
            steps=18,
            batch_size=bs,
            precision=prec,
            device=device,
        )
        sync(device)
        times[prec] = time.perf_counter() - t0
    sync(device)
    t0 = time.perf_counter()
    x = sample(
        den, kernel, range(n), shape, sampler="heun", steps=18, batch_size=bs, precision="bf16", device=device
    )
    sync(device)
    dt = time.perf_counter() - t0
    assert x.shape == (n, *shape) and bool(torch.isfinite(x).all())
    row(
        "sample",
        f"DDPM++ Heun-18 (35 NFE) x {n:,} seeds, bf16, batch {bs}",
        f"{n / dt:,.0f} img/s",
        f"x{times['fp32'] / times['bf16']:.2f} vs fp32 ({n_base / times['fp32']:,.0f} img/s on {n_base:,})",
        dt,
    )
    for solver in ("euler", "heun", "dpmpp_2m", "dpmpp_3m"):
        st: dict = {}
        sync(device)
        t0 = time.perf_counter()
        sample(
            den,
            kernel,
            range(n_base),
            shape,
            sampler=solver,
            steps=18,
            batch_size=bs,
            precision="bf16",
            device=device,
            stats=st,
        )
        sync(device)
        dt = time.perf_counter() - t0
        row(
            "sample",
            f"{solver} 18 steps ({st['nfe']} NFE) x {n_base:,}, bf16",
            f"{n_base / dt:,.0f} img/s",
            "-",
            dt,
        )
    if device.type == "cuda":
        from lightning_repro.sampling import seed_noise
        from lightning_repro.sampling.solvers import sample_heun

        def syncs(steps: int, den=den, kernel=kernel) -> int:
            x_T = kernel.prior_scale * seed_noise(range(8), shape, device=device)
            sigmas = kernel.sigmas(steps)
            sync(device)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    with torch.inference_mode():
                        sample_heun(den, x_T, sigmas)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            sync(device)
            return sum("synchroniz" in str(w.message).lower() for w in caught)

        n4, n18 = syncs(4), syncs(18)
        row(
            "sample",
            "host syncs in the Heun loop (unconditional DDPM++)",
            f"{n18 - n4} more for 18 steps than for 4 (set-up: {n4})",
            "OK" if n18 == n4 else "SYNCS IN LOOP",
        )
    del den
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fit_argv(a, gpu: bool, root: Path, compile: bool) -> list[str]:
    """``train.py fit`` of the pipeline's small digits EDM on this device (bf16-mixed and channels_last on a GPU)."""
    config = Path(__file__).resolve().parents[1] / "configs" / "train" / "digits_ddpmpp.yaml"
    return ["fit", "--config", str(config), "--trainer.accelerator", "gpu" if gpu else "cpu", "--trainer.devices", "1",
            "--trainer.precision", "bf16-mixed" if gpu else "32-true", "--trainer.logger", "false",
            "--trainer.max_steps", "20" if a.dry_run else "200", "--trainer.limit_val_batches", "0",
            "--trainer.enable_progress_bar", "false", "--model.init_args.channels_last", "true",
            "--model.init_args.compile", str(compile).lower(), "--checkpoint.every_n_train_steps", "1000",
            "--final_samples.num_samples", "16", "--trainer.default_root_dir", str(root),
            "--data.batch_size", "32" if a.dry_run else "128"]


def section_pipeline(a, device) -> None:
    import json

    from lightning_repro import evaluation as evaluate
    from lightning_repro.cli import main as train_main

    gpu = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cli = train_main(fit_argv(a, gpu, Path(tmp) / "run", compile=bool(a.compile)))
        dt = time.perf_counter() - t0
        steps = cli.trainer.global_step
        on_dev = cli.datamodule.stream_device(cli.trainer.strategy.root_device)
        loss = float(cli.trainer.callback_metrics["train/loss"])
        row(
            "pipeline",
            f"train.py fit digits EDM, {steps} steps, {cli.trainer.precision}, channels_last",
            f"loss {loss:.3f}, subset kept on {on_dev}",
            "-",
            dt,
        )
        ckpt = Path(tmp) / "run" / "checkpoints" / "last.ckpt"
        n = 64 if a.dry_run else 1000
        t0 = time.perf_counter()
        evaluate.main(
            [
                "sample",
                str(ckpt),
                "--seeds",
                f"0-{n - 1}",
                "--precision",
                "bf16" if gpu else "fp32",
                "--no-progress",
                "--out",
                str(Path(tmp) / "samples"),
                "--device",
                str(device),
            ]
        )
        dt = time.perf_counter() - t0
        (shard,) = (Path(tmp) / "samples").glob("samples_*.npz")
        import numpy as np

        with np.load(shard) as f:
            prov = json.loads(str(f["provenance"]))
            ok = f["images"].shape[0] == n
        row(
            "pipeline",
            f"evaluate.py sample x {n:,} (heun 18, {prov['precision']})",
            f"{'OK' if ok else 'WRONG COUNT'}: {n / dt:,.0f} img/s incl. loading",
            "-",
            dt,
        )


def _sscd_standin(tmp: str, device, size: int, batch: int):
    import torchvision

    from lightning_repro.metrics import SSCDDescriptor

    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None)
    net.fc = torch.nn.Linear(2048, 512)
    path = os.path.join(tmp, "resnet50_standin.torchscript.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(net.eval()).save(path)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SSCDDescriptor(
            "sscd_disc_mixup", path=path, sha256=digest, device=device, batch_size=batch, size=size
        )


def section_describe(a, device) -> None:
    from lightning_repro.metrics import PixelDescriptor

    n, size, bs = (8, 64, 4) if a.dry_run else (a.sscd_images, 320, 256)
    with tempfile.TemporaryDirectory() as tmp:
        desc = _sscd_standin(tmp, device, size, bs)
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
        desc(images[: min(n, bs)])  # warm-up
        sync(device)
        t0 = time.perf_counter()
        f = desc(images)
        sync(device)
        dt = time.perf_counter() - t0
    assert f.shape == (n, 512)
    row(
        "describe",
        f"SSCD stand-in (ResNet-50, {size} px, batch {bs}) x {n:,}",
        f"{n / dt:,.0f} img/s",
        "-",
        dt,
    )
    n = 2_000 if a.dry_run else 50_000
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=device)
    pix = PixelDescriptor()
    pix(images[:1000])
    sync(device)
    t0 = time.perf_counter()
    pix(images)
    sync(device)
    dt = time.perf_counter() - t0
    row("describe", f"pixel descriptor 32x32x3 x {n:,}", f"{n / dt:,.0f} img/s", "-", dt)


def section_gl(a, device) -> None:
    import torch.nn.functional as F

    from lightning_repro.metrics import GeneralizationScore

    n, m, d = (1_000, 5_000, 512) if a.dry_run else (10_000, 50_000, 512)
    g = torch.Generator().manual_seed(0)
    ref = F.normalize(torch.randn(m, d, generator=g), dim=1)
    q = F.normalize(torch.randn(n, d, generator=g), dim=1)
    q[: n // 10] = F.normalize(ref[: n // 10] + 0.03 * torch.randn(n // 10, d, generator=g), dim=1)
    out = {}
    for dev in dict.fromkeys([device, torch.device("cpu")]):
        metric = GeneralizationScore(ref.to(dev), threshold=0.6)
        qd = q.to(dev)
        sync(dev)
        t0 = time.perf_counter()
        metric.update(qd)
        gl = float(metric.compute())
        sync(dev)
        out[dev.type] = (time.perf_counter() - t0, gl)
    dt, gl = out[device.type]
    ratio = f"x{out['cpu'][0] / dt:.1f} vs CPU ({out['cpu'][0]:.2f} s, {torch.get_num_threads()} threads)"
    row(
        "GL",
        f"{n:,} x {m:,} x {d}-d features",
        f"{dt:.3f} s, GL = {gl:.4f}",
        ratio if device.type != "cpu" else "-",
        dt,
    )


def section_optimal(a, device) -> None:
    from lightning_repro.theory import EmpiricalOptimalDenoiser

    n, b = (2_000, 16) if a.dry_run else (50_000, 256)
    g = torch.Generator().manual_seed(0)
    train = torch.rand(n, 3, 32, 32, generator=g) * 2 - 1
    den = EmpiricalOptimalDenoiser(train.to(device), device=device)
    x = (train[:b] + 2.0 * torch.randn(b, 3, 32, 32, generator=g)).to(device)
    den(x, 2.0)
    sync(device)
    t0 = time.perf_counter()
    reps = 3
    for _ in range(reps):
        den(x, 2.0)
    sync(device)
    dt = (time.perf_counter() - t0) / reps
    row(
        "optimal",
        f"empirical optimal denoiser, N = {n:,} x 3x32x32, float64, {b} queries",
        f"{b / dt:,.0f} queries/s ({1e3 * dt:.1f} ms/call)",
        "-",
        dt * reps,
    )


#: the time budget's end (``time.perf_counter()``), set by ``main``
DEADLINE = [float("inf")]


def remaining() -> float:
    return DEADLINE[0] - time.perf_counter()


def section_compile(a, device) -> None:
    """Compiled against eager training steps per family, then the compiled CLI fit (see the module docstring)."""
    import shutil

    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "gcc", "clang++", "c++")):
        row("compile", "torch.compile on CPU", "off: no compiler (inductor's CPU backend needs g++ / clang++)")
        return
    table, shape = (SMALL, (3, 16, 16)) if a.dry_run else (CIFAR10, (3, 32, 32))
    batch, warm = (8 if a.dry_run else a.batch), 3
    for fam in a.compile_families:
        if remaining() < a.compile_reserve_s:
            row("compile", f"{fam}: skipped", f"{remaining():.0f} s of the budget left (< {a.compile_reserve_s} s)")
            continue
        t_start = time.perf_counter()
        prof = speed_profile(device, fam, compile=False)
        eager, _ = make_step(fam, table, shape, batch, device, prof)
        comp, _ = make_step(fam, table, shape, batch, device, {**prof, "compile": True})
        first = []
        for _ in range(warm):
            sync(device)
            t0 = time.perf_counter()
            comp()
            sync(device)
            first.append(time.perf_counter() - t0)
        t = time_steps({"eager": eager, "compiled": comp}, device, n=a.train_steps, repeats=a.train_repeats)
        col = 0 if device.type == "cuda" else 1
        e, c = t["eager"][col], t["compiled"][col]
        compile_s = sum(first) - warm * t["compiled"][0]
        even = f"{compile_s / (e - c):,.0f} steps" if e > c else "never (not faster)"
        row("compile", f"{fam} batch {batch} [{'+'.join(k for k, v in prof.items() if v) or 'fp32'}+compile]",
            f"{1e3 * c:.1f} vs eager {1e3 * e:.1f} ms/step; compile {compile_s:.0f} s; break-even {even}",
            f"x{e / c:.2f} vs eager", time.perf_counter() - t_start)
        del eager, comp
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if remaining() < a.compile_reserve_s:
        row("compile", "train.py fit compile true: skipped", f"{remaining():.0f} s of the budget left")
        return
    _compiled_fit(a, device)


def _compiled_fit(a, device) -> None:
    """``train.py fit`` of the pipeline's model compiled and eager: wall time each, end to end, and the final loss."""
    from lightning_repro.cli import main as train_main

    gpu, out = device.type == "cuda", {}
    with tempfile.TemporaryDirectory() as tmp:
        for compile in (False, True):
            t0 = time.perf_counter()
            cli = train_main(fit_argv(a, gpu, Path(tmp) / f"run_{compile}", compile=compile))
            out[compile] = (time.perf_counter() - t0, float(cli.trainer.callback_metrics["train/loss"]),
                            cli.trainer.global_step)
    (te, le, steps), (tc, lc, _) = out[False], out[True]
    row("compile", f"train.py fit digits EDM compile true, {steps} steps",
        f"{tc:.0f} s vs eager {te:.0f} s end to end; final loss {lc:.4f} vs {le:.4f}", f"x{te / tc:.2f} vs eager", tc)


SECTIONS = {
    "train": section_train,
    "sample": section_sample,
    "describe": section_describe,
    "gl": section_gl,
    "optimal": section_optimal,
    "pipeline": section_pipeline,
    "compile": section_compile,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--dry-run", action="store_true", help="tiny sizes (any device): checks the script itself")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny sizes on the CPU, the compiled paths included (--dry-run --device cpu, DiT compiled)")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="time budget of the whole check: the compile section skips what no longer fits (default 540)")
    p.add_argument("--compile-families", nargs="*", default=["DDPM++", "DiT"], help="families of the compile section")
    p.add_argument("--compile-reserve-s", type=float, default=120.0,
                   help="budget a compile-section item needs left to start (default 120 s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--families", nargs="*", default=["DDPM++", "DiT", "DDPM", "U-ViT"])
    p.add_argument("--batch", type=int, default=128, help="training batch (default 128)")
    p.add_argument("--train-steps", type=int, default=5, help="timed training steps per round")
    p.add_argument("--train-repeats", type=int, default=3, help="interleaved rounds (fastest kept)")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks in the 'on' profile")
    p.add_argument("--samples", type=int, default=10_000, help="Heun-18 samples of DDPM++ (default 10,000)")
    p.add_argument("--sample-baseline", type=int, default=512, help="samples for the fp32 / per-solver rows")
    p.add_argument("--sample-batch", type=int, default=1_000)
    p.add_argument("--sscd-images", type=int, default=4_096)
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by GPU name)"
    )
    a = p.parse_args(argv)
    if a.cpu_smoke:
        a.dry_run, a.device = True, "cpu"
        if a.compile_families == ["DDPM++", "DiT"]:  # the default: one small compiled family is enough here
            a.compile_families = ["DiT"]
        a.compile_reserve_s = 0.0
    device = torch.device(a.device)
    torch.set_float32_matmul_precision("high")  # as the training CLI
    if device.type == "cpu" and not a.dry_run:
        print("note: no GPU; full sizes on a CPU take hours (use --dry-run to check the script).", flush=True)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    peak = peak_tflops(device, a.peak_tflops)
    print(
        f"gpu_check: {name} | torch {torch.__version__} | {'DRY RUN (tiny sizes)' if a.dry_run else 'full size'}"
        f" | bf16 peak {peak if peak else 'unknown'} TFLOP/s",
        flush=True,
    )
    t_all = time.perf_counter()
    DEADLINE[0] = t_all + a.budget_s
    failed = 0
    for key in a.sections:
        print(f"== {key}", flush=True)
        t0 = time.perf_counter()
        try:
            SECTIONS[key](a, device)
        except KeyboardInterrupt:  # gpu_check.sh's time limit (SIGINT): the table of what finished
            failed += 1
            row(key, "INTERRUPTED", f"time limit after {time.perf_counter() - t_all:.0f} s")
            break
        except Exception as err:  # report and go on: one table at the end whatever happens
            failed += 1
            traceback.print_exc()
            row(key, "FAILED", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:90])
        print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
    total = time.perf_counter() - t_all
    widths = [
        max(len(r[i]) for r in [("section", "benchmark", "result", "vs baseline", "s"), *ROWS])
        for i in range(5)
    ]
    line = "+".join("-" * (w + 2) for w in widths)
    print(f"\nSUMMARY  {name}  torch {torch.__version__}  ({'dry run' if a.dry_run else 'full size'})")
    print(line)
    for i, r in enumerate([("section", "benchmark", "result", "vs baseline", "s"), *ROWS]):
        print("|".join(f" {c:<{w}} " for c, w in zip(r, widths)))
        if i == 0:
            print(line)
    print(line)
    print(f"total {total:.0f} s (budget {a.budget_s:.0f} s; target < 600 s on one H200); {failed} section(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
