#!/usr/bin/env bash
# The GPU check of issue 17 in one go: is CUDA there, then kiln train (bf16, fp16, eager and --compile)
# against an airbench-style raw loop on CIFAR-10-shaped data held on the GPU, with the host-sync check.
# Everything is in benchmarks/gpu_check.py (its docstring says what each variant is); this wrapper finds
# a Python with torch, checks the GPU and passes its arguments on. Meant to fit in 8 minutes of GPU time
# (--budget, default 420 s for the variants; each has its own --timeout; not yet run on a GPU).
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine, from anywhere
#   bash benchmarks/gpu_check.sh --dry-run    # on a CPU: tiny sizes, tests the script only
#   PYTHON=/opt/venv/bin/python bash benchmarks/gpu_check.sh --variants raw,kiln-bf16
#
# Exit status: 0 every variant ran, 1 one or more failed (the table and JSON are printed all the same;
# a host sync found by the check counts as a failure), 2 no CUDA device (without --dry-run).
set -u
cd "$(dirname "$0")/.." || exit 2
if [ -n "${PYTHON:-}" ]; then
    py=$PYTHON
elif [ -x .venv/bin/python ]; then
    py=.venv/bin/python
else
    py=python3
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

dry_run=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && dry_run=1; done
if [ "$dry_run" = 0 ]; then
    if ! "$py" -c 'import sys, torch
ok = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}: " + (torch.cuda.get_device_name(0) if ok else "no CUDA device"))
sys.exit(0 if ok else 2)'; then
        echo "gpu_check: no CUDA device here (or no torch for $py); on a CPU, --dry-run tests the script" >&2
        exit 2
    fi
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
exec "$py" benchmarks/gpu_check.py "$@"
