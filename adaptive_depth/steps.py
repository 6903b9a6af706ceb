"""The step-size vector of one group of leaky residual blocks, and the cost the steps scale.

``StepSizes`` holds ``rho_1..rho_L`` (sum = ``total_time``, every step in ``[min_step, max_step]``, and
``max_step * Lt < 1`` under the euler scheme), the group's effective depth ``Lt``, and the per-layer
statistics the adaptive rules read (``||f - Lt x||^2`` and ``||x||^2``, summed over recorded batches).
Blocks refer to it by index; it is registered once in the model, so it appears once in ``state_dict``.
It owns its constraints (``below_wall`` is the euler wall, written once), its statistics (``stats``,
``load_stats``, ``all_reduce_``) and its coefficients, and validates every checkpoint before loading it.

The steps are a *buffer* unless they are learned (``learnable=True``, ``steps="learned"``,
``AdaptiveSteps(rule="learned")``), then an ``nn.Parameter``: the optimizer and the framework checks that
expect every parameter to receive a gradient (timm's model tests) see only what autograd trains. The
``state_dict`` key (``...rho``) is the same either way, so checkpoints load in both directions.

``ParameterNormCost`` is the paper's ``lambda/(2 Lt) sum_l rho_l ||W_l||^2`` with its gradient, the one place
the ``lambda/Lt`` normalisation (``over_lt``) is applied to it.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import rules
from ._validate import CheckpointError
from .ops import check_effective_depth, check_scheme, step_coefficients, _as_float

__all__ = ["StepSizes", "step_groups", "step_sizes", "default_bounds", "below_wall", "over_lt",
           "ParameterNormCost", "all_reduce_stats", "guard_checkpoints", "CheckpointError"]

StepsInit = Union[str, Sequence[float], Tensor]
_STATS = ("velocity_sq", "input_sq", "count")

_REL_TOL = 1e-5  # tolerance on sum(rho) = T for steps given by the user (float32 storage)


def below_wall(step: float, effective_depth: float, scheme: str) -> bool:
    """The euler wall: a step ``rho`` is stable iff ``rho * Lt < 1`` (the exponential scheme has no wall)."""
    return scheme != "euler" or step * effective_depth < 1.0


def over_lt(value: float, effective_depth: float) -> float:
    """``value / Lt``, or ``value`` at ``Lt = 0``: the paper's normalisation (of ``lambda`` and of its cost)."""
    return value / effective_depth if effective_depth > 0 else value


def default_bounds(depth: int, total_time: float, effective_depth: float, scheme: str):
    """Bounds used when none are given: ``min_step = 1e-3 T/L``; ``max_step = T``, or under euler with
    ``Lt > 0`` the larger of ``0.9/Lt`` and the midpoint between ``T/L`` and the wall ``1/Lt``."""
    lo = 1e-3 * total_time / depth
    hi = total_time
    if scheme == "euler" and effective_depth > 0:
        wall = 1.0 / effective_depth
        hi = min(hi, max(0.9 * wall, 0.5 * (total_time / depth + wall)))
    return lo, hi


