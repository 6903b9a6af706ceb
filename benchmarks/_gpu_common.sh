# Shared by gpu_check.sh and gpu_bench.sh (sourced, not run). Sets: PY, dest, log, the step function,
# the Triton cache in build/ (kept between calls on a warm device machine: reruns skip the compiles),
# and the adaptive_depth_kernels link an uninstalled checkout needs.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
dest=${OUT:-benchmarks/results}
mkdir -p "$dest"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/build/triton-cache}
[ -e adaptive_depth_kernels ] || ln -s kernels adaptive_depth_kernels  # the import name of kernels/
status=0
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  on_cuda=1
  unset TRITON_INTERPRET
  GPU_SIZE=${GPU_SIZE:-full}
else  # no GPU: the interpreter, at a tiny size (a rehearsal of the script, not a measurement)
  on_cuda=0
  export TRITON_INTERPRET=1
  GPU_SIZE=tiny
fi

header() {  # header NAME: the run's identity, into $log
  log="$dest/$1_${stamp}.log"
  {
    echo "# adaptive-depth $1, $stamp (UTC), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), size $GPU_SIZE"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
    "$PY" - <<'PYEOF'
import numpy, torch, triton
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, numpy {numpy.__version__}")
print("GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE: the interpreter, nothing here is a GPU result")
PYEOF
  } 2>&1 | tee "$log"
}

step() {  # step NAME LIMIT COMMAND...: SIGINT at the limit (pytest then prints its summary), KILL 15 s later
  local name=$1 limit=$2
  shift 2
  echo -e "\n## $name (limit ${limit}s)" | tee -a "$log"
  local t0=$SECONDS rc=0
  timeout -k 15 -s INT "$limit" "$@" 2>&1 | tee -a "$log" || rc=${PIPESTATUS[0]}
  echo "## $name: exit $rc after $((SECONDS - t0))s" | tee -a "$log"
  [ "$rc" -eq 0 ] || status=1
}

finish() {
  echo -e "\nfinished in ${SECONDS}s, status $status; results in $dest" | tee -a "$log"
  exit $status
}
