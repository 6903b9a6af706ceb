"""``torch.compile(fullgraph=True)`` gives what eager gives, forward and gradients, on the torch path and on
the Triton path, where the kernels run inside ``torch.library`` custom ops (on the CPU under
``TRITON_INTERPRET=1``, set by tests/conftest.py when there is no GPU)."""
import importlib

import pytest
import torch
from torch import nn

from adaptive_depth import ops
from adaptive_depth.residual import LeakyMLP, LeakyResNet


def _interpreting():
    try:
        from adaptive_depth_kernels import _common
    except ImportError:
        return False
    return _common.interpreting()


CASES = [
    pytest.param("cpu", "torch"),
    pytest.param("cpu", "triton", marks=pytest.mark.skipif(
        not _interpreting(), reason="the Triton path on CPU tensors needs TRITON_INTERPRET=1")),
    pytest.param("cuda", "torch", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
    pytest.param("cuda", "triton", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def fixed_tiles(monkeypatch):
    monkeypatch.setenv("ADAPTIVE_DEPTH_AUTOTUNE", "0")  # CUDA: the fused GEMM's fixed config, one compile


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the Triton launches of the update (forward, backward) and of the fused GEMM."""
    update_module = importlib.import_module("adaptive_depth_kernels.leaky_update")
    linear_module = importlib.import_module("adaptive_depth_kernels.leaky_linear")
    calls = {"update_fwd": 0, "update_bwd": 0, "linear_fwd": 0}

    def counting(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapper

    # the launchers as the op's own file calls them (its autograd Function and custom op live there)
    for name in ("fwd", "bwd"):
        real = getattr(update_module, f"leaky_update_{name}")
        monkeypatch.setattr(update_module, f"leaky_update_{name}", counting(f"update_{name}", real))
    monkeypatch.setattr(linear_module, "_forward", counting("linear_fwd", linear_module._forward))
    return calls


def _run(model, x, forward=None):
    """Output, parameter gradients and recorded statistics of one forward/backward of ``forward``
    (``model`` itself, or its compiled form)."""
    model.zero_grad(set_to_none=True)
    for group in (m for m in model.modules() if hasattr(m, "reset_stats")):
        group.reset_stats()
    y = (forward if forward is not None else model)(x)
    y.square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    stats = {name: b.clone() for name, b in model.named_buffers() if name.endswith(("velocity_sq", "input_sq"))}
    return y.detach(), grads, stats


def _assert_same(eager, compiled):
    (y_e, g_e, s_e), (y_c, g_c, s_c) = eager, compiled
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-6)
    assert g_e.keys() == g_c.keys() and len(g_e) > 0
    for name in g_e:
        torch.testing.assert_close(g_c[name], g_e[name], rtol=1e-4, atol=1e-6, msg=name)
    assert s_e.keys() == s_c.keys()
    for name in s_e:
        torch.testing.assert_close(s_c[name], s_e[name], rtol=1e-5, atol=0.0, msg=name)


def _check_model(model, x, backend, kernel_calls, monkeypatch):
    model.train()
    for group in (m for m in model.modules() if hasattr(m, "recording")):
        group.recording = True  # the statistics go through the compiled graph too
    # the compiled graph is traced first, with the kernels module not yet looked up by ops
    monkeypatch.setattr(ops, "_KERNELS", None)
    compiled = _run(model, x, torch.compile(model, fullgraph=True))
    launched = dict(kernel_calls)
    eager = _run(model, x)
    _assert_same(eager, compiled)
    return launched


@pytest.mark.parametrize("device,backend", CASES)
def test_compiled_leaky_resnet_equals_eager(device, backend, kernel_calls, monkeypatch):
    torch.manual_seed(0)
    width = 24
    blocks = [nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(3)]
    model = LeakyResNet(blocks, effective_depth=2.0, scheme="exponential", activation="relu",
                        steps="irregular", backend=backend).to(device)
    launched = _check_model(model, torch.randn(10, 5, width, device=device), backend, kernel_calls,
                            monkeypatch)
    if backend == "triton":  # the compiled graph ran the kernels: 3 blocks forward and backward
        assert launched["update_fwd"] == 3 and launched["update_bwd"] == 3


@pytest.mark.parametrize("device,backend", CASES)
def test_compiled_leaky_mlp_equals_eager(device, backend, kernel_calls, monkeypatch):
    torch.manual_seed(1)
    model = LeakyMLP(6, 3, width=40, depth=3, effective_depth=2.0, scheme="euler", backend=backend).to(device)
    launched = _check_model(model, torch.randn(37, 6, device=device), backend, kernel_calls, monkeypatch)
    if backend == "triton":  # one fused GEMM per block in the compiled graph
        assert launched["linear_fwd"] == 3


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("scheme", ["euler", "exponential"])
def test_compiled_ops_step_gradients(device, backend, scheme):
    """The step size's gradient (through ``a, b``) and every other one, with both ops in one graph."""
    torch.manual_seed(2)
    width = 16
    x = torch.randn(9, width, device=device, requires_grad=True)
    f = torch.randn(9, width, device=device, requires_grad=True)
    weight = (torch.randn(width, width, device=device) / 4).requires_grad_()
    bias = torch.randn(width, device=device, requires_grad=True)
    rho = torch.tensor([0.2, 0.3], device=device, requires_grad=True)
    lt = torch.tensor(1.5, device=device)

    def fn(x, f, weight, bias, rho):
        h, s1 = ops.leaky_update(x, f, rho[0], lt, scheme=scheme, activation="relu", return_stats=True,
                                 backend=backend)
        a, b = ops.step_coefficients(rho[1], lt, scheme)
        y, s2 = ops.leaky_linear(h, weight, bias, a, b, lt, relu=True, stats=True, backend=backend)
        return y.square().sum() + (s1 * s2).sum() * 0, s1, s2

    inputs = (x, f, weight, bias, rho)
    out_e = fn(*inputs)
    grads_e = torch.autograd.grad(out_e[0], inputs)
    out_c = torch.compile(fn, fullgraph=True)(*inputs)
    grads_c = torch.autograd.grad(out_c[0], inputs)
    for u, v in zip(out_c, out_e):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
    for u, v, name in zip(grads_c, grads_e, ("x", "f", "weight", "bias", "rho")):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5, msg=name)
    assert grads_e[4].abs().min() > 0  # both steps receive a gradient


def test_learned_steps_compile_fullgraph_with_the_projection():
    """Learnable steps run the exact projection inside the graph: no data-dependent indexing, no break."""
    torch.manual_seed(0)
    net = LeakyResNet([nn.Sequential(nn.ReLU(), nn.Linear(8, 8)) for _ in range(5)], effective_depth=2.0,
                      steps="learned", scheme="exponential")
    with torch.no_grad():
        net.steps.rho.copy_(torch.tensor([0.5, 0.1, 0.1, 0.2, 0.3]))  # off the feasible set: projected
    x = torch.randn(6, 8)
    eager = net(x)
    eager.square().sum().backward()
    want = net.steps.rho.grad.clone()
    net.zero_grad()
    compiled = torch.compile(net, fullgraph=True)(x)
    compiled.square().sum().backward()
    assert torch.allclose(compiled, eager, atol=1e-6)
    assert torch.allclose(net.steps.rho.grad, want, atol=1e-5)
    assert abs(float(net.steps.current().detach().sum()) - 1.0) < 1e-6


def _laid_out(t, layout):
    if layout == "channels_last":
        return t.to(memory_format=torch.channels_last)
    if layout == "transposed":  # the last two dimensions swapped: dense, neither contiguous nor channels_last
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_compiled_backward_on_channels_last_and_transposed_inputs(device, backend, layout):
    """Inductor plans the backward's buffers from the ops' fake implementations: they must promise the
    layouts the real ops return (a channels_last or transposed x used to crash the compiled backward)."""
    torch.manual_seed(3)
    shape = (2, 3, 4, 5)
    x = _laid_out(torch.randn(shape, device=device), layout).requires_grad_()
    f = _laid_out(torch.randn(shape, device=device), layout).requires_grad_()
    w = torch.randn(shape, device=device)  # contiguous: the incoming gradient is laid out unlike x
    rho = torch.tensor(0.3, device=device, requires_grad=True)

    def fn(x, f, rho):
        y, s = ops.leaky_update(x, f, rho, 1.5, scheme="exponential", activation="relu", return_stats=True,
                                backend=backend)
        return (y * w).sum() + s.sum() * 0, y

    inputs = (x, f, rho)
    loss_e, y_e = fn(*inputs)
    grads_e = torch.autograd.grad(loss_e, inputs)
    loss_c, y_c = torch.compile(fn, fullgraph=True)(*inputs)
    grads_c = torch.autograd.grad(loss_c, inputs)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-6)
    for u, v, name in zip(grads_c, grads_e, ("x", "f", "rho")):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("device,backend", CASES)
def test_compiled_leaky_linear_backward_on_a_transposed_input(device, backend):
    torch.manual_seed(4)
    width = 12
    x = _laid_out(torch.randn(7, width, device=device), "transposed").requires_grad_()
    weight = (torch.randn(width, width, device=device) / 4).t().requires_grad_()  # a transposed weight too
    a, b, lt = (torch.tensor(v, device=device, requires_grad=v != 1.0) for v in (0.6, 0.3, 1.0))

    def fn(x, weight, a, b):
        y, s = ops.leaky_linear(x, weight, None, a, b, lt, relu=True, stats=True, backend=backend)
        return y.square().sum() + s.sum() * 0

    inputs = (x, weight, a, b)
    grads_e = torch.autograd.grad(fn(*inputs), inputs)
    grads_c = torch.autograd.grad(torch.compile(fn, fullgraph=True)(*inputs), inputs)
    for u, v, name in zip(grads_c, grads_e, ("x", "weight", "a", "b")):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5, msg=name)
