"""Step-size rules: pure, vectorised functions from measurements to target step sizes.

Every function returns a float64 vector that sums to ``total_time``; the guarded ones also stay inside
``[min_step, max_step]``. ``project_steps`` is the exact Euclidean projection onto that set.

    uniform          rho_l = T / L
    irregular(a)     rho_l ∝ 1 + a (1/4 - |l/L - 1/2|)           (the paper's fixed profile, larger mid-way)
    fine_ends(r)     rho_l ∝ 1 - (1 - 1/r) |2 u_l - 1|, u_l = (l - 1/2)/L   (small steps at both ends, r : 1)
    paper            rho_l = T c_l^-1 / sum_i c_i^-1,  c_l = ||A_l - A_{l-1}|| / (rho_l ||A_{l-1}||)
    equal_distance   the paper's target, guarded: speeds floored, damped toward the target, projected
    weight_norm      the same guarded target with the branch's parameter norm as the speed
    learned          no target: the steps are parameters trained by the optimizer (see ``StepSizes``)
    fixed            no target: the steps stay as they are (baselines that still want the plugin's decay)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

__all__ = ["uniform", "irregular", "fine_ends", "PROFILES", "paper", "equal_distance", "weight_norm", "project_steps",
           "Rule", "RULES", "MEASURES", "get_rule"]


def _f64(v) -> Tensor:
    return torch.as_tensor(v, dtype=torch.float64).detach().cpu()


def uniform(depth: int, total_time: float = 1.0) -> Tensor:
    """Equidistant steps ``T / L``."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    return torch.full((depth,), total_time / depth, dtype=torch.float64)


