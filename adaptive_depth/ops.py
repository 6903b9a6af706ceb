"""The leaky residual update, written once.

    y = act(a * x + b * f)          (a, b) = step_coefficients(rho, Lt, scheme)

``euler`` (the paper):       a = 1 - rho Lt,     b = rho                       (needs rho Lt < 1)
``exponential`` (leak exact): a = exp(-rho Lt),  b = (1 - exp(-rho Lt)) / Lt   (-> rho at Lt = 0)

The scheme lives only in ``step_coefficients`` (plain differentiable torch on scalars or an L-vector); the
memory-bound part is one op on ``(x, f, a, b)`` whose backward is written out: it saves x and f (the ReLU
mask is recomputed) and returns ``da = <g, x>``, ``db = <g, f>``; autograd chains those into ``d rho``.

Paths: eager calls a ``torch.autograd.Function`` (cheapest dispatch on CPU); under ``torch.compile`` the
same maths goes through a ``torch.library`` custom op with a fake and an autograd registration, so the
graph has no break. On CUDA tensors the op calls the Triton kernels in ``kernels/`` when they import;
``ADAPTIVE_DEPTH_BACKEND=torch|triton|auto`` (or ``backend=``) forces a path.
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys
from numbers import Real
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

SCHEMES = ("euler", "exponential")
ACTIVATIONS = (None, "relu")
BACKENDS = ("auto", "torch", "triton")
_LOW_PRECISION = (torch.float16, torch.bfloat16)

Number = Union[float, int]


# --------------------------------------------------------------------------------------------- checks
def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    return scheme


def check_activation(activation: Optional[str]) -> Optional[str]:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


def check_backend(backend: Optional[str]) -> str:
    backend = backend or os.environ.get("ADAPTIVE_DEPTH_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"backend (or ADAPTIVE_DEPTH_BACKEND) must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_effective_depth(value: Number, name: str = "effective_depth") -> float:
    value = _as_float(value, name)
    if not value >= 0.0:
        raise ValueError(f"{name} must be >= 0 (0 is a plain ResNet), got {value}")
    return value


def check_step(value: Number, effective_depth: float, scheme: str, name: str = "rho") -> float:
    """Validate one step size: finite, > 0 and, under the euler scheme, ``rho * Lt < 1``."""
    value = _as_float(value, name)
    if not value > 0.0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if scheme == "euler" and value * effective_depth >= 1.0:
        raise ValueError(
            f"{name} * effective_depth must be < 1 under scheme='euler' (got {name}={value:g}, "
            f"effective_depth={effective_depth:g}, product {value * effective_depth:g}); use smaller steps, "
            f"a smaller effective_depth, or scheme='exponential', which is stable for any step")
    return value


def _as_float(value, name: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


# --------------------------------------------------------------------------------------- coefficients
def step_coefficients(rho: Tensor, effective_depth: Union[Tensor, Number],
                      scheme: str = "euler") -> Tuple[Tensor, Tensor]:
    """Per-step coefficients ``(a, b)`` of ``y = a x + b f``; elementwise in ``rho`` (a scalar or a vector).

    Differentiable in ``rho`` by plain autograd. ``effective_depth`` is a hyper-parameter (no gradient).
    """
    lt = torch.as_tensor(effective_depth, dtype=rho.dtype, device=rho.device)
    if scheme == "euler":
        return 1.0 - rho * lt, rho
    if scheme == "exponential":
        z = rho * lt
        a = torch.exp(-z)
        positive = lt > 0
        safe_lt = torch.where(positive, lt, torch.ones_like(lt))
        b = torch.where(positive, -torch.expm1(-z) / safe_lt, rho)
        return a, b
    raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


# ------------------------------------------------------------------------------- the reference maths
def _out_dtype(x: Tensor, f: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, f.dtype)


def _flat_pair(u: Tensor, v: Tensor):
    """1-D views of two tensors laid out identically in dense memory (contiguous or channels_last)."""
    if u.is_contiguous() and v.is_contiguous():
        return u.reshape(-1), v.reshape(-1)
    if u.dim() == 4 and u.is_contiguous(memory_format=torch.channels_last) and \
            v.is_contiguous(memory_format=torch.channels_last):
        return u.permute(0, 2, 3, 1).reshape(-1), v.permute(0, 2, 3, 1).reshape(-1)
    return None


def _dot(u: Tensor, v: Tensor) -> Tensor:
    """<u, v> in fp32 (or fp64), one pass and no temporary where the layout allows."""
    acc = torch.float64 if torch.float64 in (u.dtype, v.dtype) else torch.float32
    if u.dtype == acc and v.dtype == acc:
        flat = _flat_pair(u, v)
        if flat is not None:
            return torch.dot(*flat)
    return (u.to(acc) * v.to(acc)).sum()


def reference_forward(x: Tensor, f: Tensor, a: Tensor, b: Tensor, effective_depth: Tensor,
                      relu: bool, stats: bool) -> Tuple[Tensor, Tensor]:
    """``y = act(a x + b f)`` in fp32 math (fp64 for fp64 inputs), and optionally the squared norms
    ``(||f - Lt x||^2, ||x||^2)`` in fp32. The CPU path, and the kernels' contract."""
    out = _out_dtype(x, f)
    low = out in _LOW_PRECISION
    xc, fc = (x.float(), f.float()) if low else (x.to(out), f.to(out))
    y = torch.mul(xc, a.to(xc.dtype))
    y.addcmul_(fc, b.to(xc.dtype))
    if relu:
        y.relu_()
    if low:
        y = y.to(out)
    if stats:
        lt = effective_depth.to(xc.dtype)
        velocity = torch.addcmul(fc, xc, -lt)
        acc = torch.float64 if xc.dtype == torch.float64 else torch.float32
        s = torch.stack([torch.linalg.vector_norm(velocity, dtype=acc),
                         torch.linalg.vector_norm(xc, dtype=acc)]).square().float()
    else:
        s = x.new_empty((0,), dtype=torch.float32)
    return y, s


