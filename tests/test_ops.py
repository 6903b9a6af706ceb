"""leaky_update against the formula written out in float64, its gradients, and its argument checks."""
import math

import pytest
import torch

from adaptive_depth import leaky_update, step_coefficients

SHAPES = [(1,), (7,), (3, 5), (2, 3, 4, 5), (33, 17)]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def formula(x, f, rho, lt, scheme, relu):
    """The update in float64, written out plainly."""
    x, f = x.double(), f.double()
    if scheme == "euler":
        y = x + rho * (f - lt * x)
    elif lt == 0:
        y = x + rho * f
    else:
        y = math.exp(-rho * lt) * x + (1 - math.exp(-rho * lt)) / lt * f
    return torch.relu(y) if relu else y


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme", ["euler", "exponential"])
@pytest.mark.parametrize("relu", [False, True])
def test_forward_matches_formula(shape, dtype, scheme, relu):
    gen = torch.Generator().manual_seed(hash((shape, str(dtype), scheme, relu)) % 2**31)
    x = torch.randn(shape, generator=gen).to(dtype)
    f = torch.randn(shape, generator=gen).to(dtype)
    rho, lt = 0.05 + 0.2 * float(torch.rand((), generator=gen)), 3.0 * float(torch.rand((), generator=gen))
    y = leaky_update(x, f, rho, lt, scheme=scheme, activation="relu" if relu else None)
    assert y.dtype == dtype and y.shape == x.shape
    want = formula(x, f, rho, lt, scheme, relu)
    # low precision: the result is the fp32 value rounded once
    tol = TOL[dtype] * max(1.0, float(want.abs().max()))
    assert float((y.double() - want).abs().max()) <= tol


@pytest.mark.parametrize("scheme", ["euler", "exponential"])
@pytest.mark.parametrize("relu", [None, "relu"])
@pytest.mark.parametrize("lt", [0.0, 0.7, 4.0])
def test_gradcheck_x_f_rho(scheme, relu, lt):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    f = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    rho = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    fn = lambda x, f, r: leaky_update(x, f, r, lt, scheme=scheme, activation=relu)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, f, rho))
    assert torch.autograd.gradgradcheck(fn, (x, f, rho)) if relu is None else True


@pytest.mark.parametrize("scheme", ["euler", "exponential"])
def test_rho_gradient_is_k_times_velocity(scheme):
    """d y / d rho = k (f - Lt x), k = 1 (euler) or exp(-rho Lt) (exponential), masked by the ReLU."""
    gen = torch.Generator().manual_seed(2)
    x, f, g = (torch.randn(40, 9, generator=gen, dtype=torch.float64) for _ in range(3))
    rho, lt = 0.15, 2.5
    r = torch.tensor(rho, dtype=torch.float64, requires_grad=True)
    y = leaky_update(x, f, r, lt, scheme=scheme, activation="relu")
    (y * g).sum().backward()
    mask = formula(x, f, rho, lt, scheme, False) > 0
    k = 1.0 if scheme == "euler" else math.exp(-rho * lt)
    want = k * (g * mask * (f - lt * x)).sum()
    assert abs(float(r.grad) - float(want)) < 1e-10 * max(1.0, abs(float(want)))


def test_exponential_equals_euler_to_first_order_and_at_zero_leak():
    x, f = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    a = leaky_update(x, f, 0.3, 0.0, scheme="euler")
    b = leaky_update(x, f, 0.3, 0.0, scheme="exponential")
    assert torch.allclose(a, b, rtol=0, atol=1e-15)
    # difference is O(rho^2): halving rho quarters it
    d1 = (leaky_update(x, f, 1e-2, 3.0, scheme="euler") - leaky_update(x, f, 1e-2, 3.0, scheme="exponential"))
    d2 = (leaky_update(x, f, 5e-3, 3.0, scheme="euler") - leaky_update(x, f, 5e-3, 3.0, scheme="exponential"))
    ratio = float(d1.abs().max() / d2.abs().max())
    assert 3.5 < ratio < 4.5


def test_exponential_is_stable_beyond_the_euler_wall():
    x, f = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    y = leaky_update(x, f, 2.0, 10.0, scheme="exponential")  # rho * Lt = 20
    assert torch.isfinite(y).all()
    assert torch.allclose(y, formula(x, f, 2.0, 10.0, "exponential", False), atol=1e-12)
    with pytest.raises(ValueError, match=r"rho \* effective_depth must be < 1"):
        leaky_update(x, f, 2.0, 10.0, scheme="euler")


def test_stats_are_velocity_and_input_norms():
    gen = torch.Generator().manual_seed(3)
    x, f = torch.randn(17, 5, generator=gen), torch.randn(17, 5, generator=gen)
    y, s = leaky_update(x, f, 0.1, 1.5, return_stats=True)
    assert s.dtype == torch.float32 and s.shape == (2,)
    xd, fd = x.double(), f.double()
    want = torch.stack([((fd - 1.5 * xd) ** 2).sum(), (xd ** 2).sum()])
    assert torch.allclose(s.double(), want, rtol=1e-5)
    assert torch.equal(y, leaky_update(x, f, 0.1, 1.5))


def test_tensor_rho_and_mixed_dtypes():
    x = torch.randn(4, 3, dtype=torch.bfloat16)
    f = torch.randn(4, 3, dtype=torch.float32)
    y = leaky_update(x, f, torch.tensor(0.25), 1.0)
    assert y.dtype == torch.float32
    assert torch.allclose(y.double(), formula(x, f, 0.25, 1.0, "euler", False), atol=1e-6)