class StepSizes(nn.Module):
    """Step sizes ``rho`` of one group, with their constraints and the statistics rules read.

    Args:
        depth: number of blocks L in the group.
        total_time: the horizon T = sum of the steps (1 in the paper; L makes rho_l = 1).
        effective_depth: Lt >= 0.
        scheme: ``"euler"`` or ``"exponential"``.
        init: ``"uniform"``, ``"irregular"`` (the paper's fixed profile, a = 0.5), ``"fine_ends"`` (small
            steps at both ends, 4:1, ``rules.fine_ends``), ``"learned"`` (uniform and trainable), or the L steps.
        min_step, max_step: bounds every step keeps; see ``default_bounds``. A default ``max_step`` follows
            ``Lt`` (``set_effective_depth``, a loaded checkpoint); a given one stays unless the wall forces it.
        learnable: train the steps with the rest (a differentiable projection keeps them feasible).
    """

    def __init__(self, depth: int, *, total_time: float = 1.0, effective_depth: float = 0.0,
                 scheme: str = "euler", init: StepsInit = "uniform", min_step: Optional[float] = None,
                 max_step: Optional[float] = None, learnable: bool = False):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth (number of blocks) must be an integer >= 1, got {depth!r}")
        total_time = _as_float(total_time, "total_time")
        if not total_time > 0:
            raise ValueError(f"total_time must be > 0, got {total_time}")
        lt = check_effective_depth(effective_depth)
        check_scheme(scheme)
        if not below_wall(total_time / depth, lt, scheme):
            raise ValueError(
                f"effective_depth * total_time / depth must be < 1 under scheme='euler' (got {lt:g} * "
                f"{total_time:g} / {depth} = {lt * total_time / depth:g}): no steps summing to total_time "
                f"keep rho * effective_depth < 1. Use more blocks, a smaller total_time, or "
                f"scheme='exponential'")
        lo, hi = default_bounds(depth, total_time, lt, scheme)
        lo = lo if min_step is None else _as_float(min_step, "min_step")
        hi = hi if max_step is None else _as_float(max_step, "max_step")
        _check_bounds(depth, total_time, lt, scheme, lo, hi)
        if isinstance(init, str) and init == "learned":
            init, learnable = "uniform", True
        values = _initial_steps(init, depth, total_time)
        self.depth, self.total_time, self.scheme = depth, total_time, scheme
        self.min_step, self.max_step = lo, hi
        self._max_step_arg = None if max_step is None else hi  # None: max_step follows Lt
        self._reserved_lt = 0.0  # an Lt the bounds keep room for (EffectiveDepthScheduler's target)
        _check_steps(values, self, lt)
        self._store_rho(values.to(torch.float32), bool(learnable))
        self.register_buffer("effective_depth", torch.tensor(lt, dtype=torch.float32))
        # per-rank sums (float64), plain tensors rather than buffers: DistributedDataParallel broadcasts
        # buffers from rank 0 at every forward, which would overwrite the other ranks' sums under gradient
        # accumulation; AdaptiveSteps all-reduces them itself and saves them in its state_dict
        for name in _STATS:
            setattr(self, name, torch.zeros(depth, dtype=torch.float64))
        self.recording = False
        self.optional_in_checkpoint = False  # wrap() sets it: a plain checkpoint loads with defaults
        self._layers: List[nn.Module] = []  # the blocks, unregistered (they live elsewhere in the model)

    # -------------------------------------------------------------------------------------- values
    def _store_rho(self, values: Tensor, learnable: bool) -> None:
        if learnable:
            self.rho = nn.Parameter(values, requires_grad=True)
        else:
            self.register_buffer("rho", values)

    @property
    def learnable(self) -> bool:
        return self.rho.requires_grad

    def make_learnable_(self, learnable: bool = True) -> Tensor:
        """Turn the steps into a trainable ``nn.Parameter`` (or back into a buffer); the values are kept.
        Returns the new ``rho``. An optimizer built before holds the old tensor: pass it the new one."""
        if isinstance(self.rho, nn.Parameter) and self.rho.requires_grad == learnable:
            return self.rho
        values = self.rho.detach()
        del self.rho
        self._store_rho(values, learnable)
        return self.rho

    def current(self) -> Tensor:
        """The steps in use: the stored vector, or its differentiable projection when learnable."""
        if self.rho.requires_grad:
            return rules.project_steps(self.rho, self.total_time, self.min_step, self.max_step)
        return self.rho

    def coefficients(self):
        """``(a, b)``: per-layer coefficients of ``y = a x + b f`` (vectors of length L)."""
        return step_coefficients(self.current(), self.effective_depth, self.scheme)

    @torch.no_grad()
    def set_steps(self, values: Union[Sequence[float], Tensor]) -> None:
        """Replace the steps; they must sum to ``total_time`` and keep the bounds (checked first)."""
        values = torch.as_tensor(values, dtype=torch.float64).detach().cpu().reshape(-1)
        if values.numel() != self.depth:
            raise ValueError(f"steps must have {self.depth} values (one per block), got {values.numel()}")
        _check_steps(values, self)
        self.rho.copy_(values.to(self.rho.dtype))

    def project(self, values: Tensor) -> Tensor:
        """The feasible steps nearest ``values`` (float64): sum ``total_time``, inside the bounds."""
        return rules.project_steps(values, self.total_time, self.min_step, self.max_step)

    @torch.no_grad()
    def project_(self) -> None:
        """Put learnable steps back on the feasible set (the plugin does this after each optimizer step)."""
        v = self.rho.detach().double().cpu()
        if not torch.isfinite(v).all():
            raise ValueError("the learned step sizes became non-finite; lower the learning rate of the steps")
        self.rho.copy_(self.project(v).to(self.rho))

    def check_effective_depth(self, value: float, name: str = "effective_depth", where: str = "the group") -> float:
        """``value`` as a valid Lt for this group: >= 0 and, under euler, below the wall of its current
        largest step and of the uniform step ``T/L``. Changes nothing."""
        lt = check_effective_depth(value, name)
        largest = max(float(self.rho.detach().max()), self.total_time / self.depth)
        if not below_wall(largest, lt, self.scheme):
            raise ValueError(
                f"{name}={lt:g} is past the euler wall of {where}: rho * Lt must stay < 1, and its largest step "
                f"is {largest:g}, so Lt must be < {1.0 / largest:g}. Use a smaller {name}, a smaller "
                f"total_time when wrapping, or scheme='exponential' (no wall)")
        return lt

    def set_effective_depth(self, value: float) -> None:
        """Change Lt (e.g. raised over training from 0); checked against the euler wall first."""
        try:
            lt = self.check_effective_depth(value)
        except ValueError as err:
            if "past the euler wall" not in str(err):
                raise
            raise ValueError(f"effective_depth={float(value):g} breaks rho * effective_depth < 1 under "
                             f"scheme='euler' ({err}); use scheme='exponential' or smaller steps") from None
        if not below_wall(self.max_step, lt, self.scheme):  # tighten the cap, keeping the current steps
            self.max_step = self._fitted_max_step(lt, float(self.rho.detach().max()))
        with torch.no_grad():
            self.effective_depth.fill_(lt)

    def reserve_effective_depth(self, value: float, name: str = "effective_depth", where: str = "the group") -> None:
        """Keep ``max_step`` below the wall of a coming ``Lt = value`` (a schedule's target), so that
        adaptive steps cannot grow into it on the way; checked first."""
        lt = self.check_effective_depth(value, name, where)
        if self.scheme == "euler" and lt > 0:
            largest = float(self.rho.detach().max())
            fitted = max(largest, default_bounds(self.depth, self.total_time, lt, self.scheme)[1])
            self.max_step = min(self.max_step, fitted)
            self._reserved_lt = max(self._reserved_lt, lt)

    def _fitted_max_step(self, lt: float, largest: float) -> float:
        """The cap at ``Lt = lt`` when the largest step is ``largest``: the given ``max_step`` while it is below
        the wall, else the default one (room kept for a reserved Lt), never below a step already held."""
        derived = self._max_step_arg is None
        cap = default_bounds(self.depth, self.total_time, max(lt, self._reserved_lt), self.scheme)[1] \
            if derived else self._max_step_arg
        if not below_wall(cap, lt, self.scheme):
            cap, derived = default_bounds(self.depth, self.total_time, lt, self.scheme)[1], True
        return max(cap, largest) if derived else cap

    # ---------------------------------------------------------------------------------- checkpoints
    def check_state(self, rho, effective_depth, where: str = "") -> Tuple[Tensor, float, float]:
        """Validate a saved ``(rho, Lt)`` for this group without changing anything; returns the steps
        (float64), Lt and the ``max_step`` they imply. Raises ``CheckpointError`` naming the problem."""
        where = where or "checkpoint"
        try:
            lt = check_effective_depth(effective_depth, f"{where} effective_depth")
        except (TypeError, ValueError) as err:
            raise CheckpointError(str(err)) from None
        values = torch.as_tensor(rho).detach().double().cpu().reshape(-1)
        if values.numel() != self.depth:
            raise CheckpointError(f"{where} has {values.numel()} steps, the model has {self.depth}")
        if not torch.isfinite(values).all() or not (values > 0).all():
            raise CheckpointError(f"{where} steps must be finite and > 0, got {values.tolist()}")
        hi = self._fitted_max_step(lt, float(values.max()))
        try:
            _check_steps(values, self, lt, max_step=hi)
        except ValueError as err:
            raise CheckpointError(f"{where}: {err}") from None
        return values, lt, hi

    @torch.no_grad()
    def load_state(self, rho, effective_depth, where: str = "") -> None:
        """Load a saved ``(rho, Lt)`` (validated first); the bounds follow the loaded Lt."""
        values, lt, hi = self.check_state(rho, effective_depth, where)
        self.rho.copy_(values.to(self.rho))
        self.effective_depth.fill_(lt)
        self.max_step = hi

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key, lt_key = prefix + "rho", prefix + "effective_depth"
        if key in state_dict or lt_key in state_dict:
            _check_entry(self, state_dict, prefix)  # raises before anything of this group changes
        before = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if key in state_dict or lt_key in state_dict:
            self.max_step = self._fitted_max_step(float(self.effective_depth), float(self.rho.detach().max()))
        if self.optional_in_checkpoint:
            ours = {key, lt_key}
            missing_keys[before:] = [k for k in missing_keys[before:] if k not in ours]

    # ---------------------------------------------------------------------------------- statistics
    @torch.no_grad()
    def resize_(self, values: Tensor) -> None:
        """Give the group a new depth ``len(values)`` (depth growth, ``adaptive_depth.depth``): the steps become
        ``values`` (their sum is still ``total_time``; a learned ``rho`` stays the same ``Parameter``), the bounds
        widen to hold them, and the statistics restart. ``bind`` the group's new blocks afterwards."""
        values = torch.as_tensor(values).detach().reshape(-1)
        self.rho.data = values.to(device=self.rho.device, dtype=self.rho.dtype)
        self.depth = int(values.numel())
        self.min_step = min(self.min_step, float(values.min()))
        self.max_step = max(self.max_step, float(values.max()))
        for name in _STATS:
            setattr(self, name, torch.zeros(self.depth, dtype=torch.float64, device=self.velocity_sq.device))

    def record(self, index: int, stats: Tensor) -> None:
        """Add one layer's ``(||f - Lt x||^2, ||x||^2)`` to the running sums."""
        self.velocity_sq[index] += stats[0].to(self.velocity_sq.dtype)
        self.input_sq[index] += stats[1].to(self.input_sq.dtype)
        self.count[index] += 1

    @torch.no_grad()
    def record_all(self, stats: Tensor) -> None:
        """Add all layers' statistics at once (``stats`` of shape (L, 2))."""
        s = stats.to(self.velocity_sq.dtype)
        self.velocity_sq += s[:, 0]
        self.input_sq += s[:, 1]
        self.count += 1

    @torch.no_grad()
    def reset_stats(self) -> None:
        for name in _STATS:
            getattr(self, name).zero_()

    def stats(self) -> Tensor:
        """The recorded sums as one ``(3, L)`` float64 CPU tensor (velocity_sq, input_sq, count), a copy."""
        return torch.stack([getattr(self, name) for name in _STATS]).detach().cpu().clone()

    def check_stats(self, stats, where: str = "statistics") -> Tensor:
        """``stats`` as a valid ``(3, L)`` float64 tensor for this group (finite, >= 0); changes nothing."""
        t = torch.as_tensor(stats).detach().double().cpu() if stats is not None else None
        if t is None or tuple(t.shape) != (3, self.depth):
            shape = None if t is None else tuple(t.shape)
            raise CheckpointError(f"{where} must have shape (3, {self.depth}), got {shape}")
        if not torch.isfinite(t).all() or (t < 0).any():
            raise CheckpointError(f"{where} must be finite and >= 0, got {t.tolist()}")
        return t

    @torch.no_grad()
    def load_stats(self, stats, where: str = "statistics") -> None:
        """Replace the recorded sums by ``stats`` (as ``stats()`` returns them), validated first."""
        t = self.check_stats(stats, where)
        for name, row in zip(_STATS, t):
            getattr(self, name).copy_(row)

    def all_reduce_(self) -> None:
        """Sum the statistics over ``torch.distributed`` ranks (a no-op without a process group)."""
        all_reduce_stats([self])

    def speed(self) -> Tensor:
        """Relative speed ``c_l = ||f - Lt x|| / ||x||`` per layer over the recorded batches (float64, CPU)."""
        return (self.velocity_sq / self.input_sq).sqrt().detach().cpu()

    def branch_parameters(self, index: int) -> Iterable[nn.Parameter]:
        """The parameters of layer ``index``'s residual branch (what the rho-scaled decay acts on)."""
        if not self._layers:
            return iter(())
        return self._layers[index].branch_parameters()

    def branch_norms(self) -> Tensor:
        """``||W_l||`` per layer over its branch parameters (float64, CPU; NaN for a branch without any)."""
        norms = []
        for l in range(self.depth):
            ps = list(self.branch_parameters(l))
            norms.append(torch.sqrt(sum((p.detach().double() ** 2).sum().cpu() for p in ps)) if ps else
                         torch.tensor(float("nan"), dtype=torch.float64))
        return torch.stack(norms)

    def bind(self, layers: Sequence[nn.Module]) -> None:
        """Tell the group which blocks it steers (each must have ``branch_parameters()``)."""
        if len(layers) != self.depth:
            raise ValueError(f"expected {self.depth} layers, got {len(layers)}")
        self.__dict__["_layers"] = list(layers)

    # ------------------------------------------------------------------------------- module plumbing
    def _apply(self, fn, recurse=True):
        # .half() / .to(bfloat16) must not round the steps or the statistics: keep each tensor's
        # precision and follow only the device
        keep = {name: t.detach().clone() for name, t in self._own_tensors()}
        super()._apply(fn, recurse)
        for name, t in self._own_tensors():
            old = keep[name]
            if t.dtype != old.dtype and torch.finfo(t.dtype).eps > torch.finfo(old.dtype).eps:
                t.data = old.to(t.device)
        for name in _STATS:
            setattr(self, name, getattr(self, name).to(self.rho.device))
        return self

    def _own_tensors(self):
        yield from self.named_parameters(recurse=False)
        yield from self.named_buffers(recurse=False)

    def __setstate__(self, state):
        state.setdefault("_max_step_arg", state.get("max_step"))  # pickled before these existed
        state.setdefault("_reserved_lt", 0.0)
        super().__setstate__(state)

    def extra_repr(self) -> str:
        rho = self.rho.detach().double().cpu()
        profile = ", ".join(f"{v:.3g}" for v in rho[:8].tolist()) + (", ..." if self.depth > 8 else "")
        return (f"depth={self.depth}, effective_depth={float(self.effective_depth):g}, "
                f"scheme={self.scheme!r}, total_time={self.total_time:g}, "
                f"bounds=[{self.min_step:.3g}, {self.max_step:.3g}], learnable={self.learnable}, "
                f"steps=[{profile}]")


