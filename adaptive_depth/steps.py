"""The step-size vector of one group of leaky residual blocks.

``StepSizes`` holds ``rho_1..rho_L`` (sum = ``total_time``, every step in ``[min_step, max_step]``, and
``max_step * Lt < 1`` under the euler scheme), the group's effective depth ``Lt``, and the per-layer
statistics the adaptive rules read (``||f - Lt x||^2`` and ``||x||^2``, summed over recorded batches).
Blocks refer to it by index; it is registered once in the model, so it appears once in ``state_dict``.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import rules
from .ops import check_effective_depth, check_scheme, step_coefficients, _as_float

StepsInit = Union[str, Sequence[float], Tensor]
_STATS = ("velocity_sq", "input_sq", "count")

_REL_TOL = 1e-5  # tolerance on sum(rho) = T for steps given by the user (float32 storage)


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
        init: ``"uniform"``, ``"irregular"`` (the paper's fixed profile, a = 0.5), ``"learned"`` (uniform
            and trainable), or the L steps themselves.
        min_step, max_step: bounds every step keeps; see ``default_bounds``.
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
        if scheme == "euler" and lt * total_time / depth >= 1.0:
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
        _check_steps(values, self, lt)
        self.rho = nn.Parameter(values.to(torch.float32), requires_grad=bool(learnable))
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
    @property
    def learnable(self) -> bool:
        return self.rho.requires_grad

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

    @torch.no_grad()
    def project_(self) -> None:
        """Put learnable steps back on the feasible set (the plugin does this after each optimizer step)."""
        v = self.rho.detach().double().cpu()
        if not torch.isfinite(v).all():
            raise ValueError("the learned step sizes became non-finite; lower the learning rate of the steps")
        self.rho.copy_(rules.project_steps(v, self.total_time, self.min_step, self.max_step).to(self.rho))

    def set_effective_depth(self, value: float) -> None:
        """Change Lt (e.g. raised over training from 0); checked against the euler wall first."""
        lt = check_effective_depth(value)
        if self.scheme == "euler" and lt > 0:
            largest = float(self.rho.detach().max())
            if max(largest, self.total_time / self.depth) * lt >= 1.0:
                raise ValueError(
                    f"effective_depth={lt:g} breaks rho * effective_depth < 1 under scheme='euler' (largest "
                    f"step {largest:g}, uniform step {self.total_time / self.depth:g}); use "
                    f"scheme='exponential' or smaller steps")
            if self.max_step * lt >= 1.0:  # tighten the cap below the new wall, keeping the current steps
                self.max_step = max(largest, default_bounds(self.depth, self.total_time, lt, self.scheme)[1])
        with torch.no_grad():
            self.effective_depth.fill_(lt)

    # ---------------------------------------------------------------------------------- statistics
    @torch.no_grad()
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
        self.velocity_sq.zero_()
        self.input_sq.zero_()
        self.count.zero_()

    def speed(self) -> Tensor:
        """Relative speed ``c_l = ||f - Lt x|| / ||x||`` per layer over the recorded batches (float64, CPU)."""
        return (self.velocity_sq / self.input_sq).sqrt().detach().cpu()

    def branch_parameters(self, index: int) -> Iterable[nn.Parameter]:
        """The parameters of layer ``index``'s residual branch (what the rho-scaled decay acts on)."""
        if not self._layers:
            return iter(())
        return self._layers[index].branch_parameters()

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

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "rho"
        if key in state_dict:
            incoming = torch.as_tensor(state_dict[key]).detach().double().cpu().reshape(-1)
            if incoming.numel() == self.depth:
                lt_key = prefix + "effective_depth"
                lt = float(state_dict[lt_key]) if lt_key in state_dict else float(self.effective_depth)
                try:
                    _check_steps(incoming, self, lt)
                except ValueError as err:
                    error_msgs.append(f"{key}: {err}")
                    return
        before = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self.optional_in_checkpoint:
            ours = {prefix + "rho", prefix + "effective_depth"}
            missing_keys[before:] = [k for k in missing_keys[before:] if k not in ours]

    def extra_repr(self) -> str:
        rho = self.rho.detach().double().cpu()
        profile = ", ".join(f"{v:.3g}" for v in rho[:8].tolist()) + (", ..." if self.depth > 8 else "")
        return (f"depth={self.depth}, effective_depth={float(self.effective_depth):g}, "
                f"scheme={self.scheme!r}, total_time={self.total_time:g}, "
                f"bounds=[{self.min_step:.3g}, {self.max_step:.3g}], learnable={self.learnable}, "
                f"steps=[{profile}]")


def _check_bounds(depth, total_time, lt, scheme, lo, hi) -> None:
    if not lo > 0:
        raise ValueError(f"min_step must be > 0, got {lo}")
    if not hi >= lo:
        raise ValueError(f"max_step must be >= min_step, got max_step={hi}, min_step={lo}")
    if depth * lo > total_time * (1 + _REL_TOL):
        raise ValueError(f"min_step * depth must be <= total_time, got {lo:g} * {depth} > {total_time:g}")
    if depth * hi < total_time * (1 - _REL_TOL):
        raise ValueError(f"max_step * depth must be >= total_time, got {hi:g} * {depth} < {total_time:g}")
    if scheme == "euler" and hi * lt >= 1.0:
        raise ValueError(f"max_step * effective_depth must be < 1 under scheme='euler', got "
                         f"{hi:g} * {lt:g} = {hi * lt:g}")


def _initial_steps(init: StepsInit, depth: int, total_time: float) -> Tensor:
    if isinstance(init, str):
        if init == "uniform":
            return rules.uniform(depth, total_time)
        if init == "irregular":
            return rules.irregular(depth, total_time)
        raise ValueError(f"steps must be 'uniform', 'irregular', 'learned' or {depth} numbers, got {init!r}")
    values = torch.as_tensor(init, dtype=torch.float64).detach().cpu().reshape(-1)
    if values.numel() != depth:
        raise ValueError(f"steps must have {depth} values (one per block), got {values.numel()}")
    return values


def _check_steps(values: Tensor, group: StepSizes, lt: Optional[float] = None) -> None:
    """Raise ValueError naming the problem unless ``values`` is a feasible step vector for ``group``."""
    if not torch.isfinite(values).all():
        raise ValueError(f"steps must be finite, got {values.tolist()}")
    if not (values > 0).all():
        raise ValueError(f"steps (rho) must be > 0, got min {float(values.min()):g}")
    total = float(values.sum())
    if not math.isclose(total, group.total_time, rel_tol=_REL_TOL):
        raise ValueError(f"steps must sum to total_time={group.total_time:g}, got {total:.8g}")
    lt = float(group.effective_depth) if lt is None else lt
    if group.scheme == "euler" and float(values.max()) * lt >= 1.0:
        raise ValueError(f"rho * effective_depth must be < 1 under scheme='euler', got max rho "
                         f"{float(values.max()):g} with effective_depth={lt:g}")
    lo, hi = group.min_step * (1 - _REL_TOL), group.max_step * (1 + _REL_TOL)
    if float(values.min()) < lo or float(values.max()) > hi:
        raise ValueError(f"steps must lie in [min_step, max_step] = [{group.min_step:g}, {group.max_step:g}], "
                         f"got [{float(values.min()):g}, {float(values.max()):g}]")


def step_groups(model: nn.Module) -> List[StepSizes]:
    """Every ``StepSizes`` group inside ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, StepSizes)]


def step_sizes(model: nn.Module) -> List[Tensor]:
    """The step sizes of ``model``: a list of 1-D tensors (detached copies), one per group."""
    return [g.current().detach().clone() for g in step_groups(model)]
