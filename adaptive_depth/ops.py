"""The leaky residual update, written once: dispatch, the reference maths and the public wrappers.

    y = act(a * x + b * f)          (a, b) = step_coefficients(rho, Lt, scheme)

``euler`` (the paper):       a = 1 - rho Lt,     b = rho                       (needs rho Lt < 1)
``exponential`` (leak exact): a = exp(-rho Lt),  b = (1 - exp(-rho Lt)) / Lt   (-> rho at Lt = 0)

The scheme lives only in ``step_coefficients`` (differentiable in ``rho``, with closed-form derivatives);
the memory-bound part is one op on ``(x, f, a, b)`` whose backward is written out: it saves x and f (or,
for fixed steps, only y) and returns ``da = <g, x>``, ``db = <g, f>``; autograd chains those into ``d rho``.

Paths: the torch path is ``reference_forward`` / ``reference_backward`` (the CPU path, and the contract the
kernels meet), in eager mode behind a small ``autograd.Function`` whose backward is itself differentiable
(double backward works), under ``torch.compile`` as plain torch maths that Inductor fuses. The Triton path
is ``adaptive_depth_kernels`` (the repository's ``kernels/``): each op there has its kernels, launchers,
``autograd.Function`` and ``torch.library`` custom op (``adaptive_depth::leaky_update``,
``adaptive_depth::leaky_linear``) in one file. CUDA tensors take the Triton path when Triton imports;
``ADAPTIVE_DEPTH_BACKEND=torch|triton|auto`` (or ``backend=``) forces a path. Nothing here needs Triton.
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

    Differentiable in ``rho`` (twice too), with the derivatives in closed form: euler ``(-Lt, 1)``,
    exponential ``(-Lt a, exp(-rho Lt))``, exact for any ``rho Lt``; the chain into ``d rho`` is one
    launch (euler) or two (exponential). ``effective_depth`` is a
    hyper-parameter (no gradient).
    """
    lt = torch.as_tensor(effective_depth, dtype=rho.dtype, device=rho.device)
    if scheme == "euler":
        if _fused_euler_chain(rho, lt):
            return _EulerCoefficients.apply(rho, lt)
        return 1.0 - rho * lt, rho
    if scheme == "exponential":
        if rho.shape != lt.shape:
            rho, lt = torch.broadcast_tensors(rho, lt)
        if torch.is_grad_enabled() and (rho.requires_grad or lt.requires_grad):
            return _ExponentialCoefficients.apply(rho, lt)
        return _exponential(rho, lt)
    raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


def _fused_euler_chain(rho: Tensor, lt: Tensor) -> bool:
    """Eager autograd through ``rho`` (not Lt), with ``rho``'s shape the result's: ``_EulerCoefficients``.
    Compiled graphs keep the plain maths, which Inductor fuses anyway."""
    return (torch.is_grad_enabled() and rho.requires_grad and not lt.requires_grad
            and not torch.compiler.is_compiling() and torch.broadcast_shapes(rho.shape, lt.shape) == rho.shape)


def _exponential(rho: Tensor, lt: Tensor) -> Tuple[Tensor, Tensor]:
    """``a = exp(-z)``, ``b = -expm1(-z) / Lt`` (``rho`` at Lt = 0), ``z = rho Lt``: no cancellation.

    Not differentiated itself (the gradient is ``_ExponentialCoefficients``'): the 0/0 the Lt = 0 entries
    meet in ``b``'s first branch is discarded by the ``where``, in 8 small ops."""
    neg_z = (rho * lt).neg()
    b = torch.where(lt > 0, torch.expm1(neg_z) / lt.neg(), rho)
    return torch.exp(neg_z), b


class _ExponentialCoefficients(torch.autograd.Function):
    """``d b / d rho = exp(-rho Lt) = a`` written out: autograd through ``expm1`` forms ``1 + expm1(-z)``,
    which has no relative precision left for large ``z`` (exactly 0 in fp32 from ``z`` ~ 17)."""

    @staticmethod
    def forward(ctx, rho, lt):
        a, b = _exponential(rho, lt)
        ctx.save_for_backward(a, lt)
        return a, b

    @staticmethod
    def backward(ctx, grad_a, grad_b):
        a, lt = ctx.saved_tensors  # a is an output: a second derivative chains through this node again
        return torch.addcmul(grad_b, grad_a, lt, value=-1.0).mul(a), None  # two launches


class _EulerCoefficients(torch.autograd.Function):
    """``(1 - rho Lt, rho)`` with ``d rho = grad_b - Lt grad_a`` as one launch (autograd's chain through
    ``rsub``, ``mul`` and the sum of the two paths into ``rho`` was three). Linear in ``rho``: the backward
    is itself differentiable (in the incoming gradients), so a second derivative is exact."""

    @staticmethod
    def forward(ctx, rho, lt):
        ctx.save_for_backward(lt)
        ctx.set_materialize_grads(False)
        return 1.0 - rho * lt, rho.view_as(rho)

    @staticmethod
    def backward(ctx, grad_a, grad_b):
        lt, = ctx.saved_tensors
        if grad_a is None:
            return grad_b, None
        if grad_b is None:
            return grad_a * lt.neg(), None
        return torch.addcmul(grad_b, grad_a, lt, value=-1.0), None


