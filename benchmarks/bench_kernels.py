"""Both kernel-op benchmarks in one run and one table file: ``bench_leaky_update.py`` (the leaky update
against eager, torch.compile and copy bandwidth) and ``bench_leaky_linear.py`` (the fused leaky linear GEMM
against eager, torch.compile and the bare GEMM). A thin driver for the command line, not a pytest module
(pytest collects the two op files themselves, once each).

    python benchmarks/bench_kernels.py --out DIR [--tag NAME]   # kernels_<cpu|gpu>_<date>[_NAME].{json,md}
    BENCH_GROUPS=update,linear  chooses the ops (default both); every other setting is the op files' own:
    BENCH_DEVICE  BENCH_SIZES  BENCH_WIDTHS  BENCH_ROWS  BENCH_DTYPES  BENCH_IMPLS  BENCH_THREADS
"""
from __future__ import annotations

import os
import sys
from typing import List

import _kernel_bench as kb
import bench_leaky_linear
import bench_leaky_update

OPS = {"update": bench_leaky_update, "linear": bench_leaky_linear}


def cases(groups: str = "") -> List[kb.Case]:
    """The cases of the ops ``groups`` names (comma-separated; default ``BENCH_GROUPS`` or both)."""
    names = [g for g in (groups or os.environ.get("BENCH_GROUPS") or "update,linear").split(",") if g]
    unknown = sorted(set(names) - set(OPS))
    if unknown:
        sys.exit(f"BENCH_GROUPS: unknown {', '.join(unknown)}; choose from {','.join(OPS)}")
    return [case for name in names for case in OPS[name].cases()]


if __name__ == "__main__":
    kb.main(cases(), __doc__)
