#!/usr/bin/env bash
# The GPU machine's stack on a CPU: a separate venv with torch 2.11 + triton 3.6 + the newest numpy
# (>= 2.4, as there), then the kernel tests under TRITON_INTERPRET=1. Not the project's own venv.
#   VENV      where the venv goes (default /tmp/adaptive-depth-old-stack; reused when it exists)
#   TORCH     torch requirement (default "torch==2.11.*"); TRITON (default "triton==3.6.*")
#   NUMPY     numpy requirement (default "numpy>=2.4": Triton 3.6's interpreter meets numpy >= 2.4 here)
#   TESTS     pytest arguments (default: the kernel tests and the static sm_90 checks)
# The CUDA wheels are large (torch pulls the nvidia-* libraries, ~3 GB): the first run downloads them.
# Usage, from the repository root:  bash benchmarks/old_stack.sh      (PYTHON=... picks the base interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-/tmp/adaptive-depth-old-stack}
t0=$SECONDS
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV" || exit 1
fi
"$VENV/bin/python" -m pip install -q "${TORCH:-torch==2.11.*}" "${TRITON:-triton==3.6.*}" \
  "${NUMPY:-numpy>=2.4}" pytest || exit 1
echo "install: $((SECONDS - t0))s"
"$VENV/bin/python" -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=1 PYTHONUNBUFFERED=1
# tests import adaptive_depth_kernels: a checkout that is not installed reaches kernels/ through this link
[ -e adaptive_depth_kernels ] || ln -s kernels adaptive_depth_kernels
t1=$SECONDS
# shellcheck disable=SC2086
"$VENV/bin/python" -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_leaky_update.py tests/test_leaky_linear.py tests/test_kernels_static.py}
rc=$?
echo "tests: exit $rc after $((SECONDS - t1))s; total $((SECONDS - t0))s"
exit $rc