def reference_backward(g: Tensor, x: Tensor, f: Tensor, a: Tensor, b: Tensor, relu: bool,
                       need: Tuple[bool, bool, bool, bool]) -> Tuple[Optional[Tensor], ...]:
    """Gradients of ``y = act(a x + b f)``: ``(dx, df, da, db)``, each ``None`` unless needed."""
    out = _out_dtype(x, f)
    math_dtype = torch.float32 if out in _LOW_PRECISION else out
    # each operand is brought to the math dtype once (a no-op in fp32/fp64) and reused
    need_x, need_f, need_a, need_b = need
    xm = x.to(math_dtype) if (relu or need_a) else None
    fm = f.to(math_dtype) if (relu or need_b) else None
    gm = g.to(math_dtype)
    am, bm = a.to(math_dtype), b.to(math_dtype)
    if relu:  # recompute the mask instead of saving y
        pre = torch.mul(xm, am).addcmul_(fm, bm)
        gm = torch.where(pre > 0, gm, torch.zeros((), dtype=math_dtype, device=g.device))
    dx = (gm * am).to(x.dtype) if need_x else None
    df = (gm * bm).to(f.dtype) if need_f else None
    da = _dot(gm, xm).to(a.dtype) if need_a else None
    db = _dot(gm, fm).to(b.dtype) if need_b else None
    return dx, df, da, db


# ------------------------------------------------------------------------------------ backend choice
_KERNELS = None  # the kernels module, or the ImportError that says why Triton cannot be used here
KERNELS_PACKAGE = "adaptive_depth_kernels"  # the repository's kernels/ folder, installed under this name


