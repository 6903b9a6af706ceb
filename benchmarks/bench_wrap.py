"""Time per training step of a wrapped torchvision resnet18 against the plain one (goal: <= 1.03x on CPU).

    pytest benchmarks/bench_wrap.py --benchmark-json=wrap.json -s

Setting: torchvision ``resnet18(num_classes=10)`` on a batch of ``BENCH_BATCH`` (default 16) random 3x32x32
images, SGD with momentum, cross-entropy, train mode. Three configurations:

* ``plain``: the torchvision model, untouched (the baseline);
* ``wrapped``: ``wrap(model, effective_depth=0.5)`` trained with the same SGD (fixed steps);
* ``adaptive``: the wrapped model under ``AdaptiveSteps(SGD, model, rule="equal_distance", every=10)``: one
  forward in ten records the speeds, then the steps adapt.

``test_update_op_cost`` isolates what wrapping adds to the arithmetic: the 8 residual updates of resnet18 at
this batch, forward and backward, as the plain blocks do them (``out += identity; relu``) and as the wrapped
ones do (``ops.fused_update`` with fixed steps), alternated many times, reported in ms per training step and
as a fraction of the plain step time measured in the same test. It is far steadier than the end-to-end ratio
on a busy machine.

A shared CPU drifts by more than the 3% we look for, so each benchmark times a configuration side by side with
a fresh plain baseline: single steps interleaved (the order flips every step), summed into blocks of ``EVERY``
consecutive steps of each, and puts in ``extra_info`` the median of the paired block ratios (config / plain),
their min/max, and the ratio of the median block times, by wall clock and by CPU time. pytest-benchmark's own
statistics time the configuration's blocks. Nothing here asserts a speed. Environment: ``BENCH_THREADS``
(torch threads, default 1), ``BENCH_BLOCKS`` (pairs of blocks, default 15), ``BENCH_BATCH``.
"""
import os
import statistics

import pytest
import torch
from _timing import BLOCKS, THREADS, block_sums, paired, threads, timed  # noqa: F401 - threads is a fixture

torchvision = pytest.importorskip("torchvision")

from adaptive_depth import AdaptiveSteps  # noqa: E402
from adaptive_depth.ops import fused_update  # noqa: E402
from adaptive_depth.wrap import wrap  # noqa: E402

EVERY = 10
BATCH = int(os.environ.get("BENCH_BATCH", "16"))


class Trainer:
    """One model and its optimizer; ``block()`` runs ``EVERY`` full training steps on a fixed batch."""

    def __init__(self, config: str):
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(BATCH, 3, 32, 32, generator=gen)
        self.y = torch.randint(0, 10, (BATCH,), generator=gen)
        torch.manual_seed(0)
        self.model = torchvision.models.resnet18(num_classes=10)
        if config != "plain":
            wrap(self.model, effective_depth=0.5)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        if config == "adaptive":
            self.opt = AdaptiveSteps(self.opt, self.model, rule="equal_distance", every=EVERY)
        self.model.train()

    def step(self):
        loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def block(self):
        for _ in range(EVERY):
            self.step()


def side_by_side(base: Trainer, other: Trainer, blocks: int) -> dict:
    """Interleave single steps of the two trainers (the order flips every step, so the two see the same
    machine within ~0.1 s) and compare blocks of ``EVERY`` consecutive steps each (a block of the adaptive
    trainer holds exactly one adaptation): paired ratios other / base, by wall clock and by CPU time."""
    base.block(), other.block()  # warm-up (allocator, oneDNN primitives, first adaptation)
    sb, so = [], []
    for i in range(blocks * EVERY):
        if i % 2:
            so.append(timed(other.step)), sb.append(timed(base.step))
        else:
            sb.append(timed(base.step)), so.append(timed(other.step))
    tb, to = block_sums(sb, EVERY), block_sums(so, EVERY)
    wall = paired([t[0] for t in to], [t[0] for t in tb])
    cpu = paired([t[1] for t in to], [t[1] for t in tb])
    info = {f"ratio_{k}": v for k, v in wall.items()}
    info.update({f"cpu_ratio_{k}": v for k, v in cpu.items()})
    info.update(plain_ms_per_step=1e3 * statistics.median(t[0] for t in tb) / EVERY,
                config_ms_per_step=1e3 * statistics.median(t[0] for t in to) / EVERY,
                overhead_pct=100 * (wall["median_paired"] - 1), cpu_overhead_pct=100 * (cpu["median_paired"] - 1),
                blocks=blocks, threads=THREADS, steps_per_block=EVERY, batch=BATCH, torch=torch.__version__,
                torchvision=torchvision.__version__)
    return info


