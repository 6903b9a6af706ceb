#!/usr/bin/env bash
# One prepared run for a session that has a GPU (made for an H100/H200 lent for ~15 minutes in all):
#   1. the CUDA correctness tests of the kernels and of torch.compile      (at most TEST_TIMEOUT s, 210)
#   2. the full kernel benchmark, do_bench medians                          (at most BENCH_TIMEOUT s, 270)
#   3. the training benchmark, when one exists (the hook below)             (at most TRAIN_TIMEOUT s, 90)
# so the whole stays well under 10 minutes. Each step runs even if an earlier one failed or timed out.
# Output: $OUT when set (the device tool's folder), else benchmarks/results/:
#   gpu_<stamp>.log           date, GPU, driver, torch and triton versions, the test report, the timings
#   kernels_gpu_<date>.json/.md   the benchmark tables (bench_kernels.py)
# Usage, from the repository root:  bash benchmarks/gpu.sh      (PYTHON=... to pick the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
dest=${OUT:-benchmarks/results}
mkdir -p "$dest"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
log="$dest/gpu_${stamp}.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout, installed or not
unset TRITON_INTERPRET
status=0

{
  echo "# adaptive-depth GPU run, $stamp (UTC), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
  "$PY" - <<'EOF'
import torch, triton
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
print("GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE: nothing below is a GPU result")
EOF
} 2>&1 | tee "$log"

step() {  # step NAME TIMEOUT COMMAND...
  local name=$1 limit=$2
  shift 2
  echo -e "\n## $name (limit ${limit}s)" | tee -a "$log"
  local t0=$SECONDS rc=0
  timeout "$limit" "$@" 2>&1 | tee -a "$log" || rc=${PIPESTATUS[0]}
  echo "## $name: exit $rc after $((SECONDS - t0))s" | tee -a "$log"
  [ "$rc" -eq 0 ] || status=1
}

if "$PY" -c "import pytest" 2>/dev/null; then
  step "CUDA tests" "${TEST_TIMEOUT:-210}" "$PY" -m pytest -q -m cuda -p no:cacheprovider \
    tests/test_kernels.py tests/test_compile.py
else
  echo "pytest is not installed here: the CUDA tests did not run" | tee -a "$log"
  status=1
fi

step "kernel benchmark" "${BENCH_TIMEOUT:-270}" "$PY" benchmarks/bench_kernels.py --out "$dest"

# Hook: the training benchmark. Set TRAIN_BENCH to a command, or add benchmarks/bench_train.py taking
# --out DIR; it gets what is left of the budget.
if [ -n "${TRAIN_BENCH:-}" ]; then
  step "training benchmark" "${TRAIN_TIMEOUT:-90}" bash -c "$TRAIN_BENCH"
elif [ -f benchmarks/bench_train.py ]; then
  step "training benchmark" "${TRAIN_TIMEOUT:-90}" "$PY" benchmarks/bench_train.py --out "$dest"
fi

echo -e "\nfinished in ${SECONDS}s, status $status; results in $dest" | tee -a "$log"
exit $status
