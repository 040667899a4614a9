"""Steady-state training speed of the real entry points against a bare PyTorch loop of the same module (issue 18).

Three configurations users wait on (small models, 1 CPU thread, W&B offline as they run):

* ``demo_ddpmpp``  the demo's DDPM++ U-Net (16 channels, ``python -m lightning_repro.demo``): its exact
                   ``lightning_repro.cli fit`` command line (``demo.train_command``) with fewer steps;
* ``demo_dit``     the demo's DiT (patch 2, width 64, depth 4), likewise;
* ``study_fig4``   the Fig. 4 study's DiT (one 8x8 patch, batch 256, N = 16) through the studies' own training
                   path, ``studies.training._train_job`` (a plain ``L.Trainer``, the pool's settings).

against (b) ``bare``: the same module and data module (built by the same CLI / study code, so the same initial
weights), the same loss (``step_generator``, ``seeded_rng(dropout_seed)``, ``DenoisingLoss``), AdamW and LR
schedule from ``configure_optimizers``, ``update_ema`` with the same beta, batches from the same
``train_dataloader`` -- and nothing else.  Both end with the same EMA weights (checked: the digest column).

Steady state: a callback (``StepTimer``) times optimisation steps ``k0 .. k1`` (``on_train_batch_start`` of step
``k0`` to that of step ``k1``, so the loop's own work between steps counts); the bare loop times the same steps;
start-up, the final validation grid, checkpoint and samples lie outside the window.  Every measurement is a
fresh process; the kinds alternate (cli, bare, cli, bare, ...) ``--repeats`` times and medians are reported,
with the load average before and after, since the machine is shared.  Then one more CLI run per configuration
under ``CPUTimeProfiler`` (Lightning's ``SimpleProfiler`` on process CPU time) and one instrumented bare run
give the per-hook breakdown: where the CLI's extra time per step goes.

    python benchmarks/train_loop.py                          # all three, 3 repeats, steps 20..220
    python benchmarks/train_loop.py --configs demo_dit --repeats 5 --k1 420
    python benchmarks/train_loop.py --no-profile             # ratios only
    python benchmarks/train_loop.py --against /tmp/base       # and this checkout's CLI against another's
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
CONFIGS = ("demo_ddpmpp", "demo_dit", "study_fig4")

try:  # imported by class path (``train_loop.StepTimer``) inside the CLI's process
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.profilers import SimpleProfiler
except ImportError:  # pragma: no cover
    Callback = SimpleProfiler = object


class CPUTimeProfiler(SimpleProfiler):
    """Lightning's ``SimpleProfiler`` on process CPU time: load from other processes on a shared machine
    hardly moves it (the runs use one thread)."""

    def start(self, action_name: str) -> None:
        self.current_actions[action_name] = time.process_time()

    def stop(self, action_name: str) -> None:
        self.recorded_durations[action_name].append(time.process_time() - self.current_actions.pop(action_name))


class StepTimer(Callback):
    """Times steps ``k0 .. k1`` (wall and process CPU) and writes them, the EMA digest and the profiler's
    per-action durations (if a ``SimpleProfiler`` runs) to ``out`` as JSON at the end of training."""

    def __init__(self, k0: int, k1: int, out: str):
        self.k0, self.k1, self.out = int(k0), int(k1), out
        self.t0 = self.t1 = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.k0:
            self.t0 = (time.perf_counter(), time.process_time())
        elif trainer.global_step == self.k1:
            self.t1 = (time.perf_counter(), time.process_time())

    def on_train_end(self, trainer, pl_module):
        prof = getattr(trainer.profiler, "recorded_durations", None)
        res = {"steps": trainer.global_step, "ema": ema_digest(pl_module),
               "actions": {k: [len(v), statistics.median(v)] for k, v in prof.items()} if prof else {}}
        if self.t0 is not None and self.t1 is not None:
            res.update(wall=self.t1[0] - self.t0[0], cpu=self.t1[1] - self.t0[1], timed=self.k1 - self.k0)
        Path(self.out).write_text(json.dumps(res))


def ema_digest(module) -> str:
    """SHA-256 (16 hex digits) of the EMA weights: equal digests mean bit-identical training."""
    h = hashlib.sha256()
    for k, v in module.ema.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------ the configurations
def demo_argv(family: str, steps: int, root: Path) -> list[str]:
    """The demo's ``cli fit`` arguments of ``family`` (all 1,797 digits, batch 64) for ``steps`` steps."""
    from lightning_repro.demo import train_command

    cmd = train_command(family, 1797, steps, root, 64, monitor_every=10**9)  # the monitor only at the last step
    return cmd[cmd.index("fit"):]


