"""Adaptive depth (issue 12): refine / coarsen step groups in place, with the optimizer, schedulers, resume,
DDP and Lightning. References are float64 formulas written out here."""
import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from _torchrun import run_two_ranks, shut_down
from torch import nn

from adaptive_depth import AdaptiveSteps, LeakyMLP, LeakyResNet
from adaptive_depth.depth import (DepthScheduler, _allocate, coarsen, depths, measure_distances, refine,
                                  refine_plan)
from adaptive_depth.residual import MLPBranch

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _conv_net(depth=2, lt=0.0, scheme="euler", activation=None, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    blocks = [nn.Sequential(nn.ReLU(), nn.Conv1d(8, 8, 3, padding=1), nn.GroupNorm(2, 8)) for _ in range(depth)]
    return LeakyResNet(blocks, effective_depth=lt, scheme=scheme, activation=activation).to(dtype)


def _randomize_affine(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("activation", [None, "relu"])
def test_zero_insert_exact_at_lt0_conv(activation):
    net = _conv_net(depth=3, activation=activation)
    _randomize_affine(net)
    x = torch.randn(5, 8, 16)
    before = net(x)
    refine(net, init="zero")
    assert net.depth == 6
    after = net(x)
    assert torch.equal(before, after)  # bit for bit: the split is by powers of two
    rho = net.steps.rho.double()
    assert math.isclose(float(rho.sum()), 1.0, rel_tol=1e-6)


def test_zero_insert_exact_at_lt0_mlp():
    torch.manual_seed(1)
    net = LeakyMLP(6, 3, width=10, depth=2, effective_depth=0.0)
    x = torch.randn(7, 6)
    before = net(x)
    refine(net, init="zero")
    assert net.depth == 4 and torch.equal(net(x), before)


@pytest.mark.parametrize("factor", [2, 3])
@pytest.mark.parametrize("lt", [0.5, 3.0])
def test_zero_insert_exponential_exact_to_fp(lt, factor):
    """exp(-a Lt) exp(-b Lt) = exp(-(a+b) Lt): a zero block after a rescaled one reproduces the original step."""
    net = _conv_net(depth=2, lt=lt, scheme="exponential", dtype=torch.float64)
    _randomize_affine(net)
    x = torch.randn(4, 8, 12, dtype=torch.float64)
    before = net(x)
    refine(net, init="zero", factor=factor)
    assert net.depth == 2 * factor
    torch.testing.assert_close(net(x), before, rtol=1e-12, atol=1e-12)


def _identity_net(lt, scheme, norm, depth=3):
    """A float64 conv LeakyResNet with branch_identity, r and the gain moved away from their inits."""
    torch.manual_seed(3)
    blocks = [nn.Sequential(nn.ReLU(), nn.Conv1d(4, 4, 3, padding=1), nn.GroupNorm(2, 4)) for _ in range(depth)]
    steps = [0.05, 0.1, 0.05][:depth] if scheme == "euler" else [0.3, 0.5, 0.2][:depth]
    net = LeakyResNet(blocks, effective_depth=lt, steps=steps, total_time=sum(steps), scheme=scheme,
                      branch_norm=norm, branch_gain=1.5 if norm else None, branch_identity=True).double()
    _randomize_affine(net)
    with torch.no_grad():
        for blk in net.blocks:
            blk.identity.uniform_(0.2, 1.5)
            if norm:
                blk.gain.uniform_(0.5, 2.0)
    return net


@pytest.mark.parametrize("pieces", [None, [[3, 1, 2]]])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("scheme,lt", [("euler", 2.5), ("exponential", 2.5), ("exponential", 8.0),
                                       ("exponential", 0.0)])
def test_zero_insert_exact_with_branch_identity(scheme, lt, norm, pieces):
    """With the leak cancelled, a zero copy (g = 0, r = 1) is the identity under both schemes, and the kept block
    at rho / n keeps its map once its g (or last layer) and r - 1 are scaled by b(rho) / b(rho / n)."""
    net = _identity_net(lt, scheme, norm)
    x = torch.randn(4, 4, 10, dtype=torch.float64)
    before = net(x)
    rho, r_before = net.steps.rho.tolist(), [b.identity.item() for b in net.blocks]
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    n = [2, 2, 2] if pieces is None else pieces[0]
    refine(net, opt, init="zero", pieces=pieces)  # pieces=None: uniform doubling
    torch.testing.assert_close(net(x), before, rtol=1e-12, atol=1e-12)
    kept = [sum(n[:l]) for l in range(3)]
    for l, i in enumerate(kept):  # r - 1 scaled by b(rho) / b(rho / n), written out
        if scheme == "euler" or lt == 0:
            s = n[l]
        else:
            s = (1 - math.exp(-rho[l] * lt)) / (1 - math.exp(-rho[l] * lt / n[l]))
        assert math.isclose(net.blocks[i].identity.item(), 1 + s * (r_before[l] - 1), rel_tol=1e-12)
    new = [i for i in range(net.depth) if i not in kept]
    assert [net.blocks[i].identity.item() for i in new] == [1.0] * len(new)
    for i in new:  # each new block alone is the identity map
        h = torch.randn(2, 4, 10, dtype=torch.float64)
        torch.testing.assert_close(net.blocks[i](h), h, rtol=1e-12, atol=1e-12)
    net(x).sum().backward()  # the optimizer follows the new blocks
    opt.step()
    assert all(p in opt.state for p in net.parameters() if p.grad is not None)


def test_zero_insert_with_branch_identity_wrapped_torchvision_stage():
    models = pytest.importorskip("torchvision.models")
    from adaptive_depth import wrap
    torch.manual_seed(4)
    model = wrap(models.resnet18(num_classes=5), effective_depth=3.0, scheme="exponential", branch_identity=True)
    model = model.double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("leaky_identity"):
                p.uniform_(0.3, 1.4)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    before = model(x)
    refine(model, init="zero")
    torch.testing.assert_close(model(x), before, rtol=1e-10, atol=1e-10)


def _zero_branch_net(lt, scheme, depth=2):
    net = LeakyResNet([MLPBranch(6).double() for _ in range(depth)], effective_depth=lt, scheme=scheme,
                      steps=[0.25, 0.75][:depth] if depth == 2 else "uniform")
    with torch.no_grad():
        for b in net.blocks:
            b.block.linear.weight.zero_()
            b.block.linear.bias.zero_()
    return net.double()  # steps in float64 too: the identities below hold to float64 rounding


def test_copy_split_of_zero_branch_exact_under_exponential():
    net = _zero_branch_net(2.0, "exponential")
    x = torch.randn(5, 6, dtype=torch.float64)
    before = net(x)
    refine(net, init="copy")
    torch.testing.assert_close(net(x), before, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(before, x * math.exp(-2.0), rtol=1e-12, atol=1e-12)


def test_copy_split_under_euler_changes_by_the_known_amount():
    """Euler cannot be exact at Lt > 0: (1 - rho Lt / 2)^2 - (1 - rho Lt) = (rho Lt / 2)^2 per block."""
    lt = 1.0
    net = _zero_branch_net(lt, "euler")
    x = torch.randn(5, 6, dtype=torch.float64)
    refine(net, init="copy")
    expected = x * (1 - 0.125 * lt) ** 2 * (1 - 0.375 * lt) ** 2
    torch.testing.assert_close(net(x), expected, rtol=1e-12, atol=1e-12)
    change = (net(x) - x * (1 - 0.25 * lt) * (1 - 0.75 * lt)).abs()
    assert change.max() > 1e-3  # not exact, and the formula above says by how much


def test_copy_split_change_is_bounded_at_lt0():
    """x + rho f(x) -> two half steps: |change| = rho/2 |f(x + rho/2 f(x)) - f(x)| <= (rho/2)^2 Lip(f) |f(x)|,
    Lip(f) <= ||W||_2 for f = W relu(.) + b."""
    torch.manual_seed(3)
    net = LeakyResNet([MLPBranch(6).double()], total_time=0.8)
    x = torch.randn(9, 6, dtype=torch.float64)
    w, bias = net.blocks[0].block.linear.weight.detach().clone(), net.blocks[0].block.linear.bias.detach().clone()
    f = torch.relu(x) @ w.T + bias
    before = net(x)
    torch.testing.assert_close(before, x + 0.8 * f)
    refine(net, init="copy")
    change = (net(x) - before).norm(dim=1)
    bound = 0.4 ** 2 * torch.linalg.matrix_norm(w, 2) * f.norm(dim=1)
    assert (change <= bound * (1 + 1e-9)).all()
    assert change.max() > 0


# ------------------------------------------------------------------------------------------ refinement
def test_uniform_refine_steps_and_blocks():
    net = _conv_net(depth=2)
    net.steps.set_steps([0.25, 0.75])
    first = net.blocks[0]
    refine(net, factor=3)
    assert net.depth == 6 and depths(net) == [6]
    torch.testing.assert_close(net.steps.rho.double(), torch.tensor([0.25 / 3] * 3 + [0.25] * 3,
                                                                    dtype=torch.float64), rtol=1e-6, atol=0)
    assert net.blocks[0] is first
    assert [b.index for b in net.blocks] == list(range(6))
    for b in net.blocks[1:3]:  # copies of block 0 with their own parameters
        assert b._group is net.steps
        for p, q in zip(b.parameters(), first.parameters()):
            assert torch.equal(p, q) and p is not q
    assert net.steps.velocity_sq.shape == (6,)
    net(torch.randn(2, 8, 5)).sum().backward()  # trains


def test_interpolate_init_and_copied_state():
    net = _conv_net(depth=2)
    _randomize_affine(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    _train(net, opt, torch.randn(3, 8, 5))
    b0, b1 = [dict(b.named_parameters()) for b in net.blocks]
    s0 = {k: {n: v.clone() for n, v in opt.state[p].items()} for k, p in b0.items()}
    s1 = {k: {n: v.clone() for n, v in opt.state[p].items()} for k, p in b1.items()}
    want = {k: (b0[k].detach().double() + b1[k].detach().double()) / 2 for k in b0}
    last = {k: b1[k].detach().clone() for k in b1}
    refine(net, opt, init="interpolate", state="copy")
    mid, end = dict(net.blocks[1].named_parameters()), dict(net.blocks[3].named_parameters())
    for k in want:  # the piece between blocks 0 and 1 sits halfway; the last block has no next: a copy
        torch.testing.assert_close(mid[k].double(), want[k], rtol=0, atol=1e-6)
        assert torch.equal(end[k], last[k])
        torch.testing.assert_close(opt.state[mid[k]]["exp_avg"].double(),
                                   (s0[k]["exp_avg"].double() + s1[k]["exp_avg"].double()) / 2, rtol=0, atol=1e-7)


def test_coarsen_drop_keeps_the_larger_step():
    net = _conv_net(depth=2)
    net.steps.set_steps([0.3, 0.7])
    kept = [p.detach().clone() for p in net.blocks[1].parameters()]
    coarsen(net, to=1, how="drop", inputs=torch.randn(2, 8, 5))
    assert net.depth == 1 and all(torch.equal(p, q) for p, q in zip(net.blocks[0].parameters(), kept))
    assert math.isclose(float(net.steps.rho), 1.0, rel_tol=1e-6)


def test_allocate_equidistributes():
    assert _allocate(torch.tensor([1.0, 1.0, 1.0]), [True] * 3, 6) == [2, 2, 2]
    assert _allocate(torch.tensor([5.0, 1.0]), [True, True], 4) == [3, 1]
    assert _allocate(torch.tensor([5.0, 1.0]), [False, True], 4) == [1, 3]
    # the largest distance per piece after allocation is as small as any allocation allows (brute force)
    d = torch.tensor([0.3, 2.0, 0.9, 1.4])
    n = _allocate(d, [True] * 4, 9)
    import itertools
    best = min(max(float(d[i]) / c[i] for i in range(4))
               for c in itertools.product(range(1, 7), repeat=4) if sum(c) == 9)
    assert max(float(d[i]) / n[i] for i in range(4)) == pytest.approx(best)


def test_adaptive_refine_splits_the_fast_blocks():
    torch.manual_seed(0)
    net = LeakyResNet([MLPBranch(6) for _ in range(3)])
    with torch.no_grad():
        net.blocks[1].block.linear.weight.mul_(20.0)  # block 1 moves the representation most
    x = torch.randn(64, 6)
    # independent distances: rho_l ||f_l(x_l)|| / ||x_l|| with Lt = 0
    ref, h = [], x
    a, b = net.steps.coefficients()
    for l, blk in enumerate(net.blocks):
        with torch.no_grad():
            f = blk.block(h)
        ref.append(float(net.steps.rho[l]) * float(f.norm() / h.norm()))  # no grad: rho is fixed
        h = h + float(b[l]) * f
    got = measure_distances(net, x)[0]
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64), rtol=1e-4, atol=0)
    plan = refine_plan(net, how="adaptive", factor=2, inputs=x)
    assert plan["pieces"] == [_allocate(torch.tensor(ref), [True] * 3, 6)]
    assert plan["pieces"][0][1] == max(plan["pieces"][0])
    refine(net, how="adaptive", inputs=x)
    assert net.depth == 6 and math.isclose(float(net.steps.rho.double().sum()), 1.0, rel_tol=1e-6)


def test_adaptive_needs_measurements():
    net = _conv_net()
    with pytest.raises(ValueError, match="inputs"):
        refine(net, how="adaptive")


def test_measure_distances_leaves_model_untouched():
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.ReLU(), nn.Conv1d(4, 4, 3, padding=1), nn.BatchNorm1d(4)) for _ in range(2)]
    net = LeakyResNet(blocks).eval()
    before = _state(net)
    measure_distances(net, torch.randn(8, 4, 6))
    assert not net.training and _same_state(before, _state(net))
    assert float(net.steps.count.sum()) == 0


