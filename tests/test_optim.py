"""AdaptiveSteps: behaves like an optimizer everywhere one is used, and adapts the steps correctly."""
import copy
import io
import os
import warnings

import pytest
import torch
import torch_optimizer
from torch import nn

from adaptive_depth import AdaptiveSteps, LeakyMLP, LeakyResNet, step_sizes
from adaptive_depth.data import teacher


def small_task(seed=0):
    return teacher((6, 2, 6), n_train=128, n_test=64, seed=seed)


def small_model(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("effective_depth", 2.0)
    kw.setdefault("scheme", "exponential")
    return LeakyMLP(6, 6, width=16, depth=5, **kw)


def loss_of(model, task):
    return task.loss_fn(model(task.x_train), task.y_train)


def train(model, opt, task, steps, closure=False):
    for _ in range(steps):
        if closure:
            def fn():
                opt.zero_grad()
                loss = loss_of(model, task)
                loss.backward()
                return loss
            opt.step(fn)
        else:
            loss = loss_of(model, task)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return float(loss_of(model, task).detach())


OPTIMIZERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=3e-3),
    "NAdam": lambda p: torch.optim.NAdam(p, lr=1e-2),
    "to.Lamb": lambda p: torch_optimizer.Lamb(p, lr=1e-2),
    "to.DiffGrad": lambda p: torch_optimizer.DiffGrad(p, lr=1e-2),
    "to.Yogi": lambda p: torch_optimizer.Yogi(p, lr=1e-2),
    "to.QHAdam": lambda p: torch_optimizer.QHAdam(p, lr=1e-2),
    "to.Lookahead(Adam)": lambda p: torch_optimizer.Lookahead(torch.optim.Adam(p, lr=1e-2), k=5, alpha=0.5),
    "to.Lookahead(Yogi)": lambda p: torch_optimizer.Lookahead(torch_optimizer.Yogi(p, lr=1e-2)),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("rule", ["equal_distance", "paper"])
def test_converges_with_many_optimizers(name, rule):
    task = small_task()
    model = small_model()
    opt = AdaptiveSteps(OPTIMIZERS[name](model.parameters()), model, rule=rule, every=2, weight_decay=1e-4)
    start = float(loss_of(model, task).detach())
    end = train(model, opt, task, 120)
    assert end < 0.5 * start, (start, end)
    rho = step_sizes(model)[0]
    assert abs(float(rho.sum()) - 1.0) < 1e-5 and float(rho.min()) > 0
    assert not torch.allclose(rho, torch.full_like(rho, 0.2)), "the steps never adapted"


def test_lbfgs_with_closure():
    task = small_task()
    model = small_model()
    opt = AdaptiveSteps(torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5), model, every=1,
                        weight_decay=1e-4)
    start = float(loss_of(model, task).detach())
    end = train(model, opt, task, 15, closure=True)
    assert end < 0.5 * start
    assert opt.steps_done == 15


@pytest.mark.parametrize("rule", ["equal_distance", "paper", "weight_norm", "learned"])
def test_lockstep_state_dict_round_trip_is_bit_exact(rule):
    task = small_task()
    make = lambda seed: small_model(seed)  # noqa: E731
    a = make(0)
    opt_a = AdaptiveSteps(torch.optim.Adam(a.parameters(), lr=1e-2), a, rule=rule, every=3, smoothing=0.5,
                          weight_decay=1e-3)
    train(a, opt_a, task, 20)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    ckpt = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    b = make(123)  # different init: everything must come from the checkpoint
    opt_b = AdaptiveSteps(torch.optim.Adam(b.parameters(), lr=1e-2), b, rule=rule, every=3, smoothing=0.5,
                          weight_decay=1e-3)
    b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    train(a, opt_a, task, 50)
    train(b, opt_b, task, 50)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    assert opt_a.steps_done == opt_b.steps_done == 70
    assert opt_b.param_groups is opt_b.base_optimizer.param_groups  # still live after load_state_dict


def test_lr_scheduler_drives_the_inner_optimizer():
    model = small_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = AdaptiveSteps(inner, model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    task = small_task()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for _ in range(3):
            train(model, opt, task, 1)
            sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)


