"""StepSizes: what the steps are (buffers unless learned), their constraints, statistics and checkpoints."""
import copy
import io
import math

import pytest
import torch
from torch import nn

from adaptive_depth import AdaptiveSteps, LeakyMLP, LeakyResNet, rules
from adaptive_depth.steps import (CheckpointError, ParameterNormCost, StepSizes, below_wall, over_lt,
                                  step_groups)


def mlp(lt=0.0, scheme="euler", seed=0, **kw):
    torch.manual_seed(seed)
    return LeakyMLP(4, 3, width=8, depth=5, effective_depth=lt, scheme=scheme, **kw)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------ item 14: what the steps are
def test_fixed_steps_are_a_buffer_and_every_parameter_gets_a_gradient():
    """timm's model tests count every parameter as needing a gradient: frozen steps must not be parameters."""
    model = mlp(lt=1.0)
    assert "net.steps.rho" not in dict(model.named_parameters())
    assert "net.steps.rho" in dict(model.named_buffers())
    model(torch.randn(6, 4)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_learned_steps_are_a_parameter_and_get_a_gradient():
    model = mlp(lt=1.0, steps="learned")
    assert isinstance(model.steps.rho, nn.Parameter) and model.steps.learnable
    model(torch.randn(6, 4)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_wrapped_resnet_passes_the_every_parameter_has_a_gradient_check():
    """The check timm's model tests make (sum of numel over parameters == sum over those with a gradient)."""
    tv = pytest.importorskip("torchvision")
    from adaptive_depth import wrap
    torch.manual_seed(0)
    model = wrap(tv.models.resnet18(num_classes=4), effective_depth=0.1)
    model(torch.randn(2, 3, 32, 32)).mean().backward()
    with_grad = sum(p.numel() for p in model.parameters() if p.grad is not None)
    assert with_grad == sum(p.numel() for p in model.parameters())
    assert all(not isinstance(g.rho, nn.Parameter) for g in step_groups(model))


def test_make_learnable_round_trip_keeps_values_and_checkpoint_keys():
    g = StepSizes(4, init=[0.1, 0.2, 0.3, 0.4])
    keys = set(g.state_dict())
    rho = g.make_learnable_()
    assert isinstance(rho, nn.Parameter) and rho.requires_grad and g.rho is rho
    assert set(g.state_dict()) == keys and rho.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    g.make_learnable_(False)
    assert not isinstance(g.rho, nn.Parameter) and set(g.state_dict()) == keys


def test_checkpoints_load_across_learned_and_fixed_and_from_the_old_parameter_layout():
    learned = mlp(lt=1.0, steps="learned")
    with torch.no_grad():
        learned.steps.rho.copy_(torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15]))
    fixed = mlp(lt=1.0, seed=1)
    fixed.load_state_dict(learned.state_dict())
    assert torch.equal(fixed.step_sizes(), learned.step_sizes())
    assert not isinstance(fixed.steps.rho, nn.Parameter)
    # the layout before: a frozen nn.Parameter (a whole pickled model of that time, and its state_dict)
    old = mlp(lt=1.0, seed=2)
    old.steps.make_learnable_().requires_grad_(False)
    buf = io.BytesIO()
    torch.save(old, buf)
    revived = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    fresh = mlp(lt=1.0, seed=3)
    fresh.load_state_dict(revived.state_dict())
    assert torch.equal(fresh(torch.ones(2, 4)), old(torch.ones(2, 4)))


# ------------------------------------------------------------------ item 3: model checkpoints validated
@pytest.mark.parametrize("key, value, words", [
    ("net.steps.effective_depth", float("nan"), "effective_depth must be finite"),
    ("net.steps.effective_depth", -1.0, "effective_depth must be >= 0"),
    ("net.steps.effective_depth", float("inf"), "effective_depth must be finite"),
    ("net.steps.effective_depth", 5.5, "rho \\* effective_depth must be < 1"),  # uniform 0.2 past the wall
    ("net.steps.rho", [0.2, 0.2, 0.2, 0.2, float("nan")], "finite and > 0"),
    ("net.steps.rho", [0.3, 0.3, 0.2, 0.3, -0.1], "finite and > 0"),
    ("net.steps.rho", [0.2, 0.2, 0.2, 0.2, float("inf")], "finite and > 0"),
    ("net.steps.rho", [0.3, 0.3, 0.3, 0.3, 0.3], "sum to total_time"),
    ("net.steps.rho", [0.2, 0.2, 0.2, 0.4], "has 4 steps"),
])
def test_model_load_state_dict_rejects_bad_steps_and_changes_nothing(key, value, words):
    model = mlp(lt=1.0)
    state = snapshot(mlp(lt=1.0, seed=7))  # every weight differs from model's
    state[key] = torch.tensor(value)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=words):
        model.load_state_dict(state)
    assert_unchanged(model, before)  # the input layer, loaded before the steps, too
    with pytest.raises(RuntimeError, match=words):  # what load_state_dict callers catch
        model.load_state_dict(state)


def test_loaded_nan_effective_depth_never_reaches_the_output():
    model = LeakyResNet([nn.Linear(4, 4) for _ in range(3)], effective_depth=1.0)
    state = model.state_dict()
    state["steps.effective_depth"] = torch.tensor(float("nan"))
    with pytest.raises(CheckpointError):
        model.load_state_dict(state)
    assert torch.isfinite(model(torch.randn(2, 4))).all()


