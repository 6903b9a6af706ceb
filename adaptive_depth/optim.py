"""``AdaptiveSteps``: an optimizer plugin that adapts a model's step sizes while any optimizer trains it.

    opt = AdaptiveSteps(torch.optim.AdamW(model.parameters(), lr=1e-3), model, rule="equal_distance")
    loss.backward(); opt.step(); opt.zero_grad()

A thin ``torch.optim.Optimizer`` around the optimizer that trains the weights: ``param_groups``, ``state``
and ``defaults`` are the wrapped optimizer's own objects, so LR schedulers, ``GradScaler``, hooks, Lightning
and accelerate see one optimizer. The steps move under a ``StepController`` (``_controller.py``); the
rho-scaled decay is a ``steps.ParameterNormCost``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import rules
from ._controller import StepController
from ._validate import CheckpointError, check_int, check_range, check_step_range
from .steps import ParameterNormCost, StepSizes, step_groups

__all__ = ["AdaptiveSteps"]

Rule = Union[str, rules.Rule, Callable[..., Tensor]]
_SETTINGS = ("every", "warmup", "until", "smoothing", "damping", "floor", "step_range", "sync", "fast_start")


class AdaptiveSteps(Optimizer):
    """Wrap ``optimizer`` and adapt the step sizes of every ``StepSizes`` group inside ``model``.

    Args:
        optimizer: any ``torch.optim`` or ``torch_optimizer`` optimizer (Lookahead included); reached as
            ``base_optimizer``.
        model: the module holding the leaky blocks (``LeakyResNet``, ``LeakyMLP``, a ``wrap``-ed ResNet).
        rule: a name in ``rules.RULES`` (``"equal_distance"`` default, ``"paper"``, ``"weight_norm"``,
            ``"uniform"``, ``"fixed"``, ``"learned"``: steps trained by ``optimizer`` and projected after each
            step), a ``rules.Rule``, or a callable ``rule(speed, rho, total_time, min_step, max_step, *,
            damping, floor) -> steps``.
        every: adapt after every ``every``-th optimizer step (the forward pass before it records speeds).
        warmup: no adaptation during the first ``warmup`` steps; ``until``: none after step ``until``.
        fast_start: the first ``fast_start`` adaptations of a guarded measuring rule happen on consecutive steps
            right after warm-up, each moving all the way to the target (no damping, no smoothing).
        smoothing: EMA factor over adaptations for the measured log-speeds (0 = use the last batch only).
        damping: fraction of the way (in log space) the steps move toward the target per adaptation.
        floor: speeds below ``floor * max(speed)`` count as that.
        step_range: ``(low, high)`` in units of the uniform step ``T/L``: guarded rules keep every step in
            ``[low T/L, high T/L]``, intersected with the group's own ``[min_step, max_step]``.
        weight_decay: ``lambda`` of the paper's cost ``lambda/(2 Lt) sum_l rho_l ||W_l||^2`` (``lambda/2`` at
            Lt = 0): its gradient is added to each branch's gradients before the inner step.
        step_lr: learning rate of the steps' own parameter group under ``rule="learned"`` (default 0.1 x the
            first group's lr; no weight decay).
        sync: all-reduce the statistics across ``torch.distributed`` ranks.

    Why these defaults, with the measurements behind them: ``benchmarks/results/bench_README.md``.
    """

    def __init__(self, optimizer: Optimizer, model: nn.Module, *, rule: Rule = "equal_distance",
                 every: int = 10, warmup: int = 0, until: Optional[int] = None, smoothing: float = 0.9,
                 damping: float = 0.5, floor: float = 1e-3, step_range: Tuple[float, float] = (0.1, 10.0),
                 weight_decay: float = 0.0, step_lr: Optional[float] = None, sync: bool = True,
                 fast_start: int = 5):
        groups = _check_arguments(optimizer, model)
        record = rules.get_rule(rule)
        settings = dict(every=check_int(every, "every", 1), warmup=check_int(warmup, "warmup", 0),
                        until=None if until is None else check_int(until, "until", 0),
                        smoothing=check_range(smoothing, "smoothing", 0.0, 1.0, right_open=True),
                        damping=check_range(damping, "damping", 0.0, 1.0, left_open=True),
                        floor=check_range(floor, "floor", 0.0, 1.0, left_open=True, right_open=True),
                        step_range=check_step_range(step_range), sync=bool(sync),
                        fast_start=check_int(fast_start, "fast_start", 0))
        check_range(weight_decay, "weight_decay", 0.0, math.inf)
        if step_lr is not None:
            check_range(step_lr, "step_lr", 0.0, math.inf, left_open=True)
        super().__init__([{"params": g["params"]} for g in optimizer.param_groups], {})
        self.base_optimizer, self.model, self.weight_decay = optimizer, model, float(weight_decay)
        self._alias()
        self.controller = StepController(groups, record, **settings)
        if record.trains_steps:
            self._train_steps(step_lr)
        self.decay = ParameterNormCost(groups, self.weight_decay)

    def _alias(self) -> None:
        """Share the base optimizer's groups, state and defaults (re-done when it replaces them on load)."""
        base = self.base_optimizer
        self.param_groups, self.state, self.defaults = base.param_groups, base.state, base.defaults

    # ------------------------------------------------------------------ the optimizer interface
    def add_param_group(self, param_group: dict) -> None:
        if "base_optimizer" in self.__dict__:
            self.base_optimizer.add_param_group(param_group)
        else:
            super().add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        """The inner optimizer's step (with the rho-scaled decay added to the gradients), then, when due,
        an adaptation of the step sizes."""
        self.controller.before_step()
        if closure is None:
            self.decay.add_to_grads()
            loss = self.base_optimizer.step()
        else:
            def closure_with_decay():
                with torch.enable_grad():
                    value = closure()
                self.decay.add_to_grads()
                return value
            loss = self.base_optimizer.step(closure_with_decay)
        self.controller.after_step(self.base_optimizer.state)
        return loss

    def adapt(self) -> None:
        """Move every group's steps toward the rule's target now (``step`` calls this when due)."""
        self.controller.adapt()

    def penalty(self) -> Tensor:
        """The parameter-norm cost ``lambda/(2 Lt) sum_l rho_l ||W_l||^2`` the decay is the gradient of."""
        return self.decay()

    def _add_decay(self) -> None:
        self.decay.add_to_grads()

    # ------------------------------------------------------------------------------ the step groups
    def rebind(self) -> None:
        """Find the model's step groups again after blocks were inserted or removed. The base optimizer and
        its state stay; branch parameters it does not hold yet join a new group with the first group's
        settings; groups whose depth changed restart their statistics and EMA, the others keep them."""
        groups = step_groups(self.model)
        if not groups:
            raise ValueError("model has no step sizes left: rebind() needs at least one StepSizes group")
        held = {id(p) for g in self.param_groups for p in g["params"]}
        new = {id(p): p for g in groups for l in range(g.depth) for p in g.branch_parameters(l)
               if p.requires_grad and id(p) not in held}
        if new:
            settings = {k: v for k, v in self.param_groups[0].items() if k != "params"}
            self.base_optimizer.add_param_group({**settings, "params": list(new.values())})
        self.controller.bind(groups)
        if self.controller.rule.trains_steps:
            self._train_steps(None)
        self.decay = ParameterNormCost(groups, self.weight_decay)

    def _train_steps(self, step_lr: Optional[float]) -> None:
        """Steps become parameters in a group of their own (``lr=step_lr``, no weight decay), taken out of
        any group they sat in; on ``rebind`` that group takes the new steps."""
        index = self.__dict__.get("_steps_group")
        lr = step_lr if step_lr is not None or index is not None else 0.1 * self.param_groups[0]["lr"]
        rhos = [g.make_learnable_() for g in self.controller.groups]
        ours = {id(r) for r in rhos}
        for i, group in enumerate(self.param_groups):
            if i != index:
                group["params"] = [p for p in group["params"] if id(p) not in ours]
        if index is None:
            self._steps_group = len(self.param_groups)
            self.base_optimizer.add_param_group({"params": rhos, "weight_decay": 0.0, "lr": lr})
        else:
            for p in self.param_groups[index]["params"]:
                if id(p) not in ours:
                    self.state.pop(p, None)
            self.param_groups[index]["params"] = rhos

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"optimizer": self.base_optimizer.state_dict(), "adaptive_steps": self.controller.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a checkpoint of ``state_dict()``: everything is validated first, and a bad checkpoint raises
        ``CheckpointError`` (a ``ValueError``) with the base optimizer, the steps and the statistics unchanged."""
        if not isinstance(state_dict, dict) or "optimizer" not in state_dict or \
                "adaptive_steps" not in state_dict:
            raise CheckpointError("state_dict must come from AdaptiveSteps.state_dict() (keys 'optimizer' and "
                                  "'adaptive_steps')")
        checked = self.controller.check_state_dict(state_dict["adaptive_steps"])
        inner = _without_frozen_steps(state_dict["optimizer"], self.param_groups, self.model)
        self.base_optimizer.load_state_dict(inner)  # checks its groups before changing anything
        self._alias()
        self.controller.load(state_dict["adaptive_steps"], checked)

    def __getstate__(self) -> dict:
        # everything (Optimizer keeps only groups and state: a copy could not step), less an LR scheduler's
        # patch of ``step`` on the instance, which calls the original optimizer (torch drops it too)
        return {k: v for k, v in self.__dict__.items() if k != "step"}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._alias()

    def __repr__(self) -> str:
        c = self.controller
        return (f"AdaptiveSteps(rule={c.rule.name!r}, every={c.every}, warmup={c.warmup}, "
                f"fast_start={c.fast_start}, groups={[g.depth for g in c.groups]}, "
                f"optimizer={self.base_optimizer!r})")

    rule = property(lambda self: self.controller.rule.name, doc="The rule's name.")
    steps_done = property(lambda self: self.controller.steps_done, doc="Optimizer steps taken so far.")
    projections = property(lambda self: self.controller.projections,
                           doc="Adaptations whose result had to be projected onto the bounds.")
    model_groups = property(lambda self: self.controller.groups, doc="The ``StepSizes`` groups steered.")

    @property
    def optimizer(self):
        raise AttributeError("AdaptiveSteps.optimizer is now AdaptiveSteps.base_optimizer: frameworks that find "
                             "an .optimizer (Lightning's LearningRateMonitor) take the plugin for a wrapper of "
                             "it and log the learning rate twice")

for _name in _SETTINGS:  # the controller's settings, read through the plugin (opt.every, opt.damping, ...)
    setattr(AdaptiveSteps, _name, property(lambda self, _n=_name: getattr(self.controller, _n)))


def _check_arguments(optimizer, model) -> list:
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, AdaptiveSteps):
        raise TypeError("optimizer is already an AdaptiveSteps; wrap the inner optimizer once")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    groups = step_groups(model)
    if not groups:
        raise ValueError("model has no step sizes: build it with LeakyResNet / LeakyMLP or "
                         "adaptive_depth.wrap(), or pass the module that contains them")
    return groups


def _without_frozen_steps(saved: dict, groups: list, model: nn.Module) -> dict:
    """An optimizer checkpoint from when fixed steps were frozen parameters (before they became buffers) lists
    each group's ``rho`` among the parameters of a group built from ``model.parameters()``: drop those
    entries (they never had state) so that it fits today's groups. Any other checkpoint is returned as is."""
    saved_groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(saved_groups, list) or len(saved_groups) != len(groups):
        return saved
    rhos = {id(g.rho): g.rho for g in step_groups(model) if not isinstance(g.rho, nn.Parameter)}
    legacy = {}  # model.parameters() as it was: each rho where its StepSizes sits in module order
    for m in model.modules():
        for p in list(m._parameters.values()) + ([m.rho] if isinstance(m, StepSizes) else []):
            if p is not None:
                legacy.setdefault(id(p), p)
    fitted, dropped = [], set()
    for old, now in zip(saved_groups, groups):
        ids = {id(p) for p in now["params"]}
        layout = [p for k, p in legacy.items() if k in ids or k in rhos]
        if len(old["params"]) == len(now["params"]):
            fitted.append(old)
            continue
        if len(layout) != len(old["params"]) or [p for p in layout if id(p) in ids] != list(now["params"]):
            return saved  # not that layout: let the optimizer report the mismatch
        dropped.update(i for i, p in zip(old["params"], layout) if id(p) in rhos)
        fitted.append({**old, "params": [i for i, p in zip(old["params"], layout) if id(p) not in rhos]})
    if not dropped:
        return saved
    return {**saved, "state": {k: v for k, v in saved["state"].items() if k not in dropped}, "param_groups": fitted}
