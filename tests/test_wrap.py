"""adaptive_depth.wrap: exact at Lt = 0 on torchvision / timm ResNets, the leaky update at Lt > 0, checkpoints,
adapters, errors, and autocast / channels_last / compile."""
import copy
import io
import math

import pytest
import torch
from torch import nn

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")
from torchvision.models import resnet as tv  # noqa: E402

from adaptive_depth import AdaptiveSteps, StepSizes, step_sizes  # noqa: E402
from adaptive_depth.wrap import (StepGroups, register_adapter, unregister_adapter, unwrap, wrap,  # noqa: E402
                                 wrapped_blocks)

TOL = 1e-6  # the bar for Lt = 0 (the implementation is bit-exact; the bar is what is promised)


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # see conftest.py


def tiny(block=tv.BasicBlock, layers=(1, 1, 1, 1), **kw):
    return tv.ResNet(block, list(layers), num_classes=10, **kw)


ARCHS = {
    "tv-resnet18": lambda: tv.resnet18(),
    "tv-resnet34": lambda: tv.resnet34(),
    "tv-resnet50": lambda: tv.resnet50(),
    "tv-resnet101": lambda: tv.resnet101(),
    "tv-resnet152": lambda: tv.resnet152(),
    "tv-wide_resnet50_2": lambda: tv.wide_resnet50_2(),
    "tv-resnext50_32x4d": lambda: tv.resnext50_32x4d(),
    "timm-resnet18": lambda: timm.create_model("resnet18"),
    "timm-resnet50": lambda: timm.create_model("resnet50"),
    "timm-resnet50d": lambda: timm.create_model("resnet50d", drop_path_rate=0.2),
    "timm-seresnet50": lambda: timm.create_model("seresnet50", drop_path_rate=0.1),
    "timm-resnetblur18": lambda: timm.create_model("resnetblur18", drop_block_rate=0.2, drop_path_rate=0.2),
    "timm-resnet26t": lambda: timm.create_model("resnet26t"),
    "timm-resnet18-silu": lambda: timm.create_model("resnet18", act_layer="silu"),  # post-add act not fused
}


