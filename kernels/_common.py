"""Shared pieces of the kernels: argument checks, the memory layout the flat kernels work in, output
allocation, the persistent grid of the flat kernels and the deterministic second pass of every reduction."""
from __future__ import annotations

import functools
import os
from typing import Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
COEF_DTYPES = (torch.float32, torch.float64)
SUM_BLOCK = 4096  # the most rows of partial sums one step of the second pass reads
PROGRAMS_PER_SM = 8  # the flat kernels' persistent grid on CUDA: this many programs per SM at most
INTERPRETER_PROGRAMS = 3  # ... and under the interpreter (small, so that the tests exercise the loop)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _fix_interpreter_index() -> None:
    """Triton 3.6's interpreter turns a scalar (a one-element array there) into a Python int with
    ``int(array)``, which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted"): every loop
    over a runtime bound (``range(pid, full, programs)``) then fails under ``TRITON_INTERPRET=1``. Triton
    3.8 squeezes the array first; do the same on older versions (3.6 tested). Interpreter only: compiled
    kernels never run this code, and where the interpreter already squeezes the result is the same."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "adaptive_depth_index_fix", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor.adaptive_depth_index_fix = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if interpreting():
    _fix_interpreter_index()


# ------------------------------------------------------------------------------------------- checks
def check_tensor(t, name: str, like: Tensor = None) -> None:
    """``t`` is a tensor of a supported dtype, on a device the kernels can run on (and on ``like``'s)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16 for the Triton kernels, got {t.dtype} "
                        f"(use backend='torch' for other dtypes)")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but x is on {like.device}")
    if like is None and not t.is_cuda and not interpreting():
        raise ValueError(f"{name} is on {t.device}: the Triton kernels need CUDA tensors, or "
                         f"TRITON_INTERPRET=1 (set before triton is imported) for CPU tensors")


def check_same_shape(t: Tensor, name: str, x: Tensor) -> None:
    if t.shape != x.shape:
        raise ValueError(f"{name} must have the shape of x, got {name} {tuple(t.shape)} and x {tuple(x.shape)}")


def check_scalar(t, name: str, x: Tensor) -> None:
    """A coefficient: a one-element fp32/fp64 tensor on x's device, read by the kernel (no host sync)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a one-element tensor on x's device, got {type(t).__name__}")
    if t.numel() != 1:
        raise ValueError(f"{name} must have one element, got shape {tuple(t.shape)}")
    if t.dtype not in COEF_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}: keep the coefficients on x's "
                         f"device (the kernels read them there, without a host sync)")


# ------------------------------------------------------------------------------------------- layout
def is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the elements fill ``numel`` consecutive slots in some dimension order."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_strides(strides: Sequence[int], t: Tensor) -> bool:
    return all(s == u or n == 1 for s, u, n in zip(strides, t.stride(), t.shape))


def flat_strides(t: Tensor) -> Tuple[int, ...]:
    """Strides of the dense layout the flat kernels use for ``t`` and its partners: ``t``'s own when dense
    (contiguous, channels_last, ...), else what ``empty_like`` gives (found on the meta device, free)."""
    return t.stride() if is_dense(t) else torch.empty_like(t, device="meta").stride()


def in_layout(t: Tensor, strides: Sequence[int]) -> Tensor:
    """``t`` itself when it already has ``strides``, else one copy of it in that layout (the fallback for
    pairs of tensors laid out differently)."""
    if same_strides(strides, t):
        return t
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device).copy_(t)


def empty(shape, strides, dtype: torch.dtype, device) -> Tensor:
    """Every buffer a kernel writes comes from here (the tests patch it to hand out NaN-filled ones)."""
    return torch.empty_strided(tuple(shape), tuple(strides), dtype=dtype, device=device)


# ------------------------------------------------------------------------------ persistent grid
@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(blocks: int, device) -> int:
    """Programs of a flat kernel's persistent grid for ``blocks`` blocks of work: each program walks the
    blocks ``pid, pid + P, ...`` accumulating its reductions in registers and writes one partial per
    reduction. ``P`` is at most ``PROGRAMS_PER_SM`` per SM of the device (a property of the device, so
    reruns on it are bit-identical), which keeps the partials few enough for one step of the second pass."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        cap = _sm_count(index) * PROGRAMS_PER_SM
    else:
        cap = INTERPRETER_PROGRAMS
    return max(1, min(blocks, cap))


