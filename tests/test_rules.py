"""Step-size rules: sum to T, inside the bounds, finite, for any speeds; the projection is the exact one."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive_depth import rules

speeds_st = st.lists(
    st.one_of(st.just(0.0), st.floats(1e-300, 1e300), st.floats(1e-3, 1e3), st.just(1e-300), st.just(1e300)),
    min_size=1, max_size=40)
totals_st = st.floats(0.01, 100.0)


def _bounds(n, total, lo_frac, hi_mult):
    unit = total / n
    return unit * lo_frac, unit * hi_mult


def _assert_feasible(rho, total, lo, hi, scale=0.0):
    """``scale``: the size of the numbers the result was computed from (rounding is relative to it)."""
    assert rho.dtype == torch.float64
    assert torch.isfinite(rho).all()
    assert math.isclose(float(rho.sum()), total, rel_tol=1e-9, abs_tol=1e-12 + 1e-14 * len(rho) * scale)
    assert float(rho.min()) >= lo * (1 - 1e-9) and float(rho.max()) <= hi * (1 + 1e-9)


@settings(max_examples=200, deadline=None)
@given(speeds=speeds_st, total=totals_st, lo_frac=st.floats(0.01, 1.0), hi_mult=st.floats(1.0, 50.0),
       damping=st.floats(0.05, 1.0), rho_seed=st.integers(0, 1000))
def test_guarded_rules_are_feasible(speeds, total, lo_frac, hi_mult, damping, rho_seed):
    n = len(speeds)
    lo, hi = _bounds(n, total, lo_frac, hi_mult)
    gen = torch.Generator().manual_seed(rho_seed)
    rho = rules.project_steps(torch.rand(n, generator=gen, dtype=torch.float64) * total, total, lo, hi)
    for name in ("equal_distance", "weight_norm", "uniform", "fixed", "learned"):
        new = rules.RULES[name](torch.tensor(speeds, dtype=torch.float64), rho, total, lo, hi,
                                damping=damping, floor=1e-3)
        _assert_feasible(torch.as_tensor(new, dtype=torch.float64), total, lo, hi)


@settings(max_examples=200, deadline=None)
@given(speeds=st.lists(st.floats(1e-150, 1e150), min_size=1, max_size=40), total=totals_st)
def test_paper_rule_equals_its_formula(speeds, total):
    c = torch.tensor(speeds, dtype=torch.float64)
    rho = rules.paper(c, total)
    want = [total * (1 / ci) / sum(1 / cj for cj in speeds) for ci in speeds]
    assert torch.allclose(rho, torch.tensor(want, dtype=torch.float64), rtol=1e-9)
    assert math.isclose(float(rho.sum()), total, rel_tol=1e-9)
    # equal relative distance per layer: rho_l c_l is the same for every layer
    dist = rho * c
    assert torch.allclose(dist, dist.mean().expand_as(dist), rtol=1e-9)


@settings(max_examples=300, deadline=None)
@given(v=st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=30), total=totals_st,
       lo_frac=st.floats(0.0, 1.0), hi_mult=st.floats(1.0, 30.0))
def test_projection_satisfies_kkt(v, total, lo_frac, hi_mult):
    """rho = argmin ||rho - v||^2 on {sum = T, lo <= rho <= hi}  <=>  rho_i = clip(v_i - tau, lo, hi)."""
    n = len(v)
    lo, hi = _bounds(n, total, max(lo_frac, 1e-6), hi_mult)
    v = torch.tensor(v, dtype=torch.float64)
    rho = rules.project_steps(v, total, lo, hi)
    _assert_feasible(rho, total, lo, hi, scale=float(v.abs().max()))
    free = (rho > lo * (1 + 1e-9)) & (rho < hi * (1 - 1e-9))
    scale = 1e-9 * max(1.0, float(v.abs().max()))
    if free.any():
        tau = (v - rho)[free]
        assert float(tau.max() - tau.min()) <= scale  # one shift for all free coordinates
        t = float(tau.mean())
        assert bool(((v - t)[rho <= lo * (1 + 1e-9)] <= lo + scale).all())  # at lo: wanted lower
        assert bool(((v - t)[rho >= hi * (1 - 1e-9)] >= hi - scale).all())  # at hi: wanted higher
    # idempotent on its own output
    assert torch.allclose(rules.project_steps(rho, total, lo, hi), rho, rtol=0, atol=1e-12 * total + scale)


def test_projection_is_nearest_on_small_grid():
    """Against brute force: the projection is no farther from v than any feasible point on a grid."""
    v = torch.tensor([0.9, -0.2, 0.4], dtype=torch.float64)
    lo, hi, total = 0.05, 0.6, 1.0
    rho = rules.project_steps(v, total, lo, hi)
    best = float((rho - v).pow(2).sum())
    grid = torch.linspace(lo, hi, 111, dtype=torch.float64)
    for a in grid:
        for b in grid:
            c = total - a - b
            if lo <= c <= hi:
                assert best <= float(((torch.stack([a, b, c]) - v) ** 2).sum()) + 1e-12


def test_projection_gradient_is_the_projected_identity():
    v = torch.tensor([0.5, 0.1, 0.3, 0.2], dtype=torch.float64, requires_grad=True)
    rho = rules.project_steps(v, 1.0, 0.15, 0.4)  # v - tau = [0.425->0.4, 0.025->0.15, 0.225, 0.125->0.15]
    g = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    (rho * g).sum().backward()
    free = (rho.detach() > 0.15) & (rho.detach() < 0.4)
    want = torch.where(free, g - g[free].mean(), torch.zeros_like(g))
    assert torch.allclose(v.grad, want)


def test_projection_rejects_infeasible_bounds():
    with pytest.raises(ValueError, match="no steps satisfy"):
        rules.project_steps(torch.ones(4), 1.0, 0.3, 0.5)


def test_uniform_and_irregular_profiles():
    assert torch.equal(rules.uniform(4, 2.0), torch.full((4,), 0.5, dtype=torch.float64))
    l = torch.arange(1, 11, dtype=torch.float64)
    w = 1 + 0.6 * (0.25 - (l / 10 - 0.5).abs())
    assert torch.allclose(rules.irregular(10, 3.0, a=0.6), 3.0 * w / w.sum())
    prof = rules.irregular(10, 1.0, a=0.9)
    assert float(prof[4]) > float(prof[0]) and float(prof[4]) > float(prof[-1])  # larger mid-way
    with pytest.raises(ValueError, match="a .* must be in"):
        rules.irregular(10, 1.0, a=1.0)


@pytest.mark.parametrize("depth,ratio", [(1, 4.0), (8, 4.0), (12, 4.0), (9, 2.5), (6, 1.0)])
def test_fine_ends_profile_by_hand(depth, ratio):
    w = [1 - (1 - 1 / ratio) * abs(2 * (l + 0.5) / depth - 1) for l in range(depth)]
    got = rules.fine_ends(depth, 2.0, ratio=ratio)
    assert got.dtype == torch.float64 and got.tolist() == pytest.approx([2.0 * v / sum(w) for v in w], rel=1e-13)
    if depth >= 8:  # small at both ends, the ends ~ratio times smaller than the middle
        assert got[0] == got[-1] and got[0] < got[depth // 2 - 1] and got[-1] < got[depth // 2]
    assert rules.PROFILES["fine_ends"] is rules.fine_ends


@pytest.mark.parametrize("bad", [0.5, float("nan"), float("inf"), True, "4"])
def test_fine_ends_bad_ratio_is_named(bad):
    with pytest.raises(ValueError, match="ratio .* must be a finite number >= 1"):
        rules.fine_ends(8, 1.0, ratio=bad)


def test_guarded_rule_floors_stalled_layers():
    """A layer with zero speed must not take the whole horizon: it is floored at floor * max speed."""
    speed = torch.tensor([0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    rho = rules.equal_distance(speed, rules.uniform(4, 1.0), 1.0, 0.01, 1.0, damping=1.0, floor=0.1)
    target = rules.paper(torch.tensor([0.1, 1.0, 1.0, 1.0], dtype=torch.float64), 1.0)
    assert torch.allclose(rho, rules.project_steps(target, 1.0, 0.01, 1.0))
    assert float(rho[0]) < 1.0


def test_damping_moves_part_of_the_way_in_log_space():
    speed = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    rho = rules.uniform(4, 1.0)
    target = rules.paper(speed, 1.0)
    half = rules.equal_distance(speed, rho, 1.0, 1e-6, 1.0, damping=0.5)
    geo = torch.sqrt(rho * target)
    assert torch.allclose(half, rules.project_steps(geo, 1.0, 1e-6, 1.0))
    full = rules.equal_distance(speed, rho, 1.0, 1e-6, 1.0, damping=1.0)
    assert torch.allclose(full, target)


def test_get_rule_lists_the_known_rules():
    with pytest.raises(ValueError, match="rule must be one of"):
        rules.get_rule("fastest")
