"""Side-by-side timing helpers shared by the training-step benchmarks.

A shared CPU drifts by more than the few percent these benchmarks look for, so two configurations are
timed alternately and compared by paired ratios; with one torch thread the process's CPU time is far less
disturbed by other jobs than the wall clock, so both are reported.
"""
import os
import statistics
import time

import pytest
import torch

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


@pytest.fixture
def threads():
    """Run a benchmark with ``BENCH_THREADS`` torch threads (default 1), restoring the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield THREADS
    torch.set_num_threads(before)
