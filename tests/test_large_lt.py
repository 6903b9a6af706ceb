"""Large Lt that trains: the normalised branch and the balanced gain (issue 9 item 2), the euler headroom
warning, and the balanced init of a wrapped torchvision ResNet."""
import copy
import io
import math
import warnings

import pytest
import torch
import torchvision.models as tv
from torch import nn

from adaptive_depth import LeakyResNet, MLPBranch, wrap
from adaptive_depth.residual import (LeakyResidual, balance_branches_, balanced_gain, euler_headroom,
                                     rms_normalise)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def conv_blocks(n, channels=16, seed=0):
    torch.manual_seed(seed)
    return [nn.Sequential(nn.ReLU(), nn.Conv1d(channels, channels, 3, padding=1)) for _ in range(n)]


def reference(blocks, x, steps, lt, scheme, gain=None, norm=False, r=None):
    """The update written out in float64: x <- a x + b (g f(x)/rms(f(x)) + Lt r_l x)."""
    h = x.double()
    for l, (blk, rho) in enumerate(zip(copy.deepcopy(blocks), steps)):
        f = blk.double()(h)
        if norm:
            f = f / torch.sqrt((f ** 2).flatten(1).mean(1) + 1e-6).view(-1, *[1] * (f.dim() - 1))
        if gain is not None:
            f = gain * f
        if r is not None:
            f = f + lt * r[l] * h
        if scheme == "euler":
            h = h + rho * (f - lt * h)
        else:
            h = math.exp(-rho * lt) * h + (1 - math.exp(-rho * lt)) / lt * f
    return h


def reloaded(net, fresh):
    """``fresh`` after loading ``net``'s state_dict through a saved checkpoint."""
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    return fresh


@pytest.mark.parametrize("scheme", ["euler", "exponential"])
def test_defaults_leave_the_update_and_the_state_dict_unchanged(scheme):
    blocks = conv_blocks(4, channels=4)
    net = LeakyResNet(copy.deepcopy(blocks), effective_depth=2.0, steps=[0.1, 0.3, 0.2, 0.4], scheme=scheme)
    x = torch.randn(3, 4, 9)
    assert torch.allclose(net(x).double(), reference(blocks, x, [0.1, 0.3, 0.2, 0.4], 2.0, scheme), atol=1e-5)
    assert not any("gain" in k for k in net.state_dict())
    assert all(blk.gain is None and not blk.branch_norm for blk in net.blocks)


@pytest.mark.parametrize("scheme", ["euler", "exponential"])
@pytest.mark.parametrize("make, shape", [(conv_blocks, (3, 16, 11)),
                                         (lambda n: [MLPBranch(8) for _ in range(n)], (5, 8))])
def test_normalised_balanced_branch_matches_float64(scheme, make, shape):
    torch.manual_seed(1)
    blocks = make(4)
    steps = [0.05, 0.1, 0.05, 0.1] if scheme == "euler" else [0.3, 0.2, 0.3, 0.2]
    lt = 3.0
    net = LeakyResNet(copy.deepcopy(blocks), effective_depth=lt, steps=steps, total_time=sum(steps),
                      scheme=scheme, branch_norm=True, branch_gain="balanced")
    x = torch.randn(shape)
    want = reference(blocks, x, steps, lt, scheme, gain=3.0, norm=True)
    assert torch.allclose(net(x).double(), want, atol=1e-4)


def test_balanced_gain_makes_the_update_a_convex_combination():
    assert balanced_gain(0.0) == 1.0 and balanced_gain(0.5) == 1.0 and balanced_gain(8.0) == 8.0
    for scheme in ("euler", "exponential"):
        net = LeakyResNet(conv_blocks(4), effective_depth=2.0, scheme=scheme, branch_gain="balanced")
        a, b = net.steps.coefficients()
        gains = torch.stack([blk.gain for blk in net.blocks])
        assert torch.allclose(b * gains, 1 - a, atol=1e-6)  # y = a x + (1 - a) f(x)


