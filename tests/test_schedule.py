"""EffectiveDepthScheduler: the ramp, the euler wall, errors, state_dict, and use with a wrapped ResNet."""
import copy
import math

import pytest
import torch
from torch import nn

from adaptive_depth import AdaptiveSteps, LeakyResNet, StepSizes
from adaptive_depth.schedule import EffectiveDepthScheduler


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # see conftest.py


def stack(depth=4, **kw):
    return LeakyResNet([nn.Linear(8, 8) for _ in range(depth)], **kw)


def test_linear_ramp_with_delay():
    net = stack(total_time=1.0)
    sched = EffectiveDepthScheduler(net, target=2.0, total_steps=4, delay=2)
    seen = [net.effective_depth]
    for _ in range(8):
        sched.step()
        seen.append(net.effective_depth)
    assert seen == pytest.approx([0, 0, 0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0])
    assert sched.get_last_effective_depth() == pytest.approx([2.0])


def test_cosine_ramp_and_start():
    net = stack(total_time=1.0, scheme="exponential")
    sched = EffectiveDepthScheduler(net, target=5.0, total_steps=10, start=1.0, shape="cosine")
    assert net.effective_depth == 1.0
    values = []
    for t in range(1, 11):
        sched.step()
        values.append(net.effective_depth)
        assert values[-1] == pytest.approx(1.0 + 4.0 * 0.5 * (1 - math.cos(math.pi * t / 10)), rel=1e-6)
    assert values == sorted(values) and values[-1] == pytest.approx(5.0)


def test_per_group_targets_and_a_list_of_groups():
    groups = [StepSizes(4, total_time=1.0), StepSizes(2, total_time=1.0, scheme="exponential")]
    sched = EffectiveDepthScheduler(groups, target=[2.0, 8.0], total_steps=2)
    sched.step(), sched.step()
    assert [float(g.effective_depth) for g in groups] == pytest.approx([2.0, 8.0])


def test_euler_wall_is_checked_up_front_and_caps_the_steps():
    net = stack(depth=4, total_time=1.0)  # uniform step 0.25: the wall is Lt < 4
    before = (net.effective_depth, net.steps.max_step)
    with pytest.raises(ValueError, match=r"target=4 is past the euler wall.*Lt must be < 4"):
        EffectiveDepthScheduler(net, target=4.0, total_steps=10)
    assert (net.effective_depth, net.steps.max_step) == before  # nothing changed
    sched = EffectiveDepthScheduler(net, target=3.0, total_steps=10)
    assert net.steps.max_step * 3.0 < 1.0  # adaptation during the ramp cannot reach the final wall
    for _ in range(10):
        sched.step()
    assert net.effective_depth == pytest.approx(3.0)


def test_euler_wall_counts_the_largest_current_step():
    net = stack(depth=4, total_time=1.0)
    net.steps.set_steps([0.1, 0.1, 0.1, 0.7])
    with pytest.raises(ValueError, match="largest step is 0.7"):
        EffectiveDepthScheduler(net, target=2.0, total_steps=10)
    EffectiveDepthScheduler(net, target=1.4, total_steps=10)


BAD = [
    (dict(target=-1.0), ValueError, "target"),
    (dict(target=float("nan")), ValueError, "target"),
    (dict(target=[1.0, 2.0]), ValueError, "target"),
    (dict(total_steps=0), ValueError, "total_steps"),
    (dict(total_steps=2.5), ValueError, "total_steps"),
    (dict(delay=-1), ValueError, "delay"),
    (dict(start=-0.5), ValueError, "start"),
    (dict(start=5.0), ValueError, "start.*euler wall"),
    (dict(shape="step"), ValueError, "shape"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD, ids=[str(k) for k, _, _ in BAD])
def test_bad_arguments(kwargs, error, match):
    net = stack(total_time=1.0)
    args = dict(target=1.0, total_steps=10)
    args.update(kwargs)
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(error, match=match):
        EffectiveDepthScheduler(net, **args)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_model_without_groups_is_refused():
    with pytest.raises(ValueError, match="no step-size groups"):
        EffectiveDepthScheduler(nn.Linear(2, 2), target=1.0, total_steps=3)
    with pytest.raises(TypeError, match="model"):
        EffectiveDepthScheduler("net", target=1.0, total_steps=3)


def test_state_dict_resumes_the_ramp():
    net = stack(total_time=1.0)
    sched = EffectiveDepthScheduler(net, target=2.0, total_steps=8)
    for _ in range(3):
        sched.step()
    state = sched.state_dict()
    other = stack(total_time=1.0)
    resumed = EffectiveDepthScheduler(other, target=0.1, total_steps=100)
    resumed.load_state_dict(state)
    assert other.effective_depth == pytest.approx(net.effective_depth)
    for _ in range(5):
        sched.step(), resumed.step()
        assert other.effective_depth == pytest.approx(net.effective_depth)
    with pytest.raises(ValueError, match="state_dict"):
        resumed.load_state_dict({"last_step": 1})


def test_ramp_on_a_wrapped_resnet_starts_exact():
    torchvision = pytest.importorskip("torchvision")
    from adaptive_depth.wrap import wrap
    torch.manual_seed(0)
    plain = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [2, 2, 1, 1],
                                             num_classes=5).eval()
    model = wrap(copy.deepcopy(plain)).eval()
    opt = AdaptiveSteps(torch.optim.SGD(model.parameters(), lr=0.0), model, every=1)
    sched = EffectiveDepthScheduler(model, target=0.5, total_steps=3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))  # Lt(0) = 0: the pretrained function
    model.train()
    for _ in range(3):
        model(x).sum().backward()
        opt.step()
        sched.step()
    assert all(float(g.effective_depth) == pytest.approx(0.5) for g in model.leaky_steps.values())
    assert all(g.max_step * 0.5 < 1 for g in model.leaky_steps.values())
