"""The leaky update's Triton kernels (``kernels/leaky_update.py``) against float64 maths written out here:
outputs, statistics and every gradient, on odd shapes and layouts, with every buffer a kernel writes handed
out NaN-filled (an element left unwritten fails), the persistent grid and its partial sums, determinism,
clear errors, and ``ops.leaky_update``'s gradients in rho on the Triton path. Shared helpers:
``tests/_kernel_helpers.py``; the GEMM's tests: ``tests/test_leaky_linear.py``."""
import importlib
import math

import pytest
import torch

from _kernel_helpers import (DEVICES, DTYPES, assert_elementwise, assert_sum, bitwise_equal, f64,
                             free_cuda_bytes, kernel_device, randn, scalar)
from _kernel_helpers import poisoned  # noqa: F401 - an autouse fixture: every kernel output starts NaN
from adaptive_depth import ops
import adaptive_depth_kernels as kernels
from adaptive_depth_kernels import _common

# the module (the package's attributes of the op's names are the functions)
update_module = importlib.import_module("adaptive_depth_kernels.leaky_update")
# (3, 5, 1031): 3 whole blocks of 4096 and a masked one; (5, 4100): 5 whole blocks and a masked one, so
# that under the interpreter (3 programs) a program loops over two whole blocks and then the partial one
SHAPES = [(1,), (7,), (13, 17), (6, 10, 10), (3, 5, 1031), (5, 4100)]


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


def assert_update_grads(got, g, x, f, a, b, relu):
    """fp32 ``(dx, df, da, db)`` against the float64 maths: dx, df elementwise, da, db as fp32 sums."""
    dx, df, da, db = got
    dx_ref, df_ref, da_ref, db_ref, gm = update_grads_ref(g, x, f, a, b, relu)
    assert_elementwise(dx, dx_ref, torch.float32)
    assert_elementwise(df, df_ref, torch.float32)
    assert_sum(da, da_ref, gm * f64(x))
    assert_sum(db, db_ref, gm * f64(f))


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
    assert_update_grads((dx, df, da, db), g, x, f, a, b, relu=True)


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
    device = kernel_device()
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
    assert_update_grads((dx, df, da, db), g, x, f, a, b, relu=True)


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


# ------------------------------------------------------------------ CUDA: more than 2^31 elements
@pytest.mark.cuda
@pytest.mark.skipif(free_cuda_bytes() < 40e9, reason="needs a CUDA GPU with 40 GB free")
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


