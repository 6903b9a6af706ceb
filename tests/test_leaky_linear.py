"""The leaky linear layer's fused Triton GEMM (``kernels/leaky_linear.py``) against float64 maths written out
here: values, statistics and every gradient on odd shapes, strided inputs, both forward paths (Triton and
cuBLAS) and the policy between them, autotuning keys, determinism, clear errors, and ``MLPBranch`` on the
Triton path against the torch path. Shared helpers: ``tests/_kernel_helpers.py``; the elementwise update's
tests: ``tests/test_leaky_update.py``."""
import importlib
import math

import pytest
import torch

from _kernel_helpers import (DEVICES, DTYPES, RTOL, assert_elementwise, assert_sum, bitwise_equal,
                             f64, free_cuda_bytes, kernel_device, randn, scalar)
from _kernel_helpers import poisoned  # noqa: F401 - an autouse fixture: every kernel output starts NaN
import adaptive_depth_kernels as kernels
from adaptive_depth.residual import MLPBranch

# the module (the package's attributes of the op's names are the functions)
linear_module = importlib.import_module("adaptive_depth_kernels.leaky_linear")


@pytest.fixture(autouse=True)
def fixed_tiles(monkeypatch):
    """The GEMM on its fixed config (as under the interpreter): one compile per variant on CUDA instead
    of one per autotuning config; test_leaky_linear_autotuned covers the autotuned path."""
    monkeypatch.setenv("ADAPTIVE_DEPTH_AUTOTUNE", "0")


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
    device = kernel_device()
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
@pytest.mark.cuda
@pytest.mark.skipif(free_cuda_bytes() < 40e9, reason="needs a CUDA GPU with 40 GB free")
def test_leaky_linear_beyond_int32_offsets():
    d, m = 1024, 2 ** 21 + 3  # m * d > 2^31
    x, weight, bias, a, b = linear_inputs((m, d), torch.bfloat16, "cuda", 4, grads=(True, False, False, False, False))
    y, _ = kernels.leaky_linear(x, weight, bias, a, b, scalar(1.0, "cuda"), relu=False, stats=False)
    tail = slice(m - 300, m)
    y_ref, _ = linear_ref(f64(x[tail]), f64(weight), f64(bias), f64(a), f64(b), 1.0, False)
    torch.testing.assert_close(f64(y[tail]), y_ref, rtol=2e-2, atol=2e-2 * y_ref.abs().max().item())
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.isfinite(dx[tail]).all()
