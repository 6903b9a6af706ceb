"""Candidate rules of the experiments (``adaptive_depth.experiments.candidates``) against hand-written float64."""
import math

import pytest
import torch

import adaptive_depth

from adaptive_depth import AdaptiveSteps, LeakyMLP
from adaptive_depth.experiments import candidates
from adaptive_depth.experiments.tasks import draw
from adaptive_depth.experiments.train import RunConfig, run


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_smooth_neighbours_is_the_reflected_121_filter(n):
    v = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    got = candidates.smooth_neighbours(v)
    x = v.tolist()
    want = []
    for i in range(n):
        if n == 1:
            want.append(x[0])
            continue
        left = x[i - 1] if i > 0 else x[1]
        right = x[i + 1] if i < n - 1 else x[n - 2]
        want.append((left + 2 * x[i] + right) / 4)
    assert got.tolist() == pytest.approx(want, rel=1e-15, abs=0)


def test_smoothed_distance_equidistributes_the_smoothed_arc_length_monitor():
    speed = torch.tensor([8.0, 4.0, 1.0, 1.0, 1.0, 2.0], dtype=torch.float64)
    rho = torch.full((6,), 1 / 6, dtype=torch.float64)
    # damping 1, wide bounds: the steps are exactly the target rho_l ∝ 1 / M_l
    got = candidates.smoothed_distance(speed, rho, 1.0, 1e-6, 1.0, damping=1.0)
    med = sorted(speed.tolist())[2]  # torch's median of an even count is the lower middle value
    m = [math.sqrt(1 + (c / med) ** 2) for c in speed.tolist()]
    ms = [(m[1] + 2 * m[0] + m[1]) / 4] + [(m[i - 1] + 2 * m[i] + m[i + 1]) / 4 for i in range(1, 5)] \
        + [(m[4] + 2 * m[5] + m[4]) / 4]
    inv = [1 / v for v in ms]
    assert got.tolist() == pytest.approx([v / sum(inv) for v in inv], rel=1e-12)
    assert float(got.sum()) == pytest.approx(1.0, rel=1e-14)
    # a slow layer's step is bounded by the 1 under the root: uniform speeds give uniform steps
    flat = candidates.smoothed_distance(torch.ones(6, dtype=torch.float64), rho, 1.0, 1e-6, 1.0, damping=1.0)
    assert flat.tolist() == pytest.approx([1 / 6] * 6, rel=1e-14)


def test_a_candidate_runs_through_the_plugin_and_the_experiments():
    model = LeakyMLP(5, 3, 16, 6, effective_depth=12.0, scheme="exponential")
    opt = AdaptiveSteps(torch.optim.Adam(model.parameters(), lr=1e-3), model,
                        rule=candidates.CANDIDATES["smoothed_distance"], every=1, fast_start=0, warmup=0)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(32, 5)).square().mean().backward()
        opt.step()
    assert opt.state_dict()["adaptive_steps"]["rule"] == "smoothed_distance"
    steps = adaptive_depth.step_sizes(model)[0].double()
    assert float(steps.sum()) == pytest.approx(1.0, rel=1e-6) and float(steps.max() - steps.min()) > 1e-4
    spec, task = draw(3, "tuning")
    result = run(RunConfig(data=spec.name, width=16, depth=6, effective_depth=12.0, scheme="exponential",
                           rule="smoothed_distance", steps=4, eval_every=2, n_train=spec.n_train,
                           n_test=spec.n_test, seed=3, data_seed=3), task)
    assert math.isfinite(result.test_loss) and abs(sum(result.final_steps) - 1.0) < 1e-6  # float32 steps
    assert candidates.resolve("equal_distance") == "equal_distance"


@pytest.mark.parametrize("depth", [1, 4, 9, 12])
@pytest.mark.parametrize("name", candidates.PROFILES)
def test_fixed_profiles_are_their_shape_at_the_block_midpoints_summing_to_t(name, depth):
    shape = {"fine_ends": lambda u: 1 - 0.75 * abs(2 * u - 1), "fine_middle": lambda u: 0.25 + 0.75 * abs(2 * u - 1),
             "fine_start": lambda u: 0.25 + 0.75 * u, "fine_end": lambda u: 1 - 0.75 * u,
             "fine_ends_2": lambda u: 1 - 0.5 * abs(2 * u - 1), "fine_ends_8": lambda u: 1 - 0.875 * abs(2 * u - 1)}[name]
    w = [shape((l + 0.5) / depth) for l in range(depth)]
    got = candidates.profile_steps(name, depth, total_time=2.5)
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx([2.5 * v / sum(w) for v in w], rel=1e-13)


def test_fixed_profiles_point_the_way_their_names_say_and_bad_input_is_named():
    ends, middle = candidates.profile_steps("fine_ends", 8), candidates.profile_steps("fine_middle", 8)
    assert ends[0] < ends[3] and ends[-1] < ends[4] and middle[0] > middle[3] and middle[-1] > middle[4]
    start, end = candidates.profile_steps("fine_start", 8), candidates.profile_steps("fine_end", 8)
    assert bool((start.diff() > 0).all()) and bool((end.diff() < 0).all())
    with pytest.raises(ValueError, match="profile must be one of"):
        candidates.profile_steps("fine_everywhere", 8)
    with pytest.raises(ValueError, match="depth must be >= 1"):
        candidates.profile_steps("fine_ends", 0)


