"""adaptive_depth.diagnostics on known answers: COI = rank, a hand-computed 2x3 example, float64 references
written out plainly, a network that acts linearly, momenta against finite differences, and the Hamiltonian
at a critical point (constant along depth to first order in 1/L, equal to kinetic + potential)."""
import json
import math

import pytest
import torch
from torch import nn

from adaptive_depth import LeakyMLP, LeakyResNet, MLPBranch, step_coefficients
from adaptive_depth.diagnostics import (Diagnostics, coi_lower_bound, cost_of_identity, diagnose, effective_rank,
                                        energies, features, hamiltonian, nuclear_ratio, singular_values)

D = torch.float64


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def nonneg_rank(n, w, k, seed=0):
    g = gen(seed)
    return torch.rand(n, k, generator=g, dtype=D) @ torch.rand(k, w, generator=g, dtype=D)


# ----------------------------------------------------------------------------------- plain references
def ref_features(a, bias=True):
    return torch.cat([torch.relu(a), torch.ones(a.shape[0], 1, dtype=D)], 1) if bias else torch.relu(a)


def ref_coi(a, bias=True):
    """Tr[A K^+ A^T] with K = s(A)^T s(A) (paper layout: A = a^T), by an explicit pseudo-inverse."""
    A, S = a.T, ref_features(a, bias).T
    K = S.T @ S
    return float(torch.trace(A @ torch.linalg.pinv(K, hermitian=True) @ A.T))


def ref_coi_stable(a, g0, bias=True):
    A, S = a.T, ref_features(a, bias).T
    K = S.T @ S
    g = g0 * float(torch.linalg.matrix_norm(K, ord=2))
    return float(torch.trace(A @ torch.linalg.inv(K + g * torch.eye(K.shape[0], dtype=D)) @ A.T))


# -------------------------------------------------------------------------------- cost of identity
@pytest.mark.parametrize("n,w,k", [(40, 12, 1), (40, 12, 3), (30, 8, 5), (6, 10, 3)])
def test_coi_of_nonnegative_matrix_without_bias_is_its_rank(n, w, k):
    a = nonneg_rank(n, w, k, seed=k)
    assert cost_of_identity(a, bias=False) == pytest.approx(k, abs=1e-8)
    # the stabilised version tends to the rank as gamma -> 0, from below; both solve branches (N > w, N < w)
    assert cost_of_identity(a, bias=False, gamma=1e-10) == pytest.approx(k, abs=1e-4)
    assert cost_of_identity(a, bias=False, gamma=1e-2) < k


def test_hand_computed_2x3_example():
    # paper layout A = [[1, 2, 0], [-1, 0, 1]] (w = 2, N = 3): rows = examples here
    a = torch.tensor([[1.0, -1.0], [2.0, 0.0], [0.0, 1.0]], dtype=D)
    # s(A) is square and invertible: the only W with W s(A) = A is [[1, 0, 0], [1, 3, -2]], |W|^2 = 15
    assert cost_of_identity(a) == pytest.approx(15.0, abs=1e-10)
    # without bias: column 1 of A is in the span of relu(A) (coefficients (1, 0)), column 2 is projected:
    # (-1, 0, 1) -> -1/5 (1, 2, 0) + 1 (0, 0, 1), so |W|^2 = 1 + 1/25 + 1 = 51/25
    assert cost_of_identity(a, bias=False) == pytest.approx(51 / 25, abs=1e-10)
    # H = (Lt/2) |B s(A)^T|^2 - Lt Tr[B A^T] with B = [[1, 0, 1], [0, 1, 1]]: B s(A)^T = [[1, 1, 2], [2, 1, 2]]
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=D)
    assert hamiltonian(a, b, 2.0) == pytest.approx(1.0 * 15 - 2.0 * 2, abs=1e-10)
    # kinetic of V = A is |A|_K^2 / (2 Lt) = 15 / 4; potential -(Lt/2) COI = -15
    kin, pot = energies(a, a, 2.0)
    assert (kin, pot) == (pytest.approx(15 / 4, abs=1e-10), pytest.approx(-15.0, abs=1e-10))


