#!/usr/bin/env bash
# The kernel benchmark, at most ~4 minutes on an H100/H200 (the second prepared GPU run; correctness is
# gpu_check.sh). Headline rows first, each table written row by row (a timeout keeps what was measured):
#   1. leaky update fwd / bwd / fwd+bwd+stats at 64M and 256M elements, bf16 and fp32, against copy
#      bandwidth, eager and torch.compile                                          (UPDATE_TIMEOUT, 110 s)
#   2. leaky linear against cuBLAS (and eager, torch.compile) at widths 1024-8192 (LINEAR_TIMEOUT, 90 s)
#   3. leaky update below 1M elements, where launches decide                      (SMALL_TIMEOUT, 30 s)
# GPU_SIZE=tiny (automatic without a GPU): tiny sizes on the CPU, a rehearsal of the script (the Triton
# rows are skipped there: the interpreter is no measure of speed).
# Output: $OUT when set, else benchmarks/results/: gpu_bench_<stamp>.log, kernels_<gpu|cpu>_<date>_<table>.{json,md}
# Usage, from anywhere:  bash benchmarks/gpu_bench.sh      (PYTHON=... picks the interpreter)
source "$(dirname "$0")/_gpu_common.sh"
header gpu_bench
update=("$PY" benchmarks/bench_leaky_update.py --out "$dest")  # one benchmark file per kernel op
linear=("$PY" benchmarks/bench_leaky_linear.py --out "$dest")
if [ "$GPU_SIZE" = tiny ]; then
  export BENCH_ROWS=${BENCH_ROWS:-128}
  # torch.compile for the CPU takes minutes on a small shared machine: not part of the rehearsal
  export BENCH_IMPLS=${BENCH_IMPLS:-copy,naive,reference,triton,gemm,eager,triton_gemm}
  sizes=(64K,256K 16K) widths=64,128
else
  sizes=(64M,256M 64K,256K,1M) widths=1024,2048,4096,8192
fi
BENCH_SIZES=${sizes[0]} BENCH_DTYPES=bf16,fp32 \
  step "leaky update, headline sizes" "${UPDATE_TIMEOUT:-110}" "${update[@]}" --tag update
BENCH_WIDTHS=$widths BENCH_DTYPES=bf16,fp32 \
  step "leaky linear against cuBLAS" "${LINEAR_TIMEOUT:-90}" "${linear[@]}" --tag linear
BENCH_SIZES=${sizes[1]} BENCH_DTYPES=bf16 \
  step "leaky update, small sizes" "${SMALL_TIMEOUT:-30}" "${update[@]}" --tag small
finish
