"""The leaky linear layer ``y = act(a x + b (relu(x) W^T + bias))`` (the paper's MLP block) as one GEMM.

Forward: a Triton GEMM whose prologue applies the ReLU to the loaded tiles of x and whose epilogue adds
the bias, reads the matching tile of x for the residual and applies the leaky combine (and the optional
output ReLU and statistics); ``relu(x) W^T + bias`` never touches memory. Backward: the two matmuls
``G W`` and ``G^T R`` (cuBLAS), the column sum of G, and three kernel launches: the elementwise kernel
(with the output ReLU it runs twice: G masked on the fly, R and ``<G, x>``, then dx after ``G W``), the
parameters' kernel (dW, dbias and the parts of db) and one second pass for da and db together: 7
launches with the output ReLU, 6 without (``tests/test_ops.py`` counts them). Differentiable in x, weight, bias, a and b, through a
``torch.autograd.Function`` in eager mode and the ``torch.library`` custom op ``adaptive_depth::leaky_linear``
under ``torch.compile`` (once: a second backward raises a clear error).

Backward, with ``G = g * [y > 0]`` (the output ReLU's mask, taken from the saved output as torch.relu
does) and ``R = relu(x)``::

    dx = a G + b (G W) * [x > 0]      dW = b G^T R      dbias = b sum_rows G
    da = <G, x>                       db = <G, f> = <G^T R, W> + <sum_rows G, bias>

so ``f`` is never needed again. ``x`` may have any strides (one copy is made where its rows are not
contiguous, for the GEMM, or x is not contiguous, for the backward); ``y`` and the gradients come out
contiguous. On CUDA the GEMM is autotuned over ``CONFIGS``; under ``TRITON_INTERPRET=1``, or with
``ADAPTIVE_DEPTH_AUTOTUNE=0``, it runs with ``FIXED_CONFIG``. Autotuning picks the config on the first
call for each ``TUNING_KEY`` (the width, the rows rounded up to a power of two, the epilogue's variant,
the precision, the dtypes); after that results are bit-identical. Full fp32 (TF32 off) runs the forward
as cuBLAS plus the fused update kernel instead (``gemm_path`` says why).
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _common
from ._common import load_block, store_block
from .leaky_update import BLOCK, NUM_WARPS, TAIL, coefficient_grads, leaky_update_fwd

# H100/H200 tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, with statistics): BLOCK_K 64 for 16-bit
# inputs, 32 for fp32 as TF32 (whose larger tiles would not fit in shared memory); _prune keeps those of
# the input's kind, and for the statistics variant only the tiles marked for it. No shipped config spills
# registers on sm_90 in the variants it serves, with Triton 3.6 (the GPU machine's) or 3.8
# (tests/test_kernels_static.py; figures in benchmarks/results/static_sm90_*.md). Found spilling there:
# 128x256 and 256x128 with 8 warps (about 1.1 KB with statistics, 12-172 B without); with statistics on
# Triton 3.6 every 16-bit tile of 128x128 or more, 64x256 and 128x64 with 4 warps (4-52 B); TF32 128x128
# (8 warps), 128x64 and 64x128 (4 warps) on Triton 3.8 (8-24 B).
_SHAPES = [(128, 128, 64, 8, 4, False), (64, 256, 64, 8, 3, False),
           (128, 64, 64, 8, 3, True), (64, 128, 64, 8, 3, True), (64, 64, 64, 4, 4, True),
           (128, 64, 32, 8, 3, True), (64, 128, 32, 8, 3, True), (64, 64, 32, 4, 4, True)]
CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
           for m, n, k, w, s, _ in _SHAPES]
_NO_STATS = {(m, n, k, w) for m, n, k, w, _, stats in _SHAPES if not stats}
# one small config: under the interpreter (several tiles on test-sized inputs), and on CUDA when
# ADAPTIVE_DEPTH_AUTOTUNE=0 (the CUDA tests: one compile per variant instead of four)
FIXED_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}


def serves_stats(config: triton.Config) -> bool:
    """Whether a shipped config is tuned for the statistics variant (whose epilogue needs more registers)."""
    c = config.kwargs
    return (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], config.num_warps) not in _NO_STATS


def _prune(configs, named_args, **kwargs):
    block_k = 32 if named_args["X"].dtype == torch.float32 else 64
    stats = bool(kwargs.get("STATS", False))
    return [c for c in configs if c.kwargs["BLOCK_K"] == block_k and (serves_stats(c) or not stats)]


def _autotune() -> bool:
    return not _common.interpreting() and os.environ.get("ADAPTIVE_DEPTH_AUTOTUNE", "1") != "0"


@triton.jit
def _leaky_linear_fwd_kernel(X, W, BIAS, Y, A, B, LT, PARTIAL, M, D, SLOTS, M_BUCKET,
                             stride_xm, stride_wn, stride_wk,
                             HAS_BIAS: tl.constexpr, RELU: tl.constexpr, STATS: tl.constexpr,
                             PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # (M_BUCKET: unused here, a key of the autotuner's cache: M rounded up to a power of two)
    # tiles in groups of GROUP_M rows, so that neighbouring programs share tiles of W in L2
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(D, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows_here = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_here
    pid_n = (pid % per_group) // rows_here
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < D
    x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :]  # rows of x are contiguous
    w_ptrs = W + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # a tile of W^T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(D, BLOCK_K)):
        left = D - k * BLOCK_K
        xt = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < left), other=0.0)
        xt = tl.where(xt < 0.0, tl.zeros_like(xt), xt)  # the ReLU prologue (keeps NaN, like torch.relu)
        wt = tl.load(w_ptrs, mask=(offs_k[:, None] < left) & mask_n[None, :], other=0.0)
        if DOT_FP32:  # the interpreter's dot reads bf16 tiles as raw integers (triton 3.8): upcast there
            acc = tl.dot(xt.to(tl.float32), wt.to(tl.float32), acc)
        else:
            acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    # the epilogue: the residual tile of x, the leaky combine, the optional ReLU and statistics
    mask = mask_m[:, None] & mask_n[None, :]
    x = tl.load(X + offs_m[:, None] * stride_xm + offs_n[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    y = tl.load(A).to(tl.float32) * x + tl.load(B).to(tl.float32) * acc
    if RELU:
        y = tl.where(y < 0.0, 0.0, y)
    tl.store(Y + offs_m[:, None] * D + offs_n[None, :], y.to(Y.dtype.element_ty), mask=mask)
    if STATS:
        v = tl.where(mask, acc - tl.load(LT).to(tl.float32) * x, 0.0)
        tl.store(PARTIAL + 2 * pid, tl.sum(tl.sum(v * v, axis=1), axis=0))
        tl.store(PARTIAL + 2 * pid + 1, tl.sum(tl.sum(x * x, axis=1), axis=0))
        # the buffer has a slot per tile of the config with the most tiles: zero the ones no tile owns
        programs = tiles_m * tiles_n
        for j in range(1, tl.cdiv(SLOTS - pid, programs)):
            tl.store(PARTIAL + 2 * (pid + j * programs), 0.0)
            tl.store(PARTIAL + 2 * (pid + j * programs) + 1, 0.0)


# What changes the best config: the width, the number of rows to within a power of two (so that a new
# batch size in the same bucket reuses the tuned config instead of retuning inside a training step), the
# epilogue's variants and the dot's precision; the autotuner adds the tensors' dtypes itself.
TUNING_KEY = ["M_BUCKET", "D", "HAS_BIAS", "RELU", "STATS", "PRECISION"]
_leaky_linear_fwd_tuned = triton.autotune(CONFIGS, key=TUNING_KEY, prune_configs_by={"early_config_prune": _prune})(
    _leaky_linear_fwd_kernel)


def m_bucket(m: int) -> int:
    """The autotuner's bucket of a row count: ``m`` rounded up to a power of two (at least 16)."""
    return max(16, triton.next_power_of_2(m))