def test_the_recipe_keeps_the_signal_where_the_leak_kills_it():
    # RESEARCH.md section 2: 8 conv blocks at Lt = 8 shrink the signal to ~0.7% at init
    x = torch.randn(64, 16, 40)
    ratio = {}
    for name, opts in (("raw", {}), ("recipe", dict(branch_norm=True, branch_gain="balanced"))):
        net = LeakyResNet(conv_blocks(8), effective_depth=8.0, scheme="exponential", **opts)
        with torch.no_grad():
            ratio[name] = float(net(x).norm() / x.norm())
    assert ratio["raw"] < 0.02
    assert ratio["recipe"] > 0.4


def test_gain_is_a_learned_parameter_that_round_trips():
    net = LeakyResNet(conv_blocks(3), effective_depth=4.0, scheme="exponential", branch_norm=True,
                      branch_gain=2.5)
    assert all(float(blk.gain.detach()) == 2.5 for blk in net.blocks)
    names = {n for n, _ in net.named_parameters()}
    assert {"blocks.0.gain", "blocks.2.gain"} <= names
    net(torch.randn(2, 16, 7)).sum().backward()
    assert all(blk.gain.grad is not None and blk.gain.grad.abs() > 0 for blk in net.blocks)
    with torch.no_grad():
        net.blocks[1].gain.fill_(7.0)
    fresh = reloaded(net, LeakyResNet(conv_blocks(3, seed=5), effective_depth=4.0, scheme="exponential",
                                      branch_norm=True, branch_gain=2.5))
    x = torch.randn(2, 16, 7)
    assert float(fresh.blocks[1].gain.detach()) == 7.0 and torch.equal(fresh(x), net(x))


def test_standalone_block_takes_the_options_and_mlp_branch_leaves_the_fused_path():
    lin = MLPBranch(6)
    blk = LeakyResidual(lin, effective_depth=3.0, step=0.2, scheme="exponential", branch_norm=True,
                        branch_gain="balanced")
    assert not blk._fused and float(blk.gain.detach()) == 3.0
    x = torch.randn(4, 6)
    want = reference([lin], x, [0.2], 3.0, "exponential", gain=3.0, norm=True)
    assert torch.allclose(blk(x).double(), want, atol=1e-5)
    assert "branch_norm=True" in repr(blk)


@pytest.mark.parametrize("kwargs, match", [
    (dict(branch_gain="big"), "branch_gain"), (dict(branch_gain=-1.0), "branch_gain"),
    (dict(branch_gain=float("nan")), "branch_gain"), (dict(branch_gain=True), "branch_gain"),
    (dict(branch_gain=0), "branch_gain")])
def test_bad_gain_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LeakyResNet(conv_blocks(2), effective_depth=2.0, **kwargs)
    with pytest.raises(ValueError, match=match):
        LeakyResidual(nn.Linear(3, 3), effective_depth=2.0, step=0.1, **kwargs)


def test_bad_branch_norm_and_unbatched_branch_are_clear_errors():
    with pytest.raises(TypeError, match="branch_norm"):
        LeakyResNet(conv_blocks(2), branch_norm="yes")
    with pytest.raises(ValueError, match="batch dimension"):
        rms_normalise(torch.randn(5))


def test_euler_headroom_warns_and_points_to_the_exponential_scheme():
    assert euler_headroom(12, 1.0, 10.0) == pytest.approx(1.1)
    assert euler_headroom(12, 1.0, 0.0) == math.inf
    with pytest.warns(UserWarning, match="scheme='exponential'"):
        LeakyResNet(conv_blocks(12, channels=2), effective_depth=10.0, scheme="euler")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LeakyResNet(conv_blocks(12, channels=2), effective_depth=10.0, scheme="exponential")
        LeakyResNet(conv_blocks(20, channels=2), effective_depth=5.0, scheme="euler")  # 3.6x headroom


def _signal_after_layer1(model, x):
    m = model
    with torch.no_grad():
        h = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        return float(m.layer1(h).norm() / h.norm())


def test_balance_branches_on_a_wrapped_torchvision_resnet():
    torch.manual_seed(0)
    model = wrap(tv.resnet18(num_classes=10), effective_depth=8.0, scheme="exponential")
    model.train()
    x = torch.randn(4, 3, 32, 32)
    before = _signal_after_layer1(model, x)
    bn2 = model.layer1[0].bn2.weight.detach().clone()
    names = balance_branches_(model)
    assert names[:2] == ["layer1.0", "layer1.1"] and len(names) == 8
    assert torch.equal(model.layer1[0].bn2.weight.detach(), 8.0 * bn2)
    assert model.layer2[0].downsample[1].weight.detach().eq(1).all()  # the shortcut's norm is left alone
    after = _signal_after_layer1(model, x)
    assert before < 0.1 and after > 4 * before


