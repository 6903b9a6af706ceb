"""Leaky update benchmark: ``y = a x + b f`` against what a user would run otherwise.

Forward, backward, and forward+backward with the statistics, per dtype and size: the naive eager expression
``x + rho * (f - Lt * x)``, the library's torch reference (``ops.fused_update(backend="torch")``),
``torch.compile`` of the reference maths, and the Triton kernels (``backend="triton"``). Each row reports the
time, the bandwidth of the bytes the op must move (forward: read x, f, write y; backward: read g, x, f, write
dx, df) and that bandwidth as a fraction of a same-size device-to-device copy timed in the same run.

Run it either way (``bench_kernels.py`` runs this and ``bench_leaky_linear.py`` into one table file):
    pytest benchmarks/bench_leaky_update.py                  # pytest-benchmark (numbers also in extra_info)
    python benchmarks/bench_leaky_update.py --out DIR        # standalone: triton.testing.do_bench medians on CUDA
Choose with environment variables (defaults: GPU sizes on CUDA, small ones on the CPU):
    BENCH_DEVICE=cuda|cpu  BENCH_SIZES=1M,16M  BENCH_DTYPES=bf16,fp32  BENCH_IMPLS=copy,naive,reference,compiled,triton
    BENCH_THREADS=1 (CPU)  BENCH_OUT=DIR (pytest: also write the table there)
    --tag NAME (standalone): kernels_<cpu|gpu>_<date>_NAME.{json,md}, so that several runs keep their tables
On the CPU the Triton rows are skipped: the interpreter checks correctness, it is no measure of speed.
"""
from __future__ import annotations

import os
from typing import Callable, List

import torch

import _kernel_bench as kb
from adaptive_depth import ops  # (importable: _kernel_bench puts the checkout on sys.path)

SIZES = kb.numbers(os.environ.get("BENCH_SIZES") or ("1M,4M,16M,64M,256M" if kb.ON_CUDA else "1M"))
BYTES_PER_ELEMENT = {"fwd": 3, "bwd": 5, "fwdbwd_stats": 8, "copy": 2}  # tensors read and written


def _bytes(op: str, case: kb.Case) -> int:
    return BYTES_PER_ELEMENT[op] * case.size * kb.DTYPES[case.dtype].itemsize


def _derive(case: kb.Case, ms: float, baseline) -> dict:
    """Bandwidth, and the fraction of the copy's bandwidth of this run."""
    out = {"GB/s": round(_bytes(case.op, case) / ms / 1e6, 1)}
    copy = baseline("copy", "copy")
    if copy:
        out["of_copy"] = round(_bytes(case.op, case) / ms / (_bytes("copy", case) / copy), 3)
    return out


kb.register(kb.Table("update", "Leaky update (size = elements; of_copy = bandwidth / copy bandwidth)",
                     ["op", "dtype", "size", "impl", "ms", "GB/s", "of_copy", "speedup_vs_eager"],
                     _derive, eager="naive", plain=("naive", "copy")))


def _reference_maths(stats: bool):
    return lambda x, f, a, b, lt: ops.reference_forward(x, f, a, b, lt, False, stats)


def _naive(x, f, rho, stats: bool):
    y = x + rho * (f - kb.LT * x)
    if not stats:
        return y, None
    with torch.no_grad():
        v = f - kb.LT * x
        return y, torch.stack([v.float().square().sum(), x.float().square().sum()])


def _forward(impl: str, stats: bool) -> Callable:
    """``(x, f, rho, a, b, lt) -> (y, s)`` for one implementation."""
    if impl == "naive":
        return lambda x, f, rho, a, b, lt: _naive(x, f, rho, stats)
    if impl == "compiled":
        fn = kb.compiled(f"update-{stats}", _reference_maths(stats))
        return lambda x, f, rho, a, b, lt: fn(x, f, a, b, lt)
    backend = {"reference": "torch", "triton": "triton"}[impl]
    return lambda x, f, rho, a, b, lt: ops.fused_update(x, f, a, b, lt, stats=stats, backend=backend)


def _case(op: str, impl: str, dtype: str, size: int) -> kb.Case:
    def make():
        dt = kb.DTYPES[dtype]
        x, f, g = (torch.randn(size, device=kb.DEVICE, dtype=dt) for _ in range(3))
        if op == "copy":
            out = torch.empty_like(x)
            return lambda: out.copy_(x)
        rho = torch.tensor(0.1, device=kb.DEVICE, requires_grad=True)
        lt = torch.tensor(kb.LT, device=kb.DEVICE)
        a, b = (v.detach().requires_grad_() for v in ops.step_coefficients(rho.detach(), lt))
        x.requires_grad_()
        f.requires_grad_()
        wrt = (x, f, rho) if impl == "naive" else (x, f, a, b)
        fn = _forward(impl, stats=op == "fwdbwd_stats")
        if op == "fwd":
            def call():
                with torch.no_grad():
                    return fn(x, f, rho, a, b, lt)
        elif op == "bwd":
            y, _ = fn(x, f, rho, a, b, lt)

            def call():
                return torch.autograd.grad(y, wrt, g, retain_graph=True)
        else:
            def call():
                y, s = fn(x, f, rho, a, b, lt)
                return torch.autograd.grad(y, wrt, g), s
        call()  # compiles, autotunes, warms the allocator
        return call

    skip = kb.triton_skip() if impl == "triton" else None
    return kb.Case("update", op, impl, dtype, size, make, skip)


def cases() -> List[kb.Case]:
    """Per dtype and size: the copy first (the others divide by it), then every op and implementation."""
    out = []
    for dtype in kb.BENCH_DTYPES:
        for size in SIZES:
            out.append(_case("copy", "copy", dtype, size))
            for op in ("fwd", "bwd", "fwdbwd_stats"):
                out += [_case(op, impl, dtype, size) for impl in ("naive", "reference", "compiled", "triton")]
    return kb.selected(out)


if kb.have_pytest():
    _report, test_bench = kb.pytest_suite(cases())

if __name__ == "__main__":
    kb.main(cases(), __doc__)
