"""DistributedDataParallel with the AdaptiveSteps plugin on a wrapped ResNet: 2 CPU processes (gloo), launched by
the test with ``torchrun`` (``python -m torch.distributed.run``), the command a user runs.

The worker (this file run as a script) trains a wrapped torchvision ResNet for a few steps (each accumulating
two micro-batches, whose statistics DDP must not overwrite with rank 0's) with adaptation every 2 steps,
checks after every step that all ranks hold bit-identical steps and weights, and rank 0 also trains the same
model in one process on the concatenated batch. That comparison uses GroupNorm: BatchNorm's batch statistics
over a rank's half batch differ from those over the whole batch, so a BN model is only checked for identical
ranks.
"""
import json
import sys
from pathlib import Path

import pytest
import torch
from _torchrun import run_two_ranks, shut_down

STEPS, EVERY, BATCH, MICRO = 6, 2, 8, 2


def _model(norm: str):
    from torchvision.models.resnet import BasicBlock, ResNet
    from adaptive_depth.wrap import wrap
    torch.manual_seed(0)
    norm_layer = (lambda c: torch.nn.GroupNorm(4, c)) if norm == "group" else None
    return wrap(ResNet(BasicBlock, [2, 2, 1, 1], num_classes=5, norm_layer=norm_layer), effective_depth=0.5)


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, 5, (BATCH,), generator=g))
            for _ in range(STEPS)]


def _train(model, opt, data, shard=None, after_step=None):
    """Each step accumulates two micro-batches (two forwards record statistics before one adaptation)."""
    from torch.nn.functional import cross_entropy
    for x, y in data:
        if shard is not None:
            x, y = x[shard], y[shard]
        for xm, ym in zip(x.chunk(MICRO), y.chunk(MICRO)):
            (cross_entropy(model(xm), ym) / MICRO).backward()
        opt.step()
        opt.zero_grad()
        if after_step is not None:
            after_step()


def _flat(model):
    from adaptive_depth import step_sizes
    return torch.cat([s.double() for s in step_sizes(model)]), \
        torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])


def _worker(out_path: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from adaptive_depth import AdaptiveSteps

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    report = {"world": world}
    for norm in ("group", "batch"):
        model = _model(norm)
        ddp = DDP(model)
        opt = AdaptiveSteps(torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9), ddp, every=EVERY,
                            smoothing=0.0)
        identical = []

        def check_ranks():
            steps, params = _flat(model)
            gathered = [torch.empty_like(steps) for _ in range(world)]
            dist.all_gather(gathered, steps)
            gathered_p = [torch.empty_like(params) for _ in range(world)]
            dist.all_gather(gathered_p, params)
            identical.append(all(torch.equal(g, gathered[0]) for g in gathered) and
                             all(torch.equal(p, gathered_p[0]) for p in gathered_p))

        _train(ddp, opt, _data(), shard, check_ranks)
        steps, params = _flat(model)
        entry = {"ranks_identical": identical, "adaptations": opt.steps_done // EVERY,
                 "steps": steps.tolist(), "uniform": bool(torch.all(steps == 1.0))}
        if norm == "group" and rank == 0:
            single = _model(norm)
            single_opt = AdaptiveSteps(torch.optim.SGD(single.parameters(), lr=0.1, momentum=0.9), single,
                                       every=EVERY, smoothing=0.0, sync=False)  # one process: no all-reduce
            _train(single, single_opt, _data())
            ref_steps, ref_params = _flat(single)
            entry["steps_diff"] = (steps - ref_steps).abs().max().item()
            entry["params_diff"] = (params - ref_params).abs().max().item()
            entry["params_scale"] = ref_params.abs().max().item()
        report[norm] = entry
    if rank == 0:
        Path(out_path).write_text(json.dumps(report))
    del ddp, opt, model
    shut_down()


def test_ddp_two_processes_with_adaptation(tmp_path):
    pytest.importorskip("torchvision")
    report = run_two_ranks(__file__, tmp_path / "ddp.json", timeout=180)
    assert report["world"] == 2
    for norm in ("group", "batch"):
        entry = report[norm]
        assert len(entry["ranks_identical"]) == STEPS and all(entry["ranks_identical"]), (norm, entry)
        assert entry["adaptations"] == STEPS // EVERY
        assert not entry["uniform"], (norm, entry["steps"])  # the steps did adapt
    group = report["group"]
    assert group["steps_diff"] <= 1e-5, group
    assert group["params_diff"] <= 1e-5 * max(1.0, group["params_scale"]), group


if __name__ == "__main__":
    _worker(sys.argv[1])