def test_channels_last_inputs_and_gradients():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 4, 5, generator=gen).to(memory_format=torch.channels_last).requires_grad_()
    f = torch.randn(2, 3, 4, 5, generator=gen).to(memory_format=torch.channels_last).requires_grad_()
    rho = torch.tensor(0.3, requires_grad=True)
    y = leaky_update(x, f, rho, 2.0, scheme="exponential", activation="relu")
    g = torch.randn(y.shape, generator=gen)
    (y * g).sum().backward()
    xr, fr = x.detach().double().requires_grad_(), f.detach().double().requires_grad_()
    rr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    z = torch.relu(torch.exp(-rr * 2.0) * xr + (1 - torch.exp(-rr * 2.0)) / 2.0 * fr)
    (z * g.double()).sum().backward()
    assert torch.allclose(y.double(), z, atol=1e-6)
    for got, want in ((x.grad, xr.grad), (f.grad, fr.grad), (rho.grad, rr.grad)):
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)


def test_backward_saves_only_x_and_f():
    """The written-out backward keeps x and f (and the scalar coefficients), nothing of the output's size."""
    x = torch.randn(64, 32, requires_grad=True)
    f = torch.randn(64, 32, requires_grad=True)
    rho = torch.tensor(0.1, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = leaky_update(x, f, rho, 2.0, scheme="euler", activation="relu")
    big = [t for t in saved if t.numel() > 1]
    assert len(big) == 2
    assert {t.data_ptr() for t in big} == {x.data_ptr(), f.data_ptr()}
    y.sum().backward()
    assert x.grad is not None and f.grad is not None and rho.grad is not None


def test_step_coefficients_vectorised():
    rho = torch.tensor([0.1, 0.2, 0.5], dtype=torch.float64)
    a, b = step_coefficients(rho, 2.0, "euler")
    assert torch.allclose(a, 1 - 2.0 * rho) and torch.equal(b, rho)
    a, b = step_coefficients(rho, 2.0, "exponential")
    assert torch.allclose(a, torch.exp(-2.0 * rho)) and torch.allclose(b, (1 - torch.exp(-2.0 * rho)) / 2.0)
    a, b = step_coefficients(rho, 0.0, "exponential")
    assert torch.equal(a, torch.ones(3, dtype=torch.float64)) and torch.equal(b, rho)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(rho=0.0), ValueError, "rho must be > 0"),
    (dict(rho=-0.1), ValueError, "rho must be > 0"),
    (dict(rho=float("nan")), ValueError, "rho must be finite"),
    (dict(rho=float("inf")), ValueError, "rho must be finite"),
    (dict(rho=torch.tensor(-1.0)), ValueError, "rho must be > 0"),
    (dict(rho=torch.tensor([0.1, 0.2])), ValueError, "rho must be a float or a 0-dim tensor"),
    (dict(rho="0.1"), TypeError, "rho must be a real number"),
    (dict(effective_depth=-1.0), ValueError, "effective_depth must be >= 0"),
    (dict(effective_depth=float("nan")), ValueError, "effective_depth must be finite"),
    (dict(rho=0.5, effective_depth=2.0), ValueError, r"rho \* effective_depth must be < 1"),
    (dict(scheme="rk4"), ValueError, "scheme must be one of"),
    (dict(activation="gelu"), ValueError, "activation must be one of"),
    (dict(f=torch.randn(3, 5)), ValueError, "x and f must have the same shape"),
    (dict(x=[1.0, 2.0]), TypeError, "x and f must be tensors"),
    (dict(backend="cuda"), ValueError, "backend"),
])
def test_bad_input_names_the_argument(kwargs, error, words):
    args = dict(x=torch.randn(3, 4), f=torch.randn(3, 4), rho=0.1, effective_depth=1.0)
    args.update(kwargs)
    x, f, rho, lt = (args.pop(k) for k in ("x", "f", "rho", "effective_depth"))
    with pytest.raises(error, match=words):
        leaky_update(x, f, rho, lt, **args)


@pytest.mark.parametrize("relu", [None, "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fixed_steps_backward_keeps_only_the_output(relu, dtype):
    """With a step that needs no gradient, the backward keeps y (for the ReLU mask) or nothing of size."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(16, 9, generator=gen).to(dtype).requires_grad_()
    f = torch.randn(16, 9, generator=gen).to(dtype).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = leaky_update(x, f, 0.3, 1.5, scheme="exponential", activation=relu)
    big = [t for t in saved if t.numel() > 1]
    assert len(big) == (1 if relu else 0)
    if relu:
        assert big[0].data_ptr() == y.data_ptr()
    g = torch.randn(y.shape, generator=gen).to(dtype)
    y.backward(g)
    a, b = math.exp(-0.45), (1 - math.exp(-0.45)) / 1.5
    mask = (formula(x.detach(), f.detach(), 0.3, 1.5, "exponential", False) > 0) if relu else 1.0
    tol = TOL[dtype]
    assert torch.allclose(x.grad.double(), a * g.double() * mask, atol=tol * 4, rtol=tol)
    assert torch.allclose(f.grad.double(), b * g.double() * mask, atol=tol * 4, rtol=tol)