def _check_entry(group: StepSizes, state_dict, prefix: str) -> None:
    """Validate ``group``'s entries (``prefix + 'rho'``, ``prefix + 'effective_depth'``) in ``state_dict``."""
    rho = state_dict.get(prefix + "rho", group.rho)
    lt = state_dict.get(prefix + "effective_depth", group.effective_depth)
    group.check_state(rho, lt, where=f"{prefix}rho / {prefix}effective_depth")


def _guard_hook(module, state_dict, prefix, *args, **kwargs) -> None:
    for name, group in module.named_modules(prefix=prefix.rstrip(".")):
        if isinstance(group, StepSizes):
            _check_entry(group, state_dict, name + "." if name else "")


def guard_checkpoints(model: nn.Module) -> None:
    """Make ``model.load_state_dict`` validate every step group's entries before it loads anything, so that
    a bad checkpoint raises ``CheckpointError`` and leaves the whole model as it was."""
    if not getattr(model, "_leaky_checkpoint_guard", False):
        model.register_load_state_dict_pre_hook(_guard_hook)
        model.__dict__["_leaky_checkpoint_guard"] = True


class ParameterNormCost:
    """The paper's parameter-norm cost ``lambda/(2 Lt) sum_l rho_l ||W_l||^2`` (``lambda/2`` at Lt = 0) over the
    branch parameters of ``groups``, and its gradient ``(lambda/Lt) rho_l W_l`` (the rho-scaled decay).

    Nothing is cached: the steps and Lt can be written in place (``.data``, ``copy_``) without bumping a
    version counter, so the coefficients are read from the stored steps at every use.
    """

    def __init__(self, groups: Sequence[StepSizes], lam: float):
        self.groups, self.lam = list(groups), float(lam)
        self.params = [[list(g.branch_parameters(l)) for l in range(g.depth)] for g in self.groups]

    def _scales(self) -> List[Tensor]:
        """``(lambda / Lt) rho_l`` per group, as float64 tensors on the steps' device (no host sync)."""
        out = []
        for g in self.groups:
            lt = g.effective_depth.detach().double()
            positive = lt > 0
            scale = torch.where(positive, self.lam / torch.where(positive, lt, torch.ones_like(lt)),
                                torch.full_like(lt, self.lam))
            out.append(scale * g.rho.detach().double())
        return out

    def coefficients(self) -> List[List[float]]:
        """``(lambda / Lt) rho_l`` per group and layer, from the stored (feasible) steps."""
        return [c.cpu().tolist() for c in self._scales()]

    @torch.no_grad()
    def add_to_grads(self) -> None:
        """Add the cost's gradient to every branch parameter that has a gradient."""
        if self.lam == 0:
            return
        for layers, coefs in zip(self.params, self._scales()):
            for params, coef in zip(layers, coefs.unbind()):
                with_grad = [p for p in params if p.grad is not None]
                if with_grad:
                    scaled = torch._foreach_mul(with_grad, coef.to(with_grad[0].dtype))
                    torch._foreach_add_([p.grad for p in with_grad], scaled)

    def __call__(self) -> Tensor:
        """The cost itself (differentiable in the weights, the steps detached)."""
        total = None
        for g, layers in zip(self.groups, self.params):
            scale = over_lt(self.lam, float(g.effective_depth)) / 2
            rho = g.current().detach()
            for l, params in enumerate(layers):
                for p in params:
                    term = scale * rho[l].to(p.dtype) * p.pow(2).sum()
                    total = term if total is None else total + term
        return total if total is not None else torch.zeros(())