def _randomize_bn(model, seed=0):
    """Non-trivial BN affine parameters and running statistics (timm zero-inits the last BN of each branch)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def compare(original, wrapped, x, train, seed=0):
    """Max abs differences (output, input grad, parameter grads, buffers) of one forward/backward each."""
    original.train(train)
    wrapped.train(train)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    outs = []
    for model, xi in zip((original, wrapped), xs):
        torch.manual_seed(seed)  # drop-path / drop-block draw the same masks
        out = model(xi)
        out.backward(torch.ones_like(out) / out.numel() + torch.linspace(0, 1, out.numel()).view_as(out))
        outs.append(out)
    ref_params = dict(original.named_parameters())
    grads = [(ref_params[n].grad - p.grad).abs().max().item() for n, p in wrapped.named_parameters()
             if n in ref_params]
    assert len(grads) == len(ref_params)
    ref_buffers = dict(original.named_buffers())
    buffers = [(ref_buffers[n].double() - b.double()).abs().max().item() for n, b in wrapped.named_buffers()
               if n in ref_buffers]
    return {"out": (outs[0] - outs[1]).abs().max().item(), "dx": (xs[0].grad - xs[1].grad).abs().max().item(),
            "dparams": max(grads), "buffers": max(buffers)}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_exact_at_zero_effective_depth(arch):
    torch.manual_seed(0)
    original = _randomize_bn(ARCHS[arch]())
    wrapped = wrap(copy.deepcopy(original))
    assert len(wrapped_blocks(wrapped)) > 0
    x = torch.randn(2, 3, 32, 32)
    for train in (False, True):
        diffs = compare(original, wrapped, x, train)
        assert max(diffs.values()) <= TOL, (arch, train, diffs)
    # and the wrap is live: a positive Lt changes the function
    for g in wrapped.leaky_steps.values():
        g.set_effective_depth(0.3)
    wrapped.eval(), original.eval()
    with torch.no_grad():
        assert (wrapped(x) - original(x)).abs().max() > 1e-4


def _expected_coefficients(rho, lt, scheme):
    if scheme == "euler":
        return 1.0 - rho * lt, rho
    a = math.exp(-rho * lt)
    return a, (1.0 - a) / lt


def _manual_forward(plain, groups, x):
    """An independent oracle: torchvision's resnet forward with each block's add replaced by a x + b f."""
    names = {id(m): n for n, m in plain.named_modules()}
    x = plain.maxpool(plain.relu(plain.bn1(plain.conv1(x))))
    for stage in (plain.layer1, plain.layer2, plain.layer3, plain.layer4):
        for blk in stage:
            key, index = groups[names[id(blk)]]
            rho = float(key.rho[index])
            a, b = _expected_coefficients(rho, float(key.effective_depth), key.scheme)
            f = blk.bn2(blk.conv2(blk.relu(blk.bn1(blk.conv1(x)))))
            s = x if blk.downsample is None else blk.downsample(x)
            x = torch.relu(a * s + b * f)
    return plain.fc(torch.flatten(plain.avgpool(x), 1))


def test_fine_ends_steps_and_bad_steps_are_named():
    from adaptive_depth import rules
    wrapped = wrap(tiny(layers=(3, 1, 1, 1)), effective_depth=2.0, scheme="exponential", steps="fine_ends")
    depths = sorted(g.depth for g in wrapped.leaky_steps.values())
    assert 3 in depths
    for g in wrapped.leaky_steps.values():
        assert torch.allclose(g.rho.detach(), rules.fine_ends(g.depth, g.total_time).float(), rtol=1e-6)
    for bad in ("geometric", ["uniform"], None):
        with pytest.raises(ValueError, match="steps must be one of"):
            wrap(tiny(layers=(1, 1, 1, 1)), steps=bad)


@pytest.mark.parametrize("scheme,lt", [("euler", 0.6), ("exponential", 3.0)])
def test_leaky_update_matches_the_formula(scheme, lt):
    torch.manual_seed(1)
    plain = _randomize_bn(tiny(layers=(2, 2, 2, 2))).eval()
    wrapped = wrap(copy.deepcopy(plain), effective_depth=lt, scheme=scheme, steps="irregular").eval()
    for g in wrapped.leaky_steps.values():
        assert g.rho.sum().item() == pytest.approx(2.0)
        assert float(g.rho.max()) != float(g.rho.min())  # irregular: the steps differ
    groups = {name: (wrapped.leaky_steps[key], i) for name, key, i in wrapped_blocks(wrapped)}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), _manual_forward(plain, groups, x), rtol=1e-5, atol=1e-5)


def test_groups_stage_global_and_explicit():
    model = wrap(tiny(layers=(2, 3, 1, 2)))
    assert list(model.leaky_steps) == ["layer1", "layer2", "layer3", "layer4"]
    assert [g.depth for g in model.leaky_steps.values()] == [2, 3, 1, 2]
    assert [s.tolist() for s in step_sizes(model)] == [[1.0] * 2, [1.0] * 3, [1.0], [1.0] * 2]
    assert list(model.named_children())[0][0] == "leaky_steps"

    glob = wrap(tiny(layers=(2, 3, 1, 2)), groups="global", total_time=1.0)
    (g,) = glob.leaky_steps.values()
    assert g.depth == 8 and g.total_time == 1.0 and g.rho.tolist() == pytest.approx([1 / 8] * 8)

    explicit = wrap(tiny(layers=(2, 1, 1, 1)), groups={"early": ["layer1.0", "layer1.1", "layer2.0"],
                                                      "late": ["layer3.0", "layer4.0"]})
    assert [(k, g.depth) for k, g in explicit.leaky_steps.items()] == [("early", 3), ("late", 2)]
    assert ("layer2.0", "early", 2) in wrapped_blocks(explicit)
    as_list = wrap(tiny(layers=(1, 1, 1, 1)), groups=[["layer1.0", "layer2.0"], ["layer3.0", "layer4.0"]])
    assert list(as_list.leaky_steps) == ["group0", "group1"]


def test_plain_sequential_of_children_keeps_working():
    torch.manual_seed(0)
    model = wrap(tiny(), effective_depth=0.5).eval()
    features = nn.Sequential(*list(model.children())[:-1])  # the common "drop the head" idiom
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = torch.flatten(model.avgpool(model.layer4(model.layer3(model.layer2(model.layer1(
            model.maxpool(model.relu(model.bn1(model.conv1(x))))))))), 1)
        torch.testing.assert_close(torch.flatten(features(x), 1), expected, rtol=0, atol=0)
    assert len(list(AdaptiveSteps(torch.optim.SGD(features.parameters(), lr=0.1), features).model_groups)) == 4


# ------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_round_trip_original_wrapped_unwrapped():
    torch.manual_seed(0)
    original = _randomize_bn(tv.resnet18())
    checkpoint = copy.deepcopy(original.state_dict())
    torch.manual_seed(1)
    wrapped = wrap(tv.resnet18(), effective_depth=0.0)
    result = wrapped.load_state_dict(checkpoint, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in checkpoint.items():
        assert torch.equal(wrapped.state_dict()[key], value), key
    assert all(g.rho.tolist() == [1.0, 1.0] and float(g.effective_depth) == 0 for g in wrapped.leaky_steps.values())

    # the wrapped checkpoint carries the steps
    wrapped.leaky_steps["layer2"].set_steps([0.5, 1.5])
    wrapped.leaky_steps["layer3"].set_effective_depth(0.25)
    saved = copy.deepcopy(wrapped.state_dict())
    assert "leaky_steps.layer2.rho" in saved and "leaky_steps.layer3.effective_depth" in saved
    again = wrap(tv.resnet18())
    again.load_state_dict(saved, strict=True)
    assert again.leaky_steps["layer2"].rho.tolist() == [0.5, 1.5]
    assert float(again.leaky_steps["layer3"].effective_depth) == 0.25

    # per-rank statistics are not buffers: DDP's buffer broadcast cannot overwrite them
    assert not any("velocity_sq" in name for name, _ in wrapped.named_buffers())
    plain = unwrap(wrapped)
    assert type(plain.layer1[0]) is tv.BasicBlock and not hasattr(plain, "leaky_steps")
    assert not any("_leaky" in k for m in plain.modules() for k in vars(m))
    state = plain.state_dict()
    assert list(state) == list(checkpoint)
    for key, value in checkpoint.items():
        assert torch.equal(state[key], value), key
    fresh = tv.resnet18()
    fresh.load_state_dict(state, strict=True)  # a plain torchvision model takes it


def test_unwrap_copy_and_wrap_copy_leave_the_original():
    model = tiny()
    wrapped = wrap(model, inplace=False)
    assert type(model.layer1[0]) is tv.BasicBlock and not hasattr(model, "leaky_steps")
    plain = unwrap(wrapped, inplace=False)
    assert hasattr(wrapped, "leaky_steps") and not hasattr(plain, "leaky_steps")
    with pytest.raises(ValueError, match="not wrapped"):
        unwrap(plain)


def test_pickle_and_deepcopy_of_a_wrapped_model():
    torch.manual_seed(0)
    model = wrap(tiny(layers=(2, 1, 1, 1)), effective_depth=0.5).eval()
    model.leaky_steps["layer1"].set_steps([0.7, 1.3])
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    copied = copy.deepcopy(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for other in (loaded, copied):
            torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
            blk = other.layer1[1]
            assert blk._leaky_group is other.leaky_steps["layer1"]  # the reference follows the copy
            assert other.leaky_steps["layer1"]._layers[1] is blk


def test_coefficient_cache_follows_step_changes():
    torch.manual_seed(0)
    plain = tiny(layers=(2, 1, 1, 1)).eval()
    model = wrap(copy.deepcopy(plain)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y0 = model(x)
        model.leaky_steps["layer1"].set_steps([0.5, 1.5])
        y1 = model(x)
        model.leaky_steps["layer1"].set_steps([1.0, 1.0])
        torch.testing.assert_close(model(x), y0, rtol=0, atol=0)
        model.leaky_steps["layer1"].set_effective_depth(0.5)
        y2 = model(x)
        model.load_state_dict(wrap(copy.deepcopy(plain)).state_dict())
        torch.testing.assert_close(model(x), y0, rtol=0, atol=0)
    assert (y1 - y0).abs().max() > 1e-4 and (y2 - y0).abs().max() > 1e-4


def _write_steps(model, how, steps):
    """Give group layer1 the steps ``steps`` by one of the ways users and frameworks write them."""
    group = model.leaky_steps["layer1"]
    values = torch.tensor(steps, dtype=group.rho.dtype)
    if how == "data-inplace":
        group.rho.data[:] = values  # no version bump: invisible to a cache keyed on versions
    elif how == "data-assign":
        group.rho.data = values.clone()
    elif how == "copy-no-grad":
        with torch.no_grad():
            group.rho.copy_(values)
    elif how == "load_state_dict":
        state = model.state_dict()
        state["leaky_steps.layer1.rho"] = values
        model.load_state_dict(state)
    elif how == "set_steps":
        group.set_steps(steps)
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["data-inplace", "data-assign", "copy-no-grad", "load_state_dict", "set_steps"])
def test_no_stale_coefficients_whichever_way_the_steps_are_written(how):
    torch.manual_seed(0)
    plain = _randomize_bn(tiny(layers=(2, 1, 1, 1))).eval()
    model = wrap(copy.deepcopy(plain), effective_depth=0.3).eval()
    groups = {name: (model.leaky_steps[key], i) for name, key, i in wrapped_blocks(model)}
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model(x)  # a first forward (anything it keeps must not survive the write)
        for steps in ([0.5, 1.5], [1.25, 0.75]):
            _write_steps(model, how, steps)
            torch.testing.assert_close(model(x), _manual_forward(plain, groups, x), rtol=1e-5, atol=1e-5)


def test_no_stale_coefficients_when_lt_is_written_behind_autograd():
    torch.manual_seed(0)
    plain = _randomize_bn(tiny()).eval()
    model = wrap(copy.deepcopy(plain), effective_depth=0.3).eval()
    groups = {name: (model.leaky_steps[key], i) for name, key, i in wrapped_blocks(model)}
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model(x)
        model.leaky_steps["layer2"].effective_depth.data.fill_(0.6)
        torch.testing.assert_close(model(x), _manual_forward(plain, groups, x), rtol=1e-5, atol=1e-5)


def test_rho_scaled_decay_follows_steps_written_through_data():
    torch.manual_seed(0)
    model = wrap(tiny(layers=(2, 1, 1, 1)), effective_depth=0.5)
    opt = AdaptiveSteps(torch.optim.SGD(model.parameters(), lr=1.0), model, rule="fixed", weight_decay=0.1)
    weight = model.layer1[0].conv2.weight

    def decay_of_block0():  # one SGD step on zero loss gradients: w <- w (1 - coefficient)
        for p in model.parameters():
            p.grad = torch.zeros_like(p) if p.requires_grad else None
        before = weight.detach().clone()
        opt.step()
        return float(((before - weight.detach()) / before).mean())

    assert decay_of_block0() == pytest.approx(0.1 / 0.5 * 1.0, rel=1e-5)
    model.leaky_steps["layer1"].rho.data[:] = torch.tensor([0.6, 1.4])
    assert decay_of_block0() == pytest.approx(0.1 / 0.5 * 0.6, rel=1e-5)


def test_wrap_on_the_meta_device_then_to_empty_and_a_plain_checkpoint():
    """Empty-weights loading: wrap a meta model, materialise it, load the torchvision checkpoint. The steps
    (absent from that checkpoint) are the ones wrap gives, not uninitialised memory."""
    torch.manual_seed(0)
    plain = _randomize_bn(tiny(layers=(2, 1, 1, 1))).eval()
    with torch.device("meta"):
        model = wrap(tiny(layers=(2, 1, 1, 1)), steps="irregular")
    assert model.leaky_steps["layer1"].rho.is_meta
    assert model(torch.empty(2, 3, 32, 32, device="meta")).shape == (2, 10)  # shape inference on meta
    model.to_empty(device="cpu")
    reference = wrap(copy.deepcopy(plain), steps="irregular")
    for key, group in model.leaky_steps.items():
        assert torch.equal(group.rho, reference.leaky_steps[key].rho)
        assert float(group.effective_depth) == 0.0 and group.count.sum() == 0
    model.load_state_dict(plain.state_dict())
    for group in model.leaky_steps.values():
        group.set_steps(torch.ones(group.depth))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), plain(x), rtol=0, atol=0)
    # reset_parameters() of the groups gives the same values again
    model.leaky_steps["layer1"].rho.data.fill_(float("nan"))
    model.leaky_steps.reset_parameters()
    assert torch.equal(model.leaky_steps["layer1"].rho, reference.leaky_steps["layer1"].rho)


# ------------------------------------------------------------------------- the optimizer plugin
def test_adaptive_steps_adapts_a_wrapped_resnet():
    torch.manual_seed(0)
    model = wrap(tiny(layers=(3, 2, 1, 1)), effective_depth=0.5)
    first = model.layer2[0]
    branch = {id(p) for p in first.branch_parameters()}
    assert branch and not branch & {id(p) for p in first.downsample.parameters()}
    assert branch | {id(p) for p in first.downsample.parameters()} == {id(p) for p in first.parameters()}
    opt = AdaptiveSteps(torch.optim.SGD(model.parameters(), lr=0.05), model, every=2, smoothing=0.0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(4):
        nn.functional.cross_entropy(model(x), y).backward()
        if model.leaky_steps["layer1"].recording:
            assert model.leaky_steps["layer1"].count.tolist() == [1.0, 1.0, 1.0]
        opt.step()
        opt.zero_grad()
    layer1 = model.leaky_steps["layer1"].rho
    assert layer1.sum().item() == pytest.approx(3.0)
    assert float(layer1.max() - layer1.min()) > 1e-3  # the steps moved


def test_learned_steps_get_gradients():
    torch.manual_seed(0)
    model = wrap(tiny(layers=(2, 2, 1, 1)), effective_depth=0.3)
    opt = AdaptiveSteps(torch.optim.SGD(model.parameters(), lr=0.05), model, rule="learned")
    nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4)).backward()
    assert model.leaky_steps["layer1"].rho.grad is not None
    assert model.leaky_steps["layer1"].rho.grad.abs().sum() > 0
    opt.step()


# ---------------------------------------------------------------------------------------- adapters
class ToyBlock(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
        self.proj = nn.Conv2d(c, c, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.proj(x) + self.body(x))


def toy_model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ToyBlock(), ToyBlock(), nn.AdaptiveAvgPool2d(1))


def test_unsupported_block_raises_with_the_fix():
    model = toy_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match=r"ToyBlock.*Supported: .*torchvision\.models\.resnet\.BasicBlock.*"
                                        r"register_adapter"):
        wrap(model)
    assert type(model[1]) is ToyBlock and not hasattr(model, "leaky_steps")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    class MyBasicBlock(tv.BasicBlock):  # a subclass may compute something else: not matched silently
        pass
    sub = tiny()
    sub.layer1[0].__class__ = MyBasicBlock
    with pytest.raises(TypeError, match="MyBasicBlock"):
        wrap(sub)
    with pytest.raises(TypeError, match="no supported residual block"):
        wrap(nn.Sequential(nn.Linear(3, 3)))


def test_registered_adapter_is_used():
    calls = []

    def split(block, x):
        calls.append(block)
        return block.proj(x), block.body(x)

    register_adapter(ToyBlock, split, activation="act", shortcut=("proj",))
    try:
        with pytest.raises(ValueError, match="replace=True"):
            register_adapter(ToyBlock, split, activation="act")
        torch.manual_seed(0)
        plain = toy_model()
        model = wrap(copy.deepcopy(plain), groups="global")
        assert list(model.leaky_steps) == ["global"] and model.leaky_steps["global"].depth == 2
        x = torch.randn(2, 3, 8, 8)
        diffs = compare(plain, model, x, train=True)
        assert max(diffs.values()) <= TOL, diffs
        assert calls == [model[2], model[3]]  # index shifted by the steps placed first
        assert {id(p) for p in model[2].branch_parameters()} == {id(p) for p in model[2].body.parameters()}
        model.leaky_steps["global"].set_effective_depth(0.5)
        with torch.no_grad():
            blk = model[2]
            h = model[1](x)
            expected = torch.relu(0.5 * blk.proj(h) + blk.body(h))
            torch.testing.assert_close(blk(h), expected, rtol=1e-6, atol=1e-6)
    finally:
        unregister_adapter(ToyBlock)
    with pytest.raises(TypeError, match="ToyBlock"):
        wrap(toy_model())


def test_register_adapter_checks_its_arguments():
    with pytest.raises(TypeError, match="block_type"):
        register_adapter("BasicBlock", lambda b, x: (x, x))
    with pytest.raises(TypeError, match="split"):
        register_adapter(ToyBlock, None)
    with pytest.raises(TypeError, match="activation"):
        register_adapter(ToyBlock, lambda b, x: (x, x), activation=nn.ReLU())
    with pytest.raises(TypeError, match="shortcut"):
        register_adapter(ToyBlock, lambda b, x: (x, x), shortcut="proj")
    with pytest.raises(ValueError, match="already registered"):
        register_adapter(tv.BasicBlock, lambda b, x: (x, x))


# ------------------------------------------------------------------------------------- bad input
BAD = [
    (dict(groups="stages"), ValueError, "groups"),
    (dict(groups=3), TypeError, "groups"),
    (dict(groups=[["layer1.0"]]), ValueError, "groups.*missing"),
    (dict(groups=[["layer1.0", "layer2.0", "layer3.0"], ["layer4.0", "layer1.0"]]), ValueError, "groups.*both"),
    (dict(groups={"a": ["layer9.0"]}), ValueError, "groups"),
    (dict(groups={"a.b": ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]}), ValueError, "groups"),
    (dict(effective_depth=-0.1), ValueError, "effective_depth"),
    (dict(effective_depth=float("nan")), ValueError, "effective_depth"),
    (dict(effective_depth=float("inf")), ValueError, "effective_depth"),
    (dict(effective_depth="1"), TypeError, "effective_depth"),
    (dict(effective_depth=1.0), ValueError, "effective_depth.*euler"),  # the wall: rho = 1, Lt = 1
    (dict(scheme="rk4"), ValueError, "scheme"),
    (dict(total_time=0.0), ValueError, "total_time"),
    (dict(total_time=float("nan")), ValueError, "total_time"),
    (dict(steps="random"), ValueError, "steps"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(inplace="yes"), TypeError, "inplace"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD, ids=[f"{list(k)[0]}={list(k.values())[0]!r}" for k, _, _ in BAD])
def test_bad_arguments_raise_and_leave_the_model_unchanged(kwargs, error, match):
    model = tiny()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        wrap(model, **kwargs)
    assert not hasattr(model, "leaky_steps")
    assert all(type(m) in (tv.BasicBlock,) for m in model.modules() if "Block" in type(m).__name__)
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_exponential_has_no_wall_and_wrapping_twice_or_wrappers_are_refused():
    model = wrap(tiny(), effective_depth=5.0, scheme="exponential")
    with pytest.raises(ValueError, match="already wrapped"):
        wrap(model)
    with pytest.raises(TypeError, match="wrap the inner module first"):
        wrap(torch.compile(tiny()))
    with pytest.raises(TypeError, match="model"):
        wrap("resnet18")


# ------------------------------------------------------------------------- autocast, layout, compile
def test_autocast_bf16_agrees_with_fp32_and_with_the_original():
    torch.manual_seed(0)
    plain = _randomize_bn(tiny(tv.Bottleneck, (2, 1, 1, 1)))
    model = wrap(copy.deepcopy(plain))
    x = torch.randn(4, 3, 64, 64)  # train-mode BN over 2 values per channel is too ill-conditioned for bf16
    for train in (False, True):
        plain.train(train), model.train(train)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_plain, y = plain(x), model(x)
        assert y.dtype == torch.bfloat16
        assert (y.float() - y_plain.float()).abs().max() <= TOL  # same rounding as the original add
        y32 = model(x)
        torch.testing.assert_close(y.float(), y32, rtol=0.05, atol=0.05 * y32.abs().max().item())
    # Lt > 0 too: bf16 against fp32 of the same wrapped model
    model.eval()
    for g in model.leaky_steps.values():
        g.set_effective_depth(0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    y32 = model(x)
    torch.testing.assert_close(y.float(), y32, rtol=0.05, atol=0.05 * y32.abs().max().item())


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    plain = _randomize_bn(tiny(layers=(2, 1, 1, 1)))
    # float64: the two layouts run different conv algorithms, and fp32 train-mode BN on a tiny batch
    # amplifies their rounding to ~1e-3 in some gradients; in float64 any real difference stands out
    model = wrap(copy.deepcopy(plain), effective_depth=0.5).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    xcl = x.to(memory_format=torch.channels_last)
    for train in (False, True):
        model.train(train), cl.train(train)
        model.zero_grad(), cl.zero_grad()
        y, ycl = model(x), cl(xcl)
        torch.testing.assert_close(ycl, y, rtol=1e-10, atol=1e-10)
        y.sum().backward(), ycl.sum().backward()
        for (n, p), q in zip(model.named_parameters(), cl.parameters()):
            if p.grad is not None:
                assert (q.grad - p.grad).abs().max() <= 1e-9 * p.grad.abs().max(), n
    with torch.no_grad():  # the blocks keep the layout
        h = cl.eval().layer1(cl.maxpool(cl.relu(cl.bn1(cl.conv1(xcl)))))
    assert h.is_contiguous(memory_format=torch.channels_last)
    # and at Lt = 0 channels_last is still the original, exactly
    plain_cl = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    zero_cl = wrap(copy.deepcopy(plain)).to(memory_format=torch.channels_last)
    diffs = compare(plain_cl, zero_cl, xcl.float(), train=True)
    assert max(diffs.values()) <= TOL, diffs


def test_compile_fullgraph_matches_eager():
    """A training step in float64 (a tight check: in fp32, train-mode BN on a tiny batch turns inductor's
    reordered sums into ~1e-2 relative gradient differences for the plain torchvision model too), then an
    fp32 forward recording the speed statistics."""
    torch.manual_seed(0)
    model = wrap(_randomize_bn(tiny(layers=(2, 1, 1, 1))), effective_depth=0.5).double().train()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    outs = []
    for m in (eager, compiled):
        out = m(x)
        out.square().mean().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-9, atol=1e-9)
    for (n, p), q in zip(eager.named_parameters(), model.parameters()):
        if p.grad is not None:
            assert (q.grad - p.grad).abs().max() <= 1e-9 * p.grad.abs().max(), n
    for (n, b), c in zip(eager.named_buffers(), model.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-9, atol=1e-9, msg=n)

    model.float()
    eager.float()
    for m in (eager, model):
        for g in m.leaky_steps.values():
            g.recording = True
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-3, atol=1e-3)
    for key in model.leaky_steps:  # the statistics are recorded inside the compiled graph
        assert model.leaky_steps[key].count.min() == 1
        torch.testing.assert_close(model.leaky_steps[key].velocity_sq, eager.leaky_steps[key].velocity_sq,
                                   rtol=1e-4, atol=0)
