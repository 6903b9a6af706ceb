"""The exact reparametrisation of ``experiments.mechanism``: a LeakyMLP is a plain ResNet with steps b/a."""
import math

import pytest
import torch

from adaptive_depth import LeakyMLP
from adaptive_depth.experiments.mechanism import plain_equivalent, rescaled_coefficients


def _trained_like(model, gen):
    """Move every weight and bias off its init (random, float64), so the check is not about the init."""
    with torch.no_grad():
        for p in model.parameters():
            if p is not model.net.steps.rho:
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def _reference(model, x):
    """The leaky recursion written out in float64 from the weights and the steps alone."""
    rho = [float(v) for v in model.net.steps.current().double()]
    lt, scheme = float(model.net.effective_depth), model.net.steps.scheme
    h = x.double() @ model.input.weight.double().T + model.input.bias.double()
    for r, blk in zip(rho, model.blocks):
        a, b = (math.exp(-r * lt), (1 - math.exp(-r * lt)) / lt if lt else r) if scheme == "exponential" \
            else (1 - r * lt, r)
        lin = blk.block.linear
        h = a * h + b * (torch.relu(h) @ lin.weight.double().T + lin.bias.double())
    return (h @ model.output.weight.double().T + model.output.bias.double()).detach()


@pytest.mark.parametrize("scheme,lt,steps", [("exponential", 12.0, "uniform"), ("exponential", 24.0, "irregular"),
                                             ("exponential", 3.0, [0.05, 0.3, 0.1, 0.25, 0.3]),
                                             ("euler", 2.5, [0.1, 0.3, 0.2, 0.15, 0.25]), ("euler", 0.0, "uniform")])
def test_a_leaky_mlp_is_exactly_a_plain_resnet_with_steps_b_over_a(scheme, lt, steps):
    gen = torch.Generator().manual_seed(int(lt * 10) + len(scheme))
    torch.manual_seed(int(lt))
    model = _trained_like(LeakyMLP(7, 3, 16, 5, effective_depth=lt, steps=steps, scheme=scheme,
                                   dtype=torch.float64), gen)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = plain_equivalent(model)
    assert float(plain.effective_depth) == 0.0 and plain.net.steps.scheme == "euler"
    for x in (torch.randn(64, 7, generator=gen, dtype=torch.float64), 5 * torch.randn(3, 7, generator=gen,
                                                                                      dtype=torch.float64)):
        # the steps are stored in float32 (so are the plain net's c_l): agreement to float32 precision, where
        # a wrong identity is off by O(1)
        want = _reference(model, x)
        scale = float(want.detach().abs().max())
        assert torch.allclose(model(x), want, rtol=1e-5, atol=1e-5 * scale)
        assert torch.allclose(plain(x), want, rtol=1e-5, atol=1e-5 * scale)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is unchanged
    c, s, out = rescaled_coefficients(model)
    rho = model.net.steps.current().double()
    if scheme == "exponential":
        want_c = [(math.exp(r * lt) - 1) / lt if lt else r for r in rho.tolist()]
        assert c.tolist() == pytest.approx(want_c, rel=1e-6)
        assert out == pytest.approx(math.exp(-lt * float(rho.sum())), rel=1e-5)
    else:
        assert c.tolist() == pytest.approx([r / (1 - r * lt) for r in rho.tolist()], rel=1e-6)
    assert plain.step_sizes().double().tolist() == pytest.approx(c.tolist(), rel=1e-6)
    a = [math.exp(-r * lt) if scheme == "exponential" else 1 - r * lt for r in rho.tolist()]
    assert s.tolist() == pytest.approx([math.prod(1 / v for v in a[:l]) for l in range(len(a))], rel=1e-6)


