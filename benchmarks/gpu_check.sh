#!/usr/bin/env bash
# One-GPU check of the whole suite at full size, the compiled training paths included, one summary table at the
# end (target: under 10 minutes on one H200).  See benchmarks/gpu_check.py for what each row measures.
#
#   benchmarks/gpu_check.sh                 # full size on the first GPU
#   benchmarks/gpu_check.sh --dry-run       # tiny sizes, any device (checks the script; ~1 min on 2 CPU cores)
#   benchmarks/gpu_check.sh --cpu-smoke     # tiny sizes on the CPU with the compiled paths (a few minutes)
#   COMPILE=1 benchmarks/gpu_check.sh       # also torch.compile the networks of the train section's "on" rows
#   LIMIT_S=540 benchmarks/gpu_check.sh     # hard wall-clock limit (default 570 s); the Python part plans its
#                                           # compile section to end 30 s before it (--budget-s)
# Extra arguments go to gpu_check.py (e.g. --sections train sample, --peak-tflops 989, --compile-families DiT).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=offline WANDB_SILENT=true PYTHONWARNINGS=ignore
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
fi
limit=${LIMIT_S:-570}
extra=(--budget-s "$(( limit > 120 ? limit - 90 : limit ))")
[ "${COMPILE:-0}" = "1" ] && extra+=(--compile)
start=$(date +%s)
status=0
# the last 60 s of the limit are the cost model's: the figures' hours from throughputs measured on this device
timeout --signal=INT --kill-after=20 "$(( limit > 120 ? limit - 60 : limit ))" "$PY" -u benchmarks/gpu_check.py \
  "${extra[@]}" "$@" || status=$?
if [ "$status" = 0 ] && [ "${COST_MODEL:-1}" = "1" ]; then
  timeout --kill-after=5 50 "$PY" -u benchmarks/cost_model.py --batch 64 --steps 5 \
    --json "${OUT:-.}/cost_model_$(hostname).json" || echo "cost_model.py: exit status $? (not counted)"
fi
echo "gpu_check.sh: exit status $status after $(( $(date +%s) - start )) s"
exit $status