def study_job(steps: int, root: Path, trainer_kwargs: dict):
    """The Fig. 4 study's first DiT job (N = 16) as its pool runs it (no progress bar), for ``steps`` steps."""
    from lightning_repro.studies import memorization
    from lightning_repro.studies.steps import source_image_shape

    cfg = memorization.STUDY.load_config(None, out=root)
    job = next(j for j in memorization.jobs(cfg, source_image_shape(cfg["data"])) if j.name.startswith("dit"))
    return dataclasses.replace(job, max_steps=steps, progress_bar=False,
                               trainer_kwargs={**job.trainer_kwargs, **trainer_kwargs})


def build(config: str, steps: int, root: Path):
    """``(module, data module)`` exactly as the configuration's real entry point builds them (same seed)."""
    if config == "study_fig4":
        import lightning as L

        from lightning_repro.data import SubsetDataModule
        from lightning_repro.studies.training import build_module, set_threads

        job = study_job(steps, root, {})
        set_threads(job.threads)
        L.seed_everything(int(job.module_kwargs.get("seed", 0)), verbose=False)
        return build_module(job.arch, job.image_shape, **job.module_kwargs), SubsetDataModule(**job.data_kwargs)
    from lightning_repro.cli import main

    argv = demo_argv(config.removeprefix("demo_"), steps, root)[1:]  # no subcommand
    cli = main(argv, run=False)
    return cli.model, cli.datamodule


# ------------------------------------------------------------------------------ the two kinds of run
def run_real(config: str, steps: int, k0: int, k1: int, root: Path, out: Path, profile: bool) -> None:
    """The configuration's real entry point, with a ``StepTimer`` (and ``SimpleProfiler`` if ``profile``)."""
    if config == "study_fig4":
        from lightning_repro.studies.training import _train_job

        kw = {"callbacks": [StepTimer(k0, k1, str(out))]}
        if profile:
            kw["profiler"] = CPUTimeProfiler()
        _train_job(study_job(steps, root, kw))
        return
    from lightning_repro.cli import main

    argv = demo_argv(config.removeprefix("demo_"), steps, root)
    timer = {"class_path": "train_loop.StepTimer", "init_args": {"k0": k0, "k1": k1, "out": str(out)}}
    argv += ["--trainer.callbacks+", json.dumps(timer)]
    if profile:
        argv += ["--trainer.profiler", json.dumps({"class_path": "train_loop.CPUTimeProfiler"})]
    main(argv)


def ema_beta(module, step: int, batch: int) -> float:
    """``DiffusionModule.ema_beta`` on one device at optimiser step ``step`` (Lightning's ``global_step``
    inside ``optimizer_step``: it counts the step only after the hook returns)."""
    half = float(module.hparams.ema_halflife_kimg) * 1000.0
    if module.hparams.ema_rampup_ratio is not None:
        half = min(half, (step + 1) * batch * float(module.hparams.ema_rampup_ratio))
    return 0.5 ** (batch / max(half, 1e-8))


