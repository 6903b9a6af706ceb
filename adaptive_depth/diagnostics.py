"""Per-layer diagnostics of a Leaky ResNet (the quantities the paper plots).

Representations are rows = examples here (``A`` of shape (N, w)); the paper writes columns.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["singular_values", "effective_rank"]


def singular_values(a: Tensor, *, centered: bool = False) -> Tensor:
    """Singular values of a batch of representations ``a`` (N, w), in float64, descending."""
    a = a.detach().double()
    if centered:
        a = a - a.mean(0, keepdim=True)
    return torch.linalg.svdvals(a)


def effective_rank(a: Tensor, *, method: str = "entropy", centered: bool = False,
                   threshold: float = 1e-2) -> float:
    """Effective rank of ``a`` (N, w).

    ``entropy``: ``exp(H(p))`` with ``p = s / sum(s)`` over the singular values (Roy & Vetterli);
    ``threshold``: the number of singular values above ``threshold * s_max``.
    """
    s = singular_values(a, centered=centered)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0.0
    if method == "threshold":
        return float((s > threshold * s[0]).sum())
    if method == "entropy":
        p = s / s.sum()
        p = p[p > 0]
        return float(torch.exp(-(p * p.log()).sum()))
    raise ValueError(f"method must be 'entropy' or 'threshold', got {method!r}")