@pytest.mark.parametrize("n,w", [(50, 7), (5, 9)])
@pytest.mark.parametrize("bias", [True, False])
def test_coi_against_float64_reference(n, w, bias):
    a = torch.randn(n, w, generator=gen(n + w), dtype=D)
    assert cost_of_identity(a, bias=bias) == pytest.approx(ref_coi(a, bias), rel=1e-8)
    for g0 in (1e-6, 1e-3, 1e-1):
        assert cost_of_identity(a, bias=bias, gamma=g0) == pytest.approx(ref_coi_stable(a, g0, bias), rel=1e-7)


def test_coi_inputs_in_float32_and_errors():
    a = torch.randn(20, 4, generator=gen(3))
    assert cost_of_identity(a) == pytest.approx(ref_coi(a.double()), rel=1e-8)
    with pytest.raises(ValueError, match="gamma"):
        cost_of_identity(a, gamma=-1.0)
    with pytest.raises(ValueError, match="a must be"):
        cost_of_identity(torch.randn(3))
    with pytest.raises(ValueError, match="a and b"):
        hamiltonian(a, torch.randn(20, 5), 1.0)
    with pytest.raises(ValueError, match="effective_depth"):
        energies(a, a, 0.0)
    with pytest.raises(ValueError, match="effective_depth"):
        hamiltonian(a, a, -1.0)


def test_nuclear_bounds():
    for seed in range(5):
        a = torch.randn(30, 6, generator=gen(seed), dtype=D) + 0.3 * seed
        for bias in (True, False):
            assert coi_lower_bound(a, bias=bias) <= cost_of_identity(a, bias=bias) * (1 + 1e-10)
    # for a >= 0 without bias the bound is the paper's ratio |A|_*^2 / |A|_F^2, itself <= rank
    a = nonneg_rank(40, 10, 3, seed=7)
    s = torch.linalg.svdvals(a)
    assert coi_lower_bound(a, bias=False) == pytest.approx(float(s.sum() ** 2 / s.square().sum()), rel=1e-8)
    assert nuclear_ratio(a) == pytest.approx(float(s.sum() ** 2 / s.square().sum()), rel=1e-10)
    assert nuclear_ratio(a) <= 3 + 1e-9
    # with the bias row the ratio is not a bound: A = c 1^T has ratio 1 and COI = c^2 / (1 + c^2)
    a = torch.full((10, 1), 2.0, dtype=D)
    assert nuclear_ratio(a) == pytest.approx(1.0)
    assert cost_of_identity(a) == pytest.approx(4 / 5, abs=1e-10)
    assert coi_lower_bound(a) <= 4 / 5 + 1e-10


def test_effective_rank_and_singular_values():
    a = nonneg_rank(50, 10, 3, seed=1)
    assert effective_rank(a, method="threshold", threshold=1e-8) == 3
    assert 1 <= effective_rank(a) <= 3
    e = torch.zeros(8, 4, dtype=D)
    e[:4, :4] = torch.eye(4, dtype=D)
    assert effective_rank(e) == pytest.approx(4.0)  # equal singular values: the entropy rank is exact
    assert singular_values(e).tolist() == pytest.approx([1.0] * 4)
    assert effective_rank(torch.ones(5, 3), centered=True) == 0.0
    with pytest.raises(ValueError, match="method"):
        effective_rank(a, method="bogus")


# -------------------------------------------------------------------------------------- networks
def random_mlp(w=5, depth=4, lt=1.5, scheme="euler", seed=0, steps="irregular"):
    torch.manual_seed(seed)
    m = LeakyMLP(3, 2, w, depth, effective_depth=lt, scheme=scheme, steps=steps, dtype=D)
    with torch.no_grad():
        for blk in m.blocks:
            blk.block.linear.weight.normal_(0, 1.0, generator=gen(seed + 11))
            blk.block.linear.bias.normal_(0, 0.5, generator=gen(seed + 12))
    return m