def _import_kernels():
    """Import the kernels. Only a missing or unusable Triton selects the PyTorch path (returned as the
    exception); any other failure is a bug and propagates."""
    try:
        import triton  # noqa: F401
    except Exception as err:  # not installed, or installed without a usable build
        return err if isinstance(err, ImportError) else ImportError(f"triton does not import: {err!r}")
    try:
        import adaptive_depth_kernels  # a plain import statement: torch.compile may trace the first call
        return adaptive_depth_kernels
    except ModuleNotFoundError as err:
        if err.name != KERNELS_PACKAGE:
            raise
    # a source checkout used without installing it (PYTHONPATH=<repo>): the kernels/ folder beside the package
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(folder, "__init__.py")
    if not os.path.exists(init):
        return ImportError(f"{KERNELS_PACKAGE} is not installed and {folder} does not exist")
    spec = importlib.util.spec_from_file_location(KERNELS_PACKAGE, init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[KERNELS_PACKAGE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[KERNELS_PACKAGE]
        raise
    return module


def _kernels():
    """The Triton kernels module, or None where Triton is missing or unusable."""
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _import_kernels()
    return None if isinstance(_KERNELS, ImportError) else _KERNELS


def triton_available() -> bool:
    """True when the Triton kernels import (on a GPU, or on the CPU under ``TRITON_INTERPRET=1``)."""
    return _kernels() is not None


def _use_triton(x: Tensor, backend: str) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"backend='triton' was forced but the Triton kernels cannot be used here: "
                               f"{_KERNELS}") from _KERNELS
        return True
    # auto: only dtypes the kernels take (they raise TypeError for the rest, e.g. float64)
    return x.is_cuda and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and triton_available()


def _forward_impl(x, f, a, b, lt, relu, stats, backend):
    if _use_triton(x, backend):
        return _kernels().leaky_update_fwd(x, f, a, b, lt, relu=relu, stats=stats)
    return reference_forward(x, f, a, b, lt, relu, stats)


def _backward_impl(g, x, f, a, b, relu, need, backend):
    if _use_triton(x, backend):
        return _kernels().leaky_update_bwd(g, x, f, a, b, relu=relu, need=need)
    return reference_backward(g, x, f, a, b, relu, need)


# ------------------------------------------------------------------------------------ eager autograd
def _fixed_step_backward(g: Tensor, y: Optional[Tensor], a: Tensor, b: Tensor, need, dtypes):
    """``(dx, df)`` of ``y = act(a x + b f)`` when a and b need no gradient: the ReLU mask is read from the
    output (``y > 0`` iff ``a x + b f > 0``), so neither x nor f has to be kept."""
    out = torch.promote_types(*dtypes)
    math_dtype = torch.float32 if out in _LOW_PRECISION else out
    if y is not None:
        g = torch.ops.aten.threshold_backward(g, y, 0)
    gm = g.to(math_dtype)
    dx = (gm * a.to(math_dtype)).to(dtypes[0]) if need[0] else None
    df = (gm * b.to(math_dtype)).to(dtypes[1]) if need[1] else None
    return dx, df


class _LeakyUpdate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, f, a, b, lt, relu: bool, stats: bool, backend: str):
        y, s = _forward_impl(x, f, a, b, lt, relu, stats, backend)
        ctx.relu, ctx.backend, ctx.dtypes = relu, backend, (x.dtype, f.dtype)
        # fixed steps on the torch path: keep only y (for the ReLU mask) or nothing; x and f are needed
        # only for the coefficient gradients and by the Triton backward, which recomputes the mask
        ctx.from_output = not (ctx.needs_input_grad[2] or ctx.needs_input_grad[3] or _use_triton(x, backend))
        if ctx.from_output:
            ctx.save_for_backward(a, b, y if relu else None)
        else:
            ctx.save_for_backward(x, f, a, b)
        ctx.mark_non_differentiable(s)
        return y, s

    @staticmethod
    def backward(ctx, g, _gs):
        if ctx.from_output:
            a, b, y = ctx.saved_tensors
            dx, df = _fixed_step_backward(g, y, a, b, tuple(ctx.needs_input_grad[:2]), ctx.dtypes)
            return dx, df, None, None, None, None, None, None
        x, f, a, b = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:4])
        dx, df, da, db = _backward_impl(g.contiguous() if not _same_layout(g, x) else g,
                                        x, f, a, b, ctx.relu, need, ctx.backend)
        return dx, df, da, db, None, None, None, None


