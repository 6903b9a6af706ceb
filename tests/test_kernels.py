"""The Triton kernels against float64 maths written out here: outputs, statistics and every gradient, on
odd shapes and layouts, with every buffer a kernel writes handed out NaN-filled (an element left
unwritten fails), determinism, and clear errors. CPU tensors run under ``TRITON_INTERPRET=1`` (set by
``tests/conftest.py`` when there is no GPU); the same tests run on CUDA when a GPU is present."""
import importlib
import math

import pytest
import torch

pytest.importorskip("triton")

from adaptive_depth import ops  # noqa: E402

ops._kernels()  # a checkout used without installing it (the GPU machine): loads kernels/ by path
import adaptive_depth_kernels as kernels  # noqa: E402
from adaptive_depth_kernels import _common  # noqa: E402
from adaptive_depth.residual import MLPBranch  # noqa: E402

# the modules (the package's attributes of these names are the functions)
linear_module = importlib.import_module("adaptive_depth_kernels.leaky_linear")
update_module = importlib.import_module("adaptive_depth_kernels.leaky_update")
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not _common.interpreting(), reason="CPU tensors need TRITON_INTERPRET=1, which tests/conftest.py "
                                           "sets only when no GPU is present")),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# an elementwise result in fp32 maths, rounded once to its dtype (about 2 ulps)
RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
# (3, 5, 1031): 3 whole blocks of 4096 and a masked one; (5, 4100): 5 whole blocks and a masked one, so
# that under the interpreter (3 programs) a program loops over two whole blocks and then the partial one
SHAPES = [(1,), (7,), (13, 17), (6, 10, 10), (3, 5, 1031), (5, 4100)]


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Every buffer the kernels write (outputs and partial sums) starts as NaN."""
    real = _common.empty

    def nan_filled(*args, **kwargs):
        return real(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(_common, "empty", nan_filled)


@pytest.fixture(autouse=True)
def fixed_tiles(monkeypatch):
    """The GEMM on its fixed config (as under the interpreter): one compile per variant on CUDA instead
    of one per autotuning config; test_leaky_linear_autotuned covers the autotuned path."""
    monkeypatch.setenv("ADAPTIVE_DEPTH_AUTOTUNE", "0")


# ----------------------------------------------------------------------------------- helpers
def randn(shape, dtype, device, seed):
    """Normal values with every 5th element exactly 0 (in the same places for every tensor of a shape, so
    the ReLU masks meet their edge cases: relu'(0) = 0, and a x + b f = 0)."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=gen, dtype=torch.float64)
    t.view(-1)[::5] = 0.0
    return t.to(device=device, dtype=dtype)


def scalar(value, device, dtype=torch.float32, grad=False):
    return torch.tensor(value, dtype=dtype, device=device, requires_grad=grad)


def f64(t):
    return t.detach().to("cpu", torch.float64)


def assert_elementwise(actual, expected, dtype):
    """``actual`` (any dtype) against float64 ``expected``, for a result rounded once to ``dtype``."""
    assert actual.shape == expected.shape
    torch.testing.assert_close(f64(actual), expected, rtol=RTOL[dtype], atol=1e-6, equal_nan=False)


def assert_sum(actual, expected, terms, rtol=1e-6):
    """A sum accumulated in fp32: error bounded by a few ulps of ``sum |terms|``."""
    assert actual.shape == expected.shape and actual.dtype in (torch.float32, torch.float64)
    bound = rtol * f64(terms).abs().sum().item() + 1e-12
    torch.testing.assert_close(f64(actual), expected, rtol=0.0, atol=bound, equal_nan=False)


def bitwise_equal(u, v):
    return u.shape == v.shape and u.dtype == v.dtype and \
        torch.equal(u.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))


# ------------------------------------------------------------------ float64 maths of the update
def update_ref(x, f, a, b, lt, relu):
    x, f, a, b, lt = (f64(t) for t in (x, f, a, b, lt))
    pre = a * x + b * f
    y = pre.clamp_min(0.0) if relu else pre
    return y, torch.stack([((f - lt * x) ** 2).sum(), (x ** 2).sum()])


def update_grads_ref(g, x, f, a, b, relu):
    g, x, f, a, b = (f64(t) for t in (g, x, f, a, b))
    if relu:
        g = torch.where(a * x + b * f > 0, g, 0.0)
    return a * g, b * g, (g * x).sum(), (g * f).sum(), g


# ------------------------------------------------------------------------------ update forward
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("stats", [False, True])
def test_update_forward(device, dtype, shape, relu, stats):
    seed = hash((shape, relu, stats)) % 1000
    x, f = randn(shape, dtype, device, seed), randn(shape, dtype, device, seed + 1)
    a, b, lt = scalar(0.62, device), scalar(0.19, device), scalar(2.0, device)
    y, s = kernels.leaky_update_fwd(x, f, a, b, lt, relu=relu, stats=stats)
    y_ref, s_ref = update_ref(x, f, a, b, lt, relu)
    assert y.dtype == dtype and y.device == x.device and y.stride() == x.stride()
    assert_elementwise(y, y_ref, dtype)
    if stats:
        assert s.dtype == torch.float32 and s.device == x.device
        assert_sum(s[0], s_ref[0], (f64(f) - 2.0 * f64(x)) ** 2)
        assert_sum(s[1], s_ref[1], f64(x) ** 2)
    else:
        assert s.shape == (0,) and s.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("coef_dtype", [torch.float32, torch.float64])