def test_a_fixed_profile_run_starts_at_the_profile_and_keeps_it():
    spec, task = draw(3, "tuning")
    result = run(RunConfig(data=spec.name, width=16, depth=6, effective_depth=12.0, scheme="exponential",
                           rule="fine_ends", steps=6, eval_every=3, every=1, n_train=spec.n_train,
                           n_test=spec.n_test, seed=3, data_seed=3), task)
    want = candidates.profile_steps("fine_ends", 6).tolist()
    assert result.final_steps == pytest.approx(want, rel=1e-6)  # float32 steps, never moved by the plugin
    assert math.isfinite(result.test_loss)


def test_the_preserving_candidate_moves_the_steps_and_keeps_the_function_at_each_move(monkeypatch):
    from adaptive_depth.experiments import mechanism, train
    assert candidates.resolve("equal_distance_preserving") == "equal_distance"
    assert candidates.preserves("equal_distance_preserving") and not candidates.preserves("equal_distance")
    spec, task = draw(3, "tuning")
    calls, real = [], mechanism.preserve_function_

    def checked(model, old, optimizer=None):  # the real rescaling, with the function compared around it
        import copy
        x = task.x_train[:16]
        with torch.no_grad():
            before_move = copy.deepcopy(model)  # the weights before the move, with the steps before it
            before_move.net.steps.rho.copy_(-torch.log(old[0].double()).float() / 12.0)
            want = before_move(x)
        real(model, old, optimizer)
        with torch.no_grad():
            calls.append(float((model(x) - want).abs().max() / want.abs().max()))

    monkeypatch.setattr(mechanism, "preserve_function_", checked)
    cfg = RunConfig(data=spec.name, width=16, depth=6, effective_depth=12.0, scheme="exponential",
                    rule="equal_distance_preserving", steps=12, eval_every=6, every=2, n_train=spec.n_train,
                    n_test=spec.n_test, seed=3, data_seed=3)
    result = run(cfg, task)
    assert calls and max(calls) < 1e-4 and math.isfinite(result.test_loss)
    assert max(result.final_steps) - min(result.final_steps) > 1e-4 and abs(sum(result.final_steps) - 1) < 1e-6
    with pytest.raises(ValueError, match="rescales a LeakyMLP"):
        train.run(cfg, task, model=torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_plugin_arguments_override_the_run_penalty():
    from adaptive_depth.experiments.train import _plugin, build_model, make_optimizer
    spec, task = draw(3, "tuning")
    cfg = RunConfig(data=spec.name, width=8, depth=3, effective_depth=12.0, scheme="exponential", rule="fine_ends",
                    plugin={"weight_decay": 0.0})
    model = build_model(cfg, task)
    assert _plugin(cfg, make_optimizer(cfg, model), model).weight_decay == 0.0
    default = RunConfig(data=spec.name, width=8, depth=3, effective_depth=12.0, scheme="exponential")
    assert _plugin(default, make_optimizer(default, model), model).weight_decay == pytest.approx(1e-3 / 12)


@pytest.mark.parametrize("suffix", list(candidates.POWERS))
def test_power_distance_targets_the_speed_to_minus_p(suffix):
    name, p = f"power_distance_{suffix}", float(suffix)
    gen = torch.Generator().manual_seed(int(p * 10))
    speed = torch.rand(7, dtype=torch.float64, generator=gen) + 0.2
    rho = torch.full((7,), 2.0 / 7, dtype=torch.float64)
    rule = candidates.CANDIDATES[name]
    # damping 1, wide bounds: exactly rho_l = T m_l^-1 / sum_i m_i^-1 with m = c^p floored at 1e-3 max(c^p)
    got = rule(speed, rho, 2.0, 1e-9, 2.0, damping=1.0)
    m = [c ** p for c in speed.tolist()]
    inv = [1 / max(v, 1e-3 * max(m)) for v in m]
    assert got.tolist() == pytest.approx([2.0 * v / sum(inv) for v in inv], rel=1e-12)
    # damping d: log rho moves a fraction d of the way, then the sum is restored by the projection
    half = rule(speed, rho, 2.0, 1e-9, 2.0, damping=0.5)
    mixed = [math.sqrt(r * t) for r, t in zip(rho.tolist(), got.tolist())]
    assert float(half.sum()) == pytest.approx(2.0, rel=1e-13)
    shift = [h - x for h, x in zip(half.tolist(), mixed)]
    assert max(shift) - min(shift) == pytest.approx(0.0, abs=1e-12)  # one shift tau for every step, no bound active
    # the fastest layer gets the smallest step
    assert int(got.argmin()) == int(speed.argmax()) and int(got.argmax()) == int(speed.argmin())


def test_power_distance_one_is_equal_distance_and_bad_power_is_named():
    speed = torch.tensor([3.0, 1.0, 0.5, 2.0], dtype=torch.float64)
    rho = torch.tensor([0.1, 0.4, 0.3, 0.2], dtype=torch.float64)
    got = candidates.power_distance(1.0)(speed, rho, 1.0, 0.05, 0.6, damping=0.5)
    want = adaptive_depth.rules.equal_distance(speed, rho, 1.0, 0.05, 0.6, damping=0.5)
    assert torch.equal(got, want)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="power must"):
            candidates.power_distance(bad)
