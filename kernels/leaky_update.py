"""The leaky residual update ``y = act(a x + b f)``: one memory pass forward, one backward.

Both kernels treat their tensors as flat buffers in one shared dense layout (contiguous, channels_last or
any other dense permutation: ``_common.flat_strides``); a tensor laid out otherwise is copied into that
layout once. They run on a persistent grid (``_common.persistent_programs``): every whole block of
``BLOCK`` elements is processed without masks, so that the loads and stores stay 128-bit vector accesses
whatever the element count, and only the one partial block at the end is masked. Reductions (the
statistics forward, ``<g, x>`` and ``<g, f>`` backward) accumulate in registers across a program's blocks,
one fp32 partial pair per program, added up by ``_common.sum_partials`` in one parallel step in a fixed
order: bit-identical across runs on a device. With ``index`` (``leaky_update``), ``a`` and ``b`` are a
group's coefficient vectors: the kernels read entry ``index`` in place and the second pass writes the
vectors' gradients whole, so a block's backward is two launches with nothing around them.

Below the launchers: the op's autograd (``_LeakyUpdateFunction``, eager) and its ``torch.library`` custom
ops ``adaptive_depth::leaky_update`` / ``adaptive_depth::leaky_update_backward`` (``torch.compile``), whose
fake implementations promise exactly the layouts the launchers return; ``leaky_update`` picks between them.
The kernels' gradients are not differentiable: a second backward raises (``_common.guard_double_backward``).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _common
from ._common import load_block, store_block

BLOCK = 2048  # elements of a whole block (one step of a program's loop)
TAIL = 256  # elements of one step over the partial block at the end (one per thread: few registers)
NUM_WARPS = 8


@triton.jit
def _fwd_block(X, F, Y, offs, N, a, b, lt, acc_v, acc_x, EVEN: tl.constexpr, RELU: tl.constexpr,
               STATS: tl.constexpr):
    """One block of the forward: unmasked when EVEN (vector loads and stores), else masked at N."""
    x = load_block(X, offs, N, EVEN)
    f = load_block(F, offs, N, EVEN)
    y = a * x + b * f
    if RELU:
        y = tl.where(y < 0.0, 0.0, y)  # keeps NaN, like torch.relu
    store_block(Y, offs, y, N, EVEN)
    if STATS:
        v = f - lt * x  # masked lanes: 0 - lt * 0
        acc_v += v * v
        acc_x += x * x
    return acc_v, acc_x


@triton.jit(do_not_specialize=["N"])  # N % 16 plays no part: the split does
def _leaky_fwd_kernel(X, F, Y, A, B, LT, PARTIAL, N,
                      BLOCK: tl.constexpr, RELU: tl.constexpr, STATS: tl.constexpr, TAIL: tl.constexpr):
    # a persistent grid: program pid takes the whole blocks pid, pid + P, ... unmasked, and the program
    # next in turn the one partial block at the end, masked, TAIL elements a step (a masked step of a
    # whole block would hold more registers than the unmasked body); the statistics accumulate in registers
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: more than 2^31 elements
    programs = tl.num_programs(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    a = tl.load(A).to(tl.float32)
    b = tl.load(B).to(tl.float32)
    lt = tl.load(LT).to(tl.float32) if STATS else 0.0
    acc_v = tl.zeros([BLOCK], dtype=tl.float32)
    acc_x = tl.zeros([BLOCK], dtype=tl.float32)
    full = N.to(tl.int64) // BLOCK
    for blk in range(pid, full, programs):
        acc_v, acc_x = _fwd_block(X, F, Y, blk * BLOCK + lanes, N, a, b, lt, acc_v, acc_x,
                                  True, RELU, STATS)
    tail_v = tl.zeros([TAIL], dtype=tl.float32)
    tail_x = tl.zeros([TAIL], dtype=tl.float32)
    if (pid == full % programs) & (full * BLOCK < N):  # TAIL elements a step: few registers
        for start in range(full * BLOCK, N, TAIL):
            tail_v, tail_x = _fwd_block(X, F, Y, start + tl.arange(0, TAIL), N, a, b, lt, tail_v, tail_x,
                                        False, RELU, STATS)
    if STATS:
        tl.store(PARTIAL + 2 * pid, tl.sum(acc_v, axis=0) + tl.sum(tail_v, axis=0))
        tl.store(PARTIAL + 2 * pid + 1, tl.sum(acc_x, axis=0) + tl.sum(tail_x, axis=0))


@triton.jit
def _bwd_block(G, X, F, DX, DF, offs, N, a, b, acc_a, acc_b, EVEN: tl.constexpr, RELU: tl.constexpr,
               NEED_X: tl.constexpr, NEED_F: tl.constexpr, NEED_A: tl.constexpr, NEED_B: tl.constexpr):
    """One block of the backward: unmasked when EVEN (vector loads and stores), else masked at N."""
    g = load_block(G, offs, N, EVEN)
    if RELU or NEED_A:
        x = load_block(X, offs, N, EVEN)
    if RELU or NEED_B:
        f = load_block(F, offs, N, EVEN)
    if RELU:  # the mask is recomputed from the inputs, not saved
        g = tl.where(a * x + b * f > 0.0, g, 0.0)
    if NEED_X:
        store_block(DX, offs, a * g, N, EVEN)
    if NEED_F:
        store_block(DF, offs, b * g, N, EVEN)
    if NEED_A:
        acc_a += g * x
    if NEED_B:
        acc_b += g * f
    return acc_a, acc_b


@triton.jit(do_not_specialize=["N"])  # N % 16 plays no part: the split does
def _leaky_bwd_kernel(G, X, F, DX, DF, A, B, PARTIAL, N, BLOCK: tl.constexpr, RELU: tl.constexpr,
                      NEED_X: tl.constexpr, NEED_F: tl.constexpr, NEED_A: tl.constexpr, NEED_B: tl.constexpr,
                      TAIL: tl.constexpr):
    # the forward's persistent grid: whole blocks unmasked, the partial one masked, sums in registers
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: more than 2^31 elements
    programs = tl.num_programs(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    a = tl.load(A).to(tl.float32) if (RELU or NEED_X) else 0.0
    b = tl.load(B).to(tl.float32) if (RELU or NEED_F) else 0.0
    acc_a = tl.zeros([BLOCK], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK], dtype=tl.float32)
    full = N.to(tl.int64) // BLOCK
    for blk in range(pid, full, programs):
        acc_a, acc_b = _bwd_block(G, X, F, DX, DF, blk * BLOCK + lanes, N, a, b, acc_a, acc_b,
                                  True, RELU, NEED_X, NEED_F, NEED_A, NEED_B)
    tail_a = tl.zeros([TAIL], dtype=tl.float32)
    tail_b = tl.zeros([TAIL], dtype=tl.float32)
    if (pid == full % programs) & (full * BLOCK < N):  # TAIL elements a step: few registers
        for start in range(full * BLOCK, N, TAIL):
            tail_a, tail_b = _bwd_block(G, X, F, DX, DF, start + tl.arange(0, TAIL), N, a, b, tail_a, tail_b,
                                        False, RELU, NEED_X, NEED_F, NEED_A, NEED_B)
    tl.store(PARTIAL + 2 * pid, tl.sum(acc_a, axis=0) + tl.sum(tail_a, axis=0))  # zeros when not asked for
    tl.store(PARTIAL + 2 * pid + 1, tl.sum(acc_b, axis=0) + tl.sum(tail_b, axis=0))


def _check(x: Tensor, f: Tensor, a: Tensor, b: Tensor) -> None:
    _common.check_tensor(x, "x")
    _common.check_tensor(f, "f", like=x)
    _common.check_same_shape(f, "f", x)
    _common.check_scalar(a, "a", x)
    _common.check_scalar(b, "b", x)


def _check_index(a: Tensor, b: Tensor, index) -> None:
    """``index`` selects one entry of the coefficient vectors ``a``, ``b`` (same length, on one device)."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, Tensor) or t.dim() != 1:
            raise ValueError(f"with an index, {name} must be a 1-D tensor of coefficients (one per step), got "
                             f"{type(t).__name__ if not isinstance(t, Tensor) else tuple(t.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same length, got {tuple(a.shape)} and {tuple(b.shape)}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < a.shape[0]:
        raise ValueError(f"index must be an integer in [0, {a.shape[0]}) (the step of a and b), got {index!r}")


def _select(a: Tensor, b: Tensor, index: Optional[int]) -> Tuple[Tensor, Tensor]:
    """The coefficients the kernels read: ``a``, ``b`` themselves, or views of their entry ``index`` (a
    pointer and an offset for the kernel: no launch)."""
    if index is None:
        return a, b
    _check_index(a, b, index)
    return a[index], b[index]


def _programs(n: int, device) -> int:
    """The persistent grid's size for ``n`` elements (``_common.persistent_programs``)."""
    return _common.persistent_programs(triton.cdiv(n, BLOCK), device)


def leaky_update_fwd(x: Tensor, f: Tensor, a: Tensor, b: Tensor, lt: Tensor, *, relu: bool,
                     stats: bool) -> Tuple[Tensor, Tensor]:
    """``y = act(a x + b f)`` in fp32 math, ``y`` in ``promote_types(x.dtype, f.dtype)`` with x's layout;
    with ``stats`` also ``[||f - lt x||^2, ||x||^2]`` (fp32, shape (2,)), else an empty fp32 tensor.

    ``a``, ``b``, ``lt``: one-element fp32/fp64 tensors on x's device, read inside the kernel.
    """
    _check(x, f, a, b)
    if stats:
        _common.check_scalar(lt, "lt", x)
    strides = _common.flat_strides(x)
    y = _common.empty(x.shape, strides, torch.promote_types(x.dtype, f.dtype), x.device)
    n = x.numel()
    if n == 0:
        return y, x.new_zeros((2 if stats else 0,), dtype=torch.float32)
    xs, fs = _common.in_layout(x, strides), _common.in_layout(f, strides)
    grid = (_programs(n, x.device),)
    partial = _common.partial_buffer(grid[0], x.device) if stats else y  # (y: an unused placeholder)
    _leaky_fwd_kernel[grid](xs, fs, y, a, b, lt if stats else a, partial, n,
                            BLOCK=BLOCK, RELU=relu, STATS=stats, TAIL=TAIL, num_warps=NUM_WARPS)
    s = _common.sum_partials(partial) if stats else x.new_empty((0,), dtype=torch.float32)
    return y, s


def leaky_update_bwd(g: Tensor, x: Tensor, f: Tensor, a: Tensor, b: Tensor, *, relu: bool,
                     need: Tuple[bool, bool, bool, bool], sums: bool = False,
                     index: Optional[int] = None) -> Tuple[Optional[Tensor], ...]:
    """Gradients ``(dx, df, da, db)`` of ``y = act(a x + b f)`` for the output gradient ``g``, each None
    unless asked for in ``need``. ``dx``, ``df`` have x's and f's dtype and layout; ``da = <g', x>`` and
    ``db = <g', f>`` (``g'`` = g with the ReLU mask, recomputed from x, f, a, b) are separate tensors in
    a's and b's shape and dtype, from deterministic fp32 partial sums.

    ``sums=True`` returns ``(dx, df, sums)`` instead, ``sums = [da, db]`` the second pass's one (2,) fp32
    tensor (None when neither is asked for): the op's autograd splits it into views (no copies).

    ``index``: a and b are vectors of coefficients (one per step) and the update used their entry
    ``index``; da and db then come out as whole vectors, zero but at ``index`` (``sums``: (2, L)), written
    so by the second pass itself (what autograd would otherwise scatter with two more launches)."""
    dx, df, total = _backward(g, x, f, a, b, relu=relu, need=need, index=index)
    if sums:
        return dx, df, total
    da = total[0].to(a.dtype, copy=True).reshape(a.shape) if need[2] else None
    db = total[1].to(b.dtype, copy=True).reshape(b.shape) if need[3] else None
    return dx, df, da, db


def coefficient_grads(sums: Optional[Tensor], a: Tensor, b: Tensor, need_a: bool, need_b: bool):
    """``(da, db)`` from the (2,) fp32 sums ``[da, db]``: views in a's and b's shapes (a cast only where a
    coefficient is not fp32), None where not asked for."""
    da = sums[0].view(a.shape).to(a.dtype) if need_a else None
    db = sums[1].view(b.shape).to(b.dtype) if need_b else None
    return da, db


def _backward(g: Tensor, x: Tensor, f: Tensor, a: Tensor, b: Tensor, *, relu: bool,
              need: Tuple[bool, bool, bool, bool],
              index: Optional[int] = None) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(dx, df, sums)``: the kernel and, when da or db is asked for, the second pass's fp32 sums
    ``[<g', x>, <g', f>]`` (else None): shape (2,), or (2, L) with ``index`` (``leaky_update_bwd``). Two
    launches, nothing else on the device."""
    length = None if index is None else a.shape[0]
    a, b = _select(a, b, index)
    _check(x, f, a, b)
    _common.check_tensor(g, "g", like=x)
    _common.check_same_shape(g, "g", x)
    need_x, need_f, need_a, need_b = (bool(v) for v in need)
    strides, f_strides = _common.flat_strides(x), _common.flat_strides(f)
    n = x.numel()
    dx = _common.empty(x.shape, strides, x.dtype, x.device) if need_x else None
    # df is written in x's layout; when f's differs, it is copied into f's once at the end
    df = _common.empty(f.shape, strides, f.dtype, f.device) if need_f else None
    sums = None
    if n > 0 and any(need):
        gs, xs, fs = (_common.in_layout(t, strides) for t in (g, x, f))
        grid = (_programs(n, x.device),)
        partial = _common.partial_buffer(grid[0], x.device)
        _leaky_bwd_kernel[grid](gs, xs, fs, dx if need_x else gs, df if need_f else gs, a, b, partial, n,
                                BLOCK=BLOCK, RELU=relu, NEED_X=need_x, NEED_F=need_f, NEED_A=need_a,
                                NEED_B=need_b, TAIL=TAIL, num_warps=NUM_WARPS)
        if (need_a or need_b) and index is None:
            sums = _common.sum_partials(partial)
        elif need_a or need_b:
            sums = _common.sum_partials_at(partial, index, length)
    if sums is None and (need_a or need_b):  # nothing to add up (no elements)
        sums = x.new_zeros((2,) if index is None else (2, length), dtype=torch.float32)
    if need_f:
        df = _common.in_layout(df, f_strides)
    return dx, df, sums


# ------------------------------------------------------------------- autograd and torch.library registration
class _LeakyUpdateFunction(torch.autograd.Function):
    """The eager path: the kernels with autograd, cheapest to dispatch. The backward recomputes the ReLU
    mask from x and f instead of saving y."""

    @staticmethod
    def forward(ctx, x, f, a, b, lt, relu: bool, stats: bool, index: Optional[int]):
        y, s = leaky_update_fwd(x, f, *_select(a, b, index), lt, relu=relu, stats=stats)
        ctx.save_for_backward(x, f, a, b)
        ctx.relu, ctx.index = relu, index
        ctx.mark_non_differentiable(s)
        ctx.set_materialize_grads(False)  # no zeros for the statistics' (non-)gradient
        return y, s

    @staticmethod
    def backward(ctx, g, _gs):
        if g is None:
            return (None,) * 8
        x, f, a, b = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:4])
        dx, df, sums = leaky_update_bwd(g, x, f, a, b, relu=ctx.relu, need=need, sums=True, index=ctx.index)
        grads = (dx, df, *coefficient_grads(sums, a, b, need[2], need[3]))  # no copies: autograd takes views
        grads = _common.guard_double_backward("leaky_update", grads, (g, x, f, a, b))
        return (*grads, None, None, None, None)


@torch.library.custom_op("adaptive_depth::leaky_update", mutates_args=())
def _leaky_update_op(x: Tensor, f: Tensor, a: Tensor, b: Tensor, lt: Tensor, relu: bool,
                     stats: bool) -> Tuple[Tensor, Tensor]:
    return leaky_update_fwd(x, f, a, b, lt, relu=relu, stats=stats)


@_leaky_update_op.register_fake
def _(x, f, a, b, lt, relu, stats):
    y = torch.empty_strided(x.shape, _common.flat_strides(x), dtype=torch.promote_types(x.dtype, f.dtype),
                            device=x.device)
    return y, x.new_empty((2 if stats else 0,), dtype=torch.float32)


@torch.library.custom_op("adaptive_depth::leaky_update_backward", mutates_args=())
def _leaky_update_backward_op(g: Tensor, x: Tensor, f: Tensor, a: Tensor, b: Tensor, relu: bool,
                              need: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dx, df, sums)``; ``sums = [da, db]`` in fp32 stays one tensor (outputs of a custom op must not
    alias each other), split in the traced graph by ``coefficient_grads``."""
    dx, df, sums = leaky_update_bwd(g, x, f, a, b, relu=relu, need=tuple(need), sums=True)
    # a custom op returns tensors only: an empty one stands for a gradient nobody asked for
    return tuple(t if t is not None else x.new_empty((0,)) for t in (dx, df, sums))


@_leaky_update_backward_op.register_fake
def _(g, x, f, a, b, relu, need):
    # what _backward returns: dx in x's dense layout, df in f's, the (2,) fp32 sums when da or db is asked for
    def like(t):
        return torch.empty_strided(t.shape, _common.flat_strides(t), dtype=t.dtype, device=t.device)
    sums = x.new_empty((2,), dtype=torch.float32) if (need[2] or need[3]) else x.new_empty((0,))
    return (like(x) if need[0] else x.new_empty((0,)), like(f) if need[1] else x.new_empty((0,)), sums)


def _op_setup(ctx, inputs, output):
    x, f, a, b, _lt, relu, _stats = inputs
    ctx.save_for_backward(x, f, a, b)
    ctx.relu = relu


def _op_backward(ctx, g, _gs):
    x, f, a, b = ctx.saved_tensors
    need = [bool(v) for v in ctx.needs_input_grad[:4]]
    dx, df, sums = _leaky_update_backward_op(g, x, f, a, b, ctx.relu, need)
    da, db = coefficient_grads(sums, a, b, need[2], need[3])
    return (dx if need[0] else None, df if need[1] else None, da, db, None, None, None)


def _no_double_backward(ctx, *_):
    raise RuntimeError(_common.DOUBLE_BACKWARD.format(op="adaptive_depth::leaky_update"))


_leaky_update_op.register_autograd(_op_backward, setup_context=_op_setup)
_leaky_update_backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def leaky_update(x: Tensor, f: Tensor, a: Tensor, b: Tensor, lt: Tensor, *, relu: bool,
                 stats: bool, index: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """``(act(a x + b f), stats)`` on the kernels, differentiable in x, f, a and b (once: a second
    backward raises). Arguments and outputs as in ``leaky_update_fwd``; with ``index``, ``a`` and ``b`` are
    a stack's coefficient vectors and the update uses their entry ``index`` (read in place by the kernel;
    the backward writes the vectors' gradients whole: no select and scatter around the op). Eager calls
    run an ``autograd.Function``; under ``torch.compile`` the custom op ``adaptive_depth::leaky_update``
    (after a traced select, which Inductor fuses), with a fake (meta) implementation that promises
    exactly the real op's layouts."""
    if torch.compiler.is_compiling():
        a, b = _select(a, b, index)
        return _leaky_update_op(x, f, a, b, lt, relu, stats)
    if index is not None:
        _check_index(a, b, index)
    return _LeakyUpdateFunction.apply(x, f, a, b, lt, relu, stats, index)