def test_update_mixed_dtypes_and_fp64_coefficients(device, coef_dtype):
    x, f = randn((9, 31), torch.bfloat16, device, 1), randn((9, 31), torch.float32, device, 2)
    a, b, lt = (scalar(v, device, coef_dtype) for v in (0.9, 0.05, 2.0))
    y, s = kernels.leaky_update_fwd(x, f, a, b, lt, relu=True, stats=True)
    assert y.dtype == torch.float32  # promote_types(bf16, fp32)
    y_ref, s_ref = update_ref(x, f, a, b, lt, True)
    assert_elementwise(y, y_ref, torch.float32)
    assert_sum(s[1], s_ref[1], f64(x) ** 2)
    g = randn((9, 31), torch.float32, device, 3)
    dx, df, da, db = kernels.leaky_update_bwd(g, x, f, a, b, relu=True, need=(True, True, True, True))
    dx_ref, df_ref, da_ref, db_ref, gm = update_grads_ref(g, x, f, a, b, True)
    assert (dx.dtype, df.dtype, da.dtype, db.dtype) == (torch.bfloat16, torch.float32, coef_dtype, coef_dtype)
    assert da.shape == () and db.shape == ()
    assert_elementwise(dx, dx_ref, torch.bfloat16)
    assert_elementwise(df, df_ref, torch.float32)
    assert_sum(da, da_ref, gm * f64(x))
    assert_sum(db, db_ref, gm * f64(f))


# ----------------------------------------------------------------------------- update backward
NEEDS = [(True, True, True, True), (True, False, False, True), (False, True, True, False),
         (False, False, False, False)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("need", NEEDS)
def test_update_backward(device, dtype, shape, relu, need):
    seed = hash((shape, relu, need)) % 1000
    x, f, g = (randn(shape, dtype, device, seed + i) for i in range(3))
    # a, b with few mantissa bits: for 16-bit inputs a x + b f is then exact in the kernel's fp32 maths, as in
    # the float64 reference, so the ReLU mask (a step function of it) agrees. With 0.7 and 0.3 a bf16 pair
    # with f = -7/3 x gives a tiny a x + b f in float64 that fp32 arithmetic rounds to 0 (in shape (5, 4100))
    a, b = scalar(0.75, device), scalar(0.25, device)
    got = kernels.leaky_update_bwd(g, x, f, a, b, relu=relu, need=need)
    dx_ref, df_ref, da_ref, db_ref, gm = update_grads_ref(g, x, f, a, b, relu)
    for value, wanted in zip(got, need):
        assert (value is not None) == wanted
    dx, df, da, db = got
    if need[0]:
        assert dx.dtype == dtype and dx.stride() == x.stride()
        assert_elementwise(dx, dx_ref, dtype)
    if need[1]:
        assert_elementwise(df, df_ref, dtype)
    if need[2]:
        assert da.shape == () and da.dtype == a.dtype
        assert_sum(da, da_ref, gm * f64(x))
    if need[3]:
        assert_sum(db, db_ref, gm * f64(f))
    if need[2] and need[3]:  # custom ops may not return aliasing outputs
        assert da.untyped_storage().data_ptr() != db.untyped_storage().data_ptr()


# ---------------------------------------------------------------------------------------- layouts
def _layouts(device):
    """Pairs (x, f) in the layouts the kernels handle: shared dense layouts run in place, others are
    copied once into x's layout (or, for a non-dense x, the layout empty_like gives)."""
    base = randn((2, 6, 5, 7), torch.float32, device, 11), randn((2, 6, 5, 7), torch.float32, device, 12)
    cl = [t.contiguous(memory_format=torch.channels_last) for t in base]
    wide = [randn((2, 6, 5, 14), torch.float32, device, 13 + i) for i in range(2)]
    tall = [randn((7, 5), torch.float32, device, 15 + i) for i in range(2)]
    return {
        "channels_last": (cl[0], cl[1]),
        "x_channels_last_f_contiguous": (cl[0], base[1]),
        "x_contiguous_f_channels_last": (base[0], cl[1]),
        "sliced_not_dense": (wide[0][..., ::2], wide[1][..., ::2]),
        "transposed_pair": (tall[0].t(), tall[1].t()),
        "expanded_f": (base[0], base[1][:1].expand(2, 6, 5, 7)),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "x_channels_last_f_contiguous",
                                    "x_contiguous_f_channels_last", "sliced_not_dense", "transposed_pair",
                                    "expanded_f"])
