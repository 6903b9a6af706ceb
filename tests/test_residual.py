"""Containers: exactness at Lt = 0, agreement with a float64 loop, validation, checkpoints, statistics."""
import copy
import io
import math

import pytest
import torch
from torch import nn

from adaptive_depth import LeakyMLP, LeakyResidual, LeakyResNet, StepSizes, leaky_update, step_sizes


def mlp_blocks(n, width=8, seed=0):
    torch.manual_seed(seed)
    return [nn.Sequential(nn.ReLU(), nn.Linear(width, width)) for _ in range(n)]


def conv_blocks(n, channels=3, seed=0):
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
            for _ in range(n)]


@pytest.mark.parametrize("make, shape", [(mlp_blocks, (5, 8)), (conv_blocks, (2, 3, 6, 6))])
@pytest.mark.parametrize("scheme", ["euler", "exponential"])
def test_plain_resnet_exactly_at_zero_leak_and_unit_steps(make, shape, scheme):
    blocks = make(4)
    net = LeakyResNet(copy.deepcopy(blocks), effective_depth=0.0, total_time=4.0, scheme=scheme)
    assert torch.equal(net.step_sizes(), torch.ones(4))
    x = torch.randn(shape)
    want = x
    for blk in blocks:  # x + f(x), block by block
        want = want + blk(want)
    assert torch.equal(net(x), want)