def test_grad_scaler_unscales_once_and_skips_inf_steps():
    task = small_task()
    ref, model = small_model(), small_model()
    ref_opt = AdaptiveSteps(torch.optim.SGD(ref.parameters(), lr=0.1), ref, every=1)
    opt = AdaptiveSteps(torch.optim.SGD(model.parameters(), lr=0.1), model, every=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for _ in range(3):
        train(ref, ref_opt, task, 1)
        loss = loss_of(model, task)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    for p, q in zip(ref.parameters(), model.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
    assert torch.allclose(step_sizes(ref)[0], step_sizes(model)[0], rtol=1e-5)
    before = copy.deepcopy(model.state_dict())
    loss = loss_of(model, task) * float("inf")
    opt.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.steps_done == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_rho_scaled_decay_equals_explicit_penalty_gradient():
    task = small_task()
    lam, lt = 0.3, 2.0
    model = small_model(effective_depth=lt)
    model.steps.set_steps([0.1, 0.3, 0.2, 0.25, 0.15])
    opt = AdaptiveSteps(torch.optim.SGD(model.parameters(), lr=0.0), model, weight_decay=lam)
    twin = copy.deepcopy(model)
    loss_of(model, task).backward()
    opt._add_decay()
    # the paper's cost, written out: lambda / (2 Lt) * sum_l rho_l ||W_l||^2 (W_l with its bias column)
    rho = [0.1, 0.3, 0.2, 0.25, 0.15]
    penalty = sum(lam / (2 * lt) * r * (blk.block.linear.weight.pow(2).sum() + blk.block.linear.bias.pow(2).sum())
                  for r, blk in zip(rho, twin.blocks))
    (loss_of(twin, task) + penalty).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name
    assert torch.allclose(opt.penalty(), penalty.detach(), rtol=1e-6)


def test_decay_follows_the_steps_when_they_change():
    task = small_task()
    model = small_model(effective_depth=0.0)
    opt = AdaptiveSteps(torch.optim.SGD(model.parameters(), lr=0.0), model, weight_decay=1.0)
    w = model.blocks[0].block.linear.weight
    for steps in ([0.2] * 5, [0.4, 0.15, 0.15, 0.15, 0.15]):
        model.steps.set_steps(steps)
        opt.zero_grad()
        loss_of(model, task).backward()
        g = w.grad.clone()
        opt._add_decay()
        assert torch.allclose(w.grad - g, steps[0] * w.detach(), atol=1e-7)  # lambda * rho_1 * W at Lt = 0


def test_adaptation_targets_equal_relative_distance():
    """One adaptation with damping 1 and no smoothing lands on the paper's target from the recorded speeds."""
    task = small_task()
    model = small_model(effective_depth=3.0)
    opt = AdaptiveSteps(torch.optim.SGD(model.parameters(), lr=0.0), model, rule="paper", every=1)
    assert model.steps.recording
    loss_of(model, task).backward()
    reps = model.representations(task.x_train)
    # speeds from the representations themselves: c_l = ||f_l - Lt A_l|| / ||A_l||
    c = []
    for blk, a in zip(model.blocks, reps[:-1]):
        f = blk.block(a).detach().double()
        c.append(float((f - 3.0 * a.double()).norm() / a.double().norm()))
    opt.step()
    c = torch.tensor(c, dtype=torch.float64)
    want = (1 / c) / (1 / c).sum()
    assert torch.allclose(step_sizes(model)[0].double(), want, rtol=1e-5)


def test_learned_rule_trains_steps_and_keeps_them_feasible():
    task = small_task()
    model = small_model()
    inner = torch.optim.Adam([p for n, p in model.named_parameters() if "rho" not in n], lr=1e-2)
    opt = AdaptiveSteps(inner, model, rule="learned")
    assert model.steps.rho.requires_grad and len(inner.param_groups) == 2
    assert inner.param_groups[1]["lr"] == pytest.approx(1e-3)  # default: 0.1 x the weights' lr
    train(model, opt, task, 60)
    rho = step_sizes(model)[0]
    assert not torch.allclose(rho, torch.full_like(rho, 0.2))
    assert abs(float(rho.sum()) - 1) < 1e-5 and float(rho.min()) >= model.steps.min_step


def test_non_finite_measurements_skip_and_warn():
    task = small_task()
    model = small_model()
    opt = AdaptiveSteps(torch.optim.SGD(model.parameters(), lr=0.01), model, every=1)
    loss_of(model, task).backward()
    model.steps.input_sq.zero_()  # speed = inf / nan
    before = step_sizes(model)[0]
    with pytest.warns(RuntimeWarning, match="non-finite or missing measurements"):
        opt.step()
    assert torch.equal(step_sizes(model)[0], before)


def test_paper_rule_out_of_bounds_is_projected_with_a_warning():
    model = small_model(effective_depth=1.0, min_step=0.15)
    opt = AdaptiveSteps(torch.optim.SGD(model.parameters(), lr=0.0), model, rule="paper", every=1)
    model.steps.velocity_sq.copy_(torch.tensor([1e4, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    model.steps.input_sq.fill_(1.0)
    model.steps.count.fill_(1.0)
    with pytest.warns(RuntimeWarning, match="projected back onto the bounds"):
        opt.adapt()
    rho = step_sizes(model)[0]
    assert float(rho.min()) >= 0.15 - 1e-6 and abs(float(rho.sum()) - 1) < 1e-5
    model.steps.velocity_sq.copy_(torch.tensor([1e4, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    model.steps.input_sq.fill_(1.0)
    model.steps.count.fill_(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once per plugin, then counted
        opt.adapt()
    assert opt.projections == 2


def test_optimizer_plumbing_zero_grad_hooks_repr():
    task = small_task()
    model = small_model()
    opt = AdaptiveSteps(torch.optim.Adam(model.parameters(), lr=1e-3), model)
    calls = []
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(o))
    train(model, opt, task, 2)
    assert calls == [opt, opt]
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters() if p.requires_grad)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert "AdaptiveSteps(rule='equal_distance'" in repr(opt)
    assert opt.state is opt.base_optimizer.state and len(opt.state) > 0


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(rule="fastest"), ValueError, "rule must be one of"),
    (dict(every=0), ValueError, "every must be an integer >= 1"),
    (dict(warmup=-1), ValueError, "warmup must be an integer >= 0"),
    (dict(smoothing=1.0), ValueError, r"smoothing must lie in \[0, 1\)"),
    (dict(damping=0.0), ValueError, r"damping must lie in \(0, 1\]"),
    (dict(floor=float("nan")), ValueError, "floor must be a finite number"),
    (dict(step_range=(2.0, 3.0)), ValueError, "step_range must satisfy"),
    (dict(step_range=0.5), ValueError, r"step_range must be a pair"),
    (dict(weight_decay=-1.0), ValueError, r"weight_decay must lie in \[0, inf\]"),
    (dict(weight_decay=float("inf")), ValueError, "weight_decay must be a finite number"),
    (dict(rule="learned", step_lr=-1.0), ValueError, "step_lr must lie in"),
])
def test_bad_arguments_raise_and_change_nothing(kwargs, error, words):
    model = small_model()
    inner = torch.optim.Adam(model.parameters(), lr=1e-3)
    model_before, inner_before = copy.deepcopy(model.state_dict()), copy.deepcopy(inner.state_dict())
    with pytest.raises(error, match=words):
        AdaptiveSteps(inner, model, **kwargs)
    assert not model.steps.rho.requires_grad and not model.steps.recording
    for k, v in model.state_dict().items():
        assert torch.equal(v, model_before[k])
    assert inner.state_dict() == inner_before


def test_bad_optimizer_and_model_are_type_errors():
    model = small_model()
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        AdaptiveSteps("adam", model)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        AdaptiveSteps(torch.optim.SGD(model.parameters(), lr=0.1), "model")
    plain = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="model has no step sizes"):
        AdaptiveSteps(torch.optim.SGD(plain.parameters(), lr=0.1), plain)
    opt = AdaptiveSteps(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with pytest.raises(TypeError, match="already an AdaptiveSteps"):
        AdaptiveSteps(opt, model)


def test_load_state_dict_rejects_mismatches_without_changing_anything():
    model = small_model()
    opt = AdaptiveSteps(torch.optim.Adam(model.parameters(), lr=1e-3), model)
    other = LeakyResNet([nn.Linear(16, 16) for _ in range(3)])
    other_opt = AdaptiveSteps(torch.optim.Adam(other.parameters(), lr=1e-3), other)
    before = step_sizes(model)[0]
    with pytest.raises(ValueError, match="has 3 steps, the model has 5"):
        opt.load_state_dict(other_opt.state_dict())
    with pytest.raises(ValueError, match="saved with rule='paper'"):
        opt.load_state_dict(AdaptiveSteps(torch.optim.Adam(model.parameters()), model, rule="paper").state_dict())
    with pytest.raises(ValueError, match="must come from AdaptiveSteps.state_dict"):
        opt.load_state_dict(torch.optim.Adam(model.parameters()).state_dict())
    assert torch.equal(step_sizes(model)[0], before)


def _distributed_worker(rank, world, port, out, batches):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = LeakyMLP(6, 6, width=16, depth=5, effective_depth=2.0, scheme="exponential")
    ddp = DDP(model)
    opt = AdaptiveSteps(torch.optim.Adam(ddp.parameters(), lr=1e-2), ddp, every=1, smoothing=0.0)
    for x, y in batches:
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        loss = (ddp(xs) - ys).pow(2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save({"rho": step_sizes(model)[0], "params": [p.detach() for p in model.parameters()]},
               os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_distributed_ranks_hold_identical_steps_equal_to_one_process(tmp_path):
    import socket
    import torch.multiprocessing as mp
    task = small_task()
    batches = [(task.x_train[i * 32:(i + 1) * 32], task.y_train[i * 32:(i + 1) * 32]) for i in range(4)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_distributed_worker, args=(2, port, str(tmp_path), batches), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["rho"], r1["rho"])
    assert not torch.allclose(r0["rho"], torch.full_like(r0["rho"], 0.2))
    # one process on the concatenated batches
    torch.manual_seed(0)
    model = LeakyMLP(6, 6, width=16, depth=5, effective_depth=2.0, scheme="exponential")
    opt = AdaptiveSteps(torch.optim.Adam(model.parameters(), lr=1e-2), model, every=1, smoothing=0.0)
    for x, y in batches:
        loss = (model(x) - y).pow(2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.allclose(step_sizes(model)[0], r0["rho"], rtol=1e-5)
    for p, q in zip(model.parameters(), r0["params"]):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-5)



def _train_profiles(opt, model, x, n):
    profiles = []
    for _ in range(n):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        profiles.append(model.step_sizes().clone())
    return profiles


def test_fast_start_adapts_on_consecutive_steps_then_every():
    torch.manual_seed(0)
    model = LeakyMLP(5, 5, 16, 6, effective_depth=20.0, scheme="exponential")
    x = torch.randn(64, 5)
    opt = AdaptiveSteps(torch.optim.SGD(model.parameters(), lr=0.0), model, every=10, fast_start=3)
    p = _train_profiles(opt, model, x, 12)
    changed = [i + 1 for i in range(1, 12) if not torch.equal(p[i], p[i - 1])]
    assert not torch.equal(p[0], torch.full((6,), 1 / 6))  # step 1 adapted
    assert changed == [2, 3, 10]  # steps 2, 3 (fast start), then step 10
    assert abs(float(p[-1].sum()) - 1.0) < 1e-5


def test_fast_start_is_undamped_and_zero_restores_old_behaviour():
    torch.manual_seed(0)
    model = LeakyMLP(5, 5, 16, 6, effective_depth=20.0, scheme="exponential")
    x = torch.randn(64, 5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = AdaptiveSteps(torch.optim.SGD(model.parameters(), lr=0.0), model, every=1, fast_start=1,
                        smoothing=0.0)
    fast = _train_profiles(opt, model, x, 1)[0]
    model.load_state_dict(state)
    opt = AdaptiveSteps(torch.optim.SGD(model.parameters(), lr=0.0), model, every=1, fast_start=0,
                        smoothing=0.0, damping=1.0)
    full = _train_profiles(opt, model, x, 1)[0]
    assert torch.allclose(fast, full)  # the fast-start adaptation goes all the way (damping 1)
    model.load_state_dict(state)
    opt = AdaptiveSteps(torch.optim.SGD(model.parameters(), lr=0.0), model, every=10, fast_start=0)
    assert all(torch.equal(p, torch.full((6,), 1 / 6, dtype=p.dtype)) for p in _train_profiles(opt, model, x, 9))


def test_paper_rule_ignores_fast_start():
    torch.manual_seed(0)
    model = LeakyMLP(5, 5, 16, 6, effective_depth=20.0, scheme="exponential")
    opt = AdaptiveSteps(torch.optim.SGD(model.parameters(), lr=0.0), model, rule="paper", every=10)
    assert opt.fast_start == 0
    assert all(torch.equal(p, torch.full((6,), 1 / 6, dtype=p.dtype))
               for p in _train_profiles(opt, model, torch.randn(64, 5), 9))


def test_learned_rule_with_step_lr_gives_the_steps_their_own_group():
    """model.parameters() includes the steps: step_lr moves them into a group of their own."""
    model = small_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    opt = AdaptiveSteps(inner, model, rule="learned", step_lr=1e-4)
    groups = [[id(p) for p in g["params"]] for g in inner.param_groups]
    assert id(model.steps.rho) not in groups[0] and groups[1] == [id(model.steps.rho)]
    assert inner.param_groups[1]["lr"] == 1e-4 and inner.param_groups[1]["weight_decay"] == 0.0
    before = step_sizes(model)[0]
    train(model, opt, small_task(), 3)
    change = float((step_sizes(model)[0] - before).abs().max())
    assert 0 < change <= 2 * 3 * 1e-4  # Adam: <= ~lr per coordinate and step, the projection at most doubles it


# ------------------------------------------------------------------ checkpoints are validated first (issue 11.3)
def _corrupt(state, **group):
    state = copy.deepcopy(state)
    state["adaptive_steps"]["groups"][0].update(group)
    return state


@pytest.mark.parametrize("change, words", [
    (dict(rho=torch.tensor([0.3, 0.3, 0.3, 0.3, -0.2])), "finite and > 0"),
    (dict(rho=torch.tensor([0.2, 0.2, 0.2, 0.2, float("nan")])), "finite and > 0"),
    (dict(rho=torch.tensor([0.2, 0.2, 0.2, 0.2, float("inf")])), "finite and > 0"),
    (dict(rho=torch.tensor([0.3, 0.3, 0.3, 0.3, 0.3])), "sum to total_time"),
    (dict(effective_depth=float("nan")), "effective_depth must be finite"),
    (dict(effective_depth=-1.0), "effective_depth must be >= 0"),
    (dict(effective_depth=6.0), r"rho \* effective_depth must be < 1"),  # past the euler wall
    (dict(stats=torch.zeros(3, 4, dtype=torch.float64)), r"stats must have shape \(3, 5\)"),
    (dict(stats=torch.full((3, 5), float("nan"), dtype=torch.float64)), "stats must be finite"),
    (dict(ema=torch.zeros(4, dtype=torch.float64)), "ema must be 5 finite numbers"),
    (dict(ema_count=-1), "ema_count must be an integer >= 0"),
])
def test_bad_optimizer_checkpoint_raises_and_changes_nothing(change, words):
    task = small_task()
    model = small_model(effective_depth=1.0, scheme="euler")
    opt = AdaptiveSteps(torch.optim.Adam(model.parameters(), lr=1e-2), model, every=2)
    train(model, opt, task, 5)
    saved = opt.state_dict()
    train(model, opt, task, 3)  # move on: the checkpoint differs from the current state everywhere
    loss_of(model, task).backward()  # some recorded statistics
    before_model = copy.deepcopy(model.state_dict())
    before_opt = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=words):  # steps.CheckpointError, a ValueError
        opt.load_state_dict(_corrupt(saved, **change))
    after = opt.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_model[k]), k
    assert after["adaptive_steps"]["steps_done"] == before_opt["adaptive_steps"]["steps_done"] == 8
    for a, b in zip(after["adaptive_steps"]["groups"], before_opt["adaptive_steps"]["groups"]):
        assert torch.equal(a["stats"], b["stats"]) and torch.equal(a["rho"], b["rho"])
        assert torch.equal(a["ema"], b["ema"]) and a["ema_count"] == b["ema_count"]
    for key, st in before_opt["optimizer"]["state"].items():
        for name, value in st.items():
            assert torch.equal(after["optimizer"]["state"][key][name], value), (key, name)
    opt.load_state_dict(saved)  # the good one still loads
    assert opt.steps_done == 5


# ------------------------------------------------------------------ learned steps and one NaN (issue 11.5)
def test_learned_steps_survive_a_nan_gradient_with_a_warning():
    task = small_task()
    model = small_model()
    opt = AdaptiveSteps(torch.optim.Adam(model.parameters(), lr=1e-2), model, rule="learned", step_lr=1e-2)
    train(model, opt, task, 3)
    before = step_sizes(model)[0]
    opt.zero_grad()
    loss_of(model, task).backward()
    model.steps.rho.grad.fill_(float("nan"))  # one bad batch reaches the steps
    with pytest.warns(RuntimeWarning, match="previous feasible steps are kept"):
        opt.step()
    assert torch.equal(step_sizes(model)[0], before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, opt, task, 5)  # and training goes on, the steps moving again
    rho = step_sizes(model)[0]
    assert torch.isfinite(rho).all() and not torch.equal(rho, before) and abs(float(rho.sum()) - 1) < 1e-5


def test_learned_steps_after_a_nan_loss_stay_feasible_and_steps_do_not_raise():
    task = small_task()
    model = small_model()
    opt = AdaptiveSteps(torch.optim.SGD(model.parameters(), lr=1e-2), model, rule="learned")
    train(model, opt, task, 2)
    before = step_sizes(model)[0]
    for _ in range(2):
        opt.zero_grad()
        (loss_of(model, task) * float("nan")).backward()
        with pytest.warns(RuntimeWarning, match="learned steps of group 0 became non-finite"):
            opt.step()
    assert torch.equal(step_sizes(model)[0], before)


# ------------------------------------------------------------------ rebind after the depth changed
def test_rebind_keeps_unchanged_groups_and_resets_the_changed_ones():
    torch.manual_seed(0)
    model = nn.Sequential(LeakyResNet([nn.Linear(6, 6) for _ in range(3)], effective_depth=1.0),
                          LeakyResNet([nn.Linear(6, 6) for _ in range(2)], effective_depth=1.0))
    inner = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = AdaptiveSteps(inner, model, every=1, fast_start=0)
    x = torch.randn(16, 6)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    kept_ema = opt.controller._ema[0].clone()
    state_before = {id(p): copy.deepcopy(s) for p, s in inner.state.items()}
    model(x)  # statistics recorded in both groups
    # grow the second stack by one block (what a depth-growth helper does), then rebind
    grown = LeakyResNet([b.block for b in model[1].blocks] + [nn.Linear(6, 6)], effective_depth=1.0)
    model[1] = grown
    opt.rebind()
    assert opt.base_optimizer is inner and [g.depth for g in opt.model_groups] == [3, 3]
    assert torch.equal(opt.controller._ema[0], kept_ema) and opt.controller._ema[1] is None
    assert model[0].steps.count.sum() > 0  # the unchanged group kept its statistics
    new_weight = grown.blocks[2].block.weight
    assert any(p is new_weight for g in opt.param_groups for p in g["params"])  # the new block trains
    for p, s in inner.state.items():
        if id(p) in state_before:
            assert all(torch.equal(v, state_before[id(p)][k]) for k, v in s.items())
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    assert inner.state[new_weight]["step"] == 3
    assert abs(float(step_sizes(model)[1].sum()) - 1) < 1e-5


def test_optimizer_checkpoint_from_when_fixed_steps_were_frozen_parameters_still_loads():
    """Before the steps became buffers, ``Adam(model.parameters())`` held each frozen rho: such a checkpoint
    must resume exactly (the old layout rebuilt here by turning the buffer back into a frozen parameter)."""
    task = small_task()
    old = small_model()
    old.steps.make_learnable_().requires_grad_(False)
    opt_old = AdaptiveSteps(torch.optim.Adam(old.parameters(), lr=1e-2), old, every=2, weight_decay=1e-3)
    assert len(opt_old.param_groups[0]["params"]) == len(list(old.parameters()))  # rho among them
    train(old, opt_old, task, 5)
    new = small_model(seed=9)
    opt_new = AdaptiveSteps(torch.optim.Adam(new.parameters(), lr=1e-2), new, every=2, weight_decay=1e-3)
    assert len(opt_new.param_groups[0]["params"]) == len(opt_old.param_groups[0]["params"]) - 1
    ckpt = copy.deepcopy({"model": old.state_dict(), "opt": opt_old.state_dict()})  # as torch.save would
    new.load_state_dict(ckpt["model"])
    opt_new.load_state_dict(ckpt["opt"])
    train(old, opt_old, task, 6)
    train(new, opt_new, task, 6)
    for (name, a), b in zip(old.state_dict().items(), new.state_dict().values()):
        assert torch.equal(a, b), name