def test_the_function_class_does_not_depend_on_the_steps_or_lt():
    """Two leaky nets with different steps and Lt map onto plain nets with the same architecture: one plain
    net's weights can be set from the other's (the steps c_l and bias scales absorbed), giving the same outputs."""
    gen = torch.Generator().manual_seed(5)
    a = _trained_like(LeakyMLP(4, 2, 8, 4, effective_depth=10.0, steps=[0.1, 0.4, 0.3, 0.2], scheme="exponential",
                               dtype=torch.float64), gen)
    b = LeakyMLP(4, 2, 8, 4, effective_depth=2.0, steps="uniform", scheme="exponential", dtype=torch.float64)
    ca, sa, oa = rescaled_coefficients(a)
    cb, sb, ob = rescaled_coefficients(b)
    with torch.no_grad():  # b's weights such that c_b W_b = c_a W_a, and its biases and read-out to match
        b.input.load_state_dict(a.input.state_dict())
        for l, (ba, bb) in enumerate(zip(a.blocks, b.blocks)):
            bb.block.linear.weight.copy_(ba.block.linear.weight * (ca[l] / cb[l]))
            bb.block.linear.bias.copy_(ba.block.linear.bias * (ca[l] * sa[l] / (cb[l] * sb[l])))
        b.output.weight.copy_(a.output.weight * (oa / ob))
        b.output.bias.copy_(a.output.bias)
    x = torch.randn(32, 4, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        want = a(x)
    assert torch.allclose(b(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert not torch.allclose(LeakyMLP(4, 2, 8, 4, effective_depth=2.0, scheme="exponential",
                                       dtype=torch.float64)(x), want, rtol=1e-2)  # a net not mapped differs


def test_bad_models_are_named():
    with pytest.raises(TypeError, match="model must be a LeakyMLP"):
        rescaled_coefficients(torch.nn.Linear(3, 3))
    net = LeakyMLP(3, 3, 4, 2, effective_depth=1.0, scheme="euler", steps=[0.5, 0.5], dtype=torch.float64)
    with torch.no_grad():
        net.net.steps.effective_depth.fill_(2.0)  # rho Lt = 1: a = 0, no rescaling exists
    with pytest.raises(ValueError, match="a_l = 1 - rho_l Lt must be > 0"):
        plain_equivalent(net)


@pytest.mark.parametrize("scheme,lt", [("exponential", 12.0), ("euler", 2.0)])
def test_adam_on_the_leaky_net_is_adam_on_the_plain_net_with_lr_scaled_by_c(scheme, lt):
    """The optimizer corollary: Adam is invariant to a fixed rescaling of a tensor's gradient, so the leaky net
    trained at lr is the plain net (steps c_l, the same W_l) trained at lr with its biases B_l = s_l beta_l at
    s_l * lr and its read-out at (its scale) * lr. The steps enter only through c_l: in a plain net with unit
    steps, V_l = c_l W_l moves at c_l * lr."""
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    leaky = _trained_like(LeakyMLP(5, 2, 12, 4, effective_depth=lt, steps=[0.1, 0.2, 0.3, 0.4] if scheme == "euler"
                                   else [0.1, 0.4, 0.3, 0.2], scheme=scheme, dtype=torch.float64), gen)
    plain, one_lr = plain_equivalent(leaky), plain_equivalent(leaky)
    c, s, out = rescaled_coefficients(leaky)
    lr, eps = 1e-2, 1e-30  # eps ~ 0: the rescaling invariance is exact only without Adam's epsilon
    weights = [p for n, p in leaky.named_parameters() if not n.endswith("rho")]
    opt_leaky = torch.optim.Adam(weights, lr=lr, eps=eps)
    groups = [{"params": list(plain.input.parameters()), "lr": lr}, {"params": [plain.output.weight], "lr": lr * out},
              {"params": [plain.output.bias], "lr": lr}]
    for l, blk in enumerate(plain.blocks):
        groups += [{"params": [blk.block.linear.weight], "lr": lr},
                   {"params": [blk.block.linear.bias], "lr": lr * float(s[l])}]
    opt_plain = torch.optim.Adam(groups, lr=lr, eps=eps)
    opt_one = torch.optim.Adam([p for n, p in one_lr.named_parameters() if not n.endswith("rho")], lr=lr, eps=eps)
    x, y = torch.randn(40, 5, generator=gen, dtype=torch.float64), torch.randn(40, 2, generator=gen, dtype=torch.float64)
    for _ in range(5):
        for net, opt in ((leaky, opt_leaky), (plain, opt_plain), (one_lr, opt_one)):
            opt.zero_grad()
            (net(x) - y).square().mean().backward()
            opt.step()
    with torch.no_grad():
        want, got = leaky(x), plain(x)
        mapped = plain_equivalent(leaky)(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert torch.allclose(mapped, got, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    with torch.no_grad():  # not a trivial agreement: the plain net trained at one lr everywhere differs
        assert not torch.allclose(one_lr(x), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))


@pytest.mark.parametrize("scheme,lt", [("exponential", 12.0), ("euler", 2.0)])
def test_preserve_function_keeps_the_output_and_adams_direction_across_a_step_change(scheme, lt):
    from adaptive_depth.experiments.mechanism import preserve_function_
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    model = _trained_like(LeakyMLP(5, 2, 12, 4, effective_depth=lt, scheme=scheme, dtype=torch.float64), gen)
    weights = [p for n, p in model.named_parameters() if not n.endswith("rho")]
    opt = torch.optim.Adam(weights, lr=1e-2)
    x, y = torch.randn(30, 5, generator=gen, dtype=torch.float64), torch.randn(30, 2, generator=gen, dtype=torch.float64)
    for _ in range(3):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
    with torch.no_grad():
        want = model(x)
        old = tuple(t.clone() for t in model.net.steps.coefficients())
        direction = {p: (opt.state[p]["exp_avg"] / opt.state[p]["exp_avg_sq"].sqrt()).clone() for p in weights}
        before = {n: p.clone() for n, p in model.named_parameters()}
    new_steps = [0.1, 0.2, 0.3, 0.4]
    model.net.steps.set_steps(new_steps)
    with torch.no_grad():
        assert not torch.allclose(model(x), want, rtol=1e-2)  # moving the grid alone changes the function
    preserve_function_(model, old, opt)
    with torch.no_grad():
        got = model(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # the factors, written out: W_l by c_l / c'_l, the read-out by prod a / prod a'
    coef = (lambda r: ((math.exp(r * lt) - 1) / lt, math.exp(-r * lt))) if scheme == "exponential" \
        else (lambda r: (r / (1 - r * lt), 1 - r * lt))
    old_rho = [0.25] * 4
    for l, r_new in enumerate(new_steps):
        k = coef(old_rho[l])[0] / coef(r_new)[0]
        w = model.blocks[l].block.linear.weight
        assert torch.allclose(w, before[f"net.blocks.{l}.block.linear.weight"] * k, rtol=1e-5)
    k_out = math.prod(coef(r)[1] for r in old_rho) / math.prod(coef(r)[1] for r in new_steps)
    assert torch.allclose(model.output.weight, before["output.weight"] * k_out, rtol=1e-5)
    assert torch.equal(model.input.weight, before["input.weight"])
    with torch.no_grad():
        for p in weights:  # Adam's normalised direction is unchanged: the layer moves at lr in W, c'_l lr in V
            now = opt.state[p]["exp_avg"] / opt.state[p]["exp_avg_sq"].sqrt()
            assert torch.allclose(now, direction[p], rtol=1e-9, atol=1e-12)
