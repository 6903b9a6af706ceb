"""The leaky linear layer ``y = act(a x + b (relu(x) W^T + bias))`` (the paper's MLP block) as one GEMM.

Forward: a Triton GEMM whose prologue applies the ReLU to the loaded tiles of x and whose epilogue adds
the bias, reads the matching tile of x for the residual and applies the leaky combine (and the optional
output ReLU and statistics); ``relu(x) W^T + bias`` never touches memory. Backward: cuBLAS matmuls plus
one fused elementwise kernel. Differentiable in x, weight, bias, a and b, through a
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
from .leaky_update import BLOCK, NUM_WARPS, TAIL, leaky_update_fwd

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
def _linear_bwd_block(G, H, X, DX, R, offs, N, a, b, acc, EVEN: tl.constexpr, NEED_X: tl.constexpr,
                      NEED_R: tl.constexpr, NEED_A: tl.constexpr):
    """One block of the backward's elementwise part: unmasked when EVEN (vector accesses), else masked."""
    if EVEN:
        x = tl.load(X + offs).to(tl.float32)
    else:
        x = tl.load(X + offs, mask=offs < N, other=0.0).to(tl.float32)
    if NEED_X or NEED_A:
        if EVEN:
            g = tl.load(G + offs).to(tl.float32)
        else:
            g = tl.load(G + offs, mask=offs < N, other=0.0).to(tl.float32)
    if NEED_X:
        if EVEN:
            h = tl.load(H + offs).to(tl.float32)
        else:
            h = tl.load(H + offs, mask=offs < N, other=0.0).to(tl.float32)
        dx = (a * g + b * tl.where(x > 0.0, h, 0.0)).to(DX.dtype.element_ty)
        if EVEN:
            tl.store(DX + offs, dx)
        else:
            tl.store(DX + offs, dx, mask=offs < N)
    if NEED_R:
        r = tl.where(x < 0.0, 0.0, x).to(R.dtype.element_ty)
        if EVEN:
            tl.store(R + offs, r)
        else:
            tl.store(R + offs, r, mask=offs < N)
    if NEED_A:
        acc += g * x
    return acc


@triton.jit(do_not_specialize=["N"])  # N % 16 plays no part: the split does
def _leaky_linear_bwd_kernel(G, H, X, DX, R, A, B, PARTIAL, N, BLOCK: tl.constexpr,
                             NEED_X: tl.constexpr, NEED_R: tl.constexpr, NEED_A: tl.constexpr, TAIL: tl.constexpr):
    """dx = a G + b H [x > 0] (H = G W), R = relu(x), and the partial sums of <G, x>, on the update
    kernels' persistent grid (whole blocks unmasked, the partial one masked, the sum in registers)."""
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: more than 2^31 elements
    programs = tl.num_programs(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    a = tl.load(A).to(tl.float32) if NEED_X else 0.0
    b = tl.load(B).to(tl.float32) if NEED_X else 0.0
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    full = N.to(tl.int64) // BLOCK
    for blk in range(pid, full, programs):
        acc = _linear_bwd_block(G, H, X, DX, R, blk * BLOCK + lanes, N, a, b, acc,
                                True, NEED_X, NEED_R, NEED_A)
    tail = tl.zeros([TAIL], dtype=tl.float32)
    if (pid == full % programs) & (full * BLOCK < N):  # TAIL elements a step: few registers
        for start in range(full * BLOCK, N, TAIL):
            tail = _linear_bwd_block(G, H, X, DX, R, start + tl.arange(0, TAIL), N, a, b, tail,
                                     False, NEED_X, NEED_R, NEED_A)
    tl.store(PARTIAL + 2 * pid, tl.sum(acc, axis=0) + tl.sum(tail, axis=0))  # zero when not asked for
    tl.store(PARTIAL + 2 * pid + 1, 0.0)


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
    """``(dx, dweight, dbias, da, db)``, each None unless asked for in ``need``."""
    need_x, need_w, need_bias, need_a, need_b = need
    need_bias = need_bias and bias is not None
    d = x.shape[-1]
    m = math.prod(x.shape[:-1])
    x2 = x.reshape(m, d).contiguous()
    gm = g.reshape(m, d).to(x.dtype).contiguous()
    if relu:
        gm = torch.where(y.reshape(m, d) > 0, gm, torch.zeros((), dtype=gm.dtype, device=gm.device))
    h = gm @ weight if need_x else None
    need_r = need_w or need_b
    dx = _common.empty(x2.shape, (d, 1), x.dtype, x.device) if need_x else None
    r = _common.empty(x2.shape, (d, 1), x.dtype, x.device) if need_r else None
    n = x2.numel()
    sums = x.new_zeros((2,), dtype=torch.float32)
    if n > 0 and (need_x or need_r or need_a):
        programs = _common.persistent_programs(triton.cdiv(n, BLOCK), x.device)
        partial = _common.partial_buffer(programs, x.device)
        _leaky_linear_bwd_kernel[(programs,)](gm, h if need_x else gm, x2, dx if need_x else x2,
                                              r if need_r else x2, a, b, partial, n, BLOCK=BLOCK,
                                              NEED_X=need_x, NEED_R=need_r, NEED_A=need_a, TAIL=TAIL,
                                              num_warps=NUM_WARPS)
        sums = _common.sum_partials(partial)
    u = gm.t() @ r if need_r else None  # G^T relu(x): dW / b
    colsum = gm.sum(0, dtype=torch.float32) if (need_bias or need_b) and bias is not None else None
    db = None
    if need_b:  # <G, f> without f: <G^T relu(x), W> + <sum_rows G, bias>
        db = _dot(u, weight) + (_dot(colsum, bias) if bias is not None else 0.0)
        db = db.to(b.dtype).reshape(b.shape)
    return (dx.view(x.shape) if need_x else None,
            (u * b).to(weight.dtype) if need_w else None,
            (colsum * b).to(bias.dtype) if need_bias else None,
            sums[0].to(a.dtype, copy=True).reshape(a.shape) if need_a else None,
            db)


def _dot(u: Tensor, v: Tensor) -> Tensor:
    """``<u, v>`` of two same-shaped tensors as a 0-dim fp32 tensor (one BLAS dot in fp32)."""
    return torch.dot(u.reshape(-1).float(), v.reshape(-1).float())


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
        grads = _backward(g, x, weight, bias, a, b, y, ctx.relu, ctx.needs_input_grad[:5])
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
                              need: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _backward(g, x, weight, bias, a, b, y, relu, need)
    # a custom op returns tensors only: an empty one stands for a gradient nobody asked for
    return tuple(t if t is not None else x.new_empty((0,)) for t in grads)


@_leaky_linear_backward_op.register_fake
def _(g, x, weight, bias, a, b, y, relu, need):
    likes = (x, weight, bias, a, b)  # the real gradients are contiguous, in their input's dtype
    return tuple(t.new_empty(t.shape) if wanted and t is not None else x.new_empty((0,))
                 for t, wanted in zip(likes, need))


def _op_setup(ctx, inputs, output):
    x, weight, bias, a, b, _lt, relu, _stats = inputs
    ctx.save_for_backward(x, weight, bias, a, b, output[0] if relu else None)
    ctx.relu = relu


def _op_backward(ctx, g, _gs):
    x, weight, bias, a, b, y = ctx.saved_tensors
    need = [bool(v) for v in ctx.needs_input_grad[:5]]
    grads = _leaky_linear_backward_op(g, x, weight, bias, a, b, y, ctx.relu, need)
    return (*(t if wanted else None for t, wanted in zip(grads, need)), None, None, None)


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
