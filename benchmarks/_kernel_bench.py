"""What the kernel-op benchmarks share: ``bench_leaky_update.py`` and ``bench_leaky_linear.py`` each define
their cases and their table; ``bench_kernels.py`` runs both into one table file.

Here: the settings read from the environment (device, dtypes, implementations), a benchmark ``Case``, the
rows and the tables they report (markdown and JSON, ``kernels_<cpu|gpu>_<date>[_<tag>]``), the
pytest-benchmark test a module collects, and the standalone command line. Standalone use needs neither
pytest nor its plugin.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout works without an install
from adaptive_depth import ops  # noqa: E402
from _timing import measure_ms as _measure_ms, sync as _sync  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE = os.environ.get("BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.startswith("cuda")
LT = 2.0  # effective depth; rho = 0.1
if not ON_CUDA:  # one thread by default: stable numbers on a shared machine (threads waiting at barriers
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS") or 1))  # for a descheduled peer time nothing)
BENCH_DTYPES = (os.environ.get("BENCH_DTYPES") or "bf16,fp32").split(",")
IMPLS = set((os.environ.get("BENCH_IMPLS") or "copy,naive,reference,compiled,triton,gemm,eager,triton_gemm").split(","))


def numbers(text: str) -> List[int]:
    """``"64K,1M,256"`` -> ``[65536, 1048576, 256]`` (K, M, G are powers of two)."""
    units = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}
    return [int(float(v[:-1]) * units[v[-1].upper()]) if v[-1].upper() in units else int(v)
            for v in text.replace(" ", "").split(",") if v]


def triton_skip() -> Optional[str]:
    """Why the Triton rows cannot run here, or None."""
    if not ON_CUDA:
        return "Triton rows need a CUDA GPU (under TRITON_INTERPRET the kernels run for correctness only)"
    if not ops.triton_available():
        return "the Triton kernels do not import here"
    return None


def sync() -> None:
    _sync(ON_CUDA)


def measure_ms(call: Callable) -> float:
    """Median milliseconds of one call on the benchmark's device (see ``_timing.measure_ms``)."""
    return _measure_ms(call, ON_CUDA)


# ------------------------------------------------------------------------------------------ cases
def case_name(group: str, op: str, impl: str, dtype: str, size: int) -> str:
    return f"{group}-{op}-{dtype}-{size}-{impl}"


@dataclass
class Case:
    group: str  # the op's table: "update" or "linear"
    op: str  # "fwd", "bwd", ...: what is timed
    impl: str
    dtype: str
    size: int  # elements (update) or width (linear)
    make: Callable[[], Callable[[], object]]  # builds the inputs, returns the timed call (warmed up)
    skip: Optional[str] = None

    @property
    def name(self) -> str:
        return case_name(self.group, self.op, self.impl, self.dtype, self.size)


_COMPILED: Dict[str, Callable] = {}


def compiled(key: str, fn: Callable) -> Callable:
    """One compiled function per kind, dynamic in the sizes (a recompile per dtype, not per size)."""
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, dynamic=True)
    return _COMPILED[key]


def selected(cases: Sequence[Case]) -> List[Case]:
    """The cases whose implementation ``BENCH_IMPLS`` names."""
    return [c for c in cases if c.impl in IMPLS]


# ------------------------------------------------------------------------------------------ tables
@dataclass(frozen=True)
class Table:
    """An op's table: its columns, and ``derive(case, ms, baseline)``, the numbers of a row beyond the time,
    where ``baseline(op, impl)`` is the time of another row of the same dtype and size in this run (or
    None). Rows get ``speedup_vs_eager`` against the ``eager`` implementation, except ``plain`` ones;
    ``meta`` joins the run's metadata."""
    group: str
    title: str
    columns: Sequence[str]
    derive: Callable[[Case, float, Callable[[str, str], Optional[float]]], dict]
    eager: str
    plain: Sequence[str]
    meta: Dict[str, object] = field(default_factory=dict)


TABLES: Dict[str, Table] = {}  # group -> table
_RESULTS: Dict[str, float] = {}  # name -> ms, this run
ROWS_OUT: List[dict] = []
SKIPPED: List[str] = []


def register(table: Table) -> Table:
    TABLES[table.group] = table
    return table


def row(case: Case, ms: float) -> dict:
    """The reported numbers of one case; the baselines (copy, eager, GEMM) come from this run."""
    _RESULTS[case.name] = ms
    table = TABLES[case.group]
    out = {"group": case.group, "op": case.op, "impl": case.impl, "dtype": case.dtype, "size": case.size,
           "ms": round(ms, 5)}

    def baseline(op, impl):
        return _RESULTS.get(case_name(case.group, op, impl, case.dtype, case.size))

    out.update(table.derive(case, ms, baseline))
    eager = baseline(case.op, table.eager)
    if eager and case.impl not in table.plain:
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
            else "wall-clock median", **{k: v for t in TABLES.values() for k, v in t.meta.items()}}


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
    for group in dict.fromkeys(r["group"] for r in rows):  # the tables in the order of their first rows
        group_rows = [r for r in rows if r["group"] == group]
        cols = list(TABLES[group].columns)
        lines += [f"## {TABLES[group].title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in group_rows]
        lines.append("")
    if skipped:
        lines += ["Skipped: " + "; ".join(sorted(set(skipped))), ""]
    return "\n".join(lines)


_META: Dict[str, object] = {}


def write(out_dir: Path, rows: List[dict], skipped: List[str], tag: str = "") -> Path:
    """``kernels_<cpu|gpu>_<date>[_<tag>].{json,md}`` in ``out_dir``; returns the path without suffix."""
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
def pytest_suite(cases: Sequence[Case]):
    """``(report, test_bench)`` for a benchmark module to bind at its top level: a module fixture that
    writes the tables to ``BENCH_OUT`` when set, and the benchmark test parametrised over ``cases``."""
    import pytest

    @pytest.fixture(scope="module", autouse=True)
    def report():
        yield
        if os.environ.get("BENCH_OUT") and ROWS_OUT:
            print(f"\nwrote {write(Path(os.environ['BENCH_OUT']), ROWS_OUT, SKIPPED)}.{{json,md}}")

    @pytest.mark.parametrize("case", cases, ids=[c.name for c in cases])
    def test_bench(benchmark, case):
        if case.skip:
            SKIPPED.append(f"{case.impl} ({case.skip})")
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

    return report, test_bench


def have_pytest() -> bool:
    try:
        import pytest  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------ standalone
def main(cases: Sequence[Case], doc: str, argv=None) -> None:
    """Time ``cases`` one after the other, writing the tables after every row (a timeout keeps what was
    measured)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                        help="folder for kernels_<cpu|gpu>_<date>[_<tag>].{json,md}")
    parser.add_argument("--tag", default="", help="a suffix of the file names (one table per run)")
    args = parser.parse_args(argv)
    skipped = []
    for case in cases:
        if case.skip:
            skipped.append(f"{case.impl} ({case.skip})")
            continue
        t0 = time.perf_counter()
        r = row(case, measure_ms(case.make()))
        extra = {k: v for k, v in r.items() if k not in ("group", "op", "impl", "dtype", "size", "ms")}
        print(f"{case.name:48s} {r['ms']:10.4f} ms  {json.dumps(extra)}  ({time.perf_counter() - t0:.1f}s)",
              flush=True)
        write(Path(args.out), ROWS_OUT, skipped, args.tag)
        if ON_CUDA:
            torch.cuda.empty_cache()
    print(f"wrote {write(Path(args.out), ROWS_OUT, skipped, args.tag)}.{{json,md}}")
