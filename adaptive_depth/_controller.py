"""``StepController``: when and how the steps of a model move (the engine behind ``AdaptiveSteps``).

It owns the schedule (``every``, ``warmup``, ``until``, ``fast_start``), the measurement (all-reduced speeds or
branch norms), the EMA of the log-measurements, the rule call with its bounds, the projection, the
projection after an inner step of learned steps, and the controller's part of a checkpoint. It knows the
rules only through their records (``rules.Rule``) and the steps only through ``StepSizes``' methods.
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import rules
from ._validate import CheckpointError, check_int
from .steps import StepSizes, all_reduce_stats


class StepController:
    """Adapt the steps of ``groups`` with ``rule``; see ``AdaptiveSteps`` for the settings."""

    def __init__(self, groups: Sequence[StepSizes], rule: rules.Rule, *, every: int, warmup: int,
                 until: Optional[int], smoothing: float, damping: float, floor: float,
                 step_range: Tuple[float, float], sync: bool, fast_start: int):
        self.rule = rule
        self.every, self.warmup, self.until = every, warmup, until
        self.smoothing, self.damping, self.floor = smoothing, damping, floor
        self.step_range, self.sync = step_range, sync
        self.fast_start = fast_start if rule.fast_starts else 0
        self.steps_done = 0
        self.projections = 0  # adaptations whose result had to be projected onto the group's bounds
        self._feasible: List[Tensor] = []
        self.bind(groups)

    def bind(self, groups: Sequence[StepSizes]) -> None:
        """Steer ``groups``; keep the EMA of a group seen before at the same depth, reset the rest."""
        old = {id(g): (ema, n, depth) for g, ema, n, depth in
               zip(getattr(self, "groups", []), getattr(self, "_ema", []), getattr(self, "_ema_count", []),
                   getattr(self, "_depths", []))}
        self.groups = list(groups)
        self._ema, self._ema_count, self._depths = [], [], []
        for g in self.groups:
            ema, n, depth = old.get(id(g), (None, 0, None))
            if depth != g.depth:
                ema, n = None, 0
                if id(g) in old:
                    g.reset_stats()
            self._ema.append(ema)
            self._ema_count.append(n)
            self._depths.append(g.depth)
        self.set_recording()

    # ------------------------------------------------------------------------------------ schedule
    def due(self, step: int) -> bool:
        """Whether the steps adapt after optimizer step ``step``."""
        if not self.rule.adapts or (self.until is not None and step > self.until):
            return False
        return step > self.warmup and (step % self.every == 0 or self.fast(step))

    def fast(self, step: int) -> bool:
        """Whether ``step`` is one of the fast-start adaptations (consecutive, undamped, unsmoothed)."""
        return self.warmup < step <= self.warmup + self.fast_start

    def set_recording(self) -> None:
        record = self.rule.measures == "speed" and self.due(self.steps_done + 1)
        for g in self.groups:
            g.recording = record

    def before_step(self) -> None:
        if self.rule.trains_steps:
            self._feasible = [g.rho.detach().clone() for g in self.groups]

    def after_step(self, optimizer_state: dict) -> None:
        """Count the step, put learned steps back on their feasible set, adapt when due."""
        self.steps_done += 1
        if self.rule.trains_steps:
            self._project_learned(optimizer_state)
        if self.due(self.steps_done):
            self.adapt()
        self.set_recording()

    @torch.no_grad()
    def _project_learned(self, optimizer_state: dict) -> None:
        for i, g in enumerate(self.groups):
            if rules.is_finite(g.rho) or i >= len(self._feasible):
                g.project_()
                continue
            warnings.warn(f"adaptive steps: the learned steps of group {i} became non-finite (a NaN/inf loss or "
                          f"gradient?); the previous feasible steps are kept and their optimizer state reset",
                          RuntimeWarning)
            g.rho.copy_(self._feasible[i])
            optimizer_state.pop(g.rho, None)

    # ---------------------------------------------------------------------------------- adaptation
    def bounds(self, g: StepSizes) -> Tuple[float, float]:
        """``[min_step, max_step]`` of ``g`` intersected with ``step_range`` (units of ``T/L``)."""
        unit = g.total_time / g.depth
        return max(g.min_step, self.step_range[0] * unit), min(g.max_step, self.step_range[1] * unit)

    @torch.no_grad()
    def adapt(self) -> None:
        """Move every group's steps toward the rule's target now."""
        if self.rule.measures == "speed" and self.sync:
            all_reduce_stats(self.groups)
        fast = self.fast(self.steps_done)
        for i, g in enumerate(self.groups):
            measure = self._measure(g)
            if measure is not None and not rules.is_finite(measure):
                warnings.warn(f"adaptive steps: non-finite or missing measurements in group {i} "
                              f"({measure.tolist()}); steps left unchanged this time (is the model in train "
                              f"mode, and does a forward pass run between optimizer steps?)", RuntimeWarning)
                continue
            if measure is not None and self.smoothing > 0 and self.rule.guarded and not fast:
                measure = self._smooth(i, measure)
            self._apply_rule(i, g, measure, damping=1.0 if fast else self.damping)
        for g in self.groups:
            g.reset_stats()

    def _measure(self, g: StepSizes) -> Optional[Tensor]:
        if self.rule.measures == "speed":
            return g.speed()
        if self.rule.measures == "weights":
            return g.branch_norms()
        return None

    def _smooth(self, i: int, measure: Tensor) -> Tensor:
        log = measure.clamp(min=1e-300).log()
        ema = log * (1 - self.smoothing) if self._ema[i] is None else \
            self._ema[i] * self.smoothing + log * (1 - self.smoothing)
        self._ema[i], self._ema_count[i] = ema, self._ema_count[i] + 1
        return (ema / (1 - self.smoothing ** self._ema_count[i])).exp()

    def _apply_rule(self, i: int, g: StepSizes, measure: Optional[Tensor], damping: float) -> None:
        rho = g.rho.detach().double().cpu()
        if self.rule.guarded:
            lo, hi = self.bounds(g)
            new = self.rule(measure, rho, g.total_time, lo, hi, damping=damping, floor=self.floor)
        else:
            new = self.rule(measure, rho, g.total_time, g.min_step, g.max_step)
        new = torch.as_tensor(new, dtype=torch.float64).reshape(-1)
        if new.numel() != g.depth or not rules.is_finite(new):
            warnings.warn(f"adaptive steps: rule {self.rule.name!r} returned invalid steps for group {i}; "
                          f"steps left unchanged", RuntimeWarning)
            return
        if float(new.min()) < g.min_step or float(new.max()) > g.max_step:
            self.projections += 1
            if self.projections == 1:  # once per plugin: the count keeps the rest visible
                warnings.warn(f"adaptive steps: rule {self.rule.name!r} left [min_step, max_step] = "
                              f"[{g.min_step:g}, {g.max_step:g}] in group {i} (steps in [{float(new.min()):g}, "
                              f"{float(new.max()):g}]); projected back onto the bounds (reported once; "
                              f"AdaptiveSteps.projections counts them)", RuntimeWarning)
            new = g.project(new)
        g.set_steps(new)

    # --------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        groups = [{"rho": g.rho.detach().cpu().clone(), "effective_depth": float(g.effective_depth),
                   "ema": None if ema is None else ema.clone(), "ema_count": n, "stats": g.stats()}
                  for g, ema, n in zip(self.groups, self._ema, self._ema_count)]
        return {"steps_done": self.steps_done, "rule": self.rule.name, "groups": groups,
                "projections": self.projections}

    def check_state_dict(self, state: dict) -> List[tuple]:
        """Validate the controller's part of a checkpoint, changing nothing; returns what ``load`` applies."""
        if not isinstance(state, dict) or "groups" not in state or "steps_done" not in state:
            raise CheckpointError("state_dict['adaptive_steps'] must come from AdaptiveSteps.state_dict()")
        if state.get("rule") != self.rule.name:
            raise CheckpointError(f"state_dict was saved with rule={state.get('rule')!r}, this plugin uses "
                                  f"rule={self.rule.name!r}")
        try:
            check_int(state["steps_done"], "state_dict steps_done", 0)
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        saved = state["groups"]
        if not isinstance(saved, (list, tuple)) or len(saved) != len(self.groups):
            n = len(saved) if isinstance(saved, (list, tuple)) else saved
            raise CheckpointError(f"state_dict has {n} step groups, the model has {len(self.groups)}")
        return [self._check_group(i, s, g) for i, (s, g) in enumerate(zip(saved, self.groups))]

    def _check_group(self, i: int, s: dict, g: StepSizes) -> tuple:
        where = f"state_dict group {i}"
        if not isinstance(s, dict) or any(k not in s for k in ("rho", "effective_depth", "stats")):
            raise CheckpointError(f"{where} must hold 'rho', 'effective_depth' and 'stats'")
        rho, lt, hi = g.check_state(s["rho"], s["effective_depth"], where)
        stats = g.check_stats(s["stats"], f"{where} stats")
        ema, n = s.get("ema"), s.get("ema_count", 0)
        if ema is not None:
            ema = torch.as_tensor(ema).detach().double().cpu()
            if tuple(ema.shape) != (g.depth,) or not rules.is_finite(ema):
                raise CheckpointError(f"{where} ema must be {g.depth} finite numbers, got {ema.tolist()}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise CheckpointError(f"{where} ema_count must be an integer >= 0, got {n!r}")
        return g, rho, lt, stats, ema, n

    def load(self, state: dict, checked: List[tuple]) -> None:
        """Apply a checkpoint validated by ``check_state_dict`` (cannot fail)."""
        for i, (g, rho, lt, stats, ema, n) in enumerate(checked):
            g.load_state(rho, lt)
            g.load_stats(stats)
            self._ema[i], self._ema_count[i] = ema, n
        self.steps_done = state["steps_done"]
        self.projections = int(state.get("projections", self.projections))
        self.set_recording()