@pytest.mark.parametrize("bad, match", [(dict(how="both"), "how"), (dict(factor=1), "factor"),
                                        (dict(factor=2.0), "factor"), (dict(init="noise"), "init"),
                                        (dict(state="old"), "state")])
def test_refine_bad_arguments(bad, match):
    net = _conv_net()
    before = _state(net)
    with pytest.raises(ValueError, match=match):
        refine(net, **bad)
    assert _same_state(before, _state(net)) and net.depth == 2


def test_failed_refine_leaves_model_and_optimizer_as_they_were():
    torch.manual_seed(0)
    net = LeakyResNet([nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(2)])  # ends in no affine
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net(torch.randn(3, 4)).sum().backward()
    opt.step()
    before, groups = _state(net), [list(g["params"]) for g in opt.param_groups]
    with pytest.raises(ValueError, match="init='zero'"):
        refine(net, opt, init="zero")
    assert _same_state(before, _state(net)) and net.depth == 2
    # fixed steps are a buffer, not a parameter: every parameter stepped has its state
    assert [list(g["params"]) for g in opt.param_groups] == groups and len(opt.state) == len(groups[0])


def test_refine_with_your_own_pieces():
    """``pieces=``: block l becomes ``pieces[l]`` blocks of ``rho_l / pieces[l]`` (T kept); ``[2] * L`` is exactly
    ``how="uniform"``; the optimizer follows as for any refinement."""
    a, b = _conv_net(depth=3, seed=1), _conv_net(depth=3, seed=1)
    a.steps.set_steps([0.2, 0.3, 0.5]), b.steps.set_steps([0.2, 0.3, 0.5])
    refine(a), refine(b, pieces=[[2, 2, 2]])
    assert _same_state(_state(a), _state(b)) and b.depth == 6
    net = _conv_net(depth=3, seed=2)
    net.steps.set_steps([0.2, 0.3, 0.5])
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x = torch.randn(2, 8, 5)
    net(x).pow(2).mean().backward()
    opt.step()
    refine(net, opt, pieces=([3, 1, 2],), state="copy")
    want = torch.tensor([0.2 / 3] * 3 + [0.3] + [0.25] * 2, dtype=torch.float64)
    torch.testing.assert_close(net.steps.rho.double(), want, rtol=1e-6, atol=0)
    assert net.depth == 6 and float(net.steps.rho.double().sum()) == pytest.approx(1.0)
    assert all(p in opt.state for p in net.parameters() if p.requires_grad)
    net(x).pow(2).mean().backward()
    opt.step()  # trains on