# ---------------------------------------------------------------------------------- reductions
@triton.jit
def load_block(PTR, offs, N, EVEN: tl.constexpr):
    """One block of ``PTR`` in fp32: unmasked when EVEN (128-bit vector loads), else masked at N (zeros)."""
    if EVEN:
        v = tl.load(PTR + offs)
    else:
        v = tl.load(PTR + offs, mask=offs < N, other=0.0)
    return v.to(tl.float32)


@triton.jit
def store_block(PTR, offs, value, N, EVEN: tl.constexpr):
    """Store one block of ``value`` into ``PTR`` in its dtype: unmasked when EVEN, else masked at N."""
    if EVEN:
        tl.store(PTR + offs, value.to(PTR.dtype.element_ty))
    else:
        tl.store(PTR + offs, value.to(PTR.dtype.element_ty), mask=offs < N)


@triton.jit
def _sum_partials_kernel(PARTIAL, OUT, P, L, INDEX, BLOCK: tl.constexpr):
    """Column sums of a (P, 2) fp32 buffer of per-program partial sums, in one fixed order: BLOCK rows
    at a time, each step a tree reduction over BLOCK lanes (one step for the persistent grids' partials).
    OUT is (2, L): column c's sum goes to ``OUT[c, INDEX]`` and every other slot gets 0 (L = 1, INDEX = 0:
    the two sums), so a gradient for one entry of a coefficient vector comes out as the whole vector."""
    rows = tl.arange(0, BLOCK)
    cols = tl.arange(0, 2)
    acc = tl.zeros([BLOCK, 2], dtype=tl.float32)
    for start in range(0, P, BLOCK):
        r = (start + rows).to(tl.int64)
        acc += tl.load(PARTIAL + r[:, None] * 2 + cols[None, :], mask=r[:, None] < P, other=0.0)
    total = tl.sum(acc, axis=0)
    for start in range(0, L, BLOCK):
        slot = (start + rows).to(tl.int64)
        value = tl.where(slot[:, None] == INDEX, total[None, :], 0.0)
        tl.store(OUT + cols[None, :] * L + slot[:, None], value, mask=slot[:, None] < L)


def partial_buffer(programs: int, device) -> Tensor:
    return empty((programs, 2), (2, 1), torch.float32, device)


def sum_partials(partial: Tensor) -> Tensor:
    """``partial.sum(0)`` for a (P, 2) fp32 buffer in a fixed order: no atomics, so the same partials
    always give bit-identical sums. The flat kernels leave at most a few thousand rows (one per program of
    their persistent grid), read in one parallel step; only larger buffers (a GEMM's per-tile partials)
    take more than one step."""
    return _launch_sum(partial, empty((2,), (1,), torch.float32, partial.device), 0, 1)


def sum_partials_at(partial: Tensor, index: int, length: int) -> Tensor:
    """``sum_partials`` written into slot ``index`` of two length-``length`` vectors, zeros elsewhere: a
    (2, length) fp32 tensor, in the same one launch (no zeros, no scatter)."""
    return _launch_sum(partial, empty((2, length), (length, 1), torch.float32, partial.device), index, length)


def _launch_sum(partial: Tensor, out: Tensor, index: int, length: int) -> Tensor:
    rows = partial.shape[0]
    block = min(SUM_BLOCK, max(16, triton.next_power_of_2(rows)))
    _sum_partials_kernel[(1,)](partial, out, rows, length, index, BLOCK=block,
                               num_warps=4 if block <= 1024 else 8)
    return out


# ------------------------------------------------------------------------- autograd: double backward
DOUBLE_BACKWARD = ("double backward (a gradient of a gradient, e.g. a gradient penalty or create_graph=True "
                   "followed by a second backward) through {op} is not supported by the Triton kernels: run "
                   "that part with backend='torch' (or ADAPTIVE_DEPTH_BACKEND=torch), whose backward is "
                   "differentiable")


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on a kernel-made gradient that ties it to the tensors it came from; differentiating
    through it raises (a kernel's gradient is not differentiable, and a constant would be wrong)."""

    @staticmethod
    def forward(ctx, message: str, grad: Tensor, *sources: Tensor) -> Tensor:
        ctx.message = message
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(ctx.message)


def guard_double_backward(op: str, grads, sources):
    """``grads`` unchanged, except under ``create_graph=True`` (grad mode on inside a backward) with a
    source that requires grad: then each gradient carries a node that raises a clear error if a second
    backward reaches it, instead of the silently wrong constant it would otherwise be."""
    sources = [t for t in sources if isinstance(t, Tensor)]
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in sources):
        return tuple(grads)
    message = DOUBLE_BACKWARD.format(op=op)
    return tuple(t if t is None or t.numel() == 0 else _NoDoubleBackward.apply(message, t, *sources)
                 for t in grads)