def test_balance_branches_scales_a_bottleneck_last_norm():
    torch.manual_seed(0)
    model = wrap(nn.Sequential(tv.resnet.Bottleneck(16, 4), tv.resnet.Bottleneck(16, 4)), effective_depth=3.0,
                 scheme="exponential")
    balance_branches_(model, gain=2.0)
    first = next(m for m in model.modules() if isinstance(m, tv.resnet.Bottleneck))
    assert first.bn3.weight.detach().eq(2.0).all() and first.bn2.weight.detach().eq(1.0).all()


def test_balance_branches_validates_before_changing_anything():
    good = LeakyResNet(conv_blocks(2), effective_depth=4.0, branch_gain=1.0, scheme="exponential")
    bad = LeakyResNet(conv_blocks(2), effective_depth=4.0, scheme="exponential")
    both = nn.Sequential(good, bad)
    with pytest.raises(ValueError, match="branch_gain='balanced'"):
        balance_branches_(both)
    assert float(good.blocks[0].gain.detach()) == 1.0  # untouched by the failed call
    with pytest.raises(ValueError, match="gain"):
        balance_branches_(good, gain=None)
    with pytest.raises(ValueError, match="gain"):
        balance_branches_(good, gain=-2.0)
    with pytest.raises(ValueError, match="no leaky blocks"):
        balance_branches_(nn.Linear(2, 2))
    assert balance_branches_(good) == ["blocks.0", "blocks.1"] and float(good.blocks[1].gain.detach()) == 4.0