def test_refine_plan_equidistributes_your_own_distances():
    """``refine_plan(distances=...)``: the measured step-distances give the measured plan; any other monitor is
    equidistributed the same way (one more piece to the largest d_l / n_l); bad distances are refused."""
    net = _conv_net(depth=4, seed=3)
    x = torch.randn(4, 8, 5)
    measured = measure_distances(net, x)
    assert refine_plan(net, how="adaptive", distances=measured) == refine_plan(net, how="adaptive", inputs=x)
    assert refine_plan(net, how="adaptive", distances=[[8.0, 1.0, 1.0, 1.0]])["pieces"] == [[5, 1, 1, 1]]
    assert refine_plan(net, how="adaptive", distances=[torch.tensor([1.0, 3.0, 3.0, 1.0])])["pieces"] == [[1, 3, 3, 1]]
    for bad, kw in (([[1.0, 1.0, 1.0]], {}), ([[1.0, -1.0, 1.0, 1.0]], {}), ([[1.0, float("nan"), 1.0, 1.0]], {}),
                    ([[1.0] * 4, [1.0] * 4], {}), ("1111", {}), ([["a", "b", "c", "d"]], {}),
                    ([[1.0] * 4], dict(how="uniform")), ([[1.0] * 4], dict(inputs=x))):
        with pytest.raises(ValueError, match="distances"):
            refine_plan(net, **dict(dict(how="adaptive"), **kw), distances=bad)


