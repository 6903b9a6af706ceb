"""``EffectiveDepthScheduler``: raise the effective depth Lt over training, like an LR scheduler.

A pretrained ResNet wrapped at ``Lt = 0`` computes what it computed before; jumping to a large Lt shrinks
every block's shortcut by ``1 - rho Lt`` at once and destroys what it learned. Starting at 0 and raising Lt
over a few hundred or thousand steps lets the weights follow (they grow like Lt, see DESIGN.md).

    sched = EffectiveDepthScheduler(model, target=0.5, total_steps=1000)
    for x, y in loader:
        loss(model(x), y).backward(); opt.step(); opt.zero_grad(); sched.step()
"""
from __future__ import annotations

import math
from typing import List, Sequence, Union

from torch import nn

from ._validate import check_choice, check_int
from .ops import check_effective_depth
from .steps import StepSizes, step_groups

__all__ = ["EffectiveDepthScheduler", "SHAPES"]

SHAPES = ("linear", "cosine")


class EffectiveDepthScheduler:
    """Move the effective depth of every step group from ``start`` to ``target`` over ``total_steps`` calls.

        Lt(t) = start                                      t < delay
        Lt(t) = start + (target - start) * w((t - delay) / total_steps),   w(p) = p or (1 - cos(pi p)) / 2
        Lt(t) = target                                     t >= delay + total_steps

    Constructing it sets ``Lt(0)`` (as LR schedulers set the initial rate); each ``step()`` (call it after
    ``optimizer.step()``) advances by one. Under the euler scheme every group must stay below the wall
    ``rho * Lt < 1`` at ``target``: that is checked here, and each group's ``max_step`` is lowered below the
    target's wall so adaptive steps cannot grow into it during the ramp.

    Args:
        model: a module holding ``StepSizes`` groups (a wrapped ResNet, ``LeakyResNet``, ...), one
            ``StepSizes``, or a list of them.
        target: the final Lt >= 0, one value for every group or one per group.
        total_steps: number of ``step()`` calls the ramp takes (an integer >= 1).
        start: the initial Lt >= 0 (default 0: the pretrained network's function).
        delay: ``step()`` calls spent at ``start`` before the ramp begins (an integer >= 0).
        shape: ``"linear"`` or ``"cosine"`` (slow at both ends).
    """

    def __init__(self, model: Union[nn.Module, StepSizes, Sequence[StepSizes]], target: Union[float, Sequence[float]],
                 total_steps: int, *, start: float = 0.0, delay: int = 0, shape: str = "linear"):
        groups = _groups(model)
        targets = _per_group(target, len(groups), "target")
        start = check_effective_depth(start, "start")
        check_int(total_steps, "total_steps", 1)
        check_int(delay, "delay", 0)
        check_choice(shape, "shape", SHAPES)
        for i, (g, lt) in enumerate(zip(groups, targets)):
            g.check_effective_depth(lt, "target", f"group {i}")
            g.check_effective_depth(start, "start", f"group {i}")
        self.groups, self.targets, self.start = groups, targets, start
        self.total_steps, self.delay, self.shape = total_steps, delay, shape
        self.last_step = 0
        for i, (g, lt) in enumerate(zip(groups, targets)):
            g.reserve_effective_depth(lt, "target", f"group {i}")
        self._apply()

    def value(self, step: int, index: int = 0) -> float:
        """The Lt of group ``index`` after ``step`` calls of ``step()``."""
        t = step - self.delay
        if t <= 0:
            return self.start
        p = min(1.0, t / self.total_steps)
        w = p if self.shape == "linear" else 0.5 * (1.0 - math.cos(math.pi * p))
        return self.start + (self.targets[index] - self.start) * w

    def get_last_effective_depth(self) -> List[float]:
        """The Lt of every group now (as ``get_last_lr``)."""
        return [float(g.effective_depth) for g in self.groups]

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def _apply(self) -> None:
        for i, g in enumerate(self.groups):
            g.set_effective_depth(self.value(self.last_step, i))

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "targets": list(self.targets), "start": self.start,
                "total_steps": self.total_steps, "delay": self.delay, "shape": self.shape}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the position in the schedule (and its settings) and set the groups' Lt accordingly."""
        keys = ("last_step", "targets", "start", "total_steps", "delay", "shape")
        if not isinstance(state_dict, dict) or any(k not in state_dict for k in keys):
            raise ValueError(f"state_dict must come from EffectiveDepthScheduler.state_dict() (keys {keys})")
        targets = _per_group(state_dict["targets"], len(self.groups), "state_dict['targets']")
        start = check_effective_depth(state_dict["start"], "state_dict['start']")
        for i, (g, lt) in enumerate(zip(self.groups, targets)):
            g.check_effective_depth(lt, "state_dict['targets']", f"group {i}")
        for name, low in (("last_step", 0), ("total_steps", 1), ("delay", 0)):
            check_int(state_dict[name], f"state_dict[{name!r}]", low)
        if state_dict["shape"] not in SHAPES:
            raise ValueError(f"state_dict['shape'] must be one of {SHAPES}, got {state_dict['shape']!r}")
        self.targets, self.start = targets, start
        self.total_steps, self.delay, self.shape = state_dict["total_steps"], state_dict["delay"], state_dict["shape"]
        self.last_step = state_dict["last_step"]
        for i, (g, lt) in enumerate(zip(self.groups, targets)):
            g.reserve_effective_depth(lt, "state_dict['targets']", f"group {i}")
        self._apply()

    def __repr__(self) -> str:
        return (f"EffectiveDepthScheduler(start={self.start:g}, targets={self.targets}, total_steps="
                f"{self.total_steps}, delay={self.delay}, shape={self.shape!r}, last_step={self.last_step})")


def _groups(model) -> List[StepSizes]:
    if isinstance(model, StepSizes):
        return [model]
    if isinstance(model, nn.Module):
        groups = step_groups(model)
    elif isinstance(model, Sequence) and all(isinstance(g, StepSizes) for g in model):
        groups = list(model)
    else:
        raise TypeError(f"model must be an nn.Module holding StepSizes groups, a StepSizes or a list of them, "
                        f"got {type(model).__name__}")
    if not groups:
        raise ValueError("model has no step-size groups: wrap it (adaptive_depth.wrap.wrap) or build it with "
                         "LeakyResNet / LeakyMLP")
    return groups


def _per_group(value, n: int, name: str) -> List[float]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} must be one number or {n} (one per group), got {len(value)}")
        return [check_effective_depth(v, f"{name}[{i}]") for i, v in enumerate(value)]
    return [check_effective_depth(value, name)] * n