class BareStep:
    """The bare training loop of ``module``, one optimisation step per call: the module's loss (``training_step``'s
    draws and ``DenoisingLoss``), ``configure_optimizers``' AdamW and LR schedule, ``update_ema`` with
    ``ema_beta``'s value, batches from ``dm.train_dataloader()``; no Trainer.  ``parts`` sums process CPU seconds
    per part of the step while ``record`` is true."""

    PARTS = ("data", "loss (forward)", "zero_grad + backward", "optimizer + lr", "ema")

    def __init__(self, module, dm, max_steps: int):
        self.module = module.train()
        cfg = module.configure_optimizers()
        self.opt = cfg["optimizer"]  # the schedule is the module's lr_factor over the run's max_steps (no Trainer)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, functools.partial(module.lr_factor,
                                                                                   total_steps=max_steps))
        self.batches, self.batch = iter(dm.train_dataloader()), int(dm.batch_size)
        self.k, self.record = 0, False
        self.parts = dict.fromkeys(self.PARTS, 0.0)

    def __call__(self) -> None:
        m, k, clock = self.module, self.k, time.process_time
        t = [clock()]
        x0, labels = next(self.batches)
        t.append(clock())
        g = m.step_generator(k, x0.device)
        with m.seeded_rng(m.dropout_seed(k, 0), x0.device):
            loss = m.loss(m.denoise, x0, labels if m.num_classes else None, g, 0, 1)
        t.append(clock())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        t.append(clock())
        self.opt.step()
        self.sched.step()
        t.append(clock())
        m.update_ema(ema_beta(m, k, self.batch))
        t.append(clock())
        if self.record:
            for key, a, b in zip(self.PARTS, t, t[1:]):
                self.parts[key] += b - a
        self.k += 1

    def timed(self, n: int) -> tuple[float, float]:
        """``(wall, process CPU)`` seconds per step of the next ``n`` steps."""
        t, c = time.perf_counter(), time.process_time()
        for _ in range(n):
            self()
        return (time.perf_counter() - t) / n, (time.process_time() - c) / n


def run_bare(config: str, steps: int, k0: int, k1: int, root: Path, out: Path, profile: bool) -> None:
    """``BareStep`` on the configuration's module and data module for ``steps`` steps, timing ``k0 .. k1``."""
    step = BareStep(*build(config, steps, root), max_steps=steps)
    for _ in range(k0):
        step()
    t0, c0 = time.perf_counter(), time.process_time()
    step.record = profile
    for _ in range(k0, k1):
        step()
    t1, c1 = time.perf_counter(), time.process_time()
    step.record = False
    for _ in range(k1, steps):
        step()
    res = {"steps": steps, "ema": ema_digest(step.module), "wall": t1 - t0, "cpu": c1 - c0, "timed": k1 - k0,
           "parts": step.parts if profile else {}}
    out.write_text(json.dumps(res))


