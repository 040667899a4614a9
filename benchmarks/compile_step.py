"""``torch.compile`` against eager training steps for every digits preset on CPU: the steady-state ratio, the
compile time (separately) and the break-even step count (issue 18).

Networks: every denoiser preset of the digits training configs (``configs/train/digits_{ddpm_ve,ddpmpp,ddpmpp_vp,
uvit,dit,multistage}.yaml``) and the demo's two (``demo_{ddpmpp,dit}.yaml``), built by the real CLI from the config
(its batch, data and seed); each is decided for the run lengths of the trainings that use it (their
``trainer.max_steps``; the demo: ``demo.FAMILIES``).  The consistency and progressive-distillation presets train
these same networks under another loss and are not timed here.
Both arms run the bare training step of ``train_loop.BareStep`` (the module's loss, AdamW + LR schedule, EMA, batches of its data
module) on modules built from the same seed; the compiled arm is ``DiffusionModule(compile=True)``: inductor
compiles the preconditioned network's forward and, through AOTAutograd, its backward at the first step.

Per network, a fresh process with an empty inductor cache (``TORCHINDUCTOR_CACHE_DIR``) times the first
``--warm`` compiled steps (compile time, cold = their time minus as many steady compiled steps), then ``--rounds``
interleaved rounds eager / compiled of ``--steps`` steps (medians of per-round ms/step); a second fresh process on
the same cache gives the compile time with a warm cache (FX-graph cache hits: a rerun of the same config).  All of
it in process CPU seconds, the compile's own compiler calls included (``TORCHINDUCTOR_COMPILE_THREADS=1``): other
processes' load on a shared machine stretches wall time, not CPU time, and on an unloaded core they agree (the
wall-time ratio of the same rounds is printed too).  ``break-even = compile time / (eager - compiled ms/step)``
steps; compile pays off over a run of ``L`` steps when break-even < ``L`` (decided on the cold time: a first run
pays it).  The EMA weights of the two arms after the same steps are compared (compiled kernels round differently:
not bit-identical to eager).

Inductor on CPU needs a C++ compiler; without one (``g++`` / ``gcc`` / ``clang++`` / ``$CXX``) this prints so and
every decision is "off: no compiler".

    python benchmarks/compile_step.py                          # all five networks
    python benchmarks/compile_step.py --configs dit demo_ddpmpp --rounds 7
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

#: network -> (the training config that defines it, its runs: {run name: training config, or "demo:FAMILY"})
CONFIGS = {
    "ddpm": ("digits_ddpm_ve.yaml", {"digits_ddpm_ve": "digits_ddpm_ve.yaml"}),
    "ddpmpp": ("digits_ddpmpp.yaml", {"digits_ddpmpp": "digits_ddpmpp.yaml", "digits_ddpmpp_cond": "digits_ddpmpp_cond.yaml"}),
    "ddpmpp_vp": ("digits_ddpmpp_vp.yaml", {"digits_ddpmpp_vp": "digits_ddpmpp_vp.yaml"}),
    "uvit": ("digits_uvit.yaml", {"digits_uvit": "digits_uvit.yaml"}),
    "dit": ("digits_dit.yaml", {"digits_dit": "digits_dit.yaml"}),
    "multistage": ("digits_multistage.yaml", {"digits_multistage": "digits_multistage.yaml"}),
    "demo_ddpmpp": ("demo_ddpmpp.yaml", {"demo ddpmpp": "demo:ddpmpp"}),
    "demo_dit": ("demo_dit.yaml", {"demo dit": "demo:dit"}),
}


def compiler() -> str | None:
    """The C++ compiler inductor would use on CPU, or None."""
    for name in (os.environ.get("CXX"), "g++", "gcc", "clang++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def run_lengths(name: str) -> dict[str, int]:
    """Training steps of each run of the network: its training configs' ``trainer.max_steps``, the demo's default."""
    from lightning_repro.demo import FAMILIES

    out = {}
    for run, source in CONFIGS[name][1].items():
        if source.startswith("demo:"):
            out[run] = int(FAMILIES[source.removeprefix("demo:")][1])
        else:
            out[run] = int(yaml.safe_load((ROOT / "configs" / "train" / source).read_text())["trainer"]["max_steps"])
    return out


def make_step(name: str, compile: bool, root: str):
    """A ``BareStep`` of the configuration's module and data module as ``train.py fit --config`` builds them
    (seed_everything of the config, so both arms start from the same weights), ``compile`` set by the arm."""
    from train_loop import BareStep

    from lightning_repro.cli import main

    config = ROOT / "configs" / "train" / CONFIGS[name][0]
    cli = main(["--config", str(config), "--model.init_args.compile", str(compile).lower(),
                "--trainer.default_root_dir", root, "--trainer.logger", "false"], run=False)
    cli.datamodule.setup("fit")
    return BareStep(cli.model, cli.datamodule, max_steps=max(run_lengths(name).values()))


def cpu_seconds() -> float:
    """Process CPU time of this process and of its finished children (inductor's compiler calls)."""
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + child.ru_utime + child.ru_stime


def worker(name: str, phase: str, a) -> dict:
    """One process: cold (compile time + interleaved rounds) or warm (compile time on a warm cache)."""
    import torch

    torch.set_num_threads(a.threads)
    torch.set_float32_matmul_precision("high")  # as the training CLI
    with tempfile.TemporaryDirectory() as root:
        eager, comp = make_step(name, False, root), make_step(name, True, root)
        return _rounds(eager, comp, phase, a)


def _rounds(eager, comp, phase: str, a) -> dict:
    """The first ``a.warm`` compiled steps (compile time), then interleaved eager / compiled rounds."""
    for _ in range(a.warm):
        eager()
    first = []
    for _ in range(a.warm):
        t, c = time.perf_counter(), cpu_seconds()
        comp()
        first.append((time.perf_counter() - t, cpu_seconds() - c))
    if phase == "warm":  # the steady step time comes from the cold process
        return {"first": first}
    rounds = {"eager": [], "compiled": []}
    for _ in range(a.rounds):
        rounds["eager"].append(eager.timed(a.steps))
        rounds["compiled"].append(comp.timed(a.steps))
    diff = max((p - q).abs().max().item() for p, q in zip(eager.module.ema.parameters(), comp.module.ema.parameters()))
    med = {k: [statistics.median(r[i] for r in v) for i in (0, 1)] for k, v in rounds.items()}
    return {"first": first, "eager": med["eager"], "compiled": med["compiled"], "ema_max_abs_diff": diff,
            "steps_each": eager.k, "params": sum(p.numel() for p in eager.module.model.parameters()),
            "batch": eager.batch}


def spawn(name: str, phase: str, cache: str, a) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONWARNINGS": "ignore", "TORCHINDUCTOR_CACHE_DIR": cache,
           "TORCHINDUCTOR_COMPILE_THREADS": "1"}  # compile in this process and its waited-for children: CPU-countable
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(HERE), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, __file__, "--worker", name, "--phase", phase, "--result", str(out),
               "--steps", str(a.steps), "--rounds", str(a.rounds), "--warm", str(a.warm), "--threads", str(a.threads)]
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if p.returncode != 0 or not out.is_file():
            raise RuntimeError(f"{name} {phase} failed ({p.returncode}): {p.stderr.strip().splitlines()[-1:]}")
        return json.loads(out.read_text())