def test_large_lt_trains_as_far_as_lt_zero_with_the_recipe():
    """A short run on a fixed random task: at Lt = 8 = L the ordinary block underfits; with the recipe the
    same block at Lt = 8 fits as far as at Lt = 0 (the full measurement: benchmarks/results/realdata_*.md)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 24, generator=gen)
    y = (x.squeeze(1)[:, :12].sum(1) > x.squeeze(1)[:, 12:].sum(1)).long() + 2 * (x[:, 0, ::3].sum(1) > 0).long()

    def fit(lt, recipe):
        torch.manual_seed(0)
        opts = dict(branch_norm=True, branch_gain="balanced") if recipe else {}
        model = nn.Sequential(nn.Conv1d(1, 8, 3, padding=1),
                              LeakyResNet(conv_blocks(8, channels=8), effective_depth=lt, scheme="exponential",
                                          **opts),
                              nn.ReLU(), nn.Flatten(), nn.Linear(8 * 24, 4))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(150):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return float((model(x).argmax(1) == y).float().mean())

    plain, raw, recipe = fit(0.0, True), fit(8.0, False), fit(8.0, True)
    assert raw < plain - 0.1  # the leak starves the ordinary block
    assert recipe >= plain - 0.02


@pytest.mark.parametrize("scheme", ["euler", "exponential"])
@pytest.mark.parametrize("make, shape", [(conv_blocks, (3, 16, 11)),
                                         (lambda n: [MLPBranch(8) for _ in range(n)], (5, 8)),
                                         (lambda n: [nn.Sequential(nn.Tanh(), nn.Linear(6, 6)) for _ in range(n)],
                                          (2, 3, 6))])
@pytest.mark.parametrize("norm", [False, True])
def test_branch_identity_matches_float64(scheme, make, shape, norm):
    torch.manual_seed(2)
    blocks = make(4)
    steps = [0.05, 0.1, 0.05, 0.1] if scheme == "euler" else [0.3, 0.2, 0.3, 0.2]
    lt = 3.0
    net = LeakyResNet(copy.deepcopy(blocks), effective_depth=lt, steps=steps, total_time=sum(steps), scheme=scheme,
                      branch_norm=norm, branch_gain=1.5 if norm else None, branch_identity=True)
    r = torch.rand(4).tolist()  # away from the init too
    with torch.no_grad():
        for blk, r_l in zip(net.blocks, r):
            blk.identity.fill_(r_l)
    x = torch.randn(shape)
    want = reference(blocks, x, steps, lt, scheme, gain=1.5 if norm else None, norm=norm, r=r)
    assert torch.allclose(net(x).double(), want, atol=1e-4)


@pytest.mark.parametrize("scheme", ["euler", "exponential"])
def test_branch_identity_starts_as_a_plain_residual_block(scheme):
    """At r = 1 the leak cancels: x <- x + b f(x) (b = rho under euler, (1 - exp(-rho Lt))/Lt otherwise)."""
    blocks = conv_blocks(4, channels=4)
    steps = [0.1, 0.2, 0.1, 0.2]
    net = LeakyResNet(copy.deepcopy(blocks), effective_depth=2.0, steps=steps, total_time=0.6, scheme=scheme,
                      branch_identity=True)
    x = torch.randn(3, 4, 9)
    h = x.double()
    for blk, rho in zip(copy.deepcopy(blocks), steps):
        b = rho if scheme == "euler" else (1 - math.exp(-2.0 * rho)) / 2.0
        h = h + b * blk.double()(h)
    assert torch.allclose(net(x).double(), h, atol=1e-5)
    # it keeps the signal where the same net without it shrinks it
    deep = LeakyResNet(conv_blocks(8), effective_depth=8.0, scheme="exponential", branch_identity=True)
    raw = LeakyResNet(conv_blocks(8), effective_depth=8.0, scheme="exponential")
    x = torch.randn(16, 16, 20)
    with torch.no_grad():
        assert float(deep(x).norm() / x.norm()) > 0.5 > 0.05 > float(raw(x).norm() / x.norm())


def test_branch_identity_is_a_learned_parameter_that_round_trips_and_is_off_by_default():
    assert all(blk.identity is None for blk in LeakyResNet(conv_blocks(2)).blocks)
    net = LeakyResNet(conv_blocks(3), effective_depth=4.0, scheme="exponential", branch_identity=True)
    assert {"blocks.0.identity", "blocks.2.identity"} <= {n for n, _ in net.named_parameters()}
    assert "branch_identity=True" in repr(net.blocks[0]) and not net.blocks[0]._fused
    net(torch.randn(2, 16, 7)).pow(2).sum().backward()
    assert all(blk.identity.grad is not None and blk.identity.grad.abs() > 0 for blk in net.blocks)
    with torch.no_grad():
        net.blocks[1].identity.fill_(0.25)
    fresh = reloaded(net, LeakyResNet(conv_blocks(3, seed=5), effective_depth=4.0, scheme="exponential",
                                      branch_identity=True))
    x = torch.randn(2, 16, 7)
    assert float(fresh.blocks[1].identity.detach()) == 0.25 and torch.equal(fresh(x), net(x))
    # standalone block, and Lt = 0 where the term vanishes
    lin = nn.Linear(5, 5)
    blk = LeakyResidual(lin, effective_depth=0.0, step=0.3, branch_identity=True)
    x = torch.randn(4, 5)
    assert torch.allclose(blk(x), x + 0.3 * lin(x), atol=1e-6)


def test_branch_identity_follows_a_changed_lt():
    net = LeakyResNet(conv_blocks(3, channels=4), effective_depth=4.0, scheme="exponential", branch_identity=True)
    net.set_effective_depth(6.0)
    blocks = [blk.block for blk in net.blocks]
    x = torch.randn(2, 4, 5)
    want = reference(blocks, x, net.step_sizes().tolist(), 6.0, "exponential", r=[1.0] * 3)
    assert torch.allclose(net(x).double(), want, atol=1e-5)


def test_bad_branch_identity_and_a_wrong_shape_are_clear_errors():
    with pytest.raises(TypeError, match="branch_identity"):
        LeakyResNet(conv_blocks(2), branch_identity=1)
    with pytest.raises(TypeError, match="branch_identity"):
        LeakyResidual(nn.Linear(3, 3), step=0.1, branch_identity="yes")
    # a branch output that broadcasts against x is still refused
    net = LeakyResNet([nn.Linear(4, 1)], effective_depth=1.0, scheme="exponential", branch_identity=True)
    with pytest.raises(ValueError, match="keep the shape"):
        net(torch.randn(2, 4))


def test_refine_copies_the_identity_and_the_zero_init_keeps_the_function():
    """init="zero" on identity blocks (it used to refuse): the new blocks are the identity (r = 1, gain 0) and
    the kept block's r - 1 scales by b(rho) / b(rho / 2); the float64 formulas are in test_depth.py."""
    from adaptive_depth import refine
    net = LeakyResNet(conv_blocks(2, channels=4), effective_depth=4.0, scheme="exponential", branch_norm=True,
                      branch_gain=1.0, branch_identity=True)
    with torch.no_grad():
        net.blocks[0].identity.fill_(0.5)
    x = torch.randn(3, 4, 9)
    zero = refine(copy.deepcopy(net), init="zero")
    torch.testing.assert_close(zero(x), net(x), rtol=1e-5, atol=1e-5)
    s = (1 - math.exp(-0.5 * 4.0)) / (1 - math.exp(-0.25 * 4.0))  # rho = 1/2 split in two, Lt = 4
    r = [float(b.identity.detach()) for b in zero.blocks]
    assert math.isclose(r[0], 1 - 0.5 * s, rel_tol=1e-6) and r[1:] == [1.0, 1.0, 1.0]
    assert [float(b.gain.detach()) for b in zero.blocks][1::2] == [0.0, 0.0]
    refine(net, init="copy")
    assert net.depth == 4 and [float(b.identity.detach()) for b in net.blocks] == [0.5, 0.5, 1.0, 1.0]


