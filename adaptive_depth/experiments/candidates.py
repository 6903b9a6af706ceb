"""Candidate step rules under test (issue 9 item 4): not library defaults until they win on tuning tasks.

A candidate is a ``rules.Rule`` that ``AdaptiveSteps(rule=...)`` accepts as it is; the experiments name it in
``RunConfig.rule`` / ``--rules`` like a library rule. Each records the idea it tests.

    smoothed_distance   moving-mesh equidistribution: the arc-length monitor M_l = sqrt(1 + (c_l / median c)^2)
                        smoothed across neighbouring layers with a [1, 2, 1] / 4 filter, rho_l ∝ 1 / M_l, damped
                        and projected like ``equal_distance``. The 1 under the root bounds how far a slow layer's
                        step can grow; the filter keeps neighbouring steps alike (a smooth mesh).
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

from ..rules import Rule, equal_distance

__all__ = ["CANDIDATES", "smooth_neighbours", "smoothed_distance", "resolve"]


def smooth_neighbours(v: Tensor) -> Tensor:
    """``[1, 2, 1] / 4`` across the layers, the ends reflected (a length-1 vector is returned as it is)."""
    if v.numel() < 2:
        return v.clone()
    padded = torch.cat([v[1:2], v, v[-2:-1]])
    return (padded[:-2] + 2 * padded[1:-1] + padded[2:]) / 4


def smoothed_distance(speed: Tensor, rho: Tensor, total_time: float, min_step: float, max_step: float, *,
                      damping: float = 0.5, floor: float = 1e-3) -> Tensor:
    """Equidistribute the smoothed arc-length monitor (see the module docstring)."""
    c = torch.as_tensor(speed, dtype=torch.float64).cpu()
    scale = c.median().clamp(min=1e-300)
    monitor = smooth_neighbours((1 + (c / scale) ** 2).sqrt())
    return equal_distance(monitor, rho, total_time, min_step, max_step, damping=damping, floor=floor)


CANDIDATES: Dict[str, Rule] = {r.name: r for r in (Rule("smoothed_distance", smoothed_distance),)}


def resolve(name: str):
    """``name`` as ``AdaptiveSteps`` takes it: a candidate's ``Rule``, else the name itself."""
    return CANDIDATES.get(name, name)