def plain_reps(m, x, layer=0, h=None):
    """A_layer .. A_L written out plainly: A_k = a_k A_{k-1} + b_k (relu(A_{k-1}) W_k^T + bias_k), with the
    coefficients in float64 (the model's own forward computes them from float32 steps)."""
    a, b = step_coefficients(m.step_sizes().double(), m.effective_depth, m.steps.scheme)
    out = [m.input(x) if h is None else h]
    for k in range(layer, m.depth):
        lin = m.blocks[k].block.linear
        out.append(a[k] * out[-1] + b[k] * (torch.relu(out[-1]) @ lin.weight.T + lin.bias))
    return out


def forward_from(m, layer, h):
    """The rest of the network from A_layer, then the output layer."""
    return m.output(plain_reps(m, None, layer, h)[-1])


@pytest.mark.parametrize("scheme", ["euler", "exponential"])
def test_momentum_equals_finite_difference_gradient(scheme):
    m = random_mlp(scheme=scheme)
    x, y = torch.randn(9, 3, generator=gen(1), dtype=D), torch.randn(9, 2, generator=gen(2), dtype=D)
    lam = 0.02
    d = diagnose(m, x, y, lam=lam)
    with torch.no_grad():
        reps = plain_reps(m, x)
    cost = lambda out: (out - y).pow(2).sum(1).mean()  # noqa: E731
    with torch.no_grad():
        base = float(cost(forward_from(m, 0, reps[0])))
    assert d.data_cost == pytest.approx(base, rel=1e-12)
    eps = 1e-6
    for layer in (0, 2, m.depth):
        e = torch.randn(reps[layer].shape, generator=gen(layer), dtype=D)
        with torch.no_grad():
            fd = (float(cost(forward_from(m, layer, reps[layer] + eps * e)))
                  - float(cost(forward_from(m, layer, reps[layer] - eps * e)))) / (2 * eps)
        b = momentum(m, x, y, layer, lam)  # autograd through the plain forward
        assert -lam * float((b * e).sum()) == pytest.approx(fd, rel=1e-6, abs=1e-9)
        # and the record's H is the formula applied to that momentum
        assert d.layers[layer].hamiltonian == pytest.approx(hamiltonian(reps[layer], b, m.effective_depth), rel=1e-9)
        assert d.layers[layer].momentum_norm == pytest.approx(float(b.norm()), rel=1e-9)


def momentum(m, x, y, layer, lam):
    """B_layer = -(1/lam) dC/dA_layer by autograd through the plain forward above."""
    h = plain_reps(m, x)[layer].detach().requires_grad_(True)
    c = (forward_from(m, layer, h) - y).pow(2).sum(1).mean()
    (g,) = torch.autograd.grad(c, h)
    return -g / lam