def test_identity_param_groups_put_r_at_lr_over_lt_of_its_group():
    from adaptive_depth.recipes import identity_param_groups
    a = LeakyResNet(conv_blocks(2, channels=4), effective_depth=8.0, scheme="exponential", branch_identity=True)
    b = LeakyResNet(conv_blocks(3, channels=4), effective_depth=2.0, scheme="exponential", branch_identity=True)
    zero = LeakyResNet(conv_blocks(1, channels=4), branch_identity=True)  # Lt = 0: r has no effect
    model = nn.Sequential(nn.Conv1d(1, 4, 1), a, b, zero)
    groups = identity_param_groups(model, lr=0.04)
    assert [g.get("lr") for g in groups] == [None, 0.02, 0.005]
    assert [id(p) for p in groups[1]["params"]] == [id(blk.identity) for blk in b.blocks]
    assert [id(p) for p in groups[2]["params"]] == [id(blk.identity) for blk in a.blocks]
    assert id(zero.blocks[0].identity) in {id(p) for p in groups[0]["params"]}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    torch.optim.AdamW(groups, lr=0.04)  # a valid grouping: no parameter twice
    with pytest.raises(ValueError, match="branch_identity=True"):
        identity_param_groups(LeakyResNet(conv_blocks(2)), lr=0.1)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        identity_param_groups(model, lr=0.0)
    scaled = identity_param_groups(model, lr=0.04, scale=0.25)
    assert [g.get("lr") for g in scaled] == [None, 0.005, 0.00125]
    assert [[id(p) for p in g["params"]] for g in scaled] == [[id(p) for p in g["params"]] for g in groups]
    for bad in (0.0, -1.0, math.inf, math.nan, True, "1"):
        with pytest.raises(ValueError, match="scale must be a finite number > 0"):
            identity_param_groups(model, lr=0.04, scale=bad)


def _small_resnet():
    torch.manual_seed(0)
    return tv.resnet18(num_classes=5).eval()


def test_wrapped_branch_identity_starts_as_the_original_model():
    x = torch.randn(2, 3, 32, 32)
    original = _small_resnet()
    with torch.no_grad():
        want = original(x)
        # euler with unit steps: a s + (f + Lt s) = s + f, the original block, at any Lt < 1
        euler = wrap(copy.deepcopy(original), effective_depth=0.5, branch_identity=True)
        assert torch.allclose(euler(x), want, atol=1e-4)
        # exponential at Lt = 8: s + b f with b = (1 - exp(-8)) / 8, i.e. the original with bn2 scaled by b
        b = (1 - math.exp(-8.0)) / 8.0
        scaled = copy.deepcopy(original)
        for blk in [m for m in scaled.modules() if isinstance(m, tv.resnet.BasicBlock)]:
            blk.bn2.weight.mul_(b), blk.bn2.bias.mul_(b)
        expo = wrap(copy.deepcopy(original), effective_depth=8.0, scheme="exponential", branch_identity=True)
        assert torch.allclose(expo(x), scaled(x), atol=1e-4)
        assert not torch.allclose(expo(x), want, atol=1e-2)  # the reference is not trivially the original
        # without the term the leak shrinks the signal instead
        leak = wrap(copy.deepcopy(original), effective_depth=8.0, scheme="exponential")
        assert not torch.allclose(leak(x), scaled(x), atol=1e-2)


