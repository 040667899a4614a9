#!/usr/bin/env bash
# One-GPU check of the whole suite at full size, one summary table at the end (target: <= 8 minutes on one
# H100-class GPU).  See benchmarks/gpu_check.py for what each row measures.
#
#   benchmarks/gpu_check.sh                 # full size on the first GPU
#   benchmarks/gpu_check.sh --dry-run       # tiny sizes, any device (checks the script; ~1 min on 2 CPU cores)
#   COMPILE=1 benchmarks/gpu_check.sh       # also torch.compile the networks (adds compile time)
#   LIMIT_S=600 benchmarks/gpu_check.sh     # hard wall-clock limit (default 480 s)
# Extra arguments go to gpu_check.py (e.g. --sections train sample, --peak-tflops 989).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=offline WANDB_SILENT=true PYTHONWARNINGS=ignore
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
fi
extra=()
[ "${COMPILE:-0}" = "1" ] && extra+=(--compile)
start=$(date +%s)
status=0
timeout --signal=INT "${LIMIT_S:-480}" "$PY" -u benchmarks/gpu_check.py "${extra[@]}" "$@" || status=$?
echo "gpu_check.sh: exit status $status after $(( $(date +%s) - start )) s"
exit $status
