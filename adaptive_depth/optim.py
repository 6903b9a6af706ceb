"""``AdaptiveSteps``: an optimizer plugin that adapts a model's step sizes while any optimizer trains it.

    opt = AdaptiveSteps(torch.optim.AdamW(model.parameters(), lr=1e-3), model, rule="equal_distance")
    loss.backward(); opt.step(); opt.zero_grad()

It is a real ``torch.optim.Optimizer``: ``param_groups`` and ``state`` are the wrapped optimizer's own
(live, also after ``load_state_dict``), so LR schedulers, ``GradScaler``, hooks and Lightning see one
optimizer. Every ``every`` steps it reads the per-layer speeds the forward pass recorded (all-reduced
under ``torch.distributed``), smooths them, and moves the steps toward the rule's target; the first
``fast_start`` adaptations run on consecutive steps and go all the way (see the class docstring).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import rules
from .steps import StepSizes, step_groups

__all__ = ["AdaptiveSteps"]

Rule = Union[str, Callable[..., Tensor]]


class AdaptiveSteps(Optimizer):
    """Wrap ``optimizer`` and adapt the step sizes of every ``StepSizes`` group inside ``model``.

    Args:
        optimizer: any ``torch.optim`` or ``torch_optimizer`` optimizer (Lookahead included).
        model: the module holding the leaky blocks (``LeakyResNet``, ``LeakyMLP``, a ``wrap``-ed ResNet).
        rule: ``"equal_distance"`` (default), ``"paper"`` (exactly the paper's assignment), ``"weight_norm"``,
            ``"uniform"``, ``"learned"`` (steps trained by ``optimizer`` and projected after each step), or a
            callable ``rule(speed, rho, total_time, min_step, max_step, *, damping, floor) -> steps``.
        every: adapt after every ``every``-th optimizer step (the forward pass before it records speeds).
        warmup: no adaptation during the first ``warmup`` steps; ``until``: none after step ``until``.
        fast_start: the first ``fast_start`` adaptations (guarded rules) happen on consecutive steps right
            after warm-up, each moving all the way to the target (no damping, no smoothing): the profile
            the network calls for at initialisation is in place within a few steps instead of after
            hundreds. Then every ``every`` steps, damped and smoothed. ``rule="paper"`` ignores it.
        smoothing: EMA factor over adaptations for the measured log-speeds (0 = use the last batch only).
        damping: fraction of the way (in log space) the steps move toward the target per adaptation.
        floor: speeds below ``floor * max(speed)`` count as that (a layer that barely moves cannot take
            the whole horizon).
        step_range: ``(low, high)`` in units of the uniform step ``T/L``: the guarded rules keep every step
            in ``[low T/L, high T/L]``, intersected with the group's own ``[min_step, max_step]``.
        weight_decay: ``lambda`` of the paper's parameter-norm cost ``lambda/(2 Lt) sum_l rho_l ||W_l||^2``
            (``lambda/2`` at Lt = 0): its gradient ``(lambda/Lt) rho_l W_l`` is added to each branch's
            gradients before the inner step, with the current steps.
        step_lr: learning rate of the steps' own parameter group under ``rule="learned"`` (they are moved out of
            any group they were in; no weight decay). Default: 0.1 x the first group's lr (teacher 30-3-30,
            Lt = 3, seed 0, Adam: at the weights' lr the steps collapse onto the lower bound in some blocks;
            at 0.1x they do not, and the test loss is as good or better).
        sync: all-reduce the statistics across ``torch.distributed`` ranks (every rank gets the same steps).

    Defaults, and why (``benchmarks/results/bench_convergence.md``: the paper's teacher 30-3-30, width 100,
    L = 20, exponential scheme, 1000 full-batch Adam steps, tuned on data seed 0, reported on seeds 1-5):

    - ``rule="equal_distance"``: the paper's target ``rho_l ∝ 1/c_l`` with guards (floor, damping,
      ``step_range``, exact projection), so it stays finite and in bounds when a speed is ~0 or noisy.
    - ``fast_start=5``: the profile the rule settles on is set by the network at initialisation (with the
      identity init the first blocks remove the negative part of the input at rate Lt, move fastest and get
      the smallest steps; runs that stop adapting at step 200 end with the same profile), but reaching it
      with damping 0.5 every 10 steps takes hundreds of steps. Five undamped adaptations on the first
      steps put it in place at once: at Lt = 30 the test loss went from -16% to -24% against uniform
      (seed 0); on held-out seeds the median paired ratio is 0.78 at Lt = 30 and 0.94 at Lt = 10, and
      0.99-1.01 at Lt = 0, 1, 3 (mnist1d: 0.99-1.01 at every Lt). With 3000 steps the gap widens:
      0.58 [0.53, 0.65] at Lt = 30 and 0.87 [0.71, 0.90] at Lt = 10
      (``benchmarks/results/bench_long_budget.md``).
    - ``every=10``, ``damping=0.5``, ``smoothing=0.9``: after the fast start the profile only drifts;
      adapting every 10 steps keeps the overhead near 1% of a step (``benchmarks/bench_steps.py``), and
      with the profile already set, adapting every step gave no gain (Lt = 30, seed 0: 0.0795 vs 0.0785).
    - ``floor=1e-3``, ``step_range=(0.1, 10)``: guards; a wider range (0.02, 50) changed nothing measurable.
    """

    def __init__(self, optimizer: Optimizer, model: nn.Module, *, rule: Rule = "equal_distance",
                 every: int = 10, warmup: int = 0, until: Optional[int] = None, smoothing: float = 0.9,
                 damping: float = 0.5, floor: float = 1e-3, step_range: Tuple[float, float] = (0.1, 10.0),
                 weight_decay: float = 0.0, step_lr: Optional[float] = None, sync: bool = True,
                 fast_start: int = 5):
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
        if callable(rule) and not isinstance(rule, str):
            rule_fn, measure, rule_name = rule, "speed", getattr(rule, "__name__", "custom")
        else:
            rule_fn, measure, rule_name = rules.get_rule(rule), rules.MEASURES.get(rule), rule
        _check_int(every, "every", 1)
        _check_int(warmup, "warmup", 0)
        _check_int(fast_start, "fast_start", 0)
        if until is not None:
            _check_int(until, "until", 0)
        _check_range(smoothing, "smoothing", 0.0, 1.0, right_open=True)
        _check_range(damping, "damping", 0.0, 1.0, left_open=True)
        _check_range(floor, "floor", 0.0, 1.0, left_open=True, right_open=True)
        step_range = _check_step_range(step_range)
        _check_range(weight_decay, "weight_decay", 0.0, math.inf)
        if step_lr is not None:
            _check_range(step_lr, "step_lr", 0.0, math.inf, left_open=True)

        defaults = dict(rule=rule_name, every=every, warmup=warmup, until=until, smoothing=smoothing,
                        damping=damping, floor=floor, step_range=step_range, weight_decay=weight_decay,
                        fast_start=fast_start)
        self.__dict__["_delegating"] = False
        self.optimizer = optimizer
        self.model_groups: List[StepSizes] = groups
        self.rule, self._rule_fn, self._measure = rule_name, rule_fn, measure
        self.every, self.warmup, self.until = every, warmup, until
        self.smoothing, self.damping, self.floor = smoothing, damping, floor
        self.step_range, self.weight_decay, self.sync = step_range, weight_decay, sync
        self.fast_start = fast_start if measure is not None and rule_name != "paper" else 0
        super().__init__([{"params": g["params"]} for g in optimizer.param_groups], defaults)
        self.__dict__["_delegating"] = True

        self._steps_done = 0
        self.projections = 0  # adaptations whose result had to be projected onto the group's bounds
        self._ema: List[Optional[Tensor]] = [None] * len(groups)
        self._ema_count = [0] * len(groups)
        self._decay_params = [[list(g.branch_parameters(l)) for l in range(g.depth)] for g in groups]
        self._decay_cache: Tuple = ((), [])
        if rule_name == "learned":
            self._make_learnable(step_lr)
        self._set_recording()

    # ------------------------------------------------------------------ the optimizer interface
    @property
    def param_groups(self):
        if self.__dict__.get("_delegating"):
            return self.optimizer.param_groups
        return self.__dict__.setdefault("_own_groups", [])

    @param_groups.setter
    def param_groups(self, value):
        if self.__dict__.get("_delegating"):
            self.optimizer.param_groups = value
        else:
            self.__dict__["_own_groups"] = value

    @property
    def state(self):
        if self.__dict__.get("_delegating"):
            return self.optimizer.state
        return self.__dict__.setdefault("_own_state", {})

    @state.setter
    def state(self, value):
        if self.__dict__.get("_delegating"):
            self.optimizer.state = value
        else:
            self.__dict__["_own_state"] = value

    def add_param_group(self, param_group: dict) -> None:
        if self.__dict__.get("_delegating"):
            self.optimizer.add_param_group(param_group)
        else:
            super().add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        """The inner optimizer's step (with the rho-scaled decay added to the gradients), then, when due,
        an adaptation of the step sizes."""
        if closure is None:
            self._add_decay()
            loss = self.optimizer.step()
        else:
            def closure_with_decay():
                with torch.enable_grad():
                    value = closure()
                self._add_decay()
                return value
            loss = self.optimizer.step(closure_with_decay)
        self._steps_done += 1
        if self.rule == "learned":
            for g in self.model_groups:
                g.project_()
        if self._due(self._steps_done):
            self.adapt()
        self._set_recording()
        return loss

    @property
    def steps_done(self) -> int:
        return self._steps_done

    # -------------------------------------------------------------------------------- adaptation
    def _due(self, step: int) -> bool:
        if self._measure is None and self.rule != "uniform":
            return False
        if self.until is not None and step > self.until:
            return False
        return step > self.warmup and (step % self.every == 0 or self._fast(step))

    def _fast(self, step: int) -> bool:
        """Whether ``step`` is one of the fast-start adaptations (consecutive, undamped, unsmoothed)."""
        return self.warmup < step <= self.warmup + self.fast_start

    def _set_recording(self) -> None:
        record = self._measure == "speed" and self._due(self._steps_done + 1)
        for g in self.model_groups:
            g.recording = record

    def _bounds(self, g: StepSizes) -> Tuple[float, float]:
        unit = g.total_time / g.depth
        return max(g.min_step, self.step_range[0] * unit), min(g.max_step, self.step_range[1] * unit)

    @torch.no_grad()
    def adapt(self) -> None:
        """Move every group's steps toward the rule's target now (``step`` calls this when due)."""
        if self._measure == "speed":
            self._all_reduce_stats()
        for i, g in enumerate(self.model_groups):
            measure = self._measurement(g)
            if measure is not None and not rules.is_finite(measure):
                warnings.warn(f"adaptive steps: non-finite or missing measurements in group {i} "
                              f"({measure.tolist()}); steps left unchanged this time (is the model in train "
                              f"mode, and does a forward pass run between optimizer steps?)", RuntimeWarning)
                continue
            fast = self._fast(self._steps_done)
            if measure is not None and self.smoothing > 0 and self.rule != "paper" and not fast:
                measure = self._smooth(i, measure)
            self._apply_rule(i, g, measure, damping=1.0 if fast else self.damping)
        for g in self.model_groups:
            g.reset_stats()

    def _measurement(self, g: StepSizes) -> Optional[Tensor]:
        if self._measure == "speed":
            return g.speed()
        if self._measure == "weights":
            norms = [torch.sqrt(sum((p.detach().double() ** 2).sum() for p in ps)) if ps else
                     torch.tensor(float("nan"), dtype=torch.float64) for ps in
                     [list(g.branch_parameters(l)) for l in range(g.depth)]]
            return torch.stack(norms).cpu()
        return None

    def _smooth(self, i: int, measure: Tensor) -> Tensor:
        log = measure.clamp(min=1e-300).log()
        ema = log * (1 - self.smoothing) if self._ema[i] is None else \
            self._ema[i] * self.smoothing + log * (1 - self.smoothing)
        self._ema[i], self._ema_count[i] = ema, self._ema_count[i] + 1
        return (ema / (1 - self.smoothing ** self._ema_count[i])).exp()

    def _apply_rule(self, i: int, g: StepSizes, measure: Optional[Tensor],
                    damping: Optional[float] = None) -> None:
        rho = g.rho.detach().double().cpu()
        damping = self.damping if damping is None else damping
        if self.rule == "paper":
            new = self._rule_fn(measure, rho, g.total_time, g.min_step, g.max_step)
        else:
            lo, hi = self._bounds(g)
            new = self._rule_fn(measure, rho, g.total_time, lo, hi, damping=damping, floor=self.floor)
        new = torch.as_tensor(new, dtype=torch.float64).reshape(-1)
        if new.numel() != g.depth or not rules.is_finite(new):
            warnings.warn(f"adaptive steps: rule {self.rule!r} returned invalid steps for group {i}; "
                          f"steps left unchanged", RuntimeWarning)
            return
        if float(new.min()) < g.min_step or float(new.max()) > g.max_step:
            self.projections += 1
            if self.projections == 1:  # once per plugin: the count keeps the rest visible
                warnings.warn(f"adaptive steps: rule {self.rule!r} left [min_step, max_step] = "
                              f"[{g.min_step:g}, {g.max_step:g}] in group {i} (steps in [{float(new.min()):g}, "
                              f"{float(new.max()):g}]); projected back onto the bounds (reported once; "
                              f"AdaptiveSteps.projections counts them)", RuntimeWarning)
            new = rules.project_steps(new, g.total_time, g.min_step, g.max_step)
        g.set_steps(new)

    def _all_reduce_stats(self) -> None:
        if not (self.sync and torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        packed = torch.cat([torch.stack([g.velocity_sq, g.input_sq, g.count]).reshape(-1)
                            for g in self.model_groups])
        torch.distributed.all_reduce(packed)
        offset = 0
        for g in self.model_groups:
            n = 3 * g.depth
            v, s, c = packed[offset:offset + n].view(3, g.depth)
            g.velocity_sq.copy_(v), g.input_sq.copy_(s), g.count.copy_(c)
            offset += n

    # ------------------------------------------------------------------------- rho-scaled decay
    def _decay_coefficients(self) -> List[List[float]]:
        key = tuple((g.rho._version, g.effective_depth._version) for g in self.model_groups)
        if key != self._decay_cache[0]:
            coefs = []
            for g in self.model_groups:
                lt = float(g.effective_depth)
                scale = self.weight_decay / lt if lt > 0 else self.weight_decay
                # the stored steps: feasible after every adaptation and, under rule="learned", after the
                # projection that follows each inner step, so no second projection per step is needed
                coefs.append([scale * r for r in g.rho.detach().double().cpu().tolist()])
            self._decay_cache = (key, coefs)
        return self._decay_cache[1]

    @torch.no_grad()
    def _add_decay(self) -> None:
        if self.weight_decay == 0:
            return
        for layers, coefs in zip(self._decay_params, self._decay_coefficients()):
            for params, coef in zip(layers, coefs):
                with_grad = [p for p in params if p.grad is not None]
                if with_grad:
                    torch._foreach_add_([p.grad for p in with_grad], with_grad, alpha=coef)

    def penalty(self) -> Tensor:
        """The parameter-norm cost ``lambda/(2 Lt) sum_l rho_l ||W_l||^2`` the decay is the gradient of."""
        total = None
        for g, layers in zip(self.model_groups, self._decay_params):
            lt = float(g.effective_depth)
            scale = self.weight_decay / (2 * lt) if lt > 0 else self.weight_decay / 2
            rho = g.current().detach()
            for l, params in enumerate(layers):
                for p in params:
                    term = scale * rho[l].to(p.dtype) * p.pow(2).sum()
                    total = term if total is None else total + term
        return total if total is not None else torch.zeros(())

    # ------------------------------------------------------------------------------- learned steps
    def _make_learnable(self, step_lr: Optional[float]) -> None:
        """Steps become trainable, in a parameter group of their own (``lr=step_lr``, no weight decay), taken
        out of any group they sat in (``model.parameters()`` includes them)."""
        rhos = [g.rho for g in self.model_groups]
        ours = {id(r) for r in rhos}
        if step_lr is None:
            step_lr = 0.1 * self.optimizer.param_groups[0]["lr"]
        for group in self.optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ours]
        for r in rhos:
            r.requires_grad_(True)
        self.optimizer.add_param_group({"params": rhos, "weight_decay": 0.0, "lr": step_lr})

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        groups = []
        for i, g in enumerate(self.model_groups):
            groups.append({
                "rho": g.rho.detach().cpu().clone(),
                "effective_depth": float(g.effective_depth),
                "ema": None if self._ema[i] is None else self._ema[i].clone(),
                "ema_count": self._ema_count[i],
                "stats": torch.stack([g.velocity_sq, g.input_sq, g.count]).detach().cpu().clone(),
            })
        return {"optimizer": self.optimizer.state_dict(),
                "adaptive_steps": {"steps_done": self._steps_done, "rule": self.rule, "groups": groups}}

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or "optimizer" not in state_dict or \
                "adaptive_steps" not in state_dict:
            raise ValueError("state_dict must come from AdaptiveSteps.state_dict() (keys 'optimizer' and "
                             "'adaptive_steps')")
        ours = state_dict["adaptive_steps"]
        if ours.get("rule") != self.rule:
            raise ValueError(f"state_dict was saved with rule={ours.get('rule')!r}, this plugin uses "
                             f"rule={self.rule!r}")
        saved = ours["groups"]
        if len(saved) != len(self.model_groups):
            raise ValueError(f"state_dict has {len(saved)} step groups, the model has {len(self.model_groups)}")
        for i, (s, g) in enumerate(zip(saved, self.model_groups)):
            if s["rho"].numel() != g.depth:
                raise ValueError(f"state_dict group {i} has {s['rho'].numel()} steps, the model has {g.depth}")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        with torch.no_grad():
            for i, (s, g) in enumerate(zip(saved, self.model_groups)):
                g.rho.copy_(s["rho"].to(g.rho))
                g.effective_depth.fill_(s["effective_depth"])
                v, sq, c = s["stats"].to(g.velocity_sq)
                g.velocity_sq.copy_(v), g.input_sq.copy_(sq), g.count.copy_(c)
                self._ema[i] = None if s["ema"] is None else s["ema"].clone()
                self._ema_count[i] = int(s["ema_count"])
        self._steps_done = int(ours["steps_done"])
        self._decay_cache = ((), [])
        self._set_recording()

    def __repr__(self) -> str:
        return (f"AdaptiveSteps(rule={self.rule!r}, every={self.every}, warmup={self.warmup}, "
                f"fast_start={self.fast_start}, "
                f"groups={[g.depth for g in self.model_groups]}, optimizer={self.optimizer!r})")


def _check_int(value, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_range(value, name: str, low: float, high: float, *, left_open=False, right_open=False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    ok_low = value > low if left_open else value >= low
    ok_high = value < high if right_open else value <= high
    if not (ok_low and ok_high):
        interval = f"{'(' if left_open else '['}{low:g}, {high:g}{')' if right_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")


def _check_step_range(step_range: Sequence[float]) -> Tuple[float, float]:
    try:
        low, high = (float(v) for v in step_range)
    except (TypeError, ValueError):
        raise ValueError(f"step_range must be a pair (low, high), got {step_range!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= 1 <= high):
        raise ValueError(f"step_range must satisfy 0 < low <= 1 <= high (units of the uniform step T/L), "
                         f"got {step_range!r}")
    return low, high