def test_wrapped_branch_identity_checkpoints_groups_and_unwrap():
    from adaptive_depth import refine, unwrap
    from adaptive_depth.recipes import identity_param_groups
    plain = _small_resnet()
    model = wrap(copy.deepcopy(plain), effective_depth=4.0, scheme="exponential", branch_identity=True)
    rs = [m.leaky_identity for m in model.modules() if "leaky_identity" in m._parameters]
    assert len(rs) == 8 and all(float(r.detach()) == 1.0 for r in rs)
    assert "layer1.0.leaky_identity" in model.state_dict()
    # not part of the branch the plugin's rho-scaled decay acts on
    blk = model.layer1[0]
    assert id(blk.leaky_identity) not in {id(p) for p in blk.branch_parameters()}
    # a plain checkpoint loads strictly and leaves r alone; a wrapped one round-trips r
    with torch.no_grad():
        rs[3].fill_(0.5)
    model.load_state_dict(plain.state_dict())  # strict: the plain model's checkpoint
    missing = model.load_state_dict({k: v for k, v in model.state_dict().items() if "leaky_identity" not in k})
    assert not missing.missing_keys and float(rs[3].detach()) == 0.5
    fresh = reloaded(model, wrap(_small_resnet(), effective_depth=4.0, scheme="exponential", branch_identity=True))
    assert float(fresh.layer2[1].leaky_identity.detach()) == float(model.layer2[1].leaky_identity.detach()) == 0.5
    groups = identity_param_groups(model, lr=0.04)
    assert [g.get("lr") for g in groups] == [None, 0.01] and len(groups[1]["params"]) == 8
    torch.optim.SGD(groups, lr=0.04)
    grown, x = refine(copy.deepcopy(model).eval(), init="zero"), torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(grown(x), model.eval()(x), rtol=1e-4, atol=1e-5)  # the function is kept
    assert sum(1 for m in grown.modules() if "leaky_identity" in m._parameters) > 8
    assert sum(1 for m in model.modules() if "leaky_identity" in m._parameters) == 8
    net = unwrap(model)
    assert not any("leaky_identity" in k for k in net.state_dict()) and type(net.layer1[0]) is tv.resnet.BasicBlock
    with pytest.raises(TypeError, match="branch_identity"):
        wrap(_small_resnet(), branch_identity="yes")


@pytest.mark.parametrize("norm", [False, True])
def test_branch_identity_under_fx_and_inductor_follows_the_live_r_and_lt(norm):
    torch.manual_seed(0)
    net = LeakyResNet([nn.Sequential(nn.ReLU(), nn.Linear(8, 8)) for _ in range(3)], effective_depth=3.0,
                      scheme="exponential", branch_identity=True, branch_norm=norm,
                      branch_gain=1.5 if norm else None)
    wrapped = wrap(_small_resnet(), effective_depth=4.0, scheme="exponential", branch_identity=True)
    x, xi = torch.randn(4, 8), torch.randn(2, 3, 32, 32)
    graphs = torch.fx.symbolic_trace(net), torch.fx.symbolic_trace(wrapped)
    with torch.no_grad():
        before = graphs[0](x), graphs[1](xi)
        net.blocks[1].identity.fill_(0.3)
        net.set_effective_depth(5.0)
        wrapped.layer2[0].leaky_identity.fill_(0.2)
        wrapped.leaky_steps["layer3"].set_effective_depth(6.0)
        for graph, model, inp, old in zip(graphs, (net, wrapped), (x, xi), before):
            torch.testing.assert_close(graph(inp), model(inp), rtol=0, atol=0)
            assert (graph(inp) - old).abs().max() > 1e-3
    compiled = torch.compile(net, backend="inductor")
    torch.testing.assert_close(compiled(x), net(x), rtol=1e-5, atol=1e-5)
    compiled(x).sum().backward()
    assert all(blk.identity.grad is not None for blk in net.blocks)