def irregular(depth: int, total_time: float = 1.0, a: float = 0.5) -> Tensor:
    """The paper's fixed profile ``(1/L)(1 + a (1/4 - |l/L - 1/2|))``, l = 1..L, rescaled to sum to T."""
    if not 0.0 <= a < 1.0:
        raise ValueError(f"a (irregular profile strength) must be in [0, 1), got {a}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    l = torch.arange(1, depth + 1, dtype=torch.float64)
    w = 1.0 + a * (0.25 - (l / depth - 0.5).abs())
    return total_time * w / w.sum()


def fine_ends(depth: int, total_time: float = 1.0, ratio: float = 4.0) -> Tensor:
    """Small steps at both ends, ``ratio`` times larger in the middle: ``w(u) = 1 - (1 - 1/ratio) |2u - 1|`` at
    the block midpoints ``u = (l - 1/2) / L``, rescaled to sum to T. The direction of ``irregular``, stronger;
    with Adam on the held-out task family it beat uniform steps and the adaptive default (docs/science.md 4d)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (math.isfinite(ratio) and ratio >= 1):
        raise ValueError(f"ratio (fine_ends profile strength) must be a finite number >= 1, got {ratio!r}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    u = (torch.arange(depth, dtype=torch.float64) + 0.5) / depth
    w = 1.0 - (1.0 - 1.0 / ratio) * (2 * u - 1).abs()
    return total_time * w / w.sum()


#: fixed initial profiles by name, as ``steps=`` takes them (``profile(depth, total_time)``)
PROFILES: Dict[str, Callable[[int, float], Tensor]] = {"uniform": uniform, "irregular": irregular,
                                                        "fine_ends": fine_ends}


def paper(speed: Tensor, total_time: float = 1.0) -> Tensor:
    """Exactly the paper's assignment ``rho_l = T c_l^{-1} / sum_i c_i^{-1}`` (no guards)."""
    inv = 1.0 / _f64(speed)
    return total_time * inv / inv.sum()


def project_steps(v: Tensor, total_time: float, min_step: float, max_step: float) -> Tensor:
    """Euclidean projection of ``v`` onto ``{rho : sum rho = T, min_step <= rho <= max_step}``.

    ``rho = clip(v - tau, lo, hi)`` where ``S(tau) = sum clip(v - tau, lo, hi)`` is piecewise linear and
    non-increasing; its breakpoints are ``v - hi`` and ``v - lo``, so ``tau`` is exact: sort them, find the
    segment where ``S`` crosses ``T``, interpolate. No host synchronisation and no data-dependent shapes
    (it runs inside ``torch.compile``), O(L^2) memory for L steps, and differentiable in ``v``: ``tau`` is
    recomputed with autograd on the free coordinates, so the gradient is the projection's Jacobian.
    """
    n = v.shape[-1]
    if not (n * min_step <= total_time * (1 + 1e-9) and total_time <= n * max_step * (1 + 1e-9)):
        raise ValueError(f"no steps satisfy sum = {total_time} with {n} steps in [{min_step}, {max_step}]")
    with torch.no_grad():
        vd = v.detach()
        knots = torch.cat([vd - max_step, vd - min_step]).sort().values
        sums = (vd[None, :] - knots[:, None]).clamp(min_step, max_step).sum(1)  # non-increasing
        k = (sums > total_time).sum().clamp(1, 2 * n - 1).reshape(1)
        pair = torch.cat([k - 1, k])  # gather, not tensor indexing: torch.compile traces it
        (t0, t1), (s0, s1) = knots.gather(0, pair), sums.gather(0, pair)
        gap = s0 - s1
        tau = t0 + torch.where(gap > 0, (s0 - total_time) * (t1 - t0) / torch.where(gap > 0, gap, 1), 0)
        shifted = vd - tau
        fixed = shifted.clamp(min_step, max_step)
        free = (shifted > min_step) & (shifted < max_step)
    zero = torch.zeros((), dtype=v.dtype, device=v.device)
    tau = (torch.where(free, v, zero).sum() + torch.where(free, zero, fixed).sum() - total_time) \
        / free.sum().clamp(min=1)
    return torch.where(free, v - tau, fixed)


def _guarded_target(speed: Tensor, floor: float) -> Tensor:
    speed = _f64(speed)
    top = speed.max()
    return speed.clamp(min=float(top) * floor) if top > 0 else torch.ones_like(speed)


def equal_distance(speed: Tensor, rho: Tensor, total_time: float, min_step: float, max_step: float, *,
                   damping: float = 0.5, floor: float = 1e-3) -> Tensor:
    """Equal relative distance per layer, guarded.

    The target is the paper's ``rho_l ∝ 1 / c_l`` with ``c_l`` floored at ``floor * max(c)`` (a layer that
    barely moves cannot claim the whole horizon); the new steps move a fraction ``damping`` of the way
    toward it in log space (``rho^(1-d) target^d``) and are projected onto ``{sum = T, bounds}``.
    """
    target = paper(_guarded_target(speed, floor), total_time)
    rho = _f64(rho).clamp(min=min_step)
    mixed = rho.log().lerp(target.log(), damping).exp()
    return project_steps(mixed, total_time, min_step, max_step)


def weight_norm(norms: Tensor, rho: Tensor, total_time: float, min_step: float, max_step: float, *,
                damping: float = 0.5, floor: float = 1e-3) -> Tensor:
    """Steps inversely proportional to each branch's parameter norm (a data-free speed), guarded."""
    return equal_distance(norms, rho, total_time, min_step, max_step, damping=damping, floor=floor)


def _uniform_rule(measure, rho, total_time, min_step, max_step, **_):
    return project_steps(uniform(_f64(rho).numel(), total_time), total_time, min_step, max_step)


def _paper_rule(measure, rho, total_time, min_step, max_step, **_):
    return paper(measure, total_time)


def _keep(measure, rho, total_time, min_step, max_step, **_):
    return _f64(rho)


@dataclass(frozen=True)
class Rule:
    """What the plugin needs to know about one rule, instead of branching on its name.

    Attributes:
        name: how ``AdaptiveSteps(rule=...)`` and checkpoints refer to it.
        fn: ``fn(measure, rho, total_time, min_step, max_step, *, damping, floor) -> steps``.
        measures: what ``fn`` reads: ``"speed"`` (recorded in the forward pass), ``"weights"`` (the
            branches' parameter norms) or ``None``.
        guarded: called with the ``step_range`` bounds, ``damping`` and ``floor``, its measurements smoothed,
            and fast-started; unguarded rules (``paper``) get the group's own bounds and the raw measurement.
        adapts: the plugin calls ``fn`` at all (``False``: the steps stay, or the optimizer trains them).
        trains_steps: the inner optimizer trains the steps (they become parameters, projected after each step).

    A ``Rule`` is callable like its function, so ``RULES[name](...)`` computes the steps.
    """
    name: str
    fn: Callable[..., Tensor]
    measures: Optional[str] = "speed"
    guarded: bool = True
    adapts: bool = True
    trains_steps: bool = False

    def __call__(self, *args, **kwargs) -> Tensor:
        return self.fn(*args, **kwargs)

    @property
    def fast_starts(self) -> bool:
        """Whether ``fast_start`` applies: a guarded rule that measures something."""
        return self.adapts and self.guarded and self.measures is not None

    @classmethod
    def custom(cls, fn: Callable[..., Tensor]) -> "Rule":
        """A user's callable: a guarded rule on the recorded speeds."""
        return cls(getattr(fn, "__name__", "custom"), fn)


#: name -> the rule's record (callable: ``RULES[name](measure, rho, total_time, min_step, max_step, ...)``)
RULES: Dict[str, Rule] = {r.name: r for r in (
    Rule("uniform", _uniform_rule, measures=None),
    Rule("paper", _paper_rule, guarded=False),
    Rule("equal_distance", equal_distance),
    Rule("weight_norm", weight_norm, measures="weights"),
    Rule("learned", _keep, measures=None, adapts=False, trains_steps=True),
    Rule("fixed", _keep, measures=None, adapts=False),
)}

#: what each rule measures: "speed" (recorded in the forward pass), "weights", or nothing
MEASURES: Dict[str, Optional[str]] = {name: r.measures for name, r in RULES.items()}


def get_rule(rule) -> Rule:
    """The record of ``rule``: a name in ``RULES``, a ``Rule``, or a callable (a guarded rule on speeds);
    a ``ValueError`` lists the known names."""
    if isinstance(rule, Rule):
        return rule
    if callable(rule) and not isinstance(rule, str):
        return Rule.custom(rule)
    if rule not in RULES:
        raise ValueError(f"rule must be one of {sorted(RULES)} or a callable, got {rule!r}")
    return RULES[rule]


def is_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite."""
    return bool(torch.isfinite(_f64(t)).all())