@pytest.mark.parametrize("scheme", ["euler", "exponential"])
def test_network_acting_as_identity_on_positive_data(scheme):
    """W_l = Lt I, bias 0 and A_0 > 0: every block maps A to A exactly (the branch cancels the leak), so the
    velocity, distance and kinetic energy are 0, every representation is A_0, every momentum is the output
    one (the Jacobian of each block is the identity), and H is the same at every layer."""
    lt, w, n = 2.0, 4, 12
    torch.manual_seed(0)
    m = LeakyMLP(3, 2, w, 6, effective_depth=lt, scheme=scheme, steps="irregular", dtype=D)
    with torch.no_grad():
        for blk in m.blocks:
            blk.block.linear.weight.copy_(lt * torch.eye(w, dtype=D))
            blk.block.linear.bias.zero_()
        m.input.weight.copy_(torch.rand(w, 3, generator=gen(5), dtype=D))
        m.input.bias.fill_(0.5)
    x = torch.rand(n, 3, generator=gen(6), dtype=D)
    y = torch.randn(n, 2, generator=gen(7), dtype=D)
    lam = 0.1
    d = diagnose(m, x, y, lam=lam)
    a0 = m.input(x).detach()
    pred = m.output(a0).detach()
    b = -(2.0 / n) * (pred - y) @ m.output.weight.detach() / lam  # closed form: -(1/lam) dC/dA_L
    h = hamiltonian(a0, b, lt)
    for rec in d.layers:
        assert rec.hamiltonian == pytest.approx(h, rel=1e-10)
        assert rec.momentum_norm == pytest.approx(float(b.norm()), rel=1e-10)
        assert rec.coi == pytest.approx(ref_coi(a0), rel=1e-8)
    for rec in d.layers[1:]:
        assert rec.velocity_norm == pytest.approx(0.0, abs=1e-12)
        assert rec.distance == pytest.approx(0.0, abs=1e-12)
        assert rec.kinetic == pytest.approx(0.0, abs=1e-12)
        assert rec.energy == pytest.approx(-0.5 * lt * ref_coi(a0), rel=1e-8)
        assert rec.weight_sv == pytest.approx([lt] * w, abs=1e-10)  # [W | b] = [Lt I | 0]
    assert [r.step for r in d.layers[1:]] == pytest.approx(m.step_sizes().tolist())
    assert d.layers[-1].depth == pytest.approx(1.0)


def critical_point(depth, lt=2.0, lam=0.1, w=4, n=8):
    """A LeakyMLP in the paper's form (A_0 = X, output A_1: identity input / output maps, frozen) trained by
    L-BFGS in float64 to a critical point of C + lam/(2 Lt) sum rho_l |W_l|^2 on positive data (the ReLUs stay
    active, so the cost is smooth there)."""
    g = gen(0)
    x = 1 + torch.rand(n, w, generator=g, dtype=D)
    mix = torch.rand(w, w, generator=g, dtype=D)
    y = 1.5 * x @ (mix / mix.sum(1, keepdim=True)).T + 0.5
    torch.manual_seed(0)
    m = LeakyMLP(w, w, w, depth, effective_depth=lt, scheme="euler").double()  # steps in float64 too
    with torch.no_grad():
        for lin in (m.input, m.output):
            lin.weight.copy_(torch.eye(w, dtype=D))
            lin.bias.zero_()
            lin.requires_grad_(False)
    params = [p for blk in m.blocks for p in blk.block.parameters()]
    rho = m.step_sizes().double()

    def closure():
        opt.zero_grad()
        reg = sum(rho[l] * sum(p.square().sum() for p in m.blocks[l].block.parameters()) for l in range(depth))
        c = (m(x) - y).square().sum(1).mean() + lam / (2 * lt) * reg
        c.backward()
        return c

    for _ in range(30):
        opt = torch.optim.LBFGS(params, lr=1, max_iter=400, tolerance_grad=1e-13, tolerance_change=0,
                                history_size=50, line_search_fn="strong_wolfe")
        opt.step(closure)
        grad = math.sqrt(sum(float(p.grad.square().sum()) for p in params))
        if grad < 1e-9:
            break
    assert grad < 1e-7, f"L-BFGS did not reach a critical point (gradient norm {grad:g})"
    return m, x, y, lam