@triton.jit
def _linear_bwd_block(G, Y, GM, H, X, DX, R, offs, N, a, b, acc, EVEN: tl.constexpr, MASK: tl.constexpr,
                      NEED_X: tl.constexpr, NEED_R: tl.constexpr, NEED_A: tl.constexpr):
    """One block of the backward's elementwise part: unmasked when EVEN (vector accesses), else masked."""
    x = load_block(X, offs, N, EVEN)
    if NEED_X or NEED_A or MASK:
        g = load_block(G, offs, N, EVEN)
    if MASK:  # the output ReLU's mask, from the saved output (as torch.relu's backward reads it)
        g = tl.where(load_block(Y, offs, N, EVEN) > 0.0, g, 0.0)
        store_block(GM, offs, g, N, EVEN)
    if NEED_X:
        h = load_block(H, offs, N, EVEN)
        dx = (a * g + b * tl.where(x > 0.0, h, 0.0)).to(DX.dtype.element_ty)
        store_block(DX, offs, dx, N, EVEN)
    if NEED_R:
        r = tl.where(x < 0.0, 0.0, x).to(R.dtype.element_ty)
        store_block(R, offs, r, N, EVEN)
    if NEED_A:
        acc += g * x
    return acc


@triton.jit(do_not_specialize=["N"])  # N % 16 plays no part: the split does
def _leaky_linear_bwd_kernel(G, Y, GM, H, X, DX, R, A, B, PARTIAL, N, BLOCK: tl.constexpr, MASK: tl.constexpr,
                             NEED_X: tl.constexpr, NEED_R: tl.constexpr, NEED_A: tl.constexpr, TAIL: tl.constexpr):
    """dx = a G + b H [x > 0] (H = G W), R = relu(x), and the partial sums of <G, x>, on the update
    kernels' persistent grid (whole blocks unmasked, the partial one masked, the sum in registers). With
    MASK, G is the incoming gradient masked by ``Y > 0`` on the fly and written to GM (for the GEMMs).
    Partials: ``(<G, x>, 0)`` per program, zeros when not asked for."""
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: more than 2^31 elements
    programs = tl.num_programs(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    a = tl.load(A).to(tl.float32) if NEED_X else 0.0
    b = tl.load(B).to(tl.float32) if NEED_X else 0.0
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    full = N.to(tl.int64) // BLOCK
    for blk in range(pid, full, programs):
        acc = _linear_bwd_block(G, Y, GM, H, X, DX, R, blk * BLOCK + lanes, N, a, b, acc,
                                True, MASK, NEED_X, NEED_R, NEED_A)
    tail = tl.zeros([TAIL], dtype=tl.float32)
    if (pid == full % programs) & (full * BLOCK < N):  # TAIL elements a step: few registers
        for start in range(full * BLOCK, N, TAIL):
            tail = _linear_bwd_block(G, Y, GM, H, X, DX, R, start + tl.arange(0, TAIL), N, a, b, tail,
                                     False, MASK, NEED_X, NEED_R, NEED_A)
    tl.store(PARTIAL + 2 * pid, tl.sum(acc, axis=0) + tl.sum(tail, axis=0))  # zero when not asked for
    tl.store(PARTIAL + 2 * pid + 1, 0.0)


@triton.jit
def _scale_dot_block(U, V, OUT, offs, N, b, acc, EVEN: tl.constexpr, STORE: tl.constexpr, DOT: tl.constexpr):
    """``OUT = b U`` and ``acc += U V`` over one block: unmasked when EVEN, else masked at N."""
    u = load_block(U, offs, N, EVEN)
    if STORE:
        store_block(OUT, offs, b * u, N, EVEN)
    if DOT:
        v = load_block(V, offs, N, EVEN)
        acc += u * v
    return acc


@triton.jit(do_not_specialize=["N", "D"])
def _linear_param_grads_kernel(U, W, DW, CS, BIAS, DBIAS, B, PARTIAL, N, D, BLOCK: tl.constexpr,
                               HAS_BIAS: tl.constexpr, NEED_W: tl.constexpr, NEED_BIAS: tl.constexpr,
                               NEED_B: tl.constexpr, TAIL: tl.constexpr):
    """The parameters' gradients from ``U = G^T relu(x)`` (N = D x D elements) and the column sums
    ``CS = sum_rows G`` (D, fp32): ``dW = b U``, ``dbias = b CS`` and the partial sums of
    ``db = <U, W> + <CS, bias>``, one pass over U and W on the flat kernels' persistent grid. Partials:
    ``(0, db part)`` per program (the second pass adds them up with the elementwise kernel's)."""
    pid = tl.program_id(0).to(tl.int64)
    programs = tl.num_programs(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    b = tl.load(B).to(tl.float32) if (NEED_W or NEED_BIAS) else 0.0
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    full = N.to(tl.int64) // BLOCK
    for blk in range(pid, full, programs):
        acc = _scale_dot_block(U, W, DW, blk * BLOCK + lanes, N, b, acc, True, NEED_W, NEED_B)
    tail = tl.zeros([TAIL], dtype=tl.float32)
    if (pid == full % programs) & (full * BLOCK < N):
        for start in range(full * BLOCK, N, TAIL):
            tail = _scale_dot_block(U, W, DW, start + tl.arange(0, TAIL), N, b, tail, False, NEED_W, NEED_B)
    if HAS_BIAS and (NEED_BIAS or NEED_B):
        if pid == programs - 1:  # the bias: D elements, one program
            for start in range(0, D, TAIL):
                tail = _scale_dot_block(CS, BIAS, DBIAS, start + tl.arange(0, TAIL), D, b, tail, False,
                                        NEED_BIAS, NEED_B)
    tl.store(PARTIAL + 2 * pid, 0.0)
    tl.store(PARTIAL + 2 * pid + 1, tl.sum(acc, axis=0) + tl.sum(tail, axis=0))  # zero when not asked for


# ------------------------------------------------------------------------------------------ launchers
def _check(x, weight, bias, a, b, lt, stats: bool) -> None:
    _common.check_tensor(x, "x")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the features)")
    d = x.shape[-1]
    _common.check_tensor(weight, "weight", like=x)
    if tuple(weight.shape) != (d, d):
        raise ValueError(f"weight must have shape ({d}, {d}) for x of shape {tuple(x.shape)} (a residual "
                         f"branch keeps the width), got {tuple(weight.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    if bias is not None:
        _common.check_tensor(bias, "bias", like=x)
        if tuple(bias.shape) != (d,):
            raise ValueError(f"bias must have shape ({d},), got {tuple(bias.shape)}")
    _common.check_scalar(a, "a", x)
    _common.check_scalar(b, "b", x)
    if stats:
        _common.check_scalar(lt, "lt", x)


def _precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs follow torch's TF32 switch, as cuBLAS does for F.linear."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def gemm_path(dtype: torch.dtype) -> str:
    """The forward's GEMM for inputs of ``dtype``: ``"triton"`` (the fused kernel above) or ``"cublas"``
    (``F.linear(relu(x), W, bias)`` by cuBLAS, then the fused update kernel for the combine, the output
    ReLU and the statistics in one memory pass).

    - bf16 / fp16, and fp32 with TF32 allowed (``torch.backends.cuda.matmul.allow_tf32``): Triton. The
      dot runs on tensor cores, and fusing the ReLU prologue and the leaky epilogue saves what cuBLAS
      would add around its GEMM: writing and reading ``relu(x)`` and ``f`` (four M x D passes).
    - fp32 with TF32 off (torch's default): cuBLAS. Full fp32 has no tensor-core path: Triton lowers the
      dot to FMA instructions and stays well behind cuBLAS's SGEMM (the sm_90 review of issue 13: not
      within 5%), while the GEMM then costs O(D) times more than the elementwise passes fusion saves.

    ``ADAPTIVE_DEPTH_GEMM=triton`` or ``cublas`` overrides the choice (benchmarks, tests).
    """
    forced = os.environ.get("ADAPTIVE_DEPTH_GEMM", "").strip().lower()
    if forced in ("triton", "cublas"):
        return forced
    if forced:
        raise ValueError(f"ADAPTIVE_DEPTH_GEMM must be 'triton', 'cublas' or unset, got {forced!r}")
    return "cublas" if _precision(dtype) == "ieee" else "triton"


def _slots(m: int, d: int, configs) -> int:
    """Statistics slots: one per tile of the config with the most tiles (the autotuner picks one later)."""
    return max(triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(d, c["BLOCK_N"]) for c in configs)


def _forward(x, weight, bias, a, b, lt, relu: bool, stats: bool) -> Tuple[Tensor, Tensor]:
    d = x.shape[-1]
    m = math.prod(x.shape[:-1])
    x2 = x.reshape(m, d)
    y = _common.empty((m, d), (d, 1), x.dtype, x.device)
    if m == 0 or d == 0:
        return y.view(x.shape), x.new_zeros((2 if stats else 0,), dtype=torch.float32)
    if _autotune():
        kernel, configs, fixed = _leaky_linear_fwd_tuned, [c.kwargs for c in CONFIGS], {}
    else:
        kernel, configs, fixed = _leaky_linear_fwd_kernel, [FIXED_CONFIG], FIXED_CONFIG
    if x2.stride(1) != 1:  # rows of x must be contiguous for the GEMM (one copy otherwise)
        x2 = x2.contiguous()
    if gemm_path(x.dtype) == "cublas":
        return _forward_cublas(x2, weight, bias, a, b, lt, relu, stats, x.shape)
    slots = _slots(m, d, configs)
    partial = _common.partial_buffer(slots, x.device) if stats else y  # (y: an unused placeholder)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(d, meta["BLOCK_N"]),)  # noqa: E731
    kernel[grid](x2, weight, bias if bias is not None else weight, y, a, b, lt if stats else a, partial,
                 m, d, slots, m_bucket(m), x2.stride(0), weight.stride(0), weight.stride(1),
                 HAS_BIAS=bias is not None, RELU=relu, STATS=stats, PRECISION=_precision(x.dtype),
                 DOT_FP32=_common.interpreting() and x.dtype == torch.bfloat16,
                 **fixed)
    s = _common.sum_partials(partial) if stats else x.new_empty((0,), dtype=torch.float32)
    return y.view(x.shape), s


def _forward_cublas(x2, weight, bias, a, b, lt, relu: bool, stats: bool, shape) -> Tuple[Tensor, Tensor]:
    """The forward by cuBLAS and the fused update kernel (``gemm_path``): ``f`` in x's dtype (fp32)."""
    f = torch.nn.functional.linear(torch.relu(x2), weight, bias)
    y, s = leaky_update_fwd(x2, f, a, b, lt, relu=relu, stats=stats)
    return y.reshape(shape), s


def _backward(g, x, weight, bias, a, b, y, relu: bool, need) -> Tuple[Optional[Tensor], ...]:
    """``(dx, dweight, dbias, sums)``, each None unless asked for in ``need`` (``sums = [da, db]``, (2,)
    fp32, when either is). Launches: the elementwise kernel (with the ReLU mask, a second one for dx after
    the GEMM ``G W``), the GEMMs ``G W`` and ``G^T relu(x)`` and the column sum of G (cuBLAS/torch), the
    parameter-gradient kernel, and one second pass for both coefficient gradients."""
    need_x, need_w, need_bias, need_a, need_b = (bool(v) for v in need)
    need_bias = need_bias and bias is not None
    d = x.shape[-1]
    m = math.prod(x.shape[:-1])
    if m * d == 0:
        return _empty_backward(x, weight, bias, need_x, need_w, need_bias, need_a or need_b)
    x2 = x.reshape(m, d).contiguous()
    gm = g.reshape(m, d).to(x.dtype).contiguous()
    weight = weight.contiguous()  # (no-ops for a module's parameters) the flat kernel reads W and bias in order
    bias = bias.contiguous() if bias is not None else None
    need_r = need_w or need_b  # relu(x) for G^T relu(x): dW / b, and db = <G^T relu(x), W> + <sum_rows G, bias>
    need_params = need_w or need_bias or need_b
    elementwise = need_x or need_r or need_a or (relu and need_params)
    rows = _common.persistent_programs(triton.cdiv(m * d, BLOCK), x.device) if elementwise else 0
    params = _common.persistent_programs(triton.cdiv(d * d, BLOCK), x.device) if need_params else 0
    partial = _common.partial_buffer(rows + params, x.device)  # rows: (<G, x>, 0); then (0, db part)
    dx = _common.empty(x2.shape, (d, 1), x.dtype, x.device) if need_x else None
    r = _common.empty(x2.shape, (d, 1), x.dtype, x.device) if need_r else None
    if relu and elementwise:  # G = g [y > 0], written once for the GEMMs; dx after G W
        masked = _common.empty(x2.shape, (d, 1), x.dtype, x.device)
        _elementwise(gm, y.reshape(m, d), masked, None, x2, None, r, a, b, partial, rows, need_a)
        gm = masked
        if need_x:
            _elementwise(gm, None, None, gm @ weight, x2, dx, None, a, b,
                         _common.partial_buffer(rows, x.device), rows, False)  # (its zero partials unused)
    elif elementwise:
        _elementwise(gm, None, None, gm @ weight if need_x else None, x2, dx, r, a, b, partial, rows, need_a)
    dw = _common.empty(weight.shape, (d, 1), weight.dtype, x.device) if need_w else None
    dbias = _common.empty(bias.shape, (1,), bias.dtype, x.device) if need_bias else None
    if need_params:
        u = gm.t() @ r if need_r else None  # G^T relu(x)
        colsum = gm.sum(0, dtype=torch.float32) if (need_bias or need_b) and bias is not None else None
        _param_grads(u, weight, dw, colsum, bias, dbias, b, partial[rows:], need_b)
    sums = _common.sum_partials(partial) if (need_a or need_b) else None
    return (dx.view(x.shape) if need_x else None), dw, dbias, sums


def _elementwise(g, y, masked, h, x2, dx, r, a, b, partial, programs: int, need_a: bool) -> None:
    """One launch of ``_leaky_linear_bwd_kernel`` (None: not asked for; unused pointers get x2)."""
    _leaky_linear_bwd_kernel[(programs,)](
        g, y if y is not None else x2, masked if masked is not None else x2, h if h is not None else x2, x2,
        dx if dx is not None else x2, r if r is not None else x2, a, b, partial, x2.numel(), BLOCK=BLOCK,
        MASK=masked is not None, NEED_X=dx is not None, NEED_R=r is not None, NEED_A=need_a, TAIL=TAIL,
        num_warps=NUM_WARPS)


def _param_grads(u, weight, dw, colsum, bias, dbias, b, partial, need_b: bool) -> None:
    """One launch of ``_linear_param_grads_kernel`` on ``partial``'s rows (None: not asked for)."""
    d = weight.shape[0]
    n = d * d if (dw is not None or need_b) else 0  # the pass over U and W, when dW or db needs it
    dummy = weight
    _linear_param_grads_kernel[(partial.shape[0],)](
        u if u is not None else dummy, weight, dw if dw is not None else dummy,
        colsum if colsum is not None else dummy, bias if bias is not None else dummy,
        dbias if dbias is not None else dummy, b, partial, n, d, BLOCK=BLOCK, HAS_BIAS=bias is not None,
        NEED_W=dw is not None, NEED_BIAS=dbias is not None, NEED_B=need_b, TAIL=TAIL, num_warps=NUM_WARPS)


def _empty_backward(x, weight, bias, need_x, need_w, need_bias, need_sums):
    """The gradients for an input without elements: zeros (nothing to launch a kernel over)."""
    return (x.new_empty(x.shape) if need_x else None, torch.zeros_like(weight) if need_w else None,
            torch.zeros_like(bias) if need_bias else None,
            x.new_zeros((2,), dtype=torch.float32) if need_sums else None)


class _LeakyLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, lt, relu: bool, stats: bool):
        y, s = _forward(x, weight, bias, a, b, lt, relu, stats)
        ctx.save_for_backward(x, weight, bias, a, b, y if relu else None)
        ctx.relu = relu
        ctx.mark_non_differentiable(s)
        ctx.set_materialize_grads(False)  # no zeros for the statistics' (non-)gradient
        return y, s

    @staticmethod
    def backward(ctx, g, _gs):
        if g is None:
            return (None,) * 8
        x, weight, bias, a, b, y = ctx.saved_tensors
        need = tuple(bool(v) for v in ctx.needs_input_grad[:5])
        dx, dw, dbias, sums = _backward(g, x, weight, bias, a, b, y, ctx.relu, need)
        grads = (dx, dw, dbias, *coefficient_grads(sums, a, b, need[3], need[4]))  # views: no copies
        grads = _common.guard_double_backward("leaky_linear", grads, (g, x, weight, bias, a, b))
        return (*grads, None, None, None)


# ------------------------------------------------------------------------- torch.compile: custom ops
@torch.library.custom_op("adaptive_depth::leaky_linear", mutates_args=())
def _leaky_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], a: Tensor, b: Tensor, lt: Tensor,
                     relu: bool, stats: bool) -> Tuple[Tensor, Tensor]:
    _check(x, weight, bias, a, b, lt, stats)
    return _forward(x, weight, bias, a, b, lt, relu, stats)