@pytest.mark.parametrize("config", ["wrapped", "adaptive"])
def test_wrapped_resnet18_step(benchmark, threads, config):
    base, other = Trainer("plain"), Trainer(config)
    benchmark.extra_info.update(config=config, **side_by_side(base, other, BLOCKS))
    benchmark.pedantic(other.block, rounds=3, iterations=1, warmup_rounds=0)
    info = benchmark.extra_info
    print(f"\n{config}: {info['ratio_median_paired']:.4f}x plain per step by wall clock (paired median, blocks "
          f"{info['ratio_min']:.3f}..{info['ratio_max']:.3f}), {info['cpu_ratio_median_paired']:.4f}x by CPU time "
          f"({info['cpu_ratio_min']:.3f}..{info['cpu_ratio_max']:.3f}); plain {info['plain_ms_per_step']:.2f} ms/step")


def test_plain_resnet18_step(benchmark, threads):
    """The baseline alone."""
    base = Trainer("plain")
    base.block()
    benchmark.extra_info.update(config="plain", threads=THREADS, steps_per_block=EVERY, batch=BATCH)
    benchmark.pedantic(base.block, rounds=5, iterations=1, warmup_rounds=0)


# the residual adds of resnet18 on 3x32x32 inputs: (channels, side) of its 8 blocks
_ADDS = [(64, 8)] * 2 + [(128, 4)] * 2 + [(256, 2)] * 2 + [(512, 1)] * 2


def _plain_adds(tensors):
    for x, f, g in tensors:
        x, f = x.detach().requires_grad_(True), f.detach().requires_grad_(True)
        out = f * 1.0  # the branch output the plain block adds into (a fresh tensor, like bn2's output)
        out += x
        torch.relu_(out).backward(g)


def _leaky_adds(tensors, a=torch.tensor(0.5), b=torch.tensor(1.0), lt=torch.tensor(0.5)):
    for x, f, g in tensors:
        x, f = x.detach().requires_grad_(True), f.detach().requires_grad_(True)
        out = f * 1.0
        fused_update(x, out, a, b, lt, relu=True)[0].backward(g)


def test_update_op_cost(benchmark, threads):
    gen = torch.Generator().manual_seed(0)
    tensors = [tuple(torch.randn(BATCH, c, s, s, generator=gen) for _ in range(3)) for c, s in _ADDS]
    reps = 20
    plain_t, leaky_t = [], []
    _plain_adds(tensors), _leaky_adds(tensors)
    for i in range(10 * BLOCKS):
        order = (_plain_adds, _leaky_adds) if i % 2 else (_leaky_adds, _plain_adds)
        for fn in order:
            t = timed(lambda: [fn(tensors) for _ in range(reps)])[1] / reps
            (plain_t if fn is _plain_adds else leaky_t).append(t)
    base = Trainer("plain")
    base.block()
    step = statistics.median(timed(base.block)[1] for _ in range(3)) / EVERY
    plain_ms, leaky_ms = 1e3 * statistics.median(plain_t), 1e3 * statistics.median(leaky_t)
    benchmark.extra_info.update(
        config="update_op", plain_adds_ms_per_step=plain_ms, leaky_updates_ms_per_step=leaky_ms,
        extra_ms_per_step=leaky_ms - plain_ms, plain_step_cpu_ms=1e3 * step,
        extra_fraction_of_step=(leaky_ms - plain_ms) / (1e3 * step), batch=BATCH, threads=THREADS,
        torch=torch.__version__, torchvision=torchvision.__version__)
    benchmark.pedantic(lambda: _leaky_adds(tensors), rounds=20, iterations=1, warmup_rounds=1)
    info = benchmark.extra_info
    print(f"\nupdate op: plain adds {plain_ms:.3f} ms/step, leaky updates {leaky_ms:.3f} ms/step: "
          f"+{info['extra_ms_per_step']:.3f} ms = {100 * info['extra_fraction_of_step']:.2f}% of a "
          f"{1e3 * step:.1f} ms plain step (CPU time)")