def test_a_checkpoint_with_a_bad_plan_is_refused_before_any_change():
    """A replayed refinement goes through the same check as ``refine(pieces=...)``: a fractional piece in a
    saved history is a ``ValueError`` naming pieces, and the model and optimizer stay as they were."""
    net = _conv_net(depth=2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    before, groups = _state(net), [list(g["params"]) for g in opt.param_groups]
    bad = {"steps_done": 1, "history": [{"op": "refine", "pieces": [[1.5, 2]], "init": "copy", "state": "fresh"}]}
    with pytest.raises(ValueError, match="pieces"):
        DepthScheduler(net, opt, at=[1]).load_state_dict(bad)
    assert _same_state(before, _state(net)) and net.depth == 2
    assert [list(g["params"]) for g in opt.param_groups] == groups


@pytest.mark.parametrize("pieces, kw", [([[2, 2]], {}), ([[2, 2, 0]], {}), ([[2, 2, 1.5]], {}), ([[2, True, 2]], {}),
                                        ([[2, 2, 2], [2, 2, 2]], {}), ([2, 2, 2], {}), ("222", {}),
                                        ([[2, 2, 2]], dict(how="adaptive")), ([[2, 2, 2]], dict(factor=3))])
def test_refine_bad_pieces_change_nothing(pieces, kw):
    net = _conv_net(depth=3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net(torch.randn(2, 8, 5)).sum().backward()
    opt.step()
    before, groups = _state(net), [list(g["params"]) for g in opt.param_groups]
    with pytest.raises(ValueError, match="pieces"):
        refine(net, opt, pieces=pieces, **kw)
    assert _same_state(before, _state(net)) and net.depth == 3
    assert [list(g["params"]) for g in opt.param_groups] == groups


# ------------------------------------------------------------------------------------------ optimizer
def _train(model, opt, x, steps=1, sched=None, depth_sched=None):
    for _ in range(steps):
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        if depth_sched is not None:
            depth_sched.step(loss=float(loss.detach()), inputs=x)


@pytest.mark.parametrize("init", ["copy", "zero"])
@pytest.mark.parametrize("state", ["copy", "fresh"])
def test_optimizer_follows_refinement(state, init):
    net = _conv_net(depth=2)
    decay = [p for n, p in net.named_parameters() if n.endswith("weight") and p.dim() > 1]
    rest = [p for n, p in net.named_parameters() if not (n.endswith("weight") and p.dim() > 1)]
    opt = torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    x = torch.randn(4, 8, 6)
    _train(net, opt, x, steps=3, sched=sched)
    old = list(net.blocks[0].parameters())
    refine(net, opt, state=state, init=init)
    params = list(net.parameters())
    # every parameter in exactly one group, each group in model order (what a fresh optimizer would hold)
    in_groups = [p for g in opt.param_groups for p in g["params"]]
    assert sorted(map(id, in_groups)) == sorted(map(id, params))
    order = {id(p): i for i, p in enumerate(params)}
    for g in opt.param_groups:
        idx = [order[id(p)] for p in g["params"]]
        assert idx == sorted(idx)
    for p_old, p_new in zip(old, net.blocks[1].parameters()):
        if state == "fresh":
            assert p_new not in opt.state
        else:
            for k, v in opt.state[p_old].items():
                assert torch.equal(opt.state[p_new][k], v) and opt.state[p_new][k] is not v
    lr = [g["lr"] for g in opt.param_groups]
    before = [p.detach().clone() for p in net.blocks[1].parameters()]
    _train(net, opt, x, steps=1, sched=sched)
    if init == "copy":  # (a zero branch's conv bias gets no gradient, so fresh state leaves it)
        assert all(not torch.equal(a, b) for a, b in zip(before, net.blocks[1].parameters()))
    assert [g["lr"] for g in opt.param_groups] == [v * 0.5 for v in lr]  # the scheduler kept counting


def test_adaptive_steps_across_refinement():
    torch.manual_seed(0)
    net = LeakyMLP(5, 3, width=8, depth=2, effective_depth=2.0, scheme="exponential")
    opt = AdaptiveSteps(torch.optim.Adam(net.parameters(), lr=1e-2), net, every=2, fast_start=2,
                        weight_decay=1e-3)
    x = torch.randn(32, 5)
    _train(net, opt, x, steps=4)
    refine(net, opt)
    ema = opt.controller._ema[0]
    assert len(opt.decay.params[0]) == 4 and (ema is None or ema.numel() == 4)
    _train(net, opt, x, steps=6)
    rho = net.steps.rho.double()
    assert rho.numel() == 4 and math.isclose(float(rho.sum()), 1.0, rel_tol=1e-5)
    assert not torch.allclose(rho, torch.full_like(rho, 0.25))  # adapted after the refinement
    coarsen(net, opt, to=3, inputs=x)
    _train(net, opt, x, steps=4)
    assert net.depth == 3 and math.isclose(float(net.steps.rho.double().sum()), 1.0, rel_tol=1e-5)


def test_learned_steps_refine_and_keep_their_optimizer_state():
    torch.manual_seed(0)
    net = LeakyMLP(5, 3, width=8, depth=2, effective_depth=1.0, scheme="exponential")
    opt = AdaptiveSteps(torch.optim.Adam(net.parameters(), lr=1e-2), net, rule="learned")
    x = torch.randn(16, 5)
    _train(net, opt, x, steps=3)
    avg = opt.state[net.steps.rho]["exp_avg"].clone()
    refine(net, opt)
    torch.testing.assert_close(opt.state[net.steps.rho]["exp_avg"], avg.repeat_interleave(2))
    _train(net, opt, x, steps=2)
    assert math.isclose(float(net.steps.current().double().sum()), 1.0, rel_tol=1e-5)


# ------------------------------------------------------------------------------------------ coarsen
def test_coarsen_zero_branches_exponential_exact_and_optimizer():
    net = _zero_branch_net(1.5, "exponential", depth=4)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(6, 6, dtype=torch.float64)
    before = net(x)
    coarsen(net, opt, to=2, inputs=x)
    assert net.depth == 2
    torch.testing.assert_close(net(x), before, rtol=1e-12, atol=1e-12)
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in net.parameters()]


def test_refine_then_coarsen_merge_restores_the_network():
    net = _conv_net(depth=2)
    _randomize_affine(net)
    net.steps.set_steps([0.4, 0.6])
    x = torch.randn(3, 8, 10)
    before, state = net(x), _state(net)
    refine(net)
    # copies: merging each block with its own copy (the pairs the merge picks need not be those, so merge
    # with explicit runs through the plan the scheduler replays)
    from adaptive_depth.depth import _apply
    _apply(net, None, {"op": "coarsen", "runs": [[[0, 1], [2, 3]]], "how": "merge"})
    torch.testing.assert_close(net(x), before, rtol=1e-6, atol=1e-6)
    assert _same_state({k: v for k, v in state.items() if k != "steps.rho"},
                       {k: v for k, v in _state(net).items() if k != "steps.rho"})


def test_coarsen_checks_the_euler_wall_first():
    net = LeakyResNet([MLPBranch(4) for _ in range(4)], effective_depth=2.5)  # steps 0.25, wall 0.4
    before = _state(net)
    with pytest.raises(ValueError, match="euler"):
        coarsen(net, to=2, inputs=torch.randn(5, 4))
    assert net.depth == 4 and _same_state(before, _state(net))
    with pytest.raises(ValueError, match="to must"):
        coarsen(net, to=0, inputs=torch.randn(5, 4))


# ------------------------------------------------------------------------------------------ wrapped models
def test_wrapped_torchvision_stages_refine():
    tv = pytest.importorskip("torchvision")
    from adaptive_depth import wrap
    from adaptive_depth.wrap import wrapped_blocks
    torch.manual_seed(0)
    model = wrap(tv.models.resnet.ResNet(tv.models.resnet.BasicBlock, [2, 1, 1, 1], num_classes=4)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.2), m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.1)
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    refine(model, opt, init="zero")
    assert depths(model) == [4, 1, 1, 1]  # stages 2-4 hold only a downsampling block: it is not split
    assert [len(model.layer1), len(model.layer2)] == [4, 1]
    assert torch.equal(model(x), before)
    assert [i for n, g, i in wrapped_blocks(model) if g == "layer1"] == [0, 1, 2, 3]
    assert sorted(map(id, opt.param_groups[0]["params"])) == sorted(map(id, model.parameters()))
    model.train()
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    opt.step()
    sd = model.state_dict()
    assert "layer1.3.conv1.weight" in sd
    coarsen(model, opt, to=1, inputs=x)
    assert depths(model) == [1, 1, 1, 1] and len(model.layer1) == 1
    assert sorted(map(id, opt.param_groups[0]["params"])) == sorted(map(id, model.parameters()))
    model(x).sum().backward()


