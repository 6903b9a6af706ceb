"""Graph capture of wrapped ResNets and the leaky containers: torch.fx (symbolic_trace, torchvision's
create_feature_extractor), torch.export (save/load) and TorchScript (refused with one clear error).

Every traced graph is compared with the eager model it came from (and, at Lt = 0, with the plain torchvision
backbone), and must follow later changes of the steps: a graph that froze them would be silently wrong.
"""
import copy
import io

import pytest
import torch
from torch import nn

torchvision = pytest.importorskip("torchvision")
from torchvision.models import resnet as tv  # noqa: E402
from torchvision.models.feature_extraction import create_feature_extractor  # noqa: E402

from adaptive_depth import LeakyMLP, LeakyResidual, LeakyResNet  # noqa: E402
from adaptive_depth.wrap import unwrap, wrap  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # see conftest.py

RETURN_NODES = {"layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5"}  # a detection backbone


def resnet18():
    torch.manual_seed(0)
    model = tv.resnet18(num_classes=10)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval and train mode differ
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
    return model


def containers():
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.ReLU(), nn.Linear(8, 8)) for _ in range(4)]
    return {
        "LeakyMLP": LeakyMLP(8, 8, width=16, depth=4, effective_depth=3.0, scheme="exponential",
                             steps="irregular"),
        "LeakyResNet": LeakyResNet(blocks, effective_depth=1.5, steps="irregular", activation="relu"),
        "LeakyResidual": LeakyResidual(nn.Linear(8, 8), effective_depth=2.0, step=0.3),
    }


def _scale_steps_in_place(group, factor):
    """Write new steps through ``.data`` (no version bump): what a cache keyed on versions would miss."""
    new = group.rho.detach().double() * factor
    new[-1] += group.total_time - new.sum()
    group.rho.data.copy_(new.to(group.rho.dtype))


# ------------------------------------------------------------------------------------------ torch.fx
@pytest.mark.parametrize("train", [False, True])
def test_feature_extractor_of_wrapped_backbone_equals_the_plain_one(train):
    plain = resnet18()
    wrapped = wrap(copy.deepcopy(plain))
    features = {}
    for name, model in (("plain", plain), ("wrapped", wrapped)):
        model.train(train)
        extractor = create_feature_extractor(model, RETURN_NODES)
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
        out = extractor(x)
        sum(v.square().mean() for v in out.values()).backward()
        features[name] = ({k: v.detach() for k, v in out.items()}, x.grad)
    (fp, gp), (fw, gw) = features["plain"], features["wrapped"]
    assert list(fw) == ["c2", "c3", "c4", "c5"]
    for k in fp:
        torch.testing.assert_close(fw[k], fp[k], rtol=0, atol=0)
    torch.testing.assert_close(gw, gp, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["resnet18", "seresnet50", "resnet50d"])
def test_feature_extractor_of_wrapped_timm_backbones_equals_the_plain_one(arch):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    plain = timm.create_model(arch).eval()
    wrapped = wrap(copy.deepcopy(plain)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = create_feature_extractor(wrapped, RETURN_NODES)(x)
        theirs = create_feature_extractor(plain, RETURN_NODES)(x)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0)


def test_symbolic_trace_of_a_wrapped_resnet_follows_the_live_steps():
    wrapped = wrap(resnet18(), effective_depth=0.4, steps="irregular").eval()
    graph = torch.fx.symbolic_trace(wrapped)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), wrapped(x), rtol=0, atol=0)
        before = graph(x)
        _scale_steps_in_place(wrapped.leaky_steps["layer2"], 0.8)
        wrapped.leaky_steps["layer3"].set_effective_depth(0.7)
        after = graph(x)
        torch.testing.assert_close(after, wrapped(x), rtol=0, atol=0)
    assert (after - before).abs().max() > 1e-4
    # the graph holds the model's own StepSizes (one get_attr each), not copies
    assert graph.get_submodule("leaky_steps.layer2") is wrapped.leaky_steps["layer2"]


def test_traced_wrapped_model_records_statistics_for_the_plugin():
    wrapped = wrap(resnet18(), effective_depth=0.4).train()
    graph = torch.fx.symbolic_trace(wrapped)
    group = wrapped.leaky_steps["layer1"]
    group.recording = True
    graph(torch.randn(2, 3, 32, 32))
    group.recording = False
    graph(torch.randn(2, 3, 32, 32))
    assert group.count.tolist() == [1, 1] and (group.velocity_sq > 0).all()