def test_update_layouts(device, layout):
    x, f = _layouts(device)[layout]
    a, b, lt = scalar(0.6, device), scalar(0.25, device), scalar(1.5, device)
    y, s = kernels.leaky_update_fwd(x, f, a, b, lt, relu=True, stats=True)
    assert y.stride() == torch.empty_like(x).stride()  # the layout the custom op's fake promises
    y_ref, s_ref = update_ref(x, f, a, b, lt, True)
    assert_elementwise(y, y_ref, torch.float32)
    assert_sum(s[0], s_ref[0], (f64(f) - 1.5 * f64(x)) ** 2)
    g = randn(x.shape, torch.float32, device, 21).contiguous(memory_format=torch.channels_last) \
        if x.dim() == 4 else randn(x.shape, torch.float32, device, 21)
    dx, df, da, db = kernels.leaky_update_bwd(g, x, f, a, b, relu=True, need=(True, True, True, True))
    assert dx.stride() == torch.empty_like(x).stride()
    assert df.stride() == torch.empty_like(f).stride()
    dx_ref, df_ref, da_ref, db_ref, gm = update_grads_ref(g, x, f, a, b, True)
    assert_elementwise(dx, dx_ref, torch.float32)
    assert_elementwise(df, df_ref, torch.float32)
    assert_sum(da, da_ref, gm * f64(x))
    assert_sum(db, db_ref, gm * f64(f))


# ------------------------------------------------------------------------- determinism, edges
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_is_deterministic(device, dtype):
    x, f, g = (randn((3, 5, 1031), dtype, device, 30 + i) for i in range(3))
    a, b, lt = scalar(0.8, device), scalar(0.1, device), scalar(2.0, device)
    first = kernels.leaky_update_fwd(x, f, a, b, lt, relu=True, stats=True) + \
        kernels.leaky_update_bwd(g, x, f, a, b, relu=True, need=(True, True, True, True))
    second = kernels.leaky_update_fwd(x, f, a, b, lt, relu=True, stats=True) + \
        kernels.leaky_update_bwd(g, x, f, a, b, relu=True, need=(True, True, True, True))
    for u, v in zip(first, second):
        assert bitwise_equal(u, v)


@pytest.mark.parametrize("device", DEVICES)
def test_update_empty_tensors(device):
    x = torch.empty((0, 5), device=device)
    a = scalar(0.5, device)
    y, s = kernels.leaky_update_fwd(x, x, a, a, a, relu=False, stats=True)
    assert y.shape == (0, 5) and s.tolist() == [0.0, 0.0]
    dx, df, da, db = kernels.leaky_update_bwd(x, x, x, a, a, relu=True, need=(True, True, True, True))
    assert dx.shape == (0, 5) and df.shape == (0, 5) and da.item() == 0.0 and db.item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_nan_inputs_propagate_like_torch(device):
    x = torch.tensor([float("nan"), -1.0, 2.0], device=device)
    f = torch.tensor([1.0, float("nan"), 0.5], device=device)
    one = scalar(1.0, device)
    y, _ = kernels.leaky_update_fwd(x, f, one, one, one, relu=True, stats=False)
    expected = torch.relu(x + f)
    assert torch.equal(y.isnan(), expected.isnan())
    assert y[2].item() == expected[2].item()