def test_wrapped_timm_stage_refines():
    timm = pytest.importorskip("timm")
    from adaptive_depth import wrap
    torch.manual_seed(0)
    model = wrap(timm.create_model("resnet10t", num_classes=3, pretrained=False))
    x = torch.randn(2, 3, 32, 32)
    n = depths(model)
    refine(model, how="uniform")
    assert sum(depths(model)) > sum(n)
    assert model(x).shape == (2, 3)


def test_ddp_wrapper_is_refused():
    net = _conv_net()
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        refine(nn.DataParallel(net))


# ------------------------------------------------------------------------------------------ scheduler
def test_depth_scheduler_at_steps():
    net = _conv_net(depth=2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    sched = DepthScheduler(net, opt, at=[2, 4])
    x = torch.randn(4, 8, 6)
    seen = []
    for _ in range(5):
        _train(net, opt, x)
        seen.append(sched.step())
    assert seen == [False, True, False, True, False] and net.depth == 8
    assert len(sched.history) == 2


def test_depth_scheduler_plateau_and_max_depth():
    net = _conv_net(depth=2)
    sched = DepthScheduler(net, None, plateau=True, patience=3, cooldown=2, max_depth=4)
    grown = [sched.step(loss=1.0) for _ in range(12)]
    assert grown.index(True) == 3  # first call sets the best; three calls without improvement
    assert net.depth == 4 and sum(grown) == 1  # max_depth stops the next one
    with pytest.raises(ValueError, match="patience"):
        DepthScheduler(net, None, plateau=True, patience=0)
    with pytest.raises(ValueError, match="at"):
        DepthScheduler(net, None, at=[0])


@pytest.mark.parametrize("how", ["uniform", "adaptive"])
def test_resume_across_refinement_is_exact(how):
    def build():
        torch.manual_seed(0)
        net = LeakyMLP(5, 3, width=8, depth=2, effective_depth=1.0, scheme="exponential")
        opt = AdaptiveSteps(torch.optim.AdamW(net.parameters(), lr=1e-2), net, every=2)
        lr = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
        return net, opt, lr, DepthScheduler(net, opt, at=[3, 5], how=how, state="copy")

    x = torch.randn(16, 5)
    net, opt, lr, grow = build()
    _train(net, opt, x, steps=6, sched=lr, depth_sched=grow)
    assert net.depth == 8
    ckpt = copy.deepcopy({"model": net.state_dict(), "opt": opt.state_dict(), "lr": lr.state_dict(),
                          "grow": grow.state_dict()})
    _train(net, opt, x, steps=3, sched=lr, depth_sched=grow)

    net2, opt2, lr2, grow2 = build()
    grow2.load_state_dict(ckpt["grow"])  # first: it replays the growth on the fresh model and optimizer
    net2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    lr2.load_state_dict(ckpt["lr"])
    _train(net2, opt2, x, steps=3, sched=lr2, depth_sched=grow2)
    for (n, p), q in zip(net.named_parameters(), net2.parameters()):
        assert torch.equal(p, q), n


def test_resume_across_zero_refinement_of_identity_blocks_is_exact():
    """DepthScheduler(init="zero") on a conv stack with the leak cancelled, under AdaptiveSteps and the
    identity-coefficient parameter groups: the growths keep the function at the moment they happen, and a resume
    from a checkpoint taken after them replays to the same parameters bit for bit."""
    from adaptive_depth.recipes import identity_param_groups

    def build():
        torch.manual_seed(0)
        blocks = [nn.Sequential(nn.ReLU(), nn.Conv1d(4, 4, 3, padding=1), nn.GroupNorm(2, 4)) for _ in range(2)]
        net = LeakyResNet(blocks, effective_depth=4.0, scheme="exponential", branch_norm=True, branch_gain=1.0,
                          branch_identity=True)
        opt = AdaptiveSteps(torch.optim.AdamW(identity_param_groups(net, lr=1e-2), lr=1e-2), net, every=2)
        lr = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
        return net, opt, lr, DepthScheduler(net, opt, at=[3, 5], init="zero", state="copy")

    x = torch.randn(6, 4, 10)
    net, opt, lr, grow = build()
    for step in range(6):
        loss = net(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        lr.step()
        with torch.no_grad():
            before = net(x)
        depth = net.depth
        grow.step(loss=loss.item(), inputs=x)
        if net.depth != depth:  # a growth at this step: the function is kept (float32 rounding)
            torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-6)
    assert net.depth == 8
    ckpt = copy.deepcopy({"model": net.state_dict(), "opt": opt.state_dict(), "lr": lr.state_dict(),
                          "grow": grow.state_dict()})
    _train(net, opt, x, steps=3, sched=lr, depth_sched=grow)

    net2, opt2, lr2, grow2 = build()
    grow2.load_state_dict(ckpt["grow"])
    net2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    lr2.load_state_dict(ckpt["lr"])
    _train(net2, opt2, x, steps=3, sched=lr2, depth_sched=grow2)
    for (n, p), q in zip(net.named_parameters(), net2.parameters()):
        assert torch.equal(p, q), n


# ------------------------------------------------------------------------------------------ lr rewarm
def _lr_spy(opt):
    """Records every group's lr as the optimizer's step sees it (a pre-hook: it runs inside the wrapper the
    DepthScheduler puts on ``opt.step``)."""
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append([g["lr"] for g in o.param_groups]))
    return seen


