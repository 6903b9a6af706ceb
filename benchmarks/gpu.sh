#!/usr/bin/env bash
# The two prepared GPU runs one after the other (kept for the README's name): gpu_check.sh (correctness
# on CUDA, <= ~4 min) then gpu_bench.sh (the kernel benchmark, <= ~4 min). On the device tool, whose
# commands stop at 10 minutes, run them as two calls instead, so that a rerun of one fits the budget.
# Usage, from anywhere:  bash benchmarks/gpu.sh      (PYTHON=... picks the interpreter; OUT=... the output)
here="$(dirname "$0")"
bash "$here/gpu_check.sh"
check=$?
bash "$here/gpu_bench.sh"
bench=$?
exit $((check || bench))
