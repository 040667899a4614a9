"""Cost of the live reproducibility monitor: the same tiny fit through the real CLI with and without it.

    python benchmarks/monitor_overhead.py                       # digits_ddpmpp, 1,500 steps, the monitor's defaults
    python benchmarks/monitor_overhead.py --max-steps 500 --config configs/train/digits_dit.yaml

Both runs are ``python train.py fit --config <experiment> --trainer.max_steps N --trainer.logger false``; the
second adds ``--config configs/callbacks/monitor.yaml`` (every 250 steps, 64 seeds, optimal reference).  Printed:
the wall time of each process, the fit time each reports, the monitor's own time, and the ratios measured in this
same run (the baseline is the run without the monitor).  The budget is ``monitor time / baseline fit < 10 %``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fit(config: str, max_steps: int, root: Path, extra: list[str]) -> tuple[float, str]:
    """(wall seconds, stdout) of one ``train.py fit`` process."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "train.py", "fit", "--config", config, *extra, "--trainer.max_steps", str(max_steps),
           "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
           "--trainer.default_root_dir", str(root)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return wall, p.stdout


def _number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else float("nan")


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/train/digits_ddpmpp.yaml")
    ap.add_argument("--monitor-config", default="configs/callbacks/monitor.yaml")
    ap.add_argument("--max-steps", type=int, default=1500)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more CLI flags for both runs")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        base_wall, base_out = fit(args.config, args.max_steps, Path(tmp) / "base", args.extra)
        mon_wall, mon_out = fit(args.config, args.max_steps, Path(tmp) / "monitor",
                                ["--config", args.monitor_config, *args.extra])
    r = {"baseline_wall_s": base_wall, "monitor_wall_s": mon_wall,
         "baseline_fit_s": _number(r"time=(\d+)s", base_out), "monitor_fit_s": _number(r"time=(\d+)s", mon_out),
         "monitor_own_s": _number(r"monitor: \d+ measurement\(s\), ([\d.]+)s", mon_out),
         "measurements": _number(r"monitor: (\d+) measurement", mon_out)}
    r["wall_ratio"] = mon_wall / base_wall
    r["own_over_baseline_fit"] = r["monitor_own_s"] / max(r["baseline_fit_s"], 1.0)
    print(f"{args.config}, {args.max_steps} steps: baseline {base_wall:.1f}s wall ({r['baseline_fit_s']:.0f}s fit) | "
          f"with monitor {mon_wall:.1f}s wall ({r['monitor_fit_s']:.0f}s fit), {r['measurements']:.0f} measurements "
          f"taking {r['monitor_own_s']:.1f}s")
    print(f"ratio with / without (wall, same run): {r['wall_ratio']:.3f} | monitor's own time / baseline fit: "
          f"{100 * r['own_over_baseline_fit']:.1f}% (budget 10%)")
    return r


if __name__ == "__main__":
    main()