@pytest.mark.parametrize("lr_scheduler_first", [True, False])
def test_rewarm_scales_the_steps_after_each_growth_and_leaves_the_lr_scheduler_alone(lr_scheduler_first):
    from adaptive_depth.experiments.growth import lr_multiplier
    net = _conv_net(depth=2)
    decay = [p for n, p in net.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in net.named_parameters() if not n.endswith("weight")]
    opt = torch.optim.SGD([{"params": decay, "lr": 0.1}, {"params": rest, "lr": 0.05}], momentum=0.9)
    if lr_scheduler_first:
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12)  # chainable: reads the lr it set last
    grow = DepthScheduler(net, opt, at=[3, 6], rewarm=4)
    if not lr_scheduler_first:  # it wraps the rewarm's step in turn
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12)
    seen = _lr_spy(opt)
    # the scheduler's own lrs, from a twin optimizer that no DepthScheduler touches
    twin = torch.optim.SGD([{"params": [torch.zeros(1)], "lr": 0.1}, {"params": [torch.zeros(1)], "lr": 0.05}])
    twin_cosine = torch.optim.lr_scheduler.CosineAnnealingLR(twin, T_max=12)
    # growths after steps 3 and 6: the 4 steps after each run at 1/5, 2/5, 3/5, 4/5 (the second cuts the first)
    factors = [1, 1, 1, 0.2, 0.4, 0.6, 0.2, 0.4, 0.6, 0.8, 1, 1]
    measured = [lr_multiplier(k, 12, [3, 6], rewarm=4) / lr_multiplier(k, 12, [3, 6]) for k in range(12)]
    assert measured == pytest.approx(factors)  # the warm-up Growth 13 measured (on top of its cosine)
    x = torch.randn(4, 8, 6)
    for k, factor in enumerate(factors):
        assert grow.lr_factor() == pytest.approx(factor)
        plain = [g["lr"] for g in twin.param_groups]
        _train(net, opt, x, sched=cosine, depth_sched=grow)
        assert seen[k] == pytest.approx([lr * factor for lr in plain], rel=1e-12), k
        twin.step()  # no gradients: only the order LR schedulers expect
        twin_cosine.step()
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in twin.param_groups], k  # untouched
    assert net.depth == 8


