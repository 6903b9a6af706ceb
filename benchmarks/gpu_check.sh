#!/usr/bin/env bash
# Correctness on CUDA, at most ~4 minutes on an H100/H200 (the first of two prepared GPU runs; the
# benchmark is gpu_bench.sh). Each step runs even if an earlier one failed or ran out of time:
#   1. the kernel tests on CUDA, every dtype and variant, autotuning included     (CHECK_TIMEOUT, 150 s)
#   2. the tests beyond 2^31 elements (40 GB of GPU memory)                        (BIG_TIMEOUT, 35 s)
#   3. the torch.compile tests on CUDA                                             (COMPILE_TIMEOUT, 50 s)
# Without a GPU it rehearses itself under TRITON_INTERPRET=1 on a few tests (GPU_SIZE=tiny).
# Output: $OUT when set (the device tool's folder), else benchmarks/results/: gpu_check_<stamp>.log
# Usage, from anywhere:  bash benchmarks/gpu_check.sh      (PYTHON=... picks the interpreter)
source "$(dirname "$0")/_gpu_common.sh"
header gpu_check
pytest=("$PY" -m pytest -q -p no:cacheprovider -rfE)
kernel_tests=(tests/test_leaky_update.py tests/test_leaky_linear.py)  # one test file per kernel op
if [ "$on_cuda" = 1 ]; then
  step "kernel tests (CUDA)" "${CHECK_TIMEOUT:-150}" "${pytest[@]}" -m cuda "${kernel_tests[@]}" \
    -k "not beyond_int32"
  step "beyond 2^31 elements (CUDA)" "${BIG_TIMEOUT:-35}" "${pytest[@]}" -m cuda "${kernel_tests[@]}" \
    -k "beyond_int32"
  step "torch.compile tests (CUDA)" "${COMPILE_TIMEOUT:-50}" "${pytest[@]}" -m cuda tests/test_compile.py
else
  step "kernel tests (interpreter, tiny)" "${CHECK_TIMEOUT:-150}" "${pytest[@]}" "${kernel_tests[@]}" \
    -k "test_update_forward and shape4 or test_leaky_linear_gemm_paths or test_update_is_deterministic"
fi
finish
