"""Leaky residual containers: one block, a stack of blocks, and the paper's MLP.

    x_{l+1} = act(a_l x_l + b_l f_l(x_l))        (a_l, b_l) from (rho_l, Lt, scheme), see ``ops``

A stack keeps its steps in one ``StepSizes`` module (``.steps``); its blocks refer to it by index.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import rules
from .ops import check_activation, check_backend, fused_update, leaky_linear
from .steps import StepSizes, StepsInit, guard_checkpoints

__all__ = ["LeakyResidual", "LeakyResNet", "LeakyMLP", "MLPBranch"]


# ----------------------------------------------------------------------------------- tracing helpers
def torchscript_error(name: str) -> RuntimeError:
    """The one error TorchScript gets from every leaky container (``jit.script`` and ``jit.trace``)."""
    return RuntimeError(
        f"{name} does not support TorchScript (torch.jit.script / torch.jit.trace): the forward is not "
        f"scriptable, and jit.trace would record the step sizes and the effective depth as constants, so "
        f"later step changes would be silently ignored. Use torch.compile(model) to speed it up, or "
        f"torch.export.export(model, args) for a saved, portable graph; torch.fx.symbolic_trace and "
        f"torchvision's create_feature_extractor work too")


def refuse_torchscript_trace(name: str) -> None:
    """Raise ``torchscript_error`` under ``torch.jit.trace`` (which would freeze the steps)."""
    if torch.jit.is_tracing():
        raise torchscript_error(name)


def _coefficients(steps: StepSizes, x: Tensor):
    """``steps.coefficients()``; an FX leaf, so that traced graphs read the live steps. ``x`` (unused) ties
    the call to the traced input: FX records a wrapped function only when an argument is traced."""
    return steps.coefficients()


def _update(x: Tensor, f: Tensor, a: Tensor, b: Tensor, lt: Tensor, relu: bool, stats: bool, backend: str,
            index: int, name: str):
    """``fused_update`` after the shape check; an FX leaf (the check and the backend choice read tensors)."""
    if f.shape != x.shape:
        raise ValueError(f"block {index} ({name}) returned shape {tuple(f.shape)} for an input of shape "
                         f"{tuple(x.shape)}; a residual branch must keep the shape")
    return fused_update(x, f, a, b, lt, relu=relu, stats=stats, backend=backend)


def _fused_step(block: nn.Module, x: Tensor, a: Tensor, b: Tensor, lt: Tensor, relu: bool, stats: bool,
                backend: str):
    """``block.leaky_step(...)`` (a branch with its own fused update); an FX leaf."""
    return block.leaky_step(x, a, b, lt, relu=relu, stats=stats, backend=backend)


def _record(steps: StepSizes, index: int, stats: Tensor) -> None:
    """``steps.record`` of one block's statistics; an FX leaf (it writes the group's sums)."""
    steps.record(index, stats)


def _record_all(steps: StepSizes, *stats: Tensor) -> None:
    """``steps.record_all`` of the per-block statistics; an FX leaf (it writes the group's sums)."""
    steps.record_all(torch.stack(stats))


def _per_block(v: Tensor, n: int):
    """``v.unbind()`` (one op for all blocks); ``v[0], ..., v[n-1]`` under torch.fx, which cannot iterate a
    traced value."""
    return [v[i] for i in range(n)] if isinstance(v, torch.fx.Proxy) else v.unbind()


# torch.fx.symbolic_trace (and torchvision's feature extraction) records these as opaque calls
for _leaf in ("_coefficients", "_update", "_fused_step", "_record", "_record_all"):
    torch.fx.wrap(_leaf)


# ------------------------------------------------------------------------- construction on any device
Snapshot = Tuple[Tensor, float]


def build_steps(depth: int, **kwargs) -> Tuple[StepSizes, Snapshot]:
    """A ``StepSizes`` on the ambient default device, and its construction values ``(rho, Lt)``.

    ``StepSizes`` checks its values on the host, which a meta tensor cannot give, so it is built on the CPU
    and then moved: ``with torch.device("meta")`` (empty-weights init) builds meta steps without an error.
    """
    device = torch.get_default_device()
    with torch.device("cpu"):
        steps = StepSizes(depth, **kwargs)
        snapshot = _snapshot(steps, kwargs)
    return (steps if device.type == "cpu" else steps.to(device)), snapshot


def _snapshot(steps: StepSizes, kwargs) -> Snapshot:
    """The construction values, from the stored steps, or from the arguments where a loader (accelerate's
    ``init_empty_weights``) already put them on the meta device."""
    lt = float(kwargs.get("effective_depth", 0.0))
    if not steps.rho.is_meta:
        return steps.rho.detach().double().cpu().clone(), lt
    init, total = kwargs.get("init", "uniform"), float(kwargs.get("total_time", 1.0))
    if isinstance(init, str):
        profile = rules.irregular if init == "irregular" else rules.uniform  # "learned" starts uniform
        return profile(steps.depth, total).double(), lt
    return torch.as_tensor(init, dtype=torch.float64).detach().cpu().reshape(-1).clone(), lt


def restore_steps(steps: StepSizes, snapshot: Snapshot) -> None:
    """Write the construction values back (no checks: they were checked when the group was built)."""
    rho, lt = snapshot
    with torch.no_grad():
        steps.rho.copy_(rho.to(steps.rho.dtype))
        steps.effective_depth.fill_(lt)
    steps.reset_stats()


class StepsOwner(nn.Module):
    """A module that owns ``StepSizes`` groups built by ``build_steps``.

    ``reset_parameters()`` puts every group back to its construction steps and effective depth, and so does
    materialising meta steps (``to_empty``): uninitialised steps would be a silently wrong model, and a
    checkpoint without steps (a plain one loaded into a wrapped model) would keep them.
    """

    def _owned_steps(self) -> List[Tuple[StepSizes, Snapshot]]:
        raise NotImplementedError

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for steps, snapshot in self._owned_steps():
            restore_steps(steps, snapshot)

    def _apply(self, fn, recurse=True):
        # to_empty() reallocates every tensor, meta or not, as uninitialised memory: steps whose values did not
        # survive the call (they were meta, or their values changed) go back to their construction values
        owned = self._owned_steps()
        before = [None if steps.rho.is_meta else (steps.rho.detach().clone(), steps.effective_depth.detach().clone())
                  for steps, _ in owned]
        for steps, _ in owned:  # per-rank statistics are plain tensors: meta ones have no data to move
            for name, value in list(vars(steps).items()):
                if isinstance(value, Tensor) and value.is_meta:
                    setattr(steps, name, torch.zeros(value.shape, dtype=value.dtype))
        super()._apply(fn, recurse)
        for (steps, snapshot), old in zip(owned, before):
            if not steps.rho.is_meta and (old is None or not _kept(steps, old)):
                restore_steps(steps, snapshot)
        return self


def _kept(steps: StepSizes, old: Tuple[Tensor, Tensor]) -> bool:
    """Whether ``steps`` still hold the values ``old`` (in their possibly new dtype and device)."""
    return all(torch.equal(new.detach().cpu(), value.to(new.dtype).cpu())
               for new, value in ((steps.rho, old[0]), (steps.effective_depth, old[1])))


class LeakyResidual(StepsOwner):
    """One leaky residual block around any module ``block`` with ``block(x).shape == x.shape``.

        y = act(x + rho (f(x) - Lt x))                         (scheme="euler")
        y = act(exp(-rho Lt) x + (1 - exp(-rho Lt)) / Lt f(x))   (scheme="exponential")

    Standalone, the block owns its step ``step`` (a ``StepSizes`` of length 1 as ``.steps``); inside a
    ``LeakyResNet`` it reads its step from the stack's shared vector.

    Example:
        >>> blk = LeakyResidual(nn.Linear(16, 16), effective_depth=2.0, step=0.1)
        >>> y = blk(torch.randn(4, 16))
    """

    def __init__(self, block: nn.Module, *, effective_depth: float = 0.0, step: float = 1.0,
                 scheme: str = "euler", activation: Optional[str] = None, backend: Optional[str] = None):
        super().__init__()
        _check_block(block, "block")
        self.block = block
        self.activation = check_activation(activation)
        self.backend = check_backend(backend)
        self.steps, self._steps_init = build_steps(1, total_time=step, effective_depth=effective_depth,
                                                   scheme=scheme, min_step=step, max_step=step)
        self._link(self.steps, 0)
        self.steps.bind([self])

    @classmethod
    def _linked(cls, block: nn.Module, steps: StepSizes, index: int, activation: Optional[str],
                backend: str) -> "LeakyResidual":
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.block, self.activation, self.backend = block, activation, backend
        self._link(steps, index)
        return self

    def _link(self, steps: StepSizes, index: int) -> None:
        self.__dict__["_group"] = steps  # not registered: the owner of the group registers it once
        self.index = index
        self._fused = getattr(self.block, "leaky_step", None) is not None

    def branch_parameters(self):
        return self.block.parameters()

    def _owned_steps(self):
        snapshot = self.__dict__.get("_steps_init")  # standalone only; in a stack the stack owns the steps
        return [(self.steps, snapshot)] if snapshot is not None and "steps" in self._modules else []

    def forward(self, x: Tensor) -> Tensor:
        refuse_torchscript_trace(type(self).__name__)
        group = self._group
        a, b = _coefficients(group, x)
        record = group.recording and self.training
        y, s = self.step(x, a[self.index], b[self.index], record)
        if record:
            _record(group, self.index, s)
        return y

    def step(self, x: Tensor, a: Tensor, b: Tensor, record: bool):
        """``(act(a x + b f(x)), stats)`` for given coefficients; the stack's hot path."""
        relu = self.activation == "relu"
        lt = self._group.effective_depth
        if self._fused:
            return _fused_step(self.block, x, a, b, lt, relu, record, self.backend)
        return _update(x, self.block(x), a, b, lt, relu, record, self.backend, self.index,
                       type(self.block).__name__)

    def __prepare_scriptable__(self):
        raise torchscript_error(type(self).__name__)

    def extra_repr(self) -> str:
        return f"index={self.index}, activation={self.activation!r}"


class LeakyResNet(StepsOwner):
    """A stack of leaky residual blocks with learned per-layer step sizes.

    Args:
        blocks: residual branches ``f_l`` (any modules mapping x to a tensor of the same shape).
        effective_depth: Lt >= 0 (0: a plain ResNet; large: behaves like a fully-connected net).
        total_time: T = sum of the steps (1 in the paper; ``len(blocks)`` with Lt = 0 and unit steps
            reproduces ``x + f(x)`` block by block exactly).
        steps: ``"uniform"``, ``"irregular"``, ``"learned"`` or the L steps.
        scheme: ``"euler"`` (the paper; needs ``rho * Lt < 1``) or ``"exponential"`` (any step).
        activation: ``None`` or ``"relu"`` after each update.
        min_step, max_step: bounds every step keeps (defaults: ``steps.default_bounds``).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (default: ``ADAPTIVE_DEPTH_BACKEND`` or auto).

    Example:
        >>> blocks = [nn.Sequential(nn.ReLU(), nn.Linear(64, 64)) for _ in range(12)]
        >>> net = LeakyResNet(blocks, effective_depth=3.0, scheme="exponential")
        >>> y = net(torch.randn(32, 64))
    """

    def __init__(self, blocks: Iterable[nn.Module], *, effective_depth: float = 0.0, total_time: float = 1.0,
                 steps: StepsInit = "uniform", scheme: str = "euler", activation: Optional[str] = None,
                 min_step: Optional[float] = None, max_step: Optional[float] = None,
                 backend: Optional[str] = None):
        super().__init__()
        if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            raise TypeError("blocks must be an iterable of modules (e.g. a list), got a single "
                            f"{type(blocks).__name__}")
        blocks = list(blocks)
        if not blocks:
            raise ValueError("blocks must contain at least one module")
        for i, blk in enumerate(blocks):
            _check_block(blk, f"blocks[{i}]")
        activation = check_activation(activation)
        backend = check_backend(backend)
        self.steps, self._steps_init = build_steps(len(blocks), total_time=total_time,
                                                   effective_depth=effective_depth, scheme=scheme, init=steps,
                                                   min_step=min_step, max_step=max_step)
        self.blocks = nn.ModuleList(LeakyResidual._linked(b, self.steps, i, activation, backend)
                                    for i, b in enumerate(blocks))
        self.steps.bind(list(self.blocks))

    @property
    def depth(self) -> int:
        return self.steps.depth

    def _owned_steps(self):
        snapshot = self.__dict__.get("_steps_init")
        return [] if snapshot is None else [(self.steps, snapshot)]

    def reset_parameters(self) -> None:
        """Put the steps and the effective depth back to their construction values (the blocks keep theirs;
        ``LeakyMLP.reset_parameters`` resets its branches too)."""
        super().reset_parameters()

    @property
    def scheme(self) -> str:
        return self.steps.scheme

    @property
    def effective_depth(self) -> float:
        return float(self.steps.effective_depth)

    def set_effective_depth(self, value: float) -> None:
        self.steps.set_effective_depth(value)

    def step_sizes(self) -> Tensor:
        """The current steps (a detached copy)."""
        return self.steps.current().detach().clone()

    def forward(self, x: Tensor) -> Tensor:
        refuse_torchscript_trace(type(self).__name__)
        a, b = _coefficients(self.steps, x)
        record = self.steps.recording and self.training
        stats = []
        for blk, a_l, b_l in zip(self.blocks, _per_block(a, self.depth), _per_block(b, self.depth)):
            x, s = blk.step(x, a_l, b_l, record)
            stats.append(s)
        if record:
            _record_all(self.steps, *stats)
        return x

    def __prepare_scriptable__(self):
        raise torchscript_error(type(self).__name__)

    def extra_repr(self) -> str:
        if self.steps.rho.is_meta:
            return f"depth={self.depth}, scheme={self.scheme!r}, steps on the meta device"
        rho = self.steps.rho.detach().double().cpu()
        return (f"depth={self.depth}, effective_depth={self.effective_depth:g}, scheme={self.scheme!r}, "
                f"total_time={self.steps.total_time:g}, steps: min={float(rho.min()):.3g} "
                f"median={float(rho.median()):.3g} max={float(rho.max()):.3g}")


class MLPBranch(nn.Module):
    """The paper's branch ``W s(A)`` with ``s(z) = (relu(z), 1)``: a linear map of ``relu(x)`` plus a bias."""

    def __init__(self, width: int, *, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.linear = nn.Linear(width, width, bias=bias, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(F.relu(x))

    def leaky_step(self, x, a, b, effective_depth, *, relu=False, stats=False, backend="auto"):
        """``act(a x + b (relu(x) W^T + bias))`` in one fused op (a Triton GEMM on CUDA)."""
        return leaky_linear(x, self.linear.weight, self.linear.bias, a, b, effective_depth,
                            relu=relu, stats=stats, backend=backend)


class LeakyMLP(nn.Module):
    """The paper's Leaky ResNet: ``in_dim -> width``, L leaky blocks ``W_l s(A)``, ``width -> out_dim``.

    Args:
        in_dim, out_dim, width, depth: sizes (depth = number of leaky blocks L).
        effective_depth, total_time, steps, scheme, min_step, max_step, backend: as ``LeakyResNet``.
        init: ``"identity"`` (default): each branch starts at ``W = Lt I + N(0, 1/width)``, bias 0, so the
            branch balances the leak on the positive part of the representation and a deep net with
            large Lt starts near the identity instead of shrinking the signal by prod(1 - rho_l Lt);
            ``"default"``: PyTorch's ``nn.Linear`` initialisation.

    Example:
        >>> net = LeakyMLP(30, 30, width=100, depth=20, effective_depth=5.0, scheme="exponential")
        >>> y = net(torch.randn(256, 30))
    """

    def __init__(self, in_dim: int, out_dim: int, width: int, depth: int, *, effective_depth: float = 0.0,
                 total_time: float = 1.0, steps: StepsInit = "uniform", scheme: str = "euler",
                 min_step: Optional[float] = None, max_step: Optional[float] = None, init: str = "identity",
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("width", width), ("depth", depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if init not in ("identity", "default"):
            raise ValueError(f"init must be 'identity' or 'default', got {init!r}")
        self.init = init
        self.input = nn.Linear(in_dim, width, device=device, dtype=dtype)
        self.net = LeakyResNet([MLPBranch(width, device=device, dtype=dtype) for _ in range(depth)],
                               effective_depth=effective_depth, total_time=total_time, steps=steps,
                               scheme=scheme, min_step=min_step, max_step=max_step, backend=backend)
        self.output = nn.Linear(width, out_dim, device=device, dtype=dtype)
        if device is not None:  # the steps follow device= too (meta: to_empty() then restores them)
            self.net.steps.to(device)
        self.reset_parameters()
        guard_checkpoints(self)  # a bad checkpoint changes nothing (the input layer loads before the steps)

    @property
    def steps(self) -> StepSizes:
        return self.net.steps

    @property
    def blocks(self) -> nn.ModuleList:
        return self.net.blocks

    @property
    def depth(self) -> int:
        return self.net.depth

    @property
    def effective_depth(self) -> float:
        return self.net.effective_depth

    def set_effective_depth(self, value: float) -> None:
        self.net.set_effective_depth(value)

    def step_sizes(self) -> Tensor:
        return self.net.step_sizes()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every parameter as the constructor does: the steps and the effective depth back to
        their construction values, then the layers (``init="identity"``: each branch ``W = Lt I + noise``
        at that Lt). With ``to_empty()`` it completes an empty-weights (meta device) build."""
        self.net.reset_parameters()
        self.input.reset_parameters()
        self.output.reset_parameters()
        lt = self.net._steps_init[1]
        for blk in self.net.blocks:
            lin = blk.block.linear
            lin.reset_parameters()
            if self.init == "identity":
                width = lin.weight.shape[0]
                lin.weight.normal_(0.0, 1.0 / math.sqrt(width))
                lin.weight.diagonal().add_(lt)
                if lin.bias is not None:
                    lin.bias.zero_()

    def representations(self, x: Tensor) -> list:
        """``[A_0, ..., A_L]``: the representation entering each block and the last one (no grad kept)."""
        with torch.no_grad():
            h = self.input(x)
            out = [h]
            a, b = self.net.steps.coefficients()
            for blk, a_l, b_l in zip(self.net.blocks, a.unbind(), b.unbind()):
                h, _ = blk.step(h, a_l, b_l, False)
                out.append(h)
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.output(self.net(self.input(x)))

    def extra_repr(self) -> str:
        return f"init={self.init!r}"


def _check_block(block, name: str) -> None:
    if not isinstance(block, nn.Module):
        raise TypeError(f"{name} must be an nn.Module mapping x to f(x) of the same shape, "
                        f"got {type(block).__name__}")
    if isinstance(block, LeakyResidual):
        raise TypeError(f"{name} is already a LeakyResidual; pass its branch (.block) instead")