def test_rewarm_step_that_raises_or_is_skipped_neither_keeps_the_scaled_lr_nor_counts():
    net = _conv_net(depth=2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    grow = DepthScheduler(net, opt, at=[1], rewarm=3)
    seen = _lr_spy(opt)
    x = torch.randn(4, 8, 6)
    _train(net, opt, x, depth_sched=grow)  # grows after this step

    def failing():
        raise RuntimeError("closure failed")

    with pytest.raises(RuntimeError, match="closure failed"):
        opt.step(failing)
    assert opt.param_groups[0]["lr"] == 0.1
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(net(x).pow(2).mean() * float("inf")).backward()
    scaler.step(opt)  # inf gradients: GradScaler skips the step
    scaler.update()
    opt.zero_grad()
    _train(net, opt, x)
    assert opt.param_groups[0]["lr"] == 0.1
    assert seen == [[0.1], [pytest.approx(0.025)], [pytest.approx(0.025)]]  # neither the failed nor the skipped
    assert grow.lr_factor() == pytest.approx(0.5)                          # step counted


def test_rewarm_leaves_an_optimizer_that_sets_its_own_lr_alone_outside_a_warm_up():
    class Halving(torch.optim.SGD):  # an optimizer that adapts its own lr inside step()
        def step(self, closure=None):
            out = super().step(closure)
            for group in self.param_groups:
                group["lr"] = group["lr"] / 2
            return out

    net = _conv_net(depth=2)
    opt = Halving(net.parameters(), lr=0.8)
    grow = DepthScheduler(net, opt, at=[5], rewarm=3)
    x = torch.randn(4, 8, 6)
    for _ in range(3):
        _train(net, opt, x, depth_sched=grow)
    assert opt.param_groups[0]["lr"] == 0.1  # 0.8 halved by each of the three steps, none undone


def test_plateau_does_not_count_during_a_rewarm():
    net = _conv_net(depth=2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    grow = DepthScheduler(net, opt, at=[1], plateau=True, patience=2, rewarm=4, max_depth=8)
    x = torch.randn(4, 8, 6)
    grown = []
    for _ in range(10):
        _train(net, opt, x)
        grown.append(grow.step(loss=1.0))  # a flat loss: a plateau at every call but the first after a growth
    # grown after call 1 (at=[1]); the calls after the next 4 optimizer steps (run warming up) do not count; then
    # two flat calls reach the patience; max_depth stops a third growth
    assert grown == [True, False, False, False, False, False, True, False, False, False]
    assert net.depth == 8


def test_rewarm_is_validated_before_anything_changes():
    net = _conv_net(depth=2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for bad in (-1, True, 2.5, "50"):
        with pytest.raises(ValueError, match="rewarm must be an integer >= 0"):
            DepthScheduler(net, opt, at=[1], rewarm=bad)
    with pytest.raises(ValueError, match="rewarm=5 needs the torch.optim.Optimizer"):
        DepthScheduler(net, None, at=[1], rewarm=5)
    with pytest.raises(ValueError, match="how"):
        DepthScheduler(net, opt, at=[1], rewarm=5, how="everywhere")
    assert "step" not in vars(opt)  # optimizer.step was not wrapped
    assert DepthScheduler(net, opt, at=[1]).lr_factor() == 1.0 and "step" not in vars(opt)
    grow = DepthScheduler(net, opt, at=[1], rewarm=2)
    _train(net, opt, torch.randn(4, 8, 6), depth_sched=grow)
    state = dict(grow.state_dict(), rewarm_since="soon")
    fresh = _conv_net(depth=2)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="soon"):
        DepthScheduler(fresh, fresh_opt, at=[1], rewarm=2).load_state_dict(state)
    assert fresh.depth == 2 and len(fresh_opt.param_groups[0]["params"]) == len(list(_conv_net(depth=2).parameters()))


def test_resume_in_the_middle_of_a_rewarm_is_exact():
    def build():
        torch.manual_seed(0)
        net = LeakyMLP(5, 3, width=8, depth=2, effective_depth=4.0, scheme="exponential")
        opt = AdaptiveSteps(torch.optim.AdamW(net.parameters(), lr=1e-2), net, every=2)
        lr = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
        return net, opt, lr, DepthScheduler(net, opt, at=[3], init="zero", rewarm=5)

    x = torch.randn(16, 5)
    net, opt, lr, grow = build()
    seen = _lr_spy(opt.base_optimizer)  # AdaptiveSteps' hooks scale the groups it shares with the inner optimizer
    _train(net, opt, x, steps=5, sched=lr, depth_sched=grow)  # two steps into the warm-up
    ckpt = copy.deepcopy({"model": net.state_dict(), "opt": opt.state_dict(), "lr": lr.state_dict(),
                          "grow": grow.state_dict()})
    _train(net, opt, x, steps=6, sched=lr, depth_sched=grow)
    assert seen[3][0] < seen[2][0] / 5  # the first step after the growth ran at 1/6 of the lr
    assert grow.lr_factor() == 1.0

    net2, opt2, lr2, grow2 = build()
    grow2.load_state_dict(ckpt["grow"])
    net2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    lr2.load_state_dict(ckpt["lr"])
    assert grow2.lr_factor() == pytest.approx(3 / 6)
    _train(net2, opt2, x, steps=6, sched=lr2, depth_sched=grow2)
    for (n, p), q in zip(net.named_parameters(), net2.parameters()):
        assert torch.equal(p, q), n


# ------------------------------------------------------------------------------------------ Lightning
def _lightning_module(pl):
    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _conv_net(depth=2)
            self.head = nn.Linear(8, 2)

        def forward(self, x):  # what how="adaptive" measures the distances with
            return self.head(self.net(x).mean(2))

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9)]

    return Module


