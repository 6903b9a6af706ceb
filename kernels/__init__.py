"""Fused Triton kernels for leaky residual networks (imports torch and triton only).

``leaky_update_fwd`` / ``leaky_update_bwd``: the update ``y = act(a x + b f)`` and its gradients, one
memory pass each, with the adaptive rule's statistics and the coefficient gradients as deterministic
fp32 reductions; ``leaky_update`` the same with autograd. ``leaky_linear``: ``act(a x + b (relu(x) W^T + bias))`` as one GEMM with a ReLU prologue
and a leaky-combine epilogue, differentiable. Inputs are fp32, bf16 or fp16 (fp32 math) on CUDA, or on
the CPU under ``TRITON_INTERPRET=1`` (set before triton is imported; for tests).

Layouts: the update kernels run in place on contiguous tensors and on any pair (or triple) of dense
tensors with identical strides (channels_last...); a tensor laid out otherwise is copied once into x's
layout, and outputs always have the layout ``torch.empty_like`` gives. ``leaky_linear`` reads x with any
row stride (rows themselves must be contiguous, else one copy). ``ADAPTIVE_DEPTH_AUTOTUNE=0`` runs the
GEMM on one fixed tile config instead of autotuning it. Full fp32 (TF32 off, torch's default) has no
tensor-core dot: its forward is cuBLAS plus the fused update kernel (``leaky_linear.gemm_path``;
``ADAPTIVE_DEPTH_GEMM=triton|cublas`` overrides).

The flat kernels run on a persistent grid (a few programs per SM): whole blocks unmasked, so that their
memory accesses stay 128-bit for any element count, the one partial block masked; their reductions
accumulate in registers and the second pass adds one partial per program in one step.

Every op has one file (``leaky_update.py``, ``leaky_linear.py``) with its kernels, their launchers, its
``autograd.Function`` (eager) and its ``torch.library`` custom ops ``adaptive_depth::<op>`` and
``adaptive_depth::<op>_backward`` with fake (meta) implementations (``torch.compile``). A second backward
through the kernels raises a clear error (the torch path's backward is differentiable).
"""
from ._common import DTYPES
from .leaky_linear import leaky_linear
from .leaky_update import leaky_update, leaky_update_bwd, leaky_update_fwd

__all__ = ["DTYPES", "leaky_update", "leaky_update_fwd", "leaky_update_bwd", "leaky_linear"]