@_leaky_linear_op.register_fake
def _(x, weight, bias, a, b, lt, relu, stats):
    return x.new_empty(x.shape), x.new_empty((2 if stats else 0,), dtype=torch.float32)


@torch.library.custom_op("adaptive_depth::leaky_linear_backward", mutates_args=())
def _leaky_linear_backward_op(g: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], a: Tensor,
                              b: Tensor, y: Optional[Tensor], relu: bool,
                              need: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias, sums)``; ``sums = [da, db]`` in fp32 stays one tensor (outputs of a custom
    op must not alias each other), split in the traced graph by ``coefficient_grads``."""
    grads = _backward(g, x, weight, bias, a, b, y, relu, need)
    # a custom op returns tensors only: an empty one stands for a gradient nobody asked for
    return tuple(t if t is not None else x.new_empty((0,)) for t in grads)


@_leaky_linear_backward_op.register_fake
def _(g, x, weight, bias, a, b, y, relu, need):
    likes = (x, weight, bias)  # the real gradients are contiguous, in their input's dtype
    grads = [t.new_empty(t.shape) if wanted and t is not None else x.new_empty((0,))
             for t, wanted in zip(likes, need[:3])]
    sums = x.new_empty((2,), dtype=torch.float32) if (need[3] or need[4]) else x.new_empty((0,))
    return (*grads, sums)


def _op_setup(ctx, inputs, output):
    x, weight, bias, a, b, _lt, relu, _stats = inputs
    ctx.save_for_backward(x, weight, bias, a, b, output[0] if relu else None)
    ctx.relu = relu


def _op_backward(ctx, g, _gs):
    x, weight, bias, a, b, y = ctx.saved_tensors
    need = [bool(v) for v in ctx.needs_input_grad[:5]]
    dx, dw, dbias, sums = _leaky_linear_backward_op(g, x, weight, bias, a, b, y, ctx.relu, need)
    da, db = coefficient_grads(sums, a, b, need[3], need[4])
    return (*(t if wanted else None for t, wanted in zip((dx, dw, dbias), need)), da, db, None, None, None)


def _no_double_backward(ctx, *_):
    raise RuntimeError(_common.DOUBLE_BACKWARD.format(op="adaptive_depth::leaky_linear"))


_leaky_linear_op.register_autograd(_op_backward, setup_context=_op_setup)
_leaky_linear_backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def leaky_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], a: Tensor, b: Tensor, lt: Tensor, *,
                 relu: bool, stats: bool) -> Tuple[Tensor, Tensor]:
    """``(act(a x + b (relu(x) W^T + bias)), stats)`` as one fused GEMM, differentiable in x, weight,
    bias, a and b. ``weight``: (D, D), ``bias``: (D,) or None, both in x's dtype; ``a``, ``b``, ``lt``:
    one-element fp32/fp64 tensors on x's device. ``stats``: ``[||f - lt x||^2, ||x||^2]`` in fp32 with
    ``f = relu(x) W^T + bias`` (kept in fp32, never rounded), else an empty fp32 tensor. ``y`` is
    contiguous, in x's dtype.
    """
    if torch.compiler.is_compiling():  # an opaque op with a fake and an autograd registration
        return _leaky_linear_op(x, weight, bias, a, b, lt, relu, stats)
    _check(x, weight, bias, a, b, lt, stats)
    return _LeakyLinear.apply(x, weight, bias, a, b, lt, relu, stats)
