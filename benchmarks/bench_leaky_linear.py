"""Leaky linear benchmark: ``a x + b (relu(x) W^T + bias)`` against what a user would run otherwise.

Per dtype and width (M rows): eager ``relu -> linear -> combine``, its ``torch.compile``, the fused Triton
GEMM (``ops.leaky_linear(backend="triton")``, which follows the GEMM policy), for fp32 also the Triton GEMM
whatever the policy (``triton_gemm``), and the bare GEMM ``x @ W^T`` (the ceiling), as time, TFLOP/s and
the fraction of the bare GEMM's speed.

Run it either way (``bench_kernels.py`` runs this and ``bench_leaky_update.py`` into one table file):
    pytest benchmarks/bench_leaky_linear.py                  # pytest-benchmark (numbers also in extra_info)
    python benchmarks/bench_leaky_linear.py --out DIR        # standalone: triton.testing.do_bench medians on CUDA
Choose with environment variables (defaults: GPU sizes on CUDA, small ones on the CPU):
    BENCH_DEVICE=cuda|cpu  BENCH_WIDTHS=512,2048  BENCH_ROWS=8192  BENCH_DTYPES=bf16,fp32
    BENCH_IMPLS=gemm,eager,compiled,triton,triton_gemm  BENCH_THREADS=1 (CPU)  BENCH_OUT=DIR (pytest)
    --tag NAME (standalone): kernels_<cpu|gpu>_<date>_NAME.{json,md}, so that several runs keep their tables
On the CPU the Triton rows are skipped: the interpreter checks correctness, it is no measure of speed.
"""
from __future__ import annotations

import os
from typing import List

import torch
import torch.nn.functional as F

import _kernel_bench as kb
from adaptive_depth import ops  # (importable: _kernel_bench puts the checkout on sys.path)

WIDTHS = kb.numbers(os.environ.get("BENCH_WIDTHS") or ("512,1024,2048,4096,8192" if kb.ON_CUDA else "256"))
ROWS = int(os.environ.get("BENCH_ROWS") or (8192 if kb.ON_CUDA else 512))


def _derive(case: kb.Case, ms: float, baseline) -> dict:
    """TFLOP/s (a forward is one GEMM, a forward+backward three), and the bare GEMM's time / this time."""
    flops = (2 if case.op == "fwd" else 6) * ROWS * case.size ** 2
    out = {"rows": ROWS, "TFLOP/s": round(flops / ms / 1e9, 2)}
    gemm = baseline("fwd", "gemm")
    if gemm and case.op == "fwd":
        out["of_gemm"] = round(gemm / ms, 3)
    return out


kb.register(kb.Table("linear", "Leaky linear (size = width; of_gemm = bare GEMM time / time)",
                     ["op", "dtype", "size", "rows", "impl", "ms", "TFLOP/s", "of_gemm", "speedup_vs_eager"],
                     _derive, eager="eager", plain=("eager", "gemm"), meta={"rows_linear": ROWS}))


def _eager(x, weight, bias, a, b):
    return a * x + b * F.linear(torch.relu(x), weight, bias)


def _triton(lt, force_triton_gemm: bool):
    """``ops.leaky_linear`` on the Triton backend; with ``force_triton_gemm`` the Triton GEMM whatever the
    policy (fp32: FMA, no tensor cores)."""
    def fn(*args):
        if not force_triton_gemm:
            return ops.leaky_linear(*args, lt, backend="triton")[0]
        before = os.environ.get("ADAPTIVE_DEPTH_GEMM")
        os.environ["ADAPTIVE_DEPTH_GEMM"] = "triton"
        try:
            return ops.leaky_linear(*args, lt, backend="triton")[0]
        finally:
            if before is None:
                del os.environ["ADAPTIVE_DEPTH_GEMM"]
            else:
                os.environ["ADAPTIVE_DEPTH_GEMM"] = before
    return fn


def _case(op: str, impl: str, dtype: str, width: int) -> kb.Case:
    def make():
        dt = kb.DTYPES[dtype]
        x = torch.randn(ROWS, width, device=kb.DEVICE, dtype=dt)
        weight = (torch.randn(width, width, device=kb.DEVICE) / width ** 0.5).to(dt)
        bias = torch.zeros(width, device=kb.DEVICE, dtype=dt)
        a, b = torch.tensor(0.8, device=kb.DEVICE), torch.tensor(0.1, device=kb.DEVICE)
        lt = torch.tensor(kb.LT, device=kb.DEVICE)
        if impl == "gemm":
            return lambda: x @ weight.t()
        if impl in ("triton", "triton_gemm"):
            fn = _triton(lt, force_triton_gemm=impl == "triton_gemm")
        else:
            fn = _eager if impl == "eager" else kb.compiled("linear", _eager)
        inputs = (x, weight, bias, a, b)
        if op == "fwd":
            def call():
                with torch.no_grad():
                    return fn(*inputs)
        else:
            for t in inputs:
                t.requires_grad_()
            g = torch.randn_like(x)

            def call():
                return torch.autograd.grad(fn(*inputs), inputs, g)
        call()
        return call

    skip = kb.triton_skip() if impl in ("triton", "triton_gemm") else None
    return kb.Case("linear", op, impl, dtype, width, make, skip)


def cases() -> List[kb.Case]:
    """Per dtype and width: the forwards (the bare GEMM first: the others divide by it), then
    forward+backward."""
    out = []
    for dtype in kb.BENCH_DTYPES:
        for width in WIDTHS:
            # fp32: "triton" follows the GEMM policy (cuBLAS without TF32), "triton_gemm" is the Triton
            # GEMM regardless, the row behind the policy
            impls = ("gemm", "eager", "compiled", "triton") + (("triton_gemm",) if dtype == "fp32" else ())
            out += [_case("fwd", impl, dtype, width) for impl in impls]
            out += [_case("fwdbwd", impl, dtype, width) for impl in ("eager", "compiled", "triton")]
    return kb.selected(out)


if kb.have_pytest():
    _report, test_bench = kb.pytest_suite(cases())

if __name__ == "__main__":
    kb.main(cases(), __doc__)