def all_reduce_stats(groups: Sequence[StepSizes]) -> None:
    """Sum the statistics of ``groups`` over ``torch.distributed`` ranks in one collective (a no-op
    without an initialised process group)."""
    if not (groups and torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    packed = torch.cat([torch.stack([getattr(g, n) for n in _STATS]).reshape(-1) for g in groups])
    torch.distributed.all_reduce(packed)
    offset = 0
    for g in groups:
        n = 3 * g.depth
        for name, row in zip(_STATS, packed[offset:offset + n].view(3, g.depth)):
            getattr(g, name).copy_(row)
        offset += n


def _check_bounds(depth, total_time, lt, scheme, lo, hi) -> None:
    if not lo > 0:
        raise ValueError(f"min_step must be > 0, got {lo}")
    if not hi >= lo:
        raise ValueError(f"max_step must be >= min_step, got max_step={hi}, min_step={lo}")
    if depth * lo > total_time * (1 + _REL_TOL):
        raise ValueError(f"min_step * depth must be <= total_time, got {lo:g} * {depth} > {total_time:g}")
    if depth * hi < total_time * (1 - _REL_TOL):
        raise ValueError(f"max_step * depth must be >= total_time, got {hi:g} * {depth} < {total_time:g}")
    if not below_wall(hi, lt, scheme):
        raise ValueError(f"max_step * effective_depth must be < 1 under scheme='euler', got "
                         f"{hi:g} * {lt:g} = {hi * lt:g}")


def _initial_steps(init: StepsInit, depth: int, total_time: float) -> Tensor:
    if isinstance(init, str):
        if init in rules.PROFILES:
            return rules.PROFILES[init](depth, total_time)
        raise ValueError(f"steps must be 'uniform', 'irregular', 'fine_ends', 'learned' or {depth} numbers, "
                         f"got {init!r}")
    values = torch.as_tensor(init, dtype=torch.float64).detach().cpu().reshape(-1)
    if values.numel() != depth:
        raise ValueError(f"steps must have {depth} values (one per block), got {values.numel()}")
    return values


def _check_steps(values: Tensor, group: StepSizes, lt: Optional[float] = None,
                 max_step: Optional[float] = None) -> None:
    """Raise ValueError naming the problem unless ``values`` is a feasible step vector for ``group``."""
    if not torch.isfinite(values).all():
        raise ValueError(f"steps must be finite, got {values.tolist()}")
    if not (values > 0).all():
        raise ValueError(f"steps (rho) must be > 0, got min {float(values.min()):g}")
    total = float(values.sum())
    if not math.isclose(total, group.total_time, rel_tol=_REL_TOL):
        raise ValueError(f"steps must sum to total_time={group.total_time:g}, got {total:.8g}")
    lt = float(group.effective_depth) if lt is None else lt
    if not below_wall(float(values.max()), lt, group.scheme):
        raise ValueError(f"rho * effective_depth must be < 1 under scheme='euler', got max rho "
                         f"{float(values.max()):g} with effective_depth={lt:g}")
    max_step = group.max_step if max_step is None else max_step
    lo, hi = group.min_step * (1 - _REL_TOL), max_step * (1 + _REL_TOL)
    if float(values.min()) < lo or float(values.max()) > hi:
        raise ValueError(f"steps must lie in [min_step, max_step] = [{group.min_step:g}, {max_step:g}], "
                         f"got [{float(values.min()):g}, {float(values.max()):g}]")


def step_groups(model: nn.Module) -> List[StepSizes]:
    """Every ``StepSizes`` group inside ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, StepSizes)]


def step_sizes(model: nn.Module) -> List[Tensor]:
    """The step sizes of ``model``: a list of 1-D tensors (detached copies), one per group."""
    return [g.current().detach().clone() for g in step_groups(model)]