def decide(name: str, a) -> dict:
    """Cold and warm processes of one network; the break-even and the on/off decision of each of its runs.

    Everything is in process CPU seconds (the compile's included its compiler calls): other processes' load on a
    shared machine stretches wall time but hardly CPU time; on an unloaded core the two agree."""
    with tempfile.TemporaryDirectory() as cache:
        cold = spawn(name, "cold", cache, a)
        warm = spawn(name, "warm", cache, a)
    (eager_w, eager), (comp_w, comp) = cold["eager"], cold["compiled"]
    c_cold = sum(c for _, c in cold["first"]) - a.warm * comp
    c_warm = sum(c for _, c in warm["first"]) - a.warm * comp
    gain = eager - comp
    even = c_cold / gain if gain > 0 else float("inf")
    runs = {run: {"steps": n, "on": even < n, "saved_s": n * gain - c_cold} for run, n in run_lengths(name).items()}
    return {"config": name, **cold, "eager_ms": 1e3 * eager, "compiled_ms": 1e3 * comp, "ratio": eager / comp,
            "ratio_wall": eager_w / comp_w, "compile_cold_s": c_cold, "compile_cold_wall_s": sum(w for w, _ in cold["first"]),
            "compile_warm_s": c_warm, "break_even": even,
            "break_even_warm": c_warm / gain if gain > 0 else float("inf"), "runs": runs}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--steps", type=int, default=20, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved eager / compiled rounds (median)")
    p.add_argument("--warm", type=int, default=3, help="first compiled steps counted as compile time")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the demo's 1)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--phase", choices=["cold", "warm"], help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        Path(a.result).write_text(json.dumps(worker(a.worker, a.phase, a)))
        return []
    import torch
    from train_loop import cpu_model, load

    cxx = compiler()
    print(f"device: {cpu_model()} ({os.cpu_count()} cores), {a.threads} torch thread(s), torch {torch.__version__}, "
          f"C++ compiler: {cxx or 'NONE'}; each config's own batch of 8x8 digits; median of {a.rounds} interleaved rounds of {a.steps} "
          f"steps; load average {load()}", flush=True)
    if cxx is None:
        for name in a.configs:
            print(f"{name:12} off: no compiler (inductor's CPU backend needs g++/clang++; none found)")
        return []
    print("CPU seconds throughout (compile: this process and its compiler calls, TORCHINDUCTOR_COMPILE_THREADS=1); "
          "'x wall' is the wall-time ratio of the same interleaved rounds")
    print(f"{'network':12} {'params':>9} {'eager ms':>8} {'comp ms':>8} {'x':>5} {'x wall':>6} {'img/s':>11} "
          f"{'compile s':>9} {'warm s':>6} {'break-even':>10} {'EMA diff':>8}  runs: steps, CPU s saved end to end "
          f"(cold cache), decision")
    rows = []
    for name in a.configs:
        try:
            r = decide(name, a)
        except RuntimeError as err:
            print(f"{name:12} FAILED: {err}", flush=True)
            continue
        runs = "; ".join(f"{run} {v['steps']}: {v['saved_s']:+.0f} s {'on' if v['on'] else 'off'}"
                         for run, v in r["runs"].items())
        ips = f"{r['batch'] * 1e3 / r['eager_ms']:.0f} / {r['batch'] * 1e3 / r['compiled_ms']:.0f}"
        print(f"{name:12} {r['params']:>9,} {r['eager_ms']:>8.1f} {r['compiled_ms']:>8.1f} {r['ratio']:>5.2f} "
              f"{r['ratio_wall']:>6.2f} {ips:>11} {r['compile_cold_s']:>9.1f} {r['compile_warm_s']:>6.1f} "
              f"{r['break_even']:>10.0f} {r['ema_max_abs_diff']:>8.1e}  {runs}   (load {load()}; compile wall "
              f"{r['compile_cold_wall_s']:.0f} s)", flush=True)
        rows.append(r)
    print(f"load average at the end: {load()}")
    return rows


if __name__ == "__main__":
    main()
