"""Training recipes built from the library's parts, and the measurement that checks them.

The bottleneck recipe (``docs/science.md``): a ``LeakyMLP`` trained with Adam shows the paper's
low-rank middle representation only when the trained input and output layers are penalised too (the
plugin's decay covers the leaky blocks alone; unpenalised, the input layer keeps a high-rank embedding and
the rescaling between it and the blocks is free), and it gets there faster when the branch weights, which
must grow to the scale Lt to balance the leak, move at a rate proportional to Lt.

    groups = bottleneck_param_groups(model, lr=1e-3, io_decay=0.1 / Lt, branch_lr_scale="lt")
    opt = AdaptiveSteps(torch.optim.Adam(groups, lr=1e-3), model, weight_decay=0.1 / Lt)
    ranks = representation_ranks(model, x)      # one rank per layer; the middle one is the bottleneck
    # then a finishing phase: the penalty off, a fresh optimizer; the rank survives and the fit improves
    opt = AdaptiveSteps(torch.optim.Adam(bottleneck_param_groups(model, lr=1e-3, io_decay=0.0,
                                                                 branch_lr_scale="lt"), lr=1e-3),
                        model, weight_decay=0.0)

The large-Lt identity recipe (``docs/large_lt.md``): blocks built with ``branch_identity=True`` carry
``Lt * r * x`` in their branch; ``identity_param_groups`` trains each ``r`` at lr / Lt, so the leak it leaves,
``Lt (1 - r)``, moves like any other weight under Adam.

    opt = torch.optim.AdamW(identity_param_groups(model, lr=1e-2), lr=1e-2)
"""
from __future__ import annotations

from typing import Dict, List, Union

import torch
from torch import Tensor, nn

from ._validate import check_positive
from .steps import step_groups
from .wrap import identity_coefficient

__all__ = ["bottleneck_param_groups", "identity_param_groups", "representation_ranks", "middle_rank"]


def bottleneck_param_groups(model: nn.Module, *, lr: float, io_decay: float = 0.0,
                            branch_lr_scale: Union[float, str] = 1.0) -> List[Dict]:
    """Optimizer parameter groups for the bottleneck recipe.

    Args:
        model: a module holding leaky blocks (``LeakyMLP``, ``LeakyResNet``, a wrapped ResNet).
        lr: the base learning rate (the input/output group and the steps' group use it).
        io_decay: ``weight_decay`` of the group of every parameter outside the leaky branches (the input and
            output layers): under Adam and SGD it is the L2 penalty ``io_decay/2 ||W||^2``; the branches get
            ``weight_decay=0`` (their penalty is the plugin's ``weight_decay``, scaled by the steps).
        branch_lr_scale: the branch weights' learning rate in units of ``lr``; ``"lt"`` gives ``max(Lt, 1)``
            (under Adam exactly the reparametrisation ``W = Lt V`` with Adam on ``V``).

    Returns:
        ``[{"params": io, "weight_decay": io_decay}, {"params": branches, "lr": ..., "weight_decay": 0},
        {"params": steps, "weight_decay": 0}]`` (empty groups are left out); pass it to any optimizer.
    """
    groups = step_groups(model)
    if not groups:
        raise ValueError("model has no step sizes: build it with LeakyResNet / LeakyMLP or adaptive_depth.wrap()")
    check_positive(lr, "lr")
    if not (isinstance(io_decay, (int, float)) and io_decay >= 0):
        raise ValueError(f"io_decay must be a number >= 0, got {io_decay!r}")
    scale = _lr_scale(branch_lr_scale, groups)
    branch_ids = {id(p) for g in groups for l in range(g.depth) for p in g.branch_parameters(l)}
    step_ids = {id(g.rho) for g in groups}
    branches, steps, io = [], [], []
    for p in model.parameters():
        (branches if id(p) in branch_ids else steps if id(p) in step_ids else io).append(p)
    out = [{"params": io, "weight_decay": float(io_decay)},
           {"params": branches, "lr": lr * scale, "weight_decay": 0.0},
           {"params": steps, "weight_decay": 0.0}]
    return [g for g in out if g["params"]]


def identity_param_groups(model: nn.Module, *, lr: float, scale: float = 1.0) -> List[Dict]:
    """Optimizer groups for blocks built with ``branch_identity=True``: every identity coefficient ``r`` at
    ``scale * lr / Lt`` of its block's group (one group per Lt; at Lt = 0 the term is absent and ``r`` stays with
    the rest), everything else in one group at the optimizer's lr. Pass the result to any optimizer.

    ``scale`` 1 trains the net leak ``Lt (1 - r)`` like any other weight, and is the measured best on one conv net
    of docs/large_lt.md; on another (at 8 and 16 blocks) 4 trained further. Search it next to the lr, and keep
    ``scale * lr / Lt`` below about 0.1: at 0.16 a net diverged."""
    check_positive(lr, "lr")
    check_positive(scale, "scale")
    by_lt: Dict[float, List[nn.Parameter]] = {}
    found = False
    for m in model.modules():  # a LeakyResidual's .identity, or a wrapped block's leaky_identity
        r = identity_coefficient(m)
        group = m.__dict__.get("_group", m.__dict__.get("_leaky_group"))
        found = found or r is not None
        if r is not None and group is not None and float(group.effective_depth) > 0:
            by_lt.setdefault(float(group.effective_depth), []).append(r)
    if not found:
        raise ValueError("model has no identity coefficients: build its LeakyResNet with branch_identity=True "
                         "(or wrap(..., branch_identity=True))")
    apart = {id(r) for rs in by_lt.values() for r in rs}
    rest = [p for p in model.parameters() if id(p) not in apart]
    return [{"params": rest}] + [{"params": rs, "lr": scale * lr / lt} for lt, rs in sorted(by_lt.items())]


def _lr_scale(value: Union[float, str], groups) -> float:
    if value == "lt":
        lts = {float(g.effective_depth) for g in groups}
        return max(max(lts), 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"branch_lr_scale must be a number > 0 or 'lt', got {value!r}")
    return float(value)


@torch.no_grad()
def representation_ranks(model: nn.Module, x: Tensor, threshold: float = 0.1) -> List[int]:
    """Per layer of a ``LeakyMLP`` (``A_0 .. A_L``): the number of singular values of the centred
    representation above ``threshold`` times the largest (the paper's bottleneck shows as a dip to k*)."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold!r}")
    if not hasattr(model, "representations"):
        raise TypeError(f"model must have .representations(x) (a LeakyMLP), got {type(model).__name__}")
    ranks = []
    for a in model.representations(x):
        a = a.double()
        s = torch.linalg.svdvals(a - a.mean(0))
        ranks.append(int((s > threshold * s[0]).sum()) if s[0] > 0 else 0)
    return ranks


def middle_rank(model: nn.Module, x: Tensor, threshold: float = 0.1) -> int:
    """The rank of the middle representation ``A_{L/2}`` (see ``representation_ranks``)."""
    ranks = representation_ranks(model, x, threshold)
    return ranks[len(ranks) // 2]

