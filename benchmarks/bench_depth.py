"""The cost of one ``refine()`` (uniform doubling) with the optimizer updated, against one training step.

    pytest benchmarks/bench_depth.py --benchmark-json=depth.json

``LeakyMLP`` 30 -> 100 x 8 blocks -> 30 trained by AdamW (state copied to the new blocks) and the
``AdaptiveSteps`` plugin; each round refines a freshly trained model (built in the untimed setup). ``extra_info`` holds
the median time of one training step of the refined (16-block) model on 256 examples, for scale. Nothing
here asserts a speed.
"""
import statistics
import time

import pytest
import torch

from adaptive_depth import AdaptiveSteps, LeakyMLP
from adaptive_depth.depth import refine


def _trained():
    torch.manual_seed(0)
    model = LeakyMLP(30, 30, 100, 8, effective_depth=2.0, scheme="exponential")
    opt = AdaptiveSteps(torch.optim.AdamW(model.parameters(), lr=1e-3), model)
    x, y = torch.randn(256, 30), torch.randn(256, 30)
    for _ in range(3):
        (model(x) - y).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt, x, y


@pytest.mark.parametrize("state", ["copy", "fresh"])
def test_refine_cost(benchmark, state):
    torch.set_num_threads(1)

    def setup():
        return (_trained(),), {}

    def grow(pack):
        model, opt, _, _ = pack
        refine(model, opt, state=state)

    benchmark.pedantic(grow, setup=setup, rounds=10)
    model, opt, x, y = _trained()
    refine(model, opt, state=state)
    times = []
    for _ in range(10):
        t = time.perf_counter()
        (model(x) - y).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    benchmark.extra_info["train_step_s_median"] = statistics.median(times)
    assert model.depth == 16