def test_poisoning_catches_an_unwritten_element(monkeypatch):
    """The harness can fail: launch one program too few and the NaN left in the tail is caught."""
    device = "cpu" if _common.interpreting() else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or a CUDA GPU")
    x, f = randn((2, 4100), torch.float32, device, 1), randn((2, 4100), torch.float32, device, 2)
    a, b, lt = scalar(0.5, device), scalar(0.5, device), scalar(1.0, device)
    real = update_module._leaky_fwd_kernel

    class EightShort:  # launches the kernel with N eight elements short
        def __getitem__(self, grid):
            return lambda *args, **kwargs: real[grid](*args[:7], args[7] - 8, *args[8:], **kwargs)

    monkeypatch.setattr(update_module, "_leaky_fwd_kernel", EightShort())
    y, s = kernels.leaky_update_fwd(x, f, a, b, lt, relu=False, stats=False)
    assert y.isnan().sum().item() == 8
    with pytest.raises(AssertionError):
        assert_elementwise(y, update_ref(x, f, a, b, lt, False)[0], torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_sum_partials_over_many_blocks(device):
    partial = randn((3 * _common.SUM_BLOCK + 77, 2), torch.float32, device, 5)
    total = _common.sum_partials(partial)
    assert_sum(total, f64(partial).sum(0), f64(partial))
    assert bitwise_equal(total, _common.sum_partials(partial))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("programs", [1, 2, 4])
def test_persistent_grid_one_partial_per_program(device, programs, monkeypatch):
    """Whatever the grid, every block is processed once (a program loops over several, the partial one
    last), and the second pass reads one partial pair per program, in one step."""
    if device == "cpu":
        monkeypatch.setattr(_common, "INTERPRETER_PROGRAMS", programs)
    else:
        monkeypatch.setattr(_common, "PROGRAMS_PER_SM", programs)
    seen = []
    real = _common.sum_partials
    monkeypatch.setattr(_common, "sum_partials", lambda partial: seen.append(partial.shape[0]) or real(partial))
    n = 6 * update_module.BLOCK + 5  # 6 whole blocks and 5 elements
    x, f, g = (randn((n,), torch.float32, device, 60 + i) for i in range(3))
    a, b, lt = scalar(0.75, device), scalar(0.25, device), scalar(2.0, device)
    y, s = kernels.leaky_update_fwd(x, f, a, b, lt, relu=True, stats=True)
    dx, df, da, db = kernels.leaky_update_bwd(g, x, f, a, b, relu=True, need=(True, True, True, True))
    cap = programs if device == "cpu" else programs * torch.cuda.get_device_properties(x.device).multi_processor_count
    assert seen == [min(7, cap)] * 2  # 7 blocks: the forward's and the backward's partials
    assert _common.persistent_programs(10 ** 12, device) <= _common.SUM_BLOCK  # one step of the second pass
    y_ref, s_ref = update_ref(x, f, a, b, lt, True)
    assert_elementwise(y, y_ref, torch.float32)
    assert_sum(s[0], s_ref[0], (f64(f) - 2.0 * f64(x)) ** 2)
    assert_sum(s[1], s_ref[1], f64(x) ** 2)
    dx_ref, df_ref, da_ref, db_ref, gm = update_grads_ref(g, x, f, a, b, True)
    assert_elementwise(dx, dx_ref, torch.float32)
    assert_elementwise(df, df_ref, torch.float32)
    assert_sum(da, da_ref, gm * f64(x))
    assert_sum(db, db_ref, gm * f64(f))


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("device", DEVICES)
def test_update_errors_name_the_argument(device):
    x = torch.zeros(4, 3, device=device)
    a = scalar(0.5, device)
    with pytest.raises(TypeError, match="x must be float32"):
        kernels.leaky_update_fwd(x.double(), x, a, a, a, relu=False, stats=False)
    with pytest.raises(TypeError, match="f must be float32"):
        kernels.leaky_update_fwd(x, x.to(torch.int32), a, a, a, relu=False, stats=False)
    with pytest.raises(ValueError, match="f must have the shape of x"):
        kernels.leaky_update_fwd(x, x[:2], a, a, a, relu=False, stats=False)
    with pytest.raises(ValueError, match="b is on meta"):
        kernels.leaky_update_fwd(x, x, a, torch.tensor(0.5, device="meta"), a, relu=False, stats=False)
    with pytest.raises(ValueError, match="a must have one element"):
        kernels.leaky_update_fwd(x, x, torch.ones(2, device=device), a, a, relu=False, stats=False)
    with pytest.raises(TypeError, match="lt must be float32 or float64"):
        kernels.leaky_update_fwd(x, x, a, a, torch.tensor(1, device=device), relu=False, stats=True)
    with pytest.raises(TypeError, match="a must be a one-element tensor"):
        kernels.leaky_update_fwd(x, x, 0.5, a, a, relu=False, stats=False)
    with pytest.raises(ValueError, match="g must have the shape of x"):
        kernels.leaky_update_bwd(x[:1], x, x, a, a, relu=False, need=(True, True, True, True))


@pytest.mark.skipif(_common.interpreting(), reason="only without the interpreter do CPU tensors fail")
def test_cpu_tensors_without_interpreter_are_refused():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        kernels.leaky_update_fwd(x, x, x[0], x[0], x[0], relu=False, stats=False)


# ---------------------------------------------------------- the update through ops (autograd, rho)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", ["euler", "exponential"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_leaky_update_op_gradients(device, dtype, scheme, activation):
    """ops.leaky_update on the Triton path: y, the statistics and the gradients of x, f and rho."""
    shape = (5, 3, 277)
    x = randn(shape, dtype, device, 40).requires_grad_()
    f = randn(shape, dtype, device, 41).requires_grad_()
    rho = scalar(0.3, device, grad=True)
    lt = 1.7
    y, s = ops.leaky_update(x, f, rho, lt, scheme=scheme, activation=activation, return_stats=True,
                            backend="triton")
    g = randn(shape, dtype, device, 42)
    dx, df, drho = torch.autograd.grad(y, (x, f, rho), g)
    # float64: a, b and their derivatives in rho written out
    r, X, F, G = 0.3, f64(x), f64(f), f64(g)
    if scheme == "euler":
        a, b, da_dr, db_dr = 1 - r * lt, r, -lt, 1.0
    else:
        a, b = math.exp(-r * lt), -math.expm1(-r * lt) / lt
        da_dr, db_dr = -lt * a, a
    pre = a * X + b * F
    y_ref = pre.clamp_min(0.0) if activation else pre
    gm = torch.where(pre > 0, G, 0.0) if activation else G
    assert_elementwise(y, y_ref, dtype)
    assert_sum(s[0], ((F - lt * X) ** 2).sum(), (F - lt * X) ** 2)
    assert_elementwise(dx, a * gm, dtype)
    assert_elementwise(df, b * gm, dtype)
    terms = gm * (da_dr * X + db_dr * F)
    assert_sum(drho, terms.sum(), terms, rtol=2e-6)


# -------------------------------------------------------------------------------- leaky linear
def linear_ref(x, weight, bias, a, b, lt, relu):
    """float64 ``act(a x + b (relu(x) W^T + bias))`` and its statistics, differentiable."""
    f = torch.relu(x) @ weight.t()
    if bias is not None:
        f = f + bias
    pre = a * x + b * f
    y = torch.relu(pre) if relu else pre
    return y, torch.stack([((f - lt * x) ** 2).sum(), (x ** 2).sum()])


def linear_inputs(shape, dtype, device, seed, bias=True, grads=(True,) * 5):
    d = shape[-1]
    x = randn(shape, dtype, device, seed)
    weight = (randn((d, d), torch.float64, device, seed + 1) / math.sqrt(d) +
              0.5 * torch.eye(d, dtype=torch.float64, device=device)).to(dtype)
    bias_t = randn((d,), dtype, device, seed + 2) if bias else None
    a, b = scalar(0.55, device), scalar(0.3, device)
    tensors = [x, weight, bias_t, a, b]
    return [t.requires_grad_(want) if t is not None else None for t, want in zip(tensors, grads)]


LINEAR_SHAPES = [(1, 1), (5, 7), (2, 3, 7), (70, 50)]  # the last: 3 x 2 tiles, 2 K steps, masked edges


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LINEAR_SHAPES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_leaky_linear(device, dtype, shape, relu, bias):
    x, weight, bias_t, a, b = linear_inputs(shape, dtype, device, hash((shape, relu, bias)) % 1000, bias)
    lt = scalar(1.5, device)
    y, s = kernels.leaky_linear(x, weight, bias_t, a, b, lt, relu=relu, stats=True)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    inputs = [x, weight, bias_t, a, b]
    ref_inputs = [f64(t).requires_grad_() if t is not None else None for t in inputs]
    y_ref, s_ref = linear_ref(*ref_inputs, 1.5, relu)
    assert_elementwise(y, y_ref.detach(), dtype)
    f_ref = (torch.relu(ref_inputs[0]) @ ref_inputs[1].t()).detach() + (f64(bias_t) if bias else 0.0)
    assert_sum(s[0], s_ref[0].detach(), (f_ref - 1.5 * f64(x)) ** 2, rtol=1e-5)
    assert_sum(s[1], s_ref[1].detach(), f64(x) ** 2)

    g = randn(shape, dtype, device, 7)
    wanted = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(y, wanted, g)
    grads_ref = torch.autograd.grad(y_ref, [t for t in ref_inputs if t is not None], f64(g))
    # dx and dW/dbias come through matmuls in the input dtype: a couple of ulps of the largest value
    for got, ref in zip(grads[:-2], grads_ref[:-2]):
        assert got.dtype == dtype and got.shape == ref.shape and got.is_contiguous()  # as the fake says
        torch.testing.assert_close(f64(got), ref, rtol=2 * RTOL[dtype], atol=2 * RTOL[dtype] * ref.abs().max().item())
    da, db = grads[-2:]
    assert da.shape == () and db.shape == () and da.dtype == torch.float32
    gm = torch.where(y_ref.detach() > 0, f64(g), 0.0) if relu else f64(g)
    assert_sum(da, grads_ref[-2], gm * f64(x))
    # db = <G^T relu(x), W> + ..., with G^T relu(x) rounded once to the input dtype
    assert_sum(db, grads_ref[-1], gm * f_ref, rtol=1e-6 if dtype == torch.float32 else RTOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grads", [(False, True, False, False, True), (True, False, True, True, False)])
def test_leaky_linear_partial_gradients(device, grads):
    x, weight, bias, a, b = linear_inputs((9, 20), torch.float32, device, 3, True, grads)
    y, _ = kernels.leaky_linear(x, weight, bias, a, b, scalar(1.0, device), relu=True, stats=False)
    wanted = [t for t, w in zip((x, weight, bias, a, b), grads) if w]
    got = torch.autograd.grad(y.sum(), wanted)
    ref_inputs = [f64(t).requires_grad_(w) for t, w in zip((x, weight, bias, a, b), grads)]
    y_ref, _ = linear_ref(*ref_inputs, 1.0, True)
    ref = torch.autograd.grad(y_ref.sum(), [t for t, w in zip(ref_inputs, grads) if w])
    for u, v in zip(got, ref):
        torch.testing.assert_close(f64(u), v, rtol=1e-5, atol=1e-5 * v.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("view", ["transposed", "column_slice"])
def test_leaky_linear_strided_x(device, view):
    if view == "transposed":  # (11, 24) with strides (1, 11): copied once
        x = randn((24, 11), torch.float32, device, 5).t().requires_grad_()
    else:  # (11, 24) with strides (30, 1): read in place by the GEMM
        x = randn((11, 30), torch.float32, device, 5)[:, 3:27].requires_grad_()
    _, weight, bias, a, b = linear_inputs((11, 24), torch.float32, device, 6)
    lt = scalar(0.5, device)
    y, s = kernels.leaky_linear(x, weight, bias, a, b, lt, relu=False, stats=True)
    ref_inputs = [f64(t).requires_grad_() for t in (x, weight, bias, a, b)]
    y_ref, s_ref = linear_ref(*ref_inputs, 0.5, False)
    assert_elementwise(y, y_ref.detach(), torch.float32)
    assert_sum(s[1], s_ref[1].detach(), f64(x) ** 2)
    g = randn((11, 24), torch.float32, device, 8)
    for got, ref in zip(torch.autograd.grad(y, (x, weight, bias, a, b), g),
                        torch.autograd.grad(y_ref, ref_inputs, f64(g))):
        torch.testing.assert_close(f64(got), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_leaky_linear_is_deterministic(device, dtype):
    x, weight, bias, a, b = linear_inputs((70, 50), dtype, device, 9)
    lt, g = scalar(2.0, device), randn((70, 50), dtype, device, 10)
    runs = []
    for _ in range(2):
        y, s = kernels.leaky_linear(x, weight, bias, a, b, lt, relu=True, stats=True)
        runs.append((y, s, *torch.autograd.grad(y, (x, weight, bias, a, b), g)))
    for u, v in zip(*runs):
        assert bitwise_equal(u, v)


@pytest.mark.parametrize("device", DEVICES)
def test_leaky_linear_zeroes_statistics_slots_no_tile_owns(device, monkeypatch):
    """Autotuned launches size the statistics buffer for the config with the most tiles; the slots the
    chosen config does not own must be zeroed by the kernel (the buffer starts as NaN here)."""
    real = linear_module._slots
    monkeypatch.setattr(linear_module, "_slots", lambda m, d, configs: 3 * real(m, d, configs) + 1)
    x, weight, bias, a, b = linear_inputs((70, 50), torch.float32, device, 12)
    y, s = kernels.leaky_linear(x, weight, bias, a, b, scalar(1.0, device), relu=False, stats=True)
    _, s_ref = linear_ref(*(f64(t) for t in (x, weight, bias, a, b)), 1.0, False)
    assert_sum(s[1], s_ref[1], f64(x) ** 2)
    assert_sum(s[0], s_ref[0], s_ref[0], rtol=1e-5)  # a sum of squares: relative


@pytest.mark.parametrize("device", DEVICES)
def test_leaky_linear_empty_rows(device):
    x, weight, bias, a, b = linear_inputs((0, 6), torch.float32, device, 1)
    y, s = kernels.leaky_linear(x, weight, bias, a, b, scalar(1.0, device), relu=False, stats=True)
    assert y.shape == (0, 6) and s.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("device", DEVICES)
def test_leaky_linear_errors_name_the_argument(device):
    x, weight, bias, a, b = linear_inputs((4, 6), torch.float32, device, 1, grads=(False,) * 5)
    lt = scalar(1.0, device)
    with pytest.raises(ValueError, match=r"weight must have shape \(6, 6\)"):
        kernels.leaky_linear(x, weight[:5], bias, a, b, lt, relu=False, stats=False)
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        kernels.leaky_linear(x, weight, bias[:5], a, b, lt, relu=False, stats=False)
    with pytest.raises(TypeError, match="weight must have x's dtype"):
        kernels.leaky_linear(x, weight.half(), bias, a, b, lt, relu=False, stats=False)
    with pytest.raises(TypeError, match="x must be float32"):
        kernels.leaky_linear(x.double(), weight.double(), bias.double(), a, b, lt, relu=False, stats=False)
    with pytest.raises(ValueError, match="a is on meta"):
        kernels.leaky_linear(x, weight, bias, a.to("meta"), b, lt, relu=False, stats=False)


# ----------------------------------------------------------- leaky linear through ops and modules
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_branch_triton_matches_torch_path(device, dtype, monkeypatch):
    calls = []
    real = linear_module._forward
    monkeypatch.setattr(linear_module, "_forward", lambda *args: calls.append(1) or real(*args))
    branch = MLPBranch(24, device=device, dtype=dtype)
    x = randn((3, 24), dtype, device, 2).requires_grad_()
    a, b, lt = scalar(0.6, device, grad=True), scalar(0.4, device, grad=True), scalar(1.0, device)
    outs = {}
    for backend in ("triton", "torch"):
        y, s = branch.leaky_step(x, a, b, lt, relu=True, stats=True, backend=backend)
        outs[backend] = (y, s, *torch.autograd.grad(y.sum(), (x, branch.linear.weight, a, b)))
    assert len(calls) == 1  # the fused kernel ran for backend="triton" only
    for u, v in zip(outs["triton"], outs["torch"]):
        torch.testing.assert_close(f64(u), f64(v), rtol=2 * RTOL[dtype], atol=2 * RTOL[dtype] * f64(v).abs().max().item())


def test_autocast_takes_the_torch_path(monkeypatch):
    device = "cpu" if _common.interpreting() else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or a CUDA GPU")
    monkeypatch.setattr(linear_module, "_forward", lambda *args: pytest.fail("the fused GEMM ran under autocast"))
    branch = MLPBranch(16, device=device)
    x = randn((4, 16), torch.float32, device, 3)
    one = scalar(0.5, device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y, _ = branch.leaky_step(x, one, one, one, backend="triton")
        f = torch.nn.functional.linear(torch.relu(x), branch.linear.weight, branch.linear.bias)
    torch.testing.assert_close(y, 0.5 * x + 0.5 * f.float())


# --------------------------------------------------------------------------- GEMM policy, autotuning
def test_gemm_path_policy(monkeypatch):
    """Triton where the dot has tensor cores (16-bit, TF32), cuBLAS for full fp32; an override by env."""
    monkeypatch.delenv("ADAPTIVE_DEPTH_GEMM", raising=False)
    before = torch.backends.cuda.matmul.allow_tf32  # (a module-like object: set and restored by hand)
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert linear_module.gemm_path(torch.float32) == "cublas"
        assert linear_module.gemm_path(torch.bfloat16) == linear_module.gemm_path(torch.float16) == "triton"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert linear_module.gemm_path(torch.float32) == "triton"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    monkeypatch.setenv("ADAPTIVE_DEPTH_GEMM", "cublas")
    assert linear_module.gemm_path(torch.bfloat16) == "cublas"
    monkeypatch.setenv("ADAPTIVE_DEPTH_GEMM", "cutlass")
    with pytest.raises(ValueError, match="ADAPTIVE_DEPTH_GEMM must be 'triton', 'cublas' or unset"):
        linear_module.gemm_path(torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["triton", "cublas"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_leaky_linear_gemm_paths(device, path, dtype, monkeypatch):
    """Both forward paths, forced: the same values, statistics and gradients (float64 reference)."""
    monkeypatch.setenv("ADAPTIVE_DEPTH_GEMM", path)
    ran = []
    for name in ("_forward_cublas", "leaky_update_fwd"):
        real = getattr(linear_module, name)
        monkeypatch.setattr(linear_module, name, lambda *args, _real=real, _name=name, **kwargs:
                            ran.append(_name) or _real(*args, **kwargs))
    x, weight, bias, a, b = linear_inputs((70, 50), dtype, device, 31)
    y, s = kernels.leaky_linear(x, weight, bias, a, b, scalar(1.5, device), relu=True, stats=True)
    assert ran == (["_forward_cublas", "leaky_update_fwd"] if path == "cublas" else [])
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    ref_inputs = [f64(t).requires_grad_() for t in (x, weight, bias, a, b)]
    y_ref, s_ref = linear_ref(*ref_inputs, 1.5, True)
    f_ref = (torch.relu(ref_inputs[0]) @ ref_inputs[1].t() + ref_inputs[2]).detach()
    # the cuBLAS path rounds f to the input dtype before the combine: a couple of ulps of |b f|
    tol = 2 * RTOL[dtype]
    torch.testing.assert_close(f64(y), y_ref.detach(), rtol=tol, atol=tol * f_ref.abs().max().item())
    assert_sum(s[1], s_ref[1].detach(), f64(x) ** 2)
    assert_sum(s[0], s_ref[0].detach(), (f_ref - 1.5 * f64(x)) ** 2, rtol=1e-5 if dtype == torch.float32 else tol)
    g = randn((70, 50), dtype, device, 32)
    for got, ref in zip(torch.autograd.grad(y, (x, weight, bias), g),
                        torch.autograd.grad(y_ref, ref_inputs[:3], f64(g))):
        torch.testing.assert_close(f64(got), ref, rtol=tol, atol=tol * ref.abs().max().item())


def _tuned_launches(device, monkeypatch):
    """The autotuned GEMM (as on CUDA, also under the interpreter) with a benchmark function that counts
    its calls and times nothing: a config by its tile area (under the interpreter time means nothing)."""
    tuned = linear_module._leaky_linear_fwd_tuned
    benched = []

    def bench(kernel_call, quantiles):
        kernel_call()
        benched.append(1)
        return [1.0, 1.0, 1.0]

    if device == "cpu":
        monkeypatch.setattr(linear_module, "_autotune", lambda: True)
        monkeypatch.setitem(tuned.__dict__, "do_bench", bench)
    else:
        monkeypatch.setenv("ADAPTIVE_DEPTH_AUTOTUNE", "1")
        real = tuned.do_bench
        monkeypatch.setitem(tuned.__dict__, "do_bench", lambda call, quantiles:
                            benched.append(1) or real(call, quantiles=quantiles))
    monkeypatch.setattr(tuned, "cache", {})
    return tuned, benched


@pytest.mark.parametrize("device", DEVICES)
def test_autotuning_keys_bucket_rows_and_variants(device, monkeypatch):
    """A new batch size in the same power-of-two bucket reuses the tuned config (no tuning inside a later
    training step); another bucket, or another epilogue variant, is tuned once on its own."""
    monkeypatch.setenv("ADAPTIVE_DEPTH_GEMM", "triton")
    tuned, benched = _tuned_launches(device, monkeypatch)
    bf16 = {"X": torch.empty(0, dtype=torch.bfloat16)}
    per_tune = len(linear_module._prune(linear_module.CONFIGS, bf16, STATS=True))  # configs benchmarked
    per_plain = len(linear_module._prune(linear_module.CONFIGS, bf16, STATS=False))
    assert 1 < per_tune < per_plain  # the large tiles serve the variant without statistics only
    lt = scalar(1.0, device)

    def run(rows, relu=True, stats=True):
        x, weight, bias, a, b = linear_inputs((rows, 40), torch.bfloat16, device, rows, grads=(False,) * 5)
        y, s = kernels.leaky_linear(x, weight, bias, a, b, lt, relu=relu, stats=stats)
        y_ref, s_ref = linear_ref(*(f64(t) for t in (x, weight, bias, a, b)), 1.0, relu)
        assert_elementwise(y, y_ref, torch.bfloat16)
        if stats:
            assert_sum(s[1], s_ref[1], f64(x) ** 2)

    run(33)  # bucket 64: tuned
    assert len(tuned.cache) == 1 and len(benched) == per_tune
    run(60)  # the same bucket: the tuned config, no benchmark
    assert len(tuned.cache) == 1 and len(benched) == per_tune
    run(65)  # bucket 128: tuned once
    assert len(tuned.cache) == 2 and len(benched) == 2 * per_tune
    run(40, stats=False)  # another variant of the epilogue: its own config, from its own candidates
    assert len(tuned.cache) == 3 and len(benched) == 2 * per_tune + per_plain
    run(50, stats=False)
    assert len(tuned.cache) == 3 and len(benched) == 2 * per_tune + per_plain
    assert linear_module.m_bucket(33) == linear_module.m_bucket(64) == 64 and linear_module.m_bucket(1) == 16


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (autotuning times kernels)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_leaky_linear_autotuned(dtype, monkeypatch):
    monkeypatch.setenv("ADAPTIVE_DEPTH_AUTOTUNE", "1")
    x, weight, bias, a, b = linear_inputs((300, 200), dtype, "cuda", 20)
    lt = scalar(1.0, "cuda")
    y, s = kernels.leaky_linear(x, weight, bias, a, b, lt, relu=True, stats=True)
    ref_inputs = [f64(t).requires_grad_() for t in (x, weight, bias, a, b)]
    y_ref, s_ref = linear_ref(*ref_inputs, 1.0, True)
    # fp32 GEMMs follow torch.backends.cuda.matmul.allow_tf32 (off by default): full fp32 here
    assert_elementwise(y, y_ref.detach(), dtype)
    assert_sum(s[0], s_ref[0].detach(), s_ref[0].detach(), rtol=1e-5)
    assert_sum(s[1], s_ref[1].detach(), f64(x) ** 2)
    y2, s2 = kernels.leaky_linear(x, weight, bias, a, b, lt, relu=True, stats=True)
    assert bitwise_equal(y, y2) and bitwise_equal(s, s2)  # the tuned config is kept


# (compiling every kernel variant for sm_90 without a GPU, with its registers, spills and vector accesses:
# tests/test_kernels_static.py)


# ------------------------------------------------------------------ CUDA: more than 2^31 elements
def _free_cuda_bytes():
    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0


@pytest.mark.cuda
@pytest.mark.skipif(_free_cuda_bytes() < 40e9, reason="needs a CUDA GPU with 40 GB free")
def test_update_beyond_int32_offsets():
    n = 2 ** 31 + 4099
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    f = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    a, b, lt = scalar(0.7, "cuda"), scalar(0.2, "cuda"), scalar(1.0, "cuda")
    y, s = kernels.leaky_update_fwd(x, f, a, b, lt, relu=False, stats=True)
    for part in (slice(0, 5000), slice(2 ** 31 - 100, 2 ** 31 + 100), slice(n - 5000, n)):
        assert_elementwise(y[part], update_ref(x[part], f[part], a, b, lt, False)[0], torch.bfloat16)
    chunks = [(x[i:i + 2 ** 28].double() ** 2).sum() for i in range(0, n, 2 ** 28)]
    torch.testing.assert_close(s[1].double(), torch.stack(chunks).sum(), rtol=1e-5, atol=0.0)
    del y
    dx, _, da, _ = kernels.leaky_update_bwd(f, x, f, a, b, relu=False, need=(True, False, True, False))
    assert_elementwise(dx[n - 5000:], 0.7 * f64(f[n - 5000:]), torch.bfloat16)
    chunks = [(x[i:i + 2 ** 28].double() * f[i:i + 2 ** 28].double()).sum() for i in range(0, n, 2 ** 28)]
    torch.testing.assert_close(da.double(), torch.stack(chunks).sum(), rtol=1e-4, atol=1.0)


@pytest.mark.cuda
@pytest.mark.skipif(_free_cuda_bytes() < 40e9, reason="needs a CUDA GPU with 40 GB free")
def test_leaky_linear_beyond_int32_offsets():
    d, m = 1024, 2 ** 21 + 3  # m * d > 2^31
    x, weight, bias, a, b = linear_inputs((m, d), torch.bfloat16, "cuda", 4, grads=(True, False, False, False, False))
    y, _ = kernels.leaky_linear(x, weight, bias, a, b, scalar(1.0, "cuda"), relu=False, stats=False)
    tail = slice(m - 300, m)
    y_ref, _ = linear_ref(f64(x[tail]), f64(weight), f64(bias), f64(a), f64(b), 1.0, False)
    torch.testing.assert_close(f64(y[tail]), y_ref, rtol=2e-2, atol=2e-2 * y_ref.abs().max().item())
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.isfinite(dx[tail]).all()