@pytest.mark.parametrize("name", ["LeakyMLP", "LeakyResNet", "LeakyResidual"])
def test_symbolic_trace_of_the_containers_follows_the_live_steps(name):
    model = containers()[name]
    graph = torch.fx.symbolic_trace(model)
    x = torch.randn(5, 8)
    torch.testing.assert_close(graph(x), model(x), rtol=0, atol=0)
    before = graph(x)
    if model.steps.depth > 1:
        _scale_steps_in_place(model.steps, 1.3)
    model.steps.effective_depth.data.fill_(1.9)  # also behind autograd's back
    torch.testing.assert_close(graph(x), model(x), rtol=0, atol=0)
    assert (graph(x) - before).abs().max() > 1e-4


def test_symbolic_trace_keeps_gradients_of_learned_steps():
    torch.manual_seed(0)
    model = LeakyResNet([nn.Sequential(nn.ReLU(), nn.Linear(8, 8)) for _ in range(4)], effective_depth=2.0,
                        steps="learned", scheme="exponential")
    graph = torch.fx.symbolic_trace(model)
    x = torch.randn(5, 8)
    graph(x).square().sum().backward()
    traced = model.steps.rho.grad.clone()
    model.zero_grad()
    model(x).square().sum().backward()
    torch.testing.assert_close(traced, model.steps.rho.grad, rtol=0, atol=0)
    assert traced.abs().max() > 0


def test_shape_check_still_runs_in_a_traced_graph():
    model = LeakyResNet([nn.Linear(8, 8), nn.Linear(8, 8)])
    graph = torch.fx.symbolic_trace(model)
    graph.get_submodule("blocks.1").block = nn.Linear(8, 4)  # the graph calls the branch by name
    with pytest.raises(ValueError, match="a residual branch must keep the shape"):
        graph(torch.randn(3, 8))


# -------------------------------------------------------------------------------------- torch.export
def _round_trip(model, x):
    program = torch.export.export(model, (x,))
    buf = io.BytesIO()
    torch.export.save(program, buf)
    buf.seek(0)
    return torch.export.load(buf)


@pytest.mark.parametrize("name", ["wrapped-resnet18", "LeakyMLP"])
def test_export_save_load_round_trip(name):
    if name == "LeakyMLP":
        model, x, key = containers()["LeakyMLP"].eval(), torch.randn(5, 8), "net.steps.rho"
    else:
        model = wrap(resnet18(), effective_depth=0.4, steps="irregular").eval()
        x, key = torch.randn(2, 3, 32, 32), "leaky_steps.layer2.rho"
    loaded = _round_trip(model, x)
    with torch.no_grad():  # the exported graph decomposes the coefficients' maths: equal to an ulp, not bitwise
        torch.testing.assert_close(loaded.module()(x), model(x), rtol=1e-6, atol=1e-6)
    # the steps are state of the program (inputs), not constants folded into it
    assert torch.equal(loaded.state_dict[key], model.state_dict()[key])
    module = loaded.module()
    rho = dict(module.named_buffers(), **dict(module.named_parameters()))[key]  # fixed steps: a buffer
    with torch.no_grad():
        rho.copy_(rho.flip(0))
        assert (module(x) - model(x)).abs().max() > 1e-5


def test_export_of_a_wrapped_model_at_zero_lt_equals_the_plain_model():
    plain = resnet18().eval()
    loaded = _round_trip(wrap(copy.deepcopy(plain)).eval(), torch.randn(2, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(x), plain(x), rtol=0, atol=0)


# --------------------------------------------------------------------------------------- TorchScript
def _models():
    yield "wrapped-resnet18", wrap(resnet18()).eval(), torch.randn(1, 3, 32, 32)
    for name, model in containers().items():
        yield name, model, torch.randn(5, 8)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_is_refused_with_one_clear_error(how):
    for name, model, x in _models():
        with pytest.raises(RuntimeError, match="does not support TorchScript") as err:
            torch.jit.script(model) if how == "script" else torch.jit.trace(model, (x,))
        assert "torch.compile" in str(err.value) and "torch.export" in str(err.value), name
        model(x)  # the model itself still works


def test_torchscript_of_an_unwrapped_model_works_again():
    plain = unwrap(wrap(resnet18())).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(torch.jit.trace(plain, (x,))(x), plain(x))
