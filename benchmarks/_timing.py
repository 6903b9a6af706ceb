"""Timing helpers shared by the benchmarks.

Training steps (``bench_steps.py``, ``bench_wrap.py``): a shared CPU drifts by more than the few percent these
benchmarks look for, so two configurations are timed alternately and compared by paired ratios; with one
torch thread the process's CPU time is far less disturbed by other jobs than the wall clock, so both are
reported. Kernel ops (``bench_leaky_update.py``, ``bench_leaky_linear.py``): ``measure_ms``, a median of one
call, with CUDA events on a GPU. Standalone use needs no pytest (the ``threads`` fixture is then absent).
"""
import os
import statistics
import time
from typing import Callable

import torch

try:
    import pytest
except ImportError:  # the standalone kernel benchmarks run without pytest
    pytest = None

THREADS = int(os.environ.get("BENCH_THREADS", "1"))
BLOCKS = int(os.environ.get("BENCH_BLOCKS", "15"))


def timed(fn):
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def block_sums(times, size: int) -> list:
    """Per-step timings (numbers, or tuples such as ``timed``'s) summed over consecutive blocks of ``size``
    steps; a trailing partial block is dropped."""
    blocks = [times[j:j + size] for j in range(0, len(times) - len(times) % size, size)]
    if times and isinstance(times[0], tuple):
        return [tuple(map(sum, zip(*b))) for b in blocks]
    return [sum(b) for b in blocks]


def paired(other, base) -> dict:
    """Median, min and max of the paired ratios other / base, and the ratio of the medians."""
    ratios = [o / b for o, b in zip(other, base)]
    return {"median_paired": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "of_medians": statistics.median(other) / statistics.median(base)}


def sync(cuda: bool) -> None:
    """Wait for the GPU's queued work (nothing to wait for on the CPU)."""
    if cuda:
        torch.cuda.synchronize()


def measure_ms(call: Callable, cuda: bool) -> float:
    """Median milliseconds of one call: CUDA-event timings with the L2 flushed (do_bench) on CUDA,
    wall-clock medians of at least 5 calls (about 0.5 s) on the CPU."""
    if cuda:
        import triton.testing
        return float(triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median"))
    times = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < 0.5 and len(times) < 50):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


if pytest is not None:
    @pytest.fixture
    def threads():
        """Run a benchmark with ``BENCH_THREADS`` torch threads (default 1), restoring the setting after."""
        before = torch.get_num_threads()
        torch.set_num_threads(THREADS)
        yield THREADS
        torch.set_num_threads(before)