@pytest.mark.parametrize("scheme", ["euler", "exponential"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_stack_matches_float64_loop(scheme, activation):
    blocks = mlp_blocks(5, width=6, seed=1)
    steps = [0.1, 0.3, 0.2, 0.25, 0.15]
    lt = 2.0
    net = LeakyResNet(copy.deepcopy(blocks), effective_depth=lt, steps=steps, scheme=scheme,
                      activation=activation)
    x = torch.randn(7, 6)
    h = x.double()
    for blk, rho in zip(copy.deepcopy(blocks), steps):
        f = blk.double()(h)
        if scheme == "euler":
            h = h + rho * (f - lt * h)
        else:
            h = math.exp(-rho * lt) * h + (1 - math.exp(-rho * lt)) / lt * f
        h = torch.relu(h) if activation else h
    assert torch.allclose(net(x).double(), h, atol=1e-5)


def test_standalone_block_equals_the_functional_form():
    lin = nn.Linear(4, 4)
    blk = LeakyResidual(lin, effective_depth=3.0, step=0.2, scheme="exponential", activation="relu")
    x = torch.randn(6, 4)
    want = leaky_update(x, lin(x), 0.2, 3.0, scheme="exponential", activation="relu")
    assert torch.allclose(blk(x), want, atol=1e-7)
    assert len(step_sizes(blk)) == 1 and torch.allclose(step_sizes(blk)[0], torch.tensor([0.2]))


def test_step_sizes_finds_every_group_anywhere():
    model = nn.Sequential(nn.Linear(3, 8), LeakyResNet(mlp_blocks(3), effective_depth=1.0),
                          nn.ModuleDict({"inner": LeakyResNet(mlp_blocks(5), total_time=2.0)}))
    found = step_sizes(model)
    assert [t.shape for t in found] == [(3,), (5,)]
    assert all(t.dim() == 1 and not t.requires_grad for t in found)
    assert torch.allclose(found[1], torch.full((5,), 0.4))


def test_gradients_reach_blocks_and_learned_steps():
    net = LeakyResNet(mlp_blocks(4), effective_depth=1.0, steps="learned", scheme="exponential")
    x = torch.randn(5, 8)
    net(x).pow(2).sum().backward()
    assert net.steps.rho.grad is not None and torch.isfinite(net.steps.rho.grad).all()
    # the projection's gradient removes the component that would change the sum
    assert abs(float(net.steps.rho.grad.sum())) < 1e-5 * float(net.steps.rho.grad.abs().sum())
    assert all(p.grad is not None for p in net.blocks.parameters())


def test_extra_repr_shows_depth_lt_scheme_and_profile():
    net = LeakyResNet(mlp_blocks(3), effective_depth=2.5, steps="irregular", scheme="euler")
    text = repr(net)
    for words in ("depth=3", "effective_depth=2.5", "scheme='euler'", "steps: min="):
        assert words in text
    assert "steps=[0.3" in repr(net.steps)


@pytest.mark.parametrize("kwargs, words", [
    (dict(effective_depth=5.0, total_time=1.0), r"effective_depth \* total_time / depth must be < 1"),
    (dict(effective_depth=-1.0), "effective_depth must be >= 0"),
    (dict(effective_depth=float("inf")), "effective_depth must be finite"),
    (dict(total_time=0.0), "total_time must be > 0"),
    (dict(total_time=float("nan")), "total_time must be finite"),
    (dict(steps=[0.5, 0.5, 0.5, 0.5]), "steps must sum to total_time"),
    (dict(steps=[0.5, 0.6, -0.1, 0.0]), r"steps \(rho\) must be > 0"),
    (dict(steps=[0.25, 0.25, float("nan"), 0.25]), "steps must be finite"),
    (dict(steps=[0.5, 0.5]), "steps must have 4 values"),
    (dict(steps="geometric"), "steps must be 'uniform'"),
    (dict(scheme="midpoint"), "scheme must be one of"),
    (dict(activation="tanh"), "activation must be one of"),
    (dict(min_step=0.0), "min_step must be > 0"),
    (dict(min_step=0.3), r"min_step \* depth must be <= total_time"),
    (dict(max_step=0.2), r"max_step \* depth must be >= total_time"),
    (dict(effective_depth=2.0, max_step=0.6), r"max_step \* effective_depth must be < 1"),
    (dict(effective_depth=3.0, steps=[0.1, 0.1, 0.1, 0.7]), r"rho \* effective_depth must be < 1|\[min_step"),
])
def test_bad_settings_raise_value_errors_naming_them(kwargs, words):
    with pytest.raises(ValueError, match=words):
        LeakyResNet(mlp_blocks(4), **kwargs)


def test_bad_blocks_raise_type_errors():
    with pytest.raises(TypeError, match=r"blocks\[1\] must be an nn.Module"):
        LeakyResNet([nn.Linear(2, 2), lambda x: x])
    with pytest.raises(TypeError, match="iterable of modules"):
        LeakyResNet(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="at least one"):
        LeakyResNet([])
    with pytest.raises(TypeError, match="already a LeakyResidual"):
        LeakyResNet([LeakyResidual(nn.Linear(2, 2))])


def test_shape_changing_block_is_a_clear_error():
    net = LeakyResNet([nn.Linear(4, 4), nn.Linear(4, 3)], total_time=2.0)
    with pytest.raises(ValueError, match=r"block 1 \(Linear\) returned shape \(2, 3\)"):
        net(torch.randn(2, 4))


def test_set_steps_validates_and_leaves_steps_unchanged_on_error():
    net = LeakyResNet(mlp_blocks(4), effective_depth=2.0)
    before = net.step_sizes()
    for bad, words in (([0.1, 0.1, 0.1, 0.1], "sum to total_time"), ([0.7, 0.1, 0.1, 0.1], "effective_depth"),
                       ([0.25, 0.25, 0.25], "4 values")):
        with pytest.raises(ValueError, match=words):
            net.steps.set_steps(bad)
        assert torch.equal(net.step_sizes(), before)
    net.steps.set_steps([0.1, 0.2, 0.3, 0.4])
    assert torch.allclose(net.step_sizes(), torch.tensor([0.1, 0.2, 0.3, 0.4]))


def test_set_effective_depth_respects_the_euler_wall():
    net = LeakyResNet(mlp_blocks(4), steps=[0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="effective_depth=3 breaks"):
        net.set_effective_depth(3.0)
    assert net.effective_depth == 0.0
    net.set_effective_depth(2.0)
    assert net.effective_depth == 2.0 and net.steps.max_step * 2.0 < 1
    with pytest.raises(ValueError, match="effective_depth must be >= 0"):
        net.set_effective_depth(-0.5)


def test_checkpoint_round_trip_is_exact():
    net = LeakyMLP(5, 3, width=16, depth=6, effective_depth=4.0, scheme="exponential", steps="irregular")
    with torch.no_grad():
        net.steps.set_steps(torch.tensor([0.05, 0.1, 0.2, 0.3, 0.25, 0.1]))
        net.set_effective_depth(7.0)
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    fresh = LeakyMLP(5, 3, width=16, depth=6, effective_depth=4.0, scheme="exponential")
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    for (k, a), (_, b) in zip(net.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k
    x = torch.randn(9, 5)
    assert torch.equal(net(x), fresh(x))
    assert fresh.effective_depth == 7.0


def test_loading_invalid_steps_fails_and_keeps_the_model():
    net = LeakyResNet(mlp_blocks(4), effective_depth=1.0)
    state = net.state_dict()
    state["steps.rho"] = torch.tensor([0.5, 0.5, 0.5, 0.5])
    with pytest.raises(RuntimeError, match="steps must sum to total_time"):
        net.load_state_dict(state)
    assert torch.equal(net.step_sizes(), torch.full((4,), 0.25))


def test_half_precision_cast_keeps_step_precision():
    net = LeakyResNet(mlp_blocks(3), steps=[0.2, 0.3, 0.5]).to(torch.bfloat16)
    assert net.steps.rho.dtype == torch.float32 and net.blocks[0].block[1].weight.dtype == torch.bfloat16
    assert torch.equal(net.steps.rho.detach(), torch.tensor([0.2, 0.3, 0.5]))
    assert net(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert net.double().steps.rho.dtype == torch.float64


def test_statistics_are_recorded_only_when_asked_and_training():
    net = LeakyResNet(mlp_blocks(3, width=5), effective_depth=1.5, steps=[0.2, 0.3, 0.5])
    x = torch.randn(11, 5)
    net(x)
    assert float(net.steps.count.sum()) == 0
    net.steps.recording = True
    net.eval()
    net(x)
    assert float(net.steps.count.sum()) == 0
    net.train()
    net(x)
    net(x)
    h, vel, inp = x.double(), [], []
    for blk, rho in zip(net.blocks, [0.2, 0.3, 0.5]):
        f = blk.block.double()(h)
        vel.append(((f - 1.5 * h) ** 2).sum())
        inp.append((h ** 2).sum())
        h = h + rho * (f - 1.5 * h)
    assert torch.equal(net.steps.count, torch.full((3,), 2.0, dtype=torch.float64))
    assert torch.allclose(net.steps.velocity_sq, 2 * torch.stack(vel), rtol=1e-5)
    assert torch.allclose(net.steps.input_sq, 2 * torch.stack(inp), rtol=1e-5)
    assert torch.allclose(net.steps.speed(), (torch.stack(vel) / torch.stack(inp)).sqrt(), rtol=1e-5)


@pytest.mark.parametrize("scheme", ["euler", "exponential"])
def test_leaky_mlp_identity_init_keeps_the_signal(scheme):
    """Naive init shrinks the signal by prod(1 - rho Lt) (~1e-7 at Lt = 10, L = 16); ours starts near it."""
    torch.manual_seed(0)
    x = torch.randn(256, 12)
    ours = LeakyMLP(12, 12, width=64, depth=16, effective_depth=10.0, scheme=scheme)
    naive = LeakyMLP(12, 12, width=64, depth=16, effective_depth=10.0, scheme=scheme, init="default")
    ratio = lambda m: float(m.representations(x)[-1].norm() / m.representations(x)[0].norm())  # noqa: E731
    assert ratio(ours) > 0.3
    assert ratio(naive) < 0.05


def test_leaky_mlp_argument_checks():
    with pytest.raises(ValueError, match="width must be an integer >= 1"):
        LeakyMLP(3, 3, width=0, depth=4)
    with pytest.raises(ValueError, match="depth must be an integer >= 1"):
        LeakyMLP(3, 3, width=4, depth=2.5)
    with pytest.raises(ValueError, match="init must be"):
        LeakyMLP(3, 3, width=4, depth=2, init="orthogonal")


def test_step_sizes_module_argument_checks():
    with pytest.raises(ValueError, match="depth .* must be an integer >= 1"):
        StepSizes(0)
    g = StepSizes(4, total_time=2.0, effective_depth=1.0, scheme="exponential", init=[0.2, 0.8, 0.6, 0.4])
    assert torch.allclose(g.current(), torch.tensor([0.2, 0.8, 0.6, 0.4]))


# ------------------------------------------------------------------ empty-weights (meta device) builds
@pytest.mark.parametrize("make", ["LeakyMLP", "LeakyResNet"])
def test_fine_ends_steps_start_at_the_library_profile(make):
    from adaptive_depth import rules
    if make == "LeakyMLP":
        model = LeakyMLP(6, 3, width=8, depth=8, effective_depth=4.0, scheme="exponential", steps="fine_ends")
    else:
        model = LeakyResNet(mlp_blocks(5), effective_depth=1.5, total_time=2.0, steps="fine_ends", scheme="exponential")
    g = model.steps
    assert torch.allclose(g.rho.detach(), rules.fine_ends(g.depth, g.total_time).float(), rtol=1e-6)
    with torch.no_grad():
        g.rho.fill_(g.total_time / g.depth)
    model.reset_parameters()  # back to the construction profile
    assert torch.allclose(g.rho.detach(), rules.fine_ends(g.depth, g.total_time).float(), rtol=1e-6)
    with torch.device("meta"):
        meta = LeakyMLP(6, 3, width=8, depth=8, effective_depth=4.0, scheme="exponential", steps="fine_ends")
    meta.to_empty(device="cpu")
    assert torch.allclose(meta.net.steps.rho, rules.fine_ends(8, 1.0).float(), rtol=1e-6)  # restored, not garbage


def _build(name):
    torch.manual_seed(0)
    if name == "LeakyMLP":
        return LeakyMLP(6, 3, width=8, depth=5, effective_depth=4.0, scheme="exponential", steps="irregular")
    if name == "LeakyResNet":
        return LeakyResNet(mlp_blocks(4), effective_depth=1.5, steps=[0.1, 0.4, 0.3, 0.2], activation="relu")
    return LeakyResidual(nn.Linear(8, 8), effective_depth=2.0, step=0.3)


def _empty(name, how):
    if how == "torch.device":
        with torch.device("meta"):
            return _build(name)
    accelerate = pytest.importorskip("accelerate")
    with accelerate.init_empty_weights(include_buffers=how == "accelerate+buffers"):
        return _build(name)


@pytest.mark.parametrize("how", ["torch.device", "accelerate", "accelerate+buffers"])
@pytest.mark.parametrize("name", ["LeakyMLP", "LeakyResNet", "LeakyResidual"])
def test_meta_build_then_to_empty_reset_and_load_gives_the_same_model(name, how):
    reference = _build(name)
    model = _empty(name, how)
    # fixed steps are buffers: accelerate's init_empty_weights leaves buffers real unless include_buffers=True
    assert model.steps.rho.is_meta == (how != "accelerate")
    x = torch.randn(3, 6 if name == "LeakyMLP" else 8)
    assert model(x.to("meta")).shape == reference(x).shape  # shape inference on meta
    model.to_empty(device="cpu")
    # materialised steps are the construction values, never uninitialised memory
    assert torch.equal(model.steps.rho, reference.steps.rho)
    assert torch.equal(model.steps.effective_depth, reference.steps.effective_depth)
    assert model.steps.count.sum() == 0 and model.steps.count.device.type == "cpu"
    model.reset_parameters()
    model.load_state_dict(reference.state_dict())
    assert torch.equal(model(x), reference(x))


def test_reset_parameters_restores_the_construction_steps_and_lt():
    net = LeakyMLP(6, 3, width=8, depth=4, effective_depth=2.0, scheme="exponential")
    torch.manual_seed(3)
    net.reset_parameters()
    torch.manual_seed(3)
    fresh_weights = LeakyMLP(6, 3, width=8, depth=4, effective_depth=2.0, scheme="exponential")
    torch.manual_seed(3)
    fresh_weights.reset_parameters()
    net.steps.set_steps([0.1, 0.2, 0.3, 0.4])
    net.set_effective_depth(5.0)
    torch.manual_seed(3)
    net.reset_parameters()
    assert torch.equal(net.step_sizes(), torch.full((4,), 0.25)) and net.effective_depth == 2.0
    for (k, a), (_, b) in zip(net.state_dict().items(), fresh_weights.state_dict().items()):
        assert torch.equal(a, b), k


def test_leaky_mlp_device_argument_places_the_steps_too():
    model = LeakyMLP(6, 3, width=8, depth=5, effective_depth=4.0, scheme="exponential", steps="irregular",
                     device="meta")
    assert model.steps.rho.is_meta and model.input.weight.is_meta
    model.to_empty(device="cpu")
    reference = LeakyMLP(6, 3, width=8, depth=5, effective_depth=4.0, scheme="exponential", steps="irregular")
    assert torch.equal(model.steps.rho, reference.steps.rho) and model.effective_depth == 4.0