# ------------------------------------------------------------------------------- the reference maths
def _out_dtype(x: Tensor, f: Tensor) -> torch.dtype:
    """The result's dtype: the operands' promoted dtype; integer operands give the default float dtype."""
    out = torch.promote_types(x.dtype, f.dtype)
    return out if out.is_floating_point else torch.get_default_dtype()


def _math_dtype(out: torch.dtype) -> torch.dtype:
    return torch.float32 if out in _LOW_PRECISION else out


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
    math_dtype = _math_dtype(out)
    xc, fc = x.to(math_dtype), f.to(math_dtype)
    y = torch.mul(xc, a.to(math_dtype))
    y.addcmul_(fc, b.to(math_dtype))
    if relu:
        y.relu_()
    y = y.to(out)
    s = _statistics(xc, fc, effective_depth) if stats else x.new_empty((0,), dtype=torch.float32)
    return y, s


def _statistics(xc: Tensor, fc: Tensor, effective_depth: Tensor) -> Tensor:
    """``(||f - Lt x||^2, ||x||^2)`` in fp32 of operands already in their math dtype (no gradient)."""
    xc, fc = xc.detach(), fc.detach()
    velocity = torch.addcmul(fc, xc, -effective_depth.detach().to(xc.dtype))
    acc = torch.float64 if xc.dtype == torch.float64 else torch.float32
    return torch.stack([torch.linalg.vector_norm(velocity, dtype=acc),
                        torch.linalg.vector_norm(xc, dtype=acc)]).square().float()


def reference_graph(x: Tensor, f: Tensor, a: Tensor, b: Tensor, effective_depth: Tensor, relu: bool,
                    stats: bool) -> Tuple[Tensor, Tensor]:
    """``reference_forward`` as plain differentiable torch (no in-place ops): what ``torch.compile`` traces
    on the torch path, so that Inductor fuses the update and its backward with their neighbours."""
    out = _out_dtype(x, f)
    math_dtype = _math_dtype(out)
    xc, fc = x.to(math_dtype), f.to(math_dtype)
    y = xc * a.to(math_dtype) + fc * b.to(math_dtype)
    if relu:
        y = torch.relu(y)
    s = _statistics(xc, fc, effective_depth) if stats else x.new_empty((0,), dtype=torch.float32)
    return y.to(out), s


def reference_backward(g: Tensor, x: Tensor, f: Tensor, a: Tensor, b: Tensor, relu: bool,
                       need: Tuple[bool, bool, bool, bool]) -> Tuple[Optional[Tensor], ...]:
    """Gradients of ``y = act(a x + b f)``: ``(dx, df, da, db)``, each ``None`` unless needed. Written in
    differentiable torch ops, so that a second backward through it is exact."""
    math_dtype = _math_dtype(_out_dtype(x, f))
    # each operand is brought to the math dtype once (a no-op in fp32/fp64) and reused
    need_x, need_f, need_a, need_b = need
    xm = x.to(math_dtype) if (relu or need_a) else None
    fm = f.to(math_dtype) if (relu or need_b) else None
    gm = g.to(math_dtype)
    am, bm = a.to(math_dtype), b.to(math_dtype)
    if relu:  # recompute the mask instead of saving y
        pre = torch.mul(xm, am).addcmul_(fm, bm)
        gm = torch.where(pre > 0, gm, 0.0)
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


def _use_triton(x: Tensor, backend: str, *others: Tensor) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"backend='triton' was forced but the Triton kernels cannot be used here: "
                               f"{_KERNELS}") from _KERNELS
        return True
    # auto: only dtypes the kernels take (they raise TypeError for the rest, e.g. float64)
    return x.is_cuda and all(t.dtype in _KERNEL_DTYPES for t in (x, *others)) and triton_available()


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------- the torch path's autograd
def _fixed_step_backward(g: Tensor, y: Optional[Tensor], a: Tensor, b: Tensor, need, dtypes):
    """``(dx, df)`` of ``y = act(a x + b f)`` when a and b need no gradient: the ReLU mask is read from the
    output (``y > 0`` iff ``a x + b f > 0``), so neither x nor f has to be kept."""
    math_dtype = _math_dtype(torch.promote_types(*dtypes))
    if y is not None:
        g = torch.ops.aten.threshold_backward(g, y, 0)
    gm = g.to(math_dtype)
    dx = (gm * a.to(math_dtype)).to(dtypes[0]) if need[0] else None
    df = (gm * b.to(math_dtype)).to(dtypes[1]) if need[1] else None
    return dx, df