def test_hamiltonian_at_a_critical_point():
    spreads = []
    for depth in (6, 18):
        m, x, y, lam = critical_point(depth)
        lt = m.effective_depth
        d = diagnose(m, x, y, lam=lam)
        with torch.no_grad():
            reps = plain_reps(m, x)
        assert min(float(r.min()) for r in reps) > 0  # the cost is smooth here: no ReLU at its kink
        for l in range(1, depth + 1):
            # optimality of W_l: W_l = Lt B_l s(A_{l-1})^T (euler: b_l = rho_l)
            lin = m.blocks[l - 1].block.linear
            wl = torch.cat([lin.weight, lin.bias[:, None]], 1).detach()
            bl = momentum(m, x, y, l, lam)
            assert torch.allclose(wl, lt * bl.T @ features(reps[l - 1]), rtol=0, atol=1e-6 * float(wl.norm()))
            # with A_{l-1} > 0 (in the row space of s(A_{l-1})), H(A_{l-1}, B_l) = kinetic + potential exactly
            rec = d.layers[l]
            assert rec.hamiltonian_step == pytest.approx(rec.energy, rel=1e-6)
            assert rec.stationarity < 1e-6
        h = torch.tensor(d.column("hamiltonian"))
        assert float(h.max()) < 0  # -(2/Lt) H > 0 on this task
        assert -2 / lt * float(h.max()) <= min(d.column("coi"))  # -(2/Lt) H <= min COI
        spreads.append(float(h.max() - h.min()) / float(h.abs().mean()))
    # H(A_l, B_l) is constant along depth up to the discretisation, first order in 1/L (6 -> 18: x 1/3)
    assert spreads[0] < 0.1
    assert spreads[1] < 0.45 * spreads[0]


# -------------------------------------------------------------------------------- the report
def test_diagnose_report_table_json_and_plot(tmp_path):
    m = random_mlp(depth=5)
    x, y = torch.randn(20, 3, generator=gen(1), dtype=D), torch.randn(20, 2, generator=gen(2), dtype=D)
    d = diagnose(m.float(), x.float(), y.float())
    assert isinstance(d, Diagnostics) and len(d.layers) == 6 and d.branch_form
    assert d.lam == pytest.approx(1e-3 / 1.5)  # the paper's lambda = 1e-3 / Lt by default
    assert d.layers[0].step is None and d.layers[0].weight_sv is None
    assert all(len(r.weight_sv) == 5 for r in d.layers[1:])
    assert all(r.stationarity > 0.1 for r in d.layers[1:])  # random weights: far from a critical point
    assert [r.layer for r in d.layers] == list(range(6))
    text = str(d)
    assert "coi_stable" in text and "hamiltonian" in text and len(text.splitlines()) == 1 + 2 + 6
    summary = d.bottleneck()
    assert summary["h_min"] <= summary["h_median"] <= summary["h_max"]
    path = d.save_json(str(tmp_path / "d.json"))
    loaded = json.load(open(path))
    assert len(loaded["layers"]) == 6 and loaded["layers"][3]["coi"] == pytest.approx(d.layers[3].coi)
    assert Diagnostics.from_dict(loaded).layers == d.layers
    png = d.plot(str(tmp_path / "d.png"), title="test")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_diagnose_leaky_resnet_branch_forms():
    torch.manual_seed(0)
    net = LeakyResNet([MLPBranch(4) for _ in range(3)], effective_depth=1.0)
    x, y = torch.randn(10, 4), torch.randn(10, 4)
    d = diagnose(net, x, y)
    assert d.branch_form and len(d.layers) == 4 and d.layers[1].weight_sv is not None
    other = LeakyResNet([nn.Sequential(nn.Tanh(), nn.Linear(4, 4)) for _ in range(3)], effective_depth=1.0)
    d = diagnose(other, x, y, head=nn.Linear(4, 4))
    assert not d.branch_form and d.notes and d.layers[1].weight_sv is None
    assert math.isfinite(d.layers[2].hamiltonian)


def test_diagnose_errors():
    m = random_mlp()
    x, y = torch.randn(6, 3, dtype=D), torch.randn(6, 2, dtype=D)
    with pytest.raises(TypeError, match="model must be"):
        diagnose(nn.Linear(3, 2), x, y)
    for bad in (0.0, float("inf"), True):
        with pytest.raises(ValueError, match="lam must be a finite number > 0"):
            diagnose(m, x, y, lam=bad)
    with pytest.raises(ValueError, match="gamma"):
        diagnose(m, x, y, gamma=0.0)
    with pytest.raises(ValueError, match="x and y"):
        diagnose(m, x, y[:3])
    with pytest.raises(ValueError, match="head"):
        diagnose(m, x, y, head=nn.Identity())
