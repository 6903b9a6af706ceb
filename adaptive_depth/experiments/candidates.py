"""Candidate step rules under test (issue 9 item 4): not library defaults until they win on tuning tasks.

A candidate is a ``rules.Rule`` that ``AdaptiveSteps(rule=...)`` accepts as it is; the experiments name it in
``RunConfig.rule`` / ``--rules`` like a library rule. Each records the idea it tests.

    smoothed_distance   moving-mesh equidistribution: the arc-length monitor M_l = sqrt(1 + (c_l / median c)^2)
                        smoothed across neighbouring layers with a [1, 2, 1] / 4 filter, rho_l ∝ 1 / M_l, damped
                        and projected like ``equal_distance``. The 1 under the root bounds how far a slow layer's
                        step can grow; the filter keeps neighbouring steps alike (a smooth mesh).
    power_distance_0.5, power_distance_2, power_distance_3, power_distance_4
                        the rule's strength: the target ``rho_l ∝ c_l^(-p)`` instead of ``equal_distance``'s
                        ``c_l^(-1)`` (p = 1 is ``equal_distance``), damped, guarded and projected the same way.
                        p > 1 sharpens the profile the default settles into (small steps where the
                        representation moves fast), p < 1 softens it.

Fixed step profiles (``PROFILES``), for the headroom check of item 4: what the best *fixed* shape, chosen per
task with hindsight, gains over uniform steps bounds what a rule that sets a profile can gain. Each is
``w(u)`` at the block midpoints ``u = (l - 1/2) / L``, rescaled to sum to T; the shapes span a ratio of 4 (1 to 1/4):

    fine_ends     small steps at both ends, large in the middle (the bottleneck's fast jumps in and out); the
                  best on the tuning tasks, shipped as ``rules.fine_ends`` / ``steps="fine_ends"``
    fine_middle   large steps at both ends, small in the middle
    fine_start    small steps first, rising (the profile ``equal_distance`` settles into on the family)
    fine_end      large steps first, falling
    fine_ends_2, fine_ends_8   ``fine_ends`` at ratios 2 and 8 (its strength, tuned on the tuning tasks)

Function-preserving moves (``PRESERVING``): ``equal_distance_preserving`` is ``equal_distance`` whose every
change of the steps is followed by ``mechanism.preserve_function_`` (the branch weights, biases and read-out
rescaled so the network computes what it computed before the move, the optimizer state with them). By the
exact reparametrisation of ``experiments.mechanism`` the steps then change only each layer's effective
learning rate, never the function: the moving-mesh idea with the weights carried onto the new grid.
"""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch
from torch import Tensor

from .. import rules
from .._validate import check_range
from ..rules import Rule, equal_distance

__all__ = ["CANDIDATES", "PRESERVING", "preserves", "PROFILES", "power_distance", "profile_steps", "smooth_neighbours", "smoothed_distance", "resolve"]


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


def power_distance(power: float) -> Callable[..., Tensor]:
    """``equal_distance`` with the target ``rho_l ∝ c_l^(-power)``: the speeds raised to ``power`` first."""
    power = check_range(power, "power", 0.0, math.inf, left_open=True)

    def fn(speed: Tensor, rho: Tensor, total_time: float, min_step: float, max_step: float, *,
           damping: float = 0.5, floor: float = 1e-3) -> Tensor:
        c = torch.as_tensor(speed, dtype=torch.float64).clamp(min=0)
        return equal_distance(c ** power, rho, total_time, min_step, max_step, damping=damping, floor=floor)

    return fn


#: ``fine_ends`` (``rules.fine_ends``, the one the library ships) at its strengths, end step : middle step = 1 : r
_FINE_ENDS_RATIOS = {"fine_ends": 4.0, "fine_ends_2": 2.0, "fine_ends_8": 8.0}
_PROFILE_SHAPES: Dict[str, Callable[[Tensor], Tensor]] = {
    "fine_middle": lambda u: 0.25 + 0.75 * (2 * u - 1).abs(),
    "fine_start": lambda u: 0.25 + 0.75 * u,
    "fine_end": lambda u: 1 - 0.75 * u,
}
#: the fixed profiles' names (``RunConfig.rule`` takes them like ``"uniform"``)
PROFILES = tuple(_FINE_ENDS_RATIOS) + tuple(_PROFILE_SHAPES)


def profile_steps(name: str, depth: int, total_time: float = 1.0) -> Tensor:
    """The ``depth`` steps of fixed profile ``name`` (float64, summing to ``total_time``)."""
    if name not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {name!r}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if name in _FINE_ENDS_RATIOS:
        return rules.fine_ends(depth, total_time, ratio=_FINE_ENDS_RATIOS[name])
    u = (torch.arange(depth, dtype=torch.float64) + 0.5) / depth
    w = _PROFILE_SHAPES[name](u)
    return total_time * w / w.sum()


#: the strengths of ``power_distance`` under test (name suffix -> power)
POWERS = {"0.5": 0.5, "2": 2.0, "3": 3.0, "4": 4.0}
CANDIDATES: Dict[str, Rule] = {r.name: r for r in (
    Rule("smoothed_distance", smoothed_distance),
    *(Rule(f"power_distance_{k}", power_distance(p)) for k, p in POWERS.items()))}


#: candidate name -> the rule whose step changes it makes function-preserving
PRESERVING: Dict[str, str] = {"equal_distance_preserving": "equal_distance"}


def preserves(name: str) -> bool:
    """Whether candidate ``name`` rescales the weights after each change of the steps."""
    return name in PRESERVING


def resolve(name: str):
    """``name`` as ``AdaptiveSteps`` takes it: a candidate's ``Rule``, else the name itself."""
    name = PRESERVING.get(name, name)
    return CANDIDATES.get(name, name)