class _ReferenceUpdate(torch.autograd.Function):
    """The torch path in eager mode: ``reference_forward`` with the written-out ``reference_backward``
    (in differentiable ops: a second backward is exact). Fixed steps keep only y (for the ReLU mask) or
    nothing; otherwise x and f."""

    @staticmethod
    def forward(ctx, x, f, a, b, lt, relu: bool, stats: bool):
        y, s = reference_forward(x, f, a, b, lt, relu, stats)
        ctx.relu, ctx.dtypes = relu, (x.dtype, f.dtype)
        ctx.set_materialize_grads(False)  # no zeros for the statistics' (non-)gradient
        ctx.from_output = not (ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
        if ctx.from_output:
            ctx.save_for_backward(a, b, y if relu else None)
        else:
            ctx.save_for_backward(x, f, a, b)
        ctx.mark_non_differentiable(s)
        return y, s

    @staticmethod
    def backward(ctx, g, _gs):
        if g is None:
            return (None,) * 7
        if ctx.from_output:
            a, b, y = ctx.saved_tensors
            dx, df = _fixed_step_backward(g, y, a, b, tuple(ctx.needs_input_grad[:2]), ctx.dtypes)
            return dx, df, None, None, None, None, None
        x, f, a, b = ctx.saved_tensors
        grads = reference_backward(g, x, f, a, b, ctx.relu, tuple(ctx.needs_input_grad[:4]))
        return (*grads, None, None, None)


# ------------------------------------------------------------------------------------- entry points
def fused_update(x: Tensor, f: Tensor, a: Tensor, b: Tensor, effective_depth: Tensor, *,
                 relu: bool = False, stats: bool = False, backend: str = "auto",
                 index: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """``(act(a x + b f), stats)`` with tensor coefficients, no validation: the containers' hot path.

    ``stats`` is ``(||f - Lt x||^2, ||x||^2)`` in fp32 when asked for, else an empty tensor. ``index``:
    ``a`` and ``b`` are a group's coefficient vectors and the update uses entry ``index``; the kernels read
    it in place and write the vectors' gradients whole (no select and scatter launches per block).
    """
    if _use_triton(x, backend, f):
        return _kernels().leaky_update(x, f, a, b, effective_depth, relu=relu, stats=stats, index=index)
    if index is not None:
        a, b = a[index], b[index]
    if torch.compiler.is_compiling():
        return reference_graph(x, f, a, b, effective_depth, relu, stats)
    return _ReferenceUpdate.apply(x, f, a, b, effective_depth, relu, stats)


def _check_operands(x, f) -> Tuple[Tensor, Tensor]:
    """x and f as real tensors of one shape; integer ones are brought to the floating dtype they compute in."""
    if not isinstance(x, Tensor) or not isinstance(f, Tensor):
        raise TypeError(f"x and f must be tensors, got {type(x).__name__} and {type(f).__name__}")
    if x.shape != f.shape:
        raise ValueError(f"x and f must have the same shape, got x {tuple(x.shape)} and f {tuple(f.shape)}")
    for name, t in (("x", x), ("f", f)):
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"{name} must be a floating-point (or integer) tensor, got {t.dtype}; convert it "
                            f"with {name}.float()")
    out = _out_dtype(x, f)
    return x.to(out), f.to(out)


def _host_number(value, name: str) -> Optional[float]:
    """``value`` as a validated float when reading it costs no device sync (a Python number, a CPU tensor
    outside ``torch.compile``), else None: device and meta tensors are never read for a check."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a float or a 0-dim tensor, got shape {tuple(value.shape)}")
        if value.device.type != "cpu" or torch.compiler.is_compiling():
            return None
    return _as_float(value, name)


def _scalar(value, dtype: torch.dtype, device) -> Tensor:
    """A 0-dim tensor on ``device``: a tensor is moved, a Python number is filled in there (no copy from
    the host, no sync)."""
    if isinstance(value, Tensor):
        return value.reshape(()).to(device=device, dtype=dtype)
    return torch.full((), float(value), dtype=dtype, device=device)


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
    x, f = _check_operands(x, f)
    check_scheme(scheme)
    relu = check_activation(activation) == "relu"
    backend = check_backend(backend)
    if isinstance(rho, Tensor):
        if rho.numel() != 1:
            raise ValueError(f"rho must be a float or a 0-dim tensor, got shape {tuple(rho.shape)}")
        if not rho.is_floating_point():
            raise TypeError(f"rho must be a floating-point tensor, got {rho.dtype}")
    # validate on the host, before anything moves to x's device (device tensors are not read: no sync)
    rho_value, lt_value = _host_number(rho, "rho"), _host_number(effective_depth, "effective_depth")
    if lt_value is not None:
        check_effective_depth(lt_value)
    if rho_value is not None:
        check_step(rho_value, lt_value if lt_value is not None else 0.0, scheme)
    wide = torch.float64 in (x.dtype, f.dtype) or (isinstance(rho, Tensor) and rho.dtype == torch.float64)
    coef_dtype = torch.float64 if wide else torch.float32  # fp32 math unless an operand is fp64
    rho_t = _scalar(rho, coef_dtype, x.device)
    lt = _scalar(effective_depth, coef_dtype, x.device)
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
    if _use_triton(x, backend, weight) and not torch.is_autocast_enabled(x.device.type):
        return _kernels().leaky_linear(x, weight, bias, a, b, effective_depth, relu=relu, stats=stats)
    f = torch.nn.functional.linear(torch.relu(x), weight, bias)
    return fused_update(x, f, a, b, effective_depth, relu=relu, stats=stats, backend=backend)