# ------------------------------------------------------------------------------ the driver
def measure(kind: str, config: str, a, profile: bool = False, code: str | None = None) -> dict:
    """One fresh process of ``kind`` (``cli`` | ``bare``) on ``config`` importing ``lightning_repro`` from ``code``
    (default: this checkout): its JSON record."""
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline",
           "WANDB_SILENT": "true"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [code or str(ROOT), str(HERE), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--configs", config,
               "--k0", str(a.k0), "--k1", str(a.k1), "--root", str(Path(tmp) / "run"), "--result", str(out),
               "--threads", str(a.threads)] + (["--profile"] if profile else [])
        env["WANDB_DIR"] = tmp
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if p.returncode != 0 or not out.is_file():
            raise SystemExit(f"error: {kind} {config} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
        return json.loads(out.read_text())


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def ratios(config: str, a) -> dict:
    """Alternate cli / bare (/ the ``--against`` checkout's cli) ``a.repeats`` times; medians of steps/s (wall and
    CPU) and their ratios."""
    kinds = {"cli": ("cli", None), "bare": ("bare", None)}
    if a.against:
        kinds["against"] = ("cli", a.against)
    runs = {k: [] for k in kinds}
    for _ in range(a.repeats):
        for k, (kind, code) in kinds.items():
            runs[k].append(measure(kind, config, a, code=code))
    med = {k: {c: statistics.median(r["timed"] / r[c] for r in v) for c in ("wall", "cpu")} for k, v in runs.items()}
    digests = {k: {r["ema"] for r in v} for k, v in runs.items()}
    out = {"config": config, "median": med, "ratio_wall": med["bare"]["wall"] / med["cli"]["wall"],
           "ratio_cpu": med["bare"]["cpu"] / med["cli"]["cpu"], "digests": digests,
           "all": {k: [round(r["timed"] / r["wall"], 1) for r in v] for k, v in runs.items()}}
    if a.against:
        out.update(speedup_wall=med["cli"]["wall"] / med["against"]["wall"],
                   speedup_cpu=med["cli"]["cpu"] / med["against"]["cpu"])
    return out


def breakdown(config: str, a) -> None:
    """Per-step CPU milliseconds of each Lightning action (``CPUTimeProfiler``: median call x calls per step)
    next to the bare loop's parts, and the two steps' totals."""
    cli, bare = measure("cli", config, a, profile=True), measure("bare", config, a, profile=True)
    n = cli["steps"]
    act = {k: 1e3 * med * cnt / n for k, (cnt, med) in cli["actions"].items() if cnt >= n}
    print(f"  breakdown of {config}, CPU ms per step (cli: Lightning's actions, median call x calls/step; "
          f"bare: its parts, steps {a.k0}..{a.k1}):")
    for k, v in sorted(act.items(), key=lambda kv: -kv[1]):
        if v >= 0.005:
            print(f"    cli  {v:8.3f}  {k.split('{')[0]}")
    opt = next((v for k, v in act.items() if k.endswith(".optimizer_step")), 0.0)
    inner = sum(v for k, v in act.items() if k.endswith(("training_step", ".backward", "optimizer_zero_grad")))
    print(f"    cli  {opt - inner:8.3f}  = optimizer_step - training_step - backward - zero_grad (AdamW, EMA, log)")
    for k, v in bare["parts"].items():
        print(f"    bare {1e3 * v / bare['timed']:8.3f}  {k}")
    c, b = 1e3 * cli["cpu"] / cli["timed"], 1e3 * bare["cpu"] / bare["timed"]
    print(f"    step {c:8.3f} cli (profiled) vs {b:.3f} bare: {c - b:+.3f} ms/step", flush=True)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--repeats", type=int, default=3, help="alternating cli/bare pairs per configuration "
                   "(0: only the breakdown)")
    p.add_argument("--k0", type=int, default=20, help="first timed step (after warm-up)")
    p.add_argument("--k1", type=int, default=220, help="end of the timed window (the run makes k1 + 1 steps)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the demo's 1)")
    p.add_argument("--no-profile", action="store_true", help="skip the per-hook breakdown")
    p.add_argument("--against", metavar="DIR", help="also time the CLI of the lightning_repro in DIR (another "
                   "checkout, e.g. `git worktree add /tmp/base main`), interleaved: this checkout's speed-up over it")
    p.add_argument("--worker", choices=["cli", "bare"], help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if not 0 <= a.k0 < a.k1:
        raise SystemExit(f"error: need 0 <= --k0 < --k1, got {a.k0} and {a.k1}.")
    if a.worker:
        import torch

        torch.set_num_threads(a.threads)
        run = run_real if a.worker == "cli" else run_bare
        run(a.configs[0], a.k1 + 1, a.k0, a.k1, Path(a.root), Path(a.result), a.profile)
        return []
    import torch

    print(f"device: {cpu_model()} ({os.cpu_count()} cores), {a.threads} torch thread(s), torch {torch.__version__}; "
          f"steps {a.k0}..{a.k1} timed, {a.repeats} alternating cli/bare pairs per config; load average {load()}",
          flush=True)
    rows = []
    for config in a.configs:
        if a.repeats < 1:
            breakdown(config, a)
            continue
        r = ratios(config, a)
        same = "identical EMA" if len(r["digests"]["cli"] | r["digests"]["bare"]) == 1 else \
            f"EMA DIFFERS {r['digests']}"
        m = r["median"]
        print(f"{config:12} cli {m['cli']['wall']:6.1f} steps/s ({m['cli']['cpu']:.1f} per CPU s)  bare "
              f"{m['bare']['wall']:6.1f} steps/s ({m['bare']['cpu']:.1f} per CPU s)  cli/bare time x{r['ratio_wall']:.3f} "
              f"(CPU time x{r['ratio_cpu']:.3f})  {same}  "
              f"runs cli {r['all']['cli']} bare {r['all']['bare']}  load {load()}", flush=True)
        if a.against:
            same = "identical EMA" if r["digests"]["against"] == r["digests"]["cli"] else "EMA DIFFERS"
            print(f"{'':12} against {a.against}: cli {r['median']['against']['wall']:6.1f} steps/s; this checkout's "
                  f"CLI x{r['speedup_wall']:.3f} faster (CPU time x{r['speedup_cpu']:.3f}), {same}, runs "
                  f"{r['all']['against']}", flush=True)
        rows.append(r)
        if not a.no_profile:
            breakdown(config, a)
    print(f"load average at the end: {load()}")
    return rows


if __name__ == "__main__":
    main()
