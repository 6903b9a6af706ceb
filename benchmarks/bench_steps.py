"""Time per training step: uniform steps against each adaptive rule (the adaptation's overhead).

    pytest benchmarks/bench_steps.py --benchmark-json=bench.json       # then: adaptive-depth bench --json bench.json

The setting is the paper's: ``LeakyMLP`` 30 -> 100 x 20 blocks -> 30, 1000 examples full batch, Lt = 10
(exponential scheme), Adam, the plugin with the rho-scaled decay, and each rule at its default settings
(``every=10``: one adaptation per 10 steps). Uniform steps run through the same plugin (``rule="fixed"``), so
the ratio isolates the adaptation: the speed recording in the forward pass, ``adapt`` and the decay
coefficients.

A shared CPU drifts by far more than 2% over seconds, so each benchmark times the two configurations side
by side: blocks of ``every`` steps, alternating uniform and adaptive, and reports in ``extra_info`` the median
of the paired block ratios (adaptive / uniform), its min/max, and the ratio of the median block times, each
in the process's CPU time (``cpu_*``; ``overhead_pct`` is its paired median, in percent) and in wall time
(``wall_*``). With one thread, CPU time is far less disturbed by other jobs on the machine.
pytest-benchmark's own statistics time the adaptive configuration's blocks. Nothing here asserts a speed.
Environment: ``BENCH_THREADS`` (torch threads, default 1), ``BENCH_BLOCKS`` (pairs of blocks, default 15).
"""
import statistics

import pytest
import torch
from _timing import BLOCKS, THREADS, paired, threads, timed  # noqa: F401 - threads is a fixture

from adaptive_depth import AdaptiveSteps, LeakyMLP

RULES = ("equal_distance", "paper", "weight_norm", "learned")
EVERY = 10


class Trainer:
    """One model and its optimizer; ``block()`` runs ``EVERY`` full training steps."""

    def __init__(self, rule: str, *, lt: float = 10.0, width: int = 100, depth: int = 20, n: int = 1000):
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 30, generator=gen)
        self.y = torch.randn(n, 30, generator=gen)
        torch.manual_seed(0)
        self.model = LeakyMLP(30, 30, width, depth, effective_depth=lt, scheme="exponential")
        inner = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.opt = AdaptiveSteps(inner, self.model, rule=rule, every=EVERY, weight_decay=1e-3 / lt)

    def step(self):
        loss = (self.model(self.x) - self.y).pow(2).sum(1).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def block(self):
        for _ in range(EVERY):
            self.step()


def _paired(other, base, prefix: str) -> dict:
    info = {f"{prefix}ratio_{k}": v for k, v in paired(other, base).items()}
    return {**info, f"{prefix}uniform_ms_per_step": 1e3 * statistics.median(base) / EVERY,
            f"{prefix}adaptive_ms_per_step": 1e3 * statistics.median(other) / EVERY,
            f"{prefix}overhead_pct": 100 * (info[f"{prefix}ratio_median_paired"] - 1)}


def side_by_side(base: Trainer, other: Trainer, blocks: int) -> dict:
    """Alternate blocks of the two trainers (the order flips every pair); paired ratios other / base, in
    CPU time (keys ``cpu_*``, the headline ``overhead_pct``) and in wall time (``wall_*``)."""
    base.block(), other.block()  # warm-up (allocator, first adaptation, fast start)
    tb, to = [], []
    for i in range(blocks):
        if i % 2:
            to.append(timed(other.block)), tb.append(timed(base.block))
        else:
            tb.append(timed(base.block)), to.append(timed(other.block))
    cpu = _paired([t[1] for t in to], [t[1] for t in tb], "cpu_")
    return {**cpu, **_paired([t[0] for t in to], [t[0] for t in tb], "wall_"),
            "overhead_pct": cpu["cpu_overhead_pct"], "blocks": blocks, "threads": THREADS,
            "steps_per_block": EVERY}


@pytest.mark.parametrize("rule", RULES)
def test_adaptation_overhead(benchmark, threads, rule):
    base, other = Trainer("fixed"), Trainer(rule)
    benchmark.extra_info.update(rule=rule, **side_by_side(base, other, BLOCKS))
    benchmark.pedantic(other.block, rounds=3, iterations=1, warmup_rounds=0)
    info = benchmark.extra_info
    print(f"\n{rule}: {info['overhead_pct']:+.2f}% CPU time per step (paired median, blocks "
          f"{info['cpu_ratio_min']:.3f}..{info['cpu_ratio_max']:.3f}; wall {info['wall_overhead_pct']:+.2f}%), "
          f"uniform {info['cpu_uniform_ms_per_step']:.2f} ms/step")


def test_uniform_step(benchmark, threads):
    """The baseline alone: one block of uniform steps through the plugin."""
    base = Trainer("fixed")
    base.block()
    benchmark.extra_info.update(rule="uniform", threads=THREADS, steps_per_block=EVERY)
    benchmark.pedantic(base.block, rounds=5, iterations=1, warmup_rounds=0)