def _same_layout(u: Tensor, v: Tensor) -> bool:
    return u.stride() == v.stride()


# ----------------------------------------------------------------------------- torch.library op
@torch.library.custom_op("adaptive_depth::leaky_update", mutates_args=())
def _leaky_update_op(x: Tensor, f: Tensor, a: Tensor, b: Tensor, lt: Tensor, relu: bool, stats: bool,
                     backend: str) -> Tuple[Tensor, Tensor]:
    y, s = _forward_impl(x, f, a, b, lt, relu, stats, backend)
    return y, s


@_leaky_update_op.register_fake
def _(x, f, a, b, lt, relu, stats, backend):
    y = torch.empty_like(x, dtype=_out_dtype(x, f))
    return y, x.new_empty((2,) if stats else (0,), dtype=torch.float32)


@torch.library.custom_op("adaptive_depth::leaky_update_backward", mutates_args=())
def _leaky_update_backward_op(g: Tensor, x: Tensor, f: Tensor, a: Tensor, b: Tensor, relu: bool,
                              backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, df, da, db = _backward_impl(g.contiguous() if not _same_layout(g, x) else g,
                                    x, f, a, b, relu, (True, True, True, True), backend)
    return dx, df, da, db


@_leaky_update_backward_op.register_fake
def _(g, x, f, a, b, relu, backend):
    return torch.empty_like(x), torch.empty_like(f), torch.empty_like(a), torch.empty_like(b)


def _op_setup(ctx, inputs, output):
    x, f, a, b, _lt, relu, _stats, backend = inputs
    ctx.save_for_backward(x, f, a, b)
    ctx.relu, ctx.backend = relu, backend


def _op_backward(ctx, g, _gs):
    x, f, a, b = ctx.saved_tensors
    dx, df, da, db = _leaky_update_backward_op(g, x, f, a, b, ctx.relu, ctx.backend)
    return dx, df, da, db, None, None, None, None


_leaky_update_op.register_autograd(_op_backward, setup_context=_op_setup)


# ------------------------------------------------------------------------------------- entry points
def fused_update(x: Tensor, f: Tensor, a: Tensor, b: Tensor, effective_depth: Tensor, *,
                 relu: bool = False, stats: bool = False, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """``(act(a x + b f), stats)`` with tensor coefficients, no validation: the containers' hot path.

    ``stats`` is ``(||f - Lt x||^2, ||x||^2)`` in fp32 when asked for, else an empty tensor.
    """
    if torch.compiler.is_compiling():
        return _leaky_update_op(x, f, a, b, effective_depth, relu, stats, backend)
    return _LeakyUpdate.apply(x, f, a, b, effective_depth, relu, stats, backend)


def leaky_update(x: Tensor, f: Tensor, rho: Union[Tensor, Number], effective_depth: Union[Tensor, Number],
                 *, scheme: str = "euler", activation: Optional[str] = None, return_stats: bool = False,
                 backend: Optional[str] = None):
    """One leaky residual step: the next representation from ``x`` and the branch output ``f = f(x)``.

    ``euler``:        ``x + rho * (f - Lt * x)``                             (needs ``rho * Lt < 1``)
    ``exponential``:  ``exp(-rho Lt) x + (1 - exp(-rho Lt)) / Lt * f``         (stable for any ``rho``)

    Args:
        x: the representation entering the step.
        f: the residual branch's output ``f(x)``, same shape as ``x``.
        rho: step size, a float or a 0-dim tensor (which may require grad).
        effective_depth: ``Lt >= 0``; 0 gives a plain ResNet step ``x + rho f``.
        scheme: ``"euler"`` (the paper) or ``"exponential"``.
        activation: ``None`` or ``"relu"``, applied after the update (torchvision blocks do this).
        return_stats: also return ``(||f - Lt x||^2, ||x||^2)`` as an fp32 tensor of shape (2,).
        backend: ``"auto"`` (Triton on CUDA when available), ``"torch"`` or ``"triton"``.

    Example:
        >>> x, f = torch.randn(8, 16), torch.randn(8, 16)
        >>> y = leaky_update(x, f, 0.1, 2.0)            # x + 0.1 * (f - 2 x)
    """
    if not isinstance(x, Tensor) or not isinstance(f, Tensor):
        raise TypeError(f"x and f must be tensors, got {type(x).__name__} and {type(f).__name__}")
    if x.shape != f.shape:
        raise ValueError(f"x and f must have the same shape, got x {tuple(x.shape)} and f {tuple(f.shape)}")
    check_scheme(scheme)
    relu = check_activation(activation) == "relu"
    backend = check_backend(backend)
    checkable = not torch.compiler.is_compiling()
    if isinstance(rho, Tensor):
        if rho.numel() != 1:
            raise ValueError(f"rho must be a float or a 0-dim tensor, got shape {tuple(rho.shape)}")
        if not rho.is_floating_point():
            raise TypeError(f"rho must be a floating-point tensor, got {rho.dtype}")
        rho_t = rho.reshape(()).to(x.device)
    else:
        rho_t = torch.tensor(_as_float(rho, "rho"), dtype=torch.float64, device=x.device)
    if isinstance(effective_depth, Tensor) and effective_depth.numel() != 1:
        raise ValueError(f"effective_depth must be a scalar, got shape {tuple(effective_depth.shape)}")
    if checkable and not (isinstance(rho, Tensor) and rho.is_cuda):  # never sync a device for a check
        check_step(rho_t.detach(), check_effective_depth(effective_depth), scheme)
    elif checkable and not isinstance(effective_depth, Tensor):
        check_effective_depth(effective_depth)
    wide = torch.float64 in (x.dtype, f.dtype) or (isinstance(rho, Tensor) and rho.dtype == torch.float64)
    coef_dtype = torch.float64 if wide else torch.float32  # fp32 math unless an operand is fp64
    rho_t = rho_t.to(coef_dtype)
    lt = torch.as_tensor(effective_depth, dtype=coef_dtype, device=x.device).reshape(())
    a, b = step_coefficients(rho_t, lt, scheme)
    y, s = fused_update(x, f, a, b, lt, relu=relu, stats=return_stats, backend=backend)
    return (y, s) if return_stats else y


def leaky_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], a: Tensor, b: Tensor,
                 effective_depth: Tensor, *, relu: bool = False, stats: bool = False,
                 backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """``(act(a x + b (relu(x) W^T + bias)), stats)``: the paper's MLP block in one op.

    On CUDA with Triton this is one GEMM whose prologue applies the ReLU to the loaded tiles and whose
    epilogue applies the leaky combine; elsewhere ``F.linear`` followed by ``fused_update``.
    """
    # kernels.leaky_linear is an autograd.Function in eager mode and a custom op under torch.compile, so
    # compiled graphs keep the fused GEMM too. Under autocast the torch path runs: the kernel would not
    # cast its operands as F.linear does.
    if _use_triton(x, backend) and not torch.is_autocast_enabled(x.device.type) \
            and hasattr(_kernels(), "leaky_linear"):
        return _kernels().leaky_linear(x, weight, bias, a, b, effective_depth, relu=relu, stats=stats)
    f = torch.nn.functional.linear(torch.relu(x), weight, bias)
    return fused_update(x, f, a, b, effective_depth, relu=relu, stats=stats, backend=backend)