# ------------------------------------------------------------------ item 4: bounds follow the loaded state
def test_bounds_follow_a_loaded_effective_depth_and_the_next_adaptation_works():
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    source = mlp(lt=4.0)
    assert source.steps.max_step * 4.0 < 1
    target = mlp(lt=0.0, seed=1)
    assert target.steps.max_step == pytest.approx(1.0)  # T: no wall at Lt = 0
    target.load_state_dict(source.state_dict())
    assert float(target.steps.effective_depth) == 4.0
    assert target.steps.max_step == pytest.approx(source.steps.max_step)
    opt = AdaptiveSteps(torch.optim.SGD(target.parameters(), lr=0.0), target, every=1, damping=1.0,
                        smoothing=0.0, fast_start=0, step_range=(0.01, 100))
    for _ in range(3):
        opt.zero_grad()
        target(x).pow(2).mean().backward()
        opt.step()
    rho = target.step_sizes()
    assert float(rho.max()) * 4.0 < 1 and abs(float(rho.sum()) - 1) < 1e-5
    # and back: a model built at Lt = 4 that loads an Lt = 0 checkpoint regains the room to adapt
    back = mlp(lt=4.0, seed=2)
    back.load_state_dict(mlp(lt=0.0).state_dict())
    assert back.steps.max_step == pytest.approx(1.0)


def test_optimizer_checkpoint_moves_the_bounds_too():
    small, large = mlp(lt=0.0), mlp(lt=4.0, seed=1)
    opt_small = AdaptiveSteps(torch.optim.SGD(small.parameters(), lr=0.0), small)
    opt_large = AdaptiveSteps(torch.optim.SGD(large.parameters(), lr=0.0), large)
    opt_small.load_state_dict(opt_large.state_dict())
    assert small.steps.max_step * 4.0 < 1 and float(small.steps.effective_depth) == 4.0


def test_given_max_step_is_kept_unless_the_wall_forces_it():
    g = StepSizes(5, max_step=0.5)
    g.load_state([0.2] * 5, 1.0)
    assert g.max_step == 0.5
    g.load_state([0.2] * 5, 2.5)  # 0.5 * 2.5 >= 1: the default cap at 2.5 (below the wall)
    assert g.max_step * 2.5 < 1
    with pytest.raises(CheckpointError, match=r"\[min_step, max_step\]"):
        StepSizes(5, max_step=0.25).check_state([0.1, 0.1, 0.1, 0.1, 0.6], 0.0)


# ------------------------------------------------------------------ statistics
def test_stats_round_trip_and_validation():
    g = StepSizes(3)
    g.record_all(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    s = g.stats()
    assert s.shape == (3, 3) and s.dtype == torch.float64 and s[2].tolist() == [1, 1, 1]
    other = StepSizes(3)
    other.load_stats(s)
    assert torch.equal(other.speed(), g.speed())
    assert torch.allclose(g.speed(), torch.tensor([0.5, 0.75, 5 / 6], dtype=torch.float64).sqrt())
    for bad in (torch.zeros(3, 2), torch.zeros(2, 3), torch.full((3, 3), float("nan")), -torch.ones(3, 3)):
        with pytest.raises(CheckpointError):
            other.load_stats(bad)
    assert torch.equal(other.stats(), s)
    other.all_reduce_()  # no process group: unchanged
    assert torch.equal(other.stats(), s)


# ------------------------------------------------------------------ the wall, the decay, the records
def test_the_wall_and_the_lambda_normalisation():
    assert below_wall(0.49, 2.0, "euler") and not below_wall(0.5, 2.0, "euler")
    assert below_wall(10.0, 2.0, "exponential")
    assert over_lt(1e-3, 4.0) == pytest.approx(2.5e-4) and over_lt(1e-3, 0.0) == 1e-3


def test_parameter_norm_cost_is_the_papers_formula():
    model = mlp(lt=2.0)
    model.steps.set_steps([0.1, 0.3, 0.2, 0.25, 0.15])
    cost = ParameterNormCost(step_groups(model), 0.3)
    want = sum(0.3 / (2 * 2.0) * r * sum(float(p.detach().double().pow(2).sum()) for p in blk.block.parameters())
               for r, blk in zip([0.1, 0.3, 0.2, 0.25, 0.15], model.blocks))
    assert float(cost().detach()) == pytest.approx(want, rel=1e-6)
    assert cost.coefficients()[0] == pytest.approx([0.3 / 2.0 * r for r in [0.1, 0.3, 0.2, 0.25, 0.15]], rel=1e-6)


def test_every_rule_is_a_record():
    for name, rule in rules.RULES.items():
        assert isinstance(rule, rules.Rule) and rule.name == name and callable(rule)
        assert rules.MEASURES[name] == rule.measures
    assert rules.RULES["learned"].trains_steps and not rules.RULES["learned"].adapts
    assert not rules.RULES["paper"].guarded and not rules.RULES["paper"].fast_starts
    assert rules.RULES["equal_distance"].fast_starts
    custom = rules.get_rule(lambda speed, rho, t, lo, hi, **kw: rho)
    assert custom.measures == "speed" and custom.guarded
    assert rules.get_rule(custom) is custom