def _lightning_fit(pl, module, callback, max_steps, tmp_path, ckpt_path=None):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 8, 6), torch.randint(0, 2, (32,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[callback])
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def test_lightning_callback_grows_during_fit_and_resumes(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    from adaptive_depth.depth import DepthCallback
    Module = _lightning_module(pl)
    torch.manual_seed(0)
    module = Module()
    callback = DepthCallback(at=[2, 5], how="adaptive")
    trainer = _lightning_fit(pl, module, callback, 7, tmp_path)
    assert module.net.depth == 8
    opt = trainer.optimizers[0]
    assert sorted(map(id, opt.param_groups[0]["params"])) == sorted(map(id, module.parameters()))
    new = module.net.blocks[-1]
    assert any(opt.state.get(p) for p in new.parameters())  # the last-added block was trained
    assert callback.state_dict()["steps_done"] == 7 and len(callback.state_dict()["history"]) == 2
    path = tmp_path / "grown.ckpt"
    trainer.save_checkpoint(path)

    # resume: grow the fresh module first (Lightning loads the weights before it restores callbacks)
    torch.manual_seed(1)
    fresh = DepthCallback.replay(Module(), path)
    assert fresh.net.depth == 8
    saved = torch.load(path, weights_only=False)["state_dict"]
    callback2 = DepthCallback(at=[2, 5, 9], how="adaptive")
    trainer2 = _lightning_fit(pl, fresh, callback2, 10, tmp_path, ckpt_path=path)
    assert callback2.state_dict()["steps_done"] == 10
    assert fresh.net.depth == 16 and len(callback2.state_dict()["history"]) == 3  # grew again at step 9
    opt2 = trainer2.optimizers[0]
    assert sorted(map(id, opt2.param_groups[0]["params"])) == sorted(map(id, fresh.parameters()))
    # the optimizer state came back from the checkpoint: AdamW counted 7 + 3 steps for the first parameters
    assert max(int(st["step"]) for st in opt2.state.values()) == 10
    head = saved["head.weight"]
    assert head.shape == fresh.head.weight.shape and not torch.equal(head, fresh.head.weight)  # trained on


def test_lightning_callback_checks_its_arguments_when_built():
    pytest.importorskip("pytorch_lightning")
    from adaptive_depth.depth import DepthCallback
    for kwargs, match in (({"rewarm": -1}, "rewarm must be an integer >= 0"), ({"how": "fast"}, "how"),
                          ({"at": [0]}, "at must list integers >= 1"), ({"max_depth": 0}, "max_depth")):
        with pytest.raises(ValueError, match=match):
            DepthCallback(**kwargs)
    with pytest.raises(TypeError, match="DepthScheduler.*hw"):
        DepthCallback(at=[2], hw="adaptive")
    with pytest.raises(TypeError, match="trainer.optimizers"):
        DepthCallback(at=[2], optimizer=None)
    assert DepthCallback(at=[2], how="adaptive", rewarm=5).kwargs == {"how": "adaptive", "rewarm": 5}


def test_lightning_callback_rewarm_resumes_in_the_middle_of_a_warm_up(tmp_path):
    """DepthCallback(rewarm=3): the steps after the growth see 1/4, 2/4, 3/4 of StepLR's lr, also across a
    resume from a checkpoint taken in the middle of the warm-up (the hooks are in place before the first step)."""
    pl = pytest.importorskip("pytorch_lightning")
    from adaptive_depth.depth import DepthCallback
    base = _lightning_module(pl)

    class Module(base):
        def configure_optimizers(self):
            seen = self.seen = []

            class Spy(torch.optim.AdamW):  # the lr inside step() (its super().step() runs torch's hooks twice)
                def step(self, closure=None):
                    seen.append(self.param_groups[0]["lr"])
                    return super().step(closure)

            opt = Spy(self.parameters(), lr=1e-2)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9)]  # stepped once per epoch

    def fit_and_resume(rewarm):
        torch.manual_seed(0)
        module = Module()
        trainer = _lightning_fit(pl, module, DepthCallback(at=[2], rewarm=rewarm), 4, tmp_path)
        path = tmp_path / f"rewarm{rewarm}.ckpt"
        trainer.save_checkpoint(path)
        fresh = DepthCallback.replay(Module(), path)
        _lightning_fit(pl, fresh, DepthCallback(at=[2], rewarm=rewarm), 6, tmp_path, ckpt_path=path)
        assert fresh.net.depth == 4
        return module.seen + fresh.seen

    plain = fit_and_resume(0)  # what Lightning's StepLR gives (stepped once per epoch of 4 batches)
    assert fit_and_resume(3) == pytest.approx([lr * f for lr, f in zip(plain, [1, 1, 0.25, 0.5, 0.75, 1])],
                                              rel=1e-9)


# ------------------------------------------------------------------------------------------ benchmark
def test_growth_benchmark_accounting():
    from adaptive_depth.experiments.growth import SETTINGS, get_task, summarize, table, train_one
    task = get_task("teacher", 0)
    settings = dict(SETTINGS["teacher"], steps=10, width=8)
    runs = [train_one(task, arm, 0, at=(0.2, 0.4), eval_every=5, settings=settings)
            for arm in ("full", "uniform", "adaptive")]
    full, uniform, adaptive = runs
    assert full["block_steps"] == 8 * 10
    assert uniform["block_steps"] == 2 * 2 + 4 * 2 + 8 * 6  # grown after steps 2 and 4
    assert [c[0] for c in uniform["curve"]] == [0, 5, 10]
    assert len(uniform["steps_profile"][0]) == 8 and len(adaptive["steps_profile"][0]) == 8
    assert math.isclose(sum(uniform["steps_profile"][0]), 1.0, rel_tol=1e-6)
    summary = summarize(runs, slack=0.5)
    assert {s["arm"] for s in summary} == {"full", "uniform", "adaptive"}
    assert "block-steps to target" in table(summary)


# ------------------------------------------------------------------------------------------ DDP
def _ddp_worker(out_path: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    net = LeakyMLP(5, 3, width=8, depth=2, effective_depth=1.0, scheme="exponential")
    opt = AdaptiveSteps(torch.optim.AdamW(net.parameters(), lr=1e-2), net, every=2)
    g = torch.Generator().manual_seed(1 + rank)  # every rank its own data: the measured distances differ
    identical, depth_seen = [], []
    ddp = DDP(net)
    for step in range(1, 7):
        x = torch.randn(8, 5, generator=g)
        ddp(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if step in (2, 4):
            refine(net, opt, how="adaptive" if step == 2 else "uniform", inputs=x)
            ddp = DDP(net)  # DDP fixes its parameters when built
        flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
        got = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(got, flat)
        identical.append(all(torch.equal(t, got[0]) for t in got))
        depth_seen.append(net.depth)
    if rank == 0:
        Path(out_path).write_text(json.dumps({"identical": identical, "depths": depth_seen}))
    del ddp, opt, net
    shut_down()


def test_ddp_two_processes_refine(tmp_path):
    report = run_two_ranks(__file__, tmp_path / "ddp.json", timeout=240)
    assert report["identical"] == [True] * 6
    assert report["depths"] == [2, 4, 4, 8, 8, 8]


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])
