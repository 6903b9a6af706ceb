"""Kernel benchmarks: the leaky update and the leaky linear layer against what a user would run otherwise.

Leaky update ``y = a x + b f`` (forward, backward, and forward+backward with the statistics), per dtype and
size: the naive eager expression ``x + rho * (f - Lt * x)``, the library's torch reference
(``ops.fused_update(backend="torch")``), ``torch.compile`` of the reference maths, and the Triton kernels
(``backend="triton"``). Each row reports the time, the bandwidth of the bytes the op must move (forward:
read x, f, write y; backward: read g, x, f, write dx, df) and that bandwidth as a fraction of a same-size
device-to-device copy timed in the same run.

Leaky linear ``a x + b (relu(x) W^T + bias)`` per dtype and width (M rows): eager ``relu -> linear ->
combine``, its ``torch.compile``, the fused Triton GEMM, and the bare GEMM ``x @ W^T`` (the ceiling), as
time, TFLOP/s and the fraction of the bare GEMM's speed.

Run it either way:
    pytest benchmarks/bench_kernels.py                  # pytest-benchmark (numbers also in extra_info)
    python benchmarks/bench_kernels.py --out DIR        # standalone: triton.testing.do_bench medians on CUDA
Choose with environment variables (defaults: GPU sizes on CUDA, small ones on the CPU):
    BENCH_DEVICE=cuda|cpu  BENCH_SIZES=1M,16M  BENCH_WIDTHS=512,2048  BENCH_ROWS=8192  BENCH_DTYPES=bf16,fp32
    BENCH_GROUPS=update,linear  BENCH_IMPLS=copy,naive,reference,compiled,triton,gemm,eager,triton_gemm
    BENCH_THREADS=1 (CPU)  BENCH_OUT=DIR (pytest: also write the tables there)
    --tag NAME (standalone): kernels_<cpu|gpu>_<date>_NAME.{json,md}, so that several runs keep their tables
On the CPU the Triton rows are skipped: the interpreter checks correctness, it is no measure of speed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout works without an install
from adaptive_depth import ops  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE = os.environ.get("BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.startswith("cuda")
LT = 2.0  # effective depth; rho = 0.1
if not ON_CUDA:  # one thread by default: stable numbers on a shared machine (threads waiting at barriers
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS") or 1))  # for a descheduled peer time nothing)


def _numbers(text: str) -> List[int]:
    units = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}
    return [int(float(v[:-1]) * units[v[-1].upper()]) if v[-1].upper() in units else int(v)
            for v in text.replace(" ", "").split(",") if v]


SIZES = _numbers(os.environ.get("BENCH_SIZES") or ("1M,4M,16M,64M,256M" if ON_CUDA else "1M"))
WIDTHS = _numbers(os.environ.get("BENCH_WIDTHS") or ("512,1024,2048,4096,8192" if ON_CUDA else "256"))
ROWS = int(os.environ.get("BENCH_ROWS") or (8192 if ON_CUDA else 512))
BENCH_DTYPES = (os.environ.get("BENCH_DTYPES") or "bf16,fp32").split(",")
GROUPS = (os.environ.get("BENCH_GROUPS") or "update,linear").split(",")
IMPLS = set((os.environ.get("BENCH_IMPLS") or "copy,naive,reference,compiled,triton,gemm,eager,triton_gemm").split(","))


def _triton_skip() -> Optional[str]:
    if not ON_CUDA:
        return "Triton rows need a CUDA GPU (under TRITON_INTERPRET the kernels run for correctness only)"
    if not ops.triton_available():
        return "the Triton kernels do not import here"
    return None


# ------------------------------------------------------------------------------------------ cases
@dataclass
class Case:
    group: str  # "update" or "linear"
    op: str  # "fwd", "bwd", "fwdbwd_stats" (update); "fwd", "fwdbwd" (linear)
    impl: str
    dtype: str
    size: int  # elements (update) or width (linear)
    make: Callable[[], Callable[[], object]]  # builds the inputs, returns the timed call (warmed up)
    skip: Optional[str] = None

    @property
    def name(self) -> str:
        return f"{self.group}-{self.op}-{self.dtype}-{self.size}-{self.impl}"

    @property
    def bytes(self) -> int:
        per = {"fwd": 3, "bwd": 5, "fwdbwd_stats": 8, "copy": 2}[self.op]
        return per * self.size * DTYPES[self.dtype].itemsize

    @property
    def flops(self) -> int:
        return (2 if self.op == "fwd" else 6) * ROWS * self.size ** 2


_COMPILED: Dict[str, Callable] = {}


def _compiled(key: str, fn: Callable) -> Callable:
    """One compiled function per kind, dynamic in the sizes (a recompile per dtype, not per size)."""
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, dynamic=True)
    return _COMPILED[key]


def _reference_maths(stats: bool):
    return lambda x, f, a, b, lt: ops.reference_forward(x, f, a, b, lt, False, stats)


def _naive(x, f, rho, stats: bool):
    y = x + rho * (f - LT * x)
    if not stats:
        return y, None
    with torch.no_grad():
        v = f - LT * x
        return y, torch.stack([v.float().square().sum(), x.float().square().sum()])


def _update_forward(impl: str, stats: bool) -> Callable:
    """``(x, f, rho, a, b, lt) -> (y, s)`` for one implementation."""
    if impl == "naive":
        return lambda x, f, rho, a, b, lt: _naive(x, f, rho, stats)
    if impl == "compiled":
        fn = _compiled(f"update-{stats}", _reference_maths(stats))
        return lambda x, f, rho, a, b, lt: fn(x, f, a, b, lt)
    backend = {"reference": "torch", "triton": "triton"}[impl]
    return lambda x, f, rho, a, b, lt: ops.fused_update(x, f, a, b, lt, stats=stats, backend=backend)


def _update_case(op: str, impl: str, dtype: str, size: int) -> Case:
    def make():
        dt = DTYPES[dtype]
        x, f, g = (torch.randn(size, device=DEVICE, dtype=dt) for _ in range(3))
        if op == "copy":
            out = torch.empty_like(x)
            return lambda: out.copy_(x)
        rho = torch.tensor(0.1, device=DEVICE, requires_grad=True)
        lt = torch.tensor(LT, device=DEVICE)
        a, b = (v.detach().requires_grad_() for v in ops.step_coefficients(rho.detach(), lt))
        x.requires_grad_()
        f.requires_grad_()
        wrt = (x, f, rho) if impl == "naive" else (x, f, a, b)
        fn = _update_forward(impl, stats=op == "fwdbwd_stats")
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

    skip = _triton_skip() if impl == "triton" else None
    return Case("update", op, impl, dtype, size, make, skip)


def _eager_linear(x, weight, bias, a, b):
    return a * x + b * F.linear(torch.relu(x), weight, bias)


def _linear_case(op: str, impl: str, dtype: str, width: int) -> Case:
    def make():
        dt = DTYPES[dtype]
        x = torch.randn(ROWS, width, device=DEVICE, dtype=dt)
        weight = (torch.randn(width, width, device=DEVICE) / width ** 0.5).to(dt)
        bias = torch.zeros(width, device=DEVICE, dtype=dt)
        a, b = torch.tensor(0.8, device=DEVICE), torch.tensor(0.1, device=DEVICE)
        lt = torch.tensor(LT, device=DEVICE)
        if impl == "gemm":
            return lambda: x @ weight.t()
        if impl == "triton":
            def fn(*args):
                return ops.leaky_linear(*args, lt, backend="triton")[0]
        elif impl == "triton_gemm":  # the Triton GEMM whatever the policy (fp32: FMA, no tensor cores)
            def fn(*args):
                before = os.environ.get("ADAPTIVE_DEPTH_GEMM")
                os.environ["ADAPTIVE_DEPTH_GEMM"] = "triton"
                try:
                    return ops.leaky_linear(*args, lt, backend="triton")[0]
                finally:
                    if before is None:
                        del os.environ["ADAPTIVE_DEPTH_GEMM"]
                    else:
                        os.environ["ADAPTIVE_DEPTH_GEMM"] = before
        else:
            fn = _eager_linear if impl == "eager" else _compiled("linear", _eager_linear)
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

    skip = _triton_skip() if impl in ("triton", "triton_gemm") else None
    return Case("linear", op, impl, dtype, width, make, skip)


def cases() -> List[Case]:
    return [c for c in _all_cases() if c.impl in IMPLS]


def _all_cases() -> List[Case]:
    out = []
    for dtype in BENCH_DTYPES:
        if "update" in GROUPS:
            for size in SIZES:
                out.append(_update_case("copy", "copy", dtype, size))  # first: the others divide by it
                for op in ("fwd", "bwd", "fwdbwd_stats"):
                    out += [_update_case(op, impl, dtype, size)
                            for impl in ("naive", "reference", "compiled", "triton")]
        if "linear" in GROUPS:
            for width in WIDTHS:
                # fp32: "triton" follows the GEMM policy (cuBLAS without TF32), "triton_gemm" is the Triton
                # GEMM regardless, the row behind the policy
                impls = ("gemm", "eager", "compiled", "triton") + (("triton_gemm",) if dtype == "fp32" else ())
                out += [_linear_case("fwd", impl, dtype, width) for impl in impls]
                out += [_linear_case("fwdbwd", impl, dtype, width) for impl in ("eager", "compiled", "triton")]
    return out


# ----------------------------------------------------------------------------------------- timing
def sync() -> None:
    if ON_CUDA:
        torch.cuda.synchronize()


def measure_ms(call: Callable) -> float:
    """Median milliseconds of one call: CUDA-event timings with the L2 flushed (do_bench) on CUDA,
    wall-clock medians of at least 5 calls (about 0.5 s) on the CPU."""
    if ON_CUDA:
        import triton.testing
        return float(triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median"))
    times = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < 0.5 and len(times) < 50):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


_RESULTS: Dict[str, float] = {}  # name -> ms, this run
ROWS_OUT: List[dict] = []


def row(case: Case, ms: float) -> dict:
    """The reported numbers of one case; the baselines (copy, eager, GEMM) come from this run."""
    _RESULTS[case.name] = ms
    out = {"group": case.group, "op": case.op, "impl": case.impl, "dtype": case.dtype, "size": case.size,
           "ms": round(ms, 5)}

    def baseline(op, impl):
        return _RESULTS.get(Case(case.group, op, impl, case.dtype, case.size, None).name)

    if case.group == "update":
        out["GB/s"] = round(case.bytes / ms / 1e6, 1)
        copy = baseline("copy", "copy")
        if copy:
            copy_rate = Case("update", "copy", "copy", case.dtype, case.size, None).bytes / copy
            out["of_copy"] = round(case.bytes / ms / copy_rate, 3)
        eager = baseline(case.op, "naive")
    else:
        out["rows"] = ROWS
        out["TFLOP/s"] = round(case.flops / ms / 1e9, 2)
        gemm = baseline("fwd", "gemm")
        if gemm and case.op == "fwd":
            out["of_gemm"] = round(gemm / ms, 3)
        eager = baseline(case.op, "eager")
    if eager and case.impl not in ("naive", "eager", "copy", "gemm"):
        out["speedup_vs_eager"] = round(eager / ms, 2)
    ROWS_OUT.append(out)
    return out


# ---------------------------------------------------------------------------------------- reports
def metadata() -> dict:
    import triton
    name = torch.cuda.get_device_name() if ON_CUDA else _cpu_name()
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "device": DEVICE, "device_name": name, "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
            "timing": "triton.testing.do_bench median (CUDA events, L2 flushed)" if ON_CUDA
            else "wall-clock median", "rows_linear": ROWS}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def markdown(meta: dict, rows: List[dict], skipped: List[str]) -> str:
    lines = [f"# Kernel benchmarks, {meta['device_name']}", "",
             f"{meta['date']} · torch {meta['torch']} · triton {meta['triton']} · {meta['timing']}"
             f" · {meta['cpu_threads']} CPU threads", ""]
    tables = {"update": ["op", "dtype", "size", "impl", "ms", "GB/s", "of_copy", "speedup_vs_eager"],
              "linear": ["op", "dtype", "size", "rows", "impl", "ms", "TFLOP/s", "of_gemm", "speedup_vs_eager"]}
    titles = {"update": "Leaky update (size = elements; of_copy = bandwidth / copy bandwidth)",
              "linear": "Leaky linear (size = width; of_gemm = bare GEMM time / time)"}
    for group, cols in tables.items():
        group_rows = [r for r in rows if r["group"] == group]
        if not group_rows:
            continue
        lines += [f"## {titles[group]}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in group_rows]
        lines.append("")
    if skipped:
        lines += ["Skipped: " + "; ".join(sorted(set(skipped))), ""]
    return "\n".join(lines)


_META: Dict[str, object] = {}


def write(out_dir: Path, rows: List[dict], skipped: List[str], tag: str = "") -> Path:
    if not _META:  # taken once per run
        _META.update(metadata())
    meta = _META
    out_dir.mkdir(parents=True, exist_ok=True)
    kind = "gpu" if ON_CUDA else "cpu"
    stem = out_dir / f"kernels_{kind}_{meta['date'][:10]}{'_' + tag if tag else ''}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "skipped": skipped}, indent=1))
    stem.with_suffix(".md").write_text(markdown(meta, rows, skipped))
    return stem


# ------------------------------------------------------------------------------ pytest-benchmark
try:
    import pytest
except ImportError:  # standalone use needs neither pytest nor the plugin
    pytest = None

if pytest is not None:
    _SKIPPED: List[str] = []
    CASES = cases()

    @pytest.fixture(scope="module", autouse=True)
    def _report():
        yield
        if os.environ.get("BENCH_OUT") and ROWS_OUT:
            print(f"\nwrote {write(Path(os.environ['BENCH_OUT']), ROWS_OUT, _SKIPPED)}.{{json,md}}")

    @pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
    def test_bench(benchmark, case):
        if case.skip:
            _SKIPPED.append(f"{case.impl} ({case.skip})")
            pytest.skip(case.skip)
        call = case.make()
        # on CUDA a round is enough calls to last ~2 ms, so the synchronisation is not what is timed
        calls = 1
        if ON_CUDA:
            calls = max(1, int(2.0 / max(measure_ms(call), 1e-3)))

        def rounds():
            for _ in range(calls):
                call()
            sync()

        benchmark.group = f"{case.group}-{case.op}-{case.dtype}-{case.size}"
        benchmark.pedantic(rounds, rounds=10, warmup_rounds=1, iterations=1)
        ms = benchmark.stats["median"] * 1e3 / calls if benchmark.stats else measure_ms(call)
        benchmark.extra_info.update(row(case, ms))
        assert ms > 0


# ------------------------------------------------------------------------------------ standalone
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                        help="folder for kernels_<cpu|gpu>_<date>[_<tag>].{json,md}")
    parser.add_argument("--tag", default="", help="a suffix of the file names (one table per run)")
    args = parser.parse_args(argv)
    skipped = []
    for case in cases():
        if case.skip:
            skipped.append(f"{case.impl} ({case.skip})")
            continue
        t0 = time.perf_counter()
        r = row(case, measure_ms(case.make()))
        extra = {k: v for k, v in r.items() if k not in ("group", "op", "impl", "dtype", "size", "ms")}
        print(f"{case.name:48s} {r['ms']:10.4f} ms  {json.dumps(extra)}  ({time.perf_counter() - t0:.1f}s)",
              flush=True)
        write(Path(args.out), ROWS_OUT, skipped, args.tag)  # after every row: a timeout keeps what was measured
        if ON_CUDA:
            torch.cuda.empty_cache()
    print(f"wrote {write(Path(args.out), ROWS_OUT, skipped, args.tag)}.{{json,md}}")


if __name__ == "__main__":
    main()
