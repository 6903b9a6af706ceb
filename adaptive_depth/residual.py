"""Leaky residual containers: one block, a stack of blocks, and the paper's MLP.

    x_{l+1} = act(a_l x_l + b_l f_l(x_l))        (a_l, b_l) from (rho_l, Lt, scheme), see ``ops``

A stack keeps its steps in one ``StepSizes`` module (``.steps``); its blocks refer to it by index.
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import rules
from .ops import check_activation, check_backend, fused_update, leaky_linear
from .steps import StepSizes, StepsInit, default_bounds, guard_checkpoints

__all__ = ["LeakyResidual", "LeakyResNet", "LeakyMLP", "MLPBranch", "StepsOwner", "balanced_gain", "balance_branches_",
           "euler_headroom"]

BranchGain = Union[None, str, float]


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
            index: int, name: str, select: bool = False, identity: Optional[Tensor] = None):
    """``fused_update`` after the shape check; an FX leaf (the check and the backend choice read tensors).
    ``select``: a and b are the group's vectors, entry ``index`` is this block's (read by the kernel).
    ``identity``: ``branch_identity``'s r, adding ``Lt r x`` to the branch."""
    if f.shape != x.shape:
        raise ValueError(f"block {index} ({name}) returned shape {tuple(f.shape)} for an input of shape "
                         f"{tuple(x.shape)}; a residual branch must keep the shape")
    if identity is not None:
        f = with_identity(f, x, lt, identity)
    return fused_update(x, f, a, b, lt, relu=relu, stats=stats, backend=backend, index=index if select else None)


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
for _leaf in ("_coefficients", "_update", "_fused_step", "_record", "_record_all", "rms_normalise"):
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
        profile = rules.PROFILES.get(init, rules.uniform)  # "learned" starts uniform
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
                 scheme: str = "euler", activation: Optional[str] = None, backend: Optional[str] = None,
                 branch_norm: bool = False, branch_gain: BranchGain = None, branch_identity: bool = False):
        super().__init__()
        _check_block(block, "block")
        norm, gain = _check_branch_options(branch_norm, branch_gain, effective_depth)
        _check_flag(branch_identity, "branch_identity")
        self.block = block
        self.activation = check_activation(activation)
        self.backend = check_backend(backend)
        self.steps, self._steps_init = build_steps(1, total_time=step, effective_depth=effective_depth,
                                                   scheme=scheme, min_step=step, max_step=step)
        self._set_branch_scaling(norm, gain, branch_identity)
        self._link(self.steps, 0)
        self.steps.bind([self])

    @classmethod
    def _linked(cls, block: nn.Module, steps: StepSizes, index: int, activation: Optional[str],
                backend: str, branch_norm: bool = False, gain: Optional[float] = None,
                identity: bool = False) -> "LeakyResidual":
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.block, self.activation, self.backend = block, activation, backend
        self._set_branch_scaling(branch_norm, gain, identity)
        self._link(steps, index)
        return self

    def _set_branch_scaling(self, branch_norm: bool, gain: Optional[float], identity: bool = False) -> None:
        self.branch_norm = branch_norm
        dtype = next((p.dtype for p in self.block.parameters() if p.is_floating_point()), torch.float32)
        device = next((p.device for p in self.block.parameters()), None)
        self.gain = None if gain is None else nn.Parameter(torch.tensor(gain, dtype=dtype, device=device))
        # branch_identity: the branch carries Lt * identity * x with identity learned from 1, which cancels
        # the leak at initialisation (the block starts as a plain residual block); training decides how much
        # of the leak to keep (identity -> 0: all of it)
        self.identity = nn.Parameter(torch.tensor(1.0, dtype=dtype, device=device)) if identity else None

    def _link(self, steps: StepSizes, index: int) -> None:
        self.__dict__["_group"] = steps  # not registered: the owner of the group registers it once
        self.index = index
        plain = not self.branch_norm and self.gain is None and self.identity is None
        self._fused = plain and getattr(self.block, "leaky_step", None) is not None

    def branch(self, x: Tensor) -> Tensor:
        """The branch as the update sees it: ``f(x)``, RMS-normalised per example if ``branch_norm``, times
        ``gain`` if there is one (``branch_identity``'s ``Lt r x`` is added inside the update, after its shape
        check)."""
        f = self.block(x)
        if self.branch_norm:
            f = rms_normalise(f)
        return f if self.gain is None else f * self.gain

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
        y, s = self.step(x, a, b, record, select=True)
        if record:
            _record(group, self.index, s)
        return y

    def step(self, x: Tensor, a: Tensor, b: Tensor, record: bool, select: bool = False):
        """``(act(a x + b f(x)), stats)`` for given coefficients; the stack's hot path. ``select``: ``a``
        and ``b`` are the group's vectors, and this block's entry is read where the update runs."""
        relu = self.activation == "relu"
        lt = self._group.effective_depth
        if self._fused:
            if select:
                a, b = a[self.index], b[self.index]
            return _fused_step(self.block, x, a, b, lt, relu, record, self.backend)
        return _update(x, self.branch(x), a, b, lt, relu, record, self.backend, self.index,
                       type(self.block).__name__, select, self.identity)

    def __prepare_scriptable__(self):
        raise torchscript_error(type(self).__name__)

    def extra_repr(self) -> str:
        extra = (", branch_norm=True" if self.branch_norm else "") + \
            (", branch_identity=True" if self.identity is not None else "")
        return f"index={self.index}, activation={self.activation!r}{extra}"


class LeakyResNet(StepsOwner):
    """A stack of leaky residual blocks with learned per-layer step sizes.

    Args:
        blocks: residual branches ``f_l`` (any modules mapping x to a tensor of the same shape).
        effective_depth: Lt >= 0 (0: a plain ResNet; large: behaves like a fully-connected net).
        total_time: T = sum of the steps (1 in the paper; ``len(blocks)`` with Lt = 0 and unit steps
            reproduces ``x + f(x)`` block by block exactly).
        steps: ``"uniform"``, ``"irregular"``, ``"fine_ends"``, ``"learned"`` or the L steps.
        scheme: ``"euler"`` (the paper; needs ``rho * Lt < 1``) or ``"exponential"`` (any step).
        activation: ``None`` or ``"relu"`` after each update.
        min_step, max_step: bounds every step keeps (defaults: ``steps.default_bounds``). Under euler with
            ``Lt T / L`` near 1 the wall ``rho < 1/Lt`` leaves a rule almost no room above the uniform step;
            a ``UserWarning`` then says so (see ``euler_headroom``) and points to ``scheme="exponential"``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (default: ``ADAPTIVE_DEPTH_BACKEND`` or auto).
        branch_norm: divide each branch output by its root mean square over each example (all dims but the
            first), so a branch keeps unit scale whatever Lt does to the signal (docs/large_lt.md).
        branch_gain: ``None`` (default: no gain), ``"balanced"`` or a number: a learned scalar gain per
            block multiplying the branch, initialised at ``balanced_gain(Lt) = max(1, Lt)`` (or the number).
            With ``branch_norm`` this is the large-Lt recipe: at Lt >= 1 the update starts as the balanced
            ``a x + (1 - a) f(x) / |f(x)|`` instead of a leak that shrinks the signal by ~exp(-rho Lt) per block.
        branch_identity: the branch gets a learned linear term ``Lt * r * x`` (one scalar ``r`` per block, from
            1): the update starts as ``x + b f(x)``, a plain residual block whatever Lt, and training decides
            how much of the leak to keep (``r -> 0``: all of it; weight decay on ``r`` pulls that way). The
            general form of ``LeakyMLP``'s near-identity init, for any block (docs/large_lt.md).

    Example:
        >>> blocks = [nn.Sequential(nn.ReLU(), nn.Linear(64, 64)) for _ in range(12)]
        >>> net = LeakyResNet(blocks, effective_depth=3.0, scheme="exponential")
        >>> y = net(torch.randn(32, 64))
    """

    def __init__(self, blocks: Iterable[nn.Module], *, effective_depth: float = 0.0, total_time: float = 1.0,
                 steps: StepsInit = "uniform", scheme: str = "euler", activation: Optional[str] = None,
                 min_step: Optional[float] = None, max_step: Optional[float] = None,
                 backend: Optional[str] = None, branch_norm: bool = False, branch_gain: BranchGain = None,
                 branch_identity: bool = False):
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
        norm, gain = _check_branch_options(branch_norm, branch_gain, effective_depth)
        _check_flag(branch_identity, "branch_identity")
        self.steps, self._steps_init = build_steps(len(blocks), total_time=total_time,
                                                   effective_depth=effective_depth, scheme=scheme, init=steps,
                                                   min_step=min_step, max_step=max_step)
        self.blocks = nn.ModuleList(LeakyResidual._linked(b, self.steps, i, activation, backend, norm, gain,
                                                          branch_identity)
                                    for i, b in enumerate(blocks))
        self.steps.bind(list(self.blocks))
        _warn_euler_headroom(self.steps, effective_depth)

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



# ------------------------------------------------------------------------------- large Lt helpers
def with_identity(f: Tensor, x: Tensor, effective_depth: Tensor, identity: Tensor) -> Tensor:
    """``f + Lt r x``: the branch of a ``branch_identity`` block (0-dim factors: ``f`` keeps its dtype)."""
    return f + x * (effective_depth * identity)


def rms_normalise(f: Tensor, eps: float = 1e-6) -> Tensor:
    """``f / sqrt(mean(f^2) + eps)`` with the mean over every dim but the first (one scale per example)."""
    if f.dim() < 2:
        raise ValueError(f"branch_norm needs a batch dimension first: the branch gave shape {tuple(f.shape)}")
    dims = tuple(range(1, f.dim()))
    return f * torch.rsqrt(f.pow(2).mean(dim=dims, keepdim=True) + eps)


def balanced_gain(effective_depth: float) -> float:
    """The branch gain that balances the leak at initialisation: ``max(1, Lt)``.

    For Lt > 0 both schemes give ``b = (1 - a) / Lt``, so a gain of Lt makes the update the convex combination
    ``a x + (1 - a) f(x)``: with a unit-scale branch (``branch_norm``) the signal keeps its scale through any
    number of blocks instead of shrinking by ``a`` per block. Below Lt = 1 the gain stays 1 (a plain ResNet's
    branch weight at Lt = 0)."""
    lt = float(effective_depth)
    if not (math.isfinite(lt) and lt >= 0):
        raise ValueError(f"effective_depth must be a finite number >= 0, got {effective_depth!r}")
    return max(1.0, lt)


def _check_flag(value, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _check_branch_options(branch_norm, branch_gain: BranchGain, effective_depth) -> tuple:
    _check_flag(branch_norm, "branch_norm")
    if branch_gain is None:
        return branch_norm, None
    if isinstance(branch_gain, str):
        if branch_gain != "balanced":
            raise ValueError(f"branch_gain must be None, 'balanced' or a positive number, got {branch_gain!r}")
        return branch_norm, balanced_gain(float(effective_depth))
    if isinstance(branch_gain, bool) or not isinstance(branch_gain, (int, float)) \
            or not (math.isfinite(branch_gain) and branch_gain > 0):
        raise ValueError(f"branch_gain must be None, 'balanced' or a positive finite number, got {branch_gain!r}")
    return branch_norm, float(branch_gain)


def euler_headroom(depth: int, total_time: float, effective_depth: float,
                   max_step: Optional[float] = None) -> float:
    """How far (in units of the uniform step ``T/L``) a rule may raise a step under euler: ``max_step / (T/L)``
    with ``max_step`` the default bound when not given. ``inf`` at Lt = 0. Near 1 a rule has no room (e.g.
    L = 12, Lt = 10: 1.1); the exponential scheme has no wall and leaves ``T / (T/L) = L``."""
    if effective_depth <= 0 and max_step is None:
        return math.inf
    hi = default_bounds(depth, total_time, effective_depth, "euler")[1] if max_step is None else max_step
    return hi / (total_time / depth)


_MIN_HEADROOM = 1.5


def _warn_euler_headroom(steps: StepSizes, effective_depth: float) -> None:
    lt = float(effective_depth)  # the constructor's value: the buffer may be on the meta device
    if steps.scheme != "euler" or lt <= 0:
        return
    room = steps.max_step / (steps.total_time / steps.depth)
    if room < _MIN_HEADROOM:
        warnings.warn(
            f"scheme='euler' with effective_depth={lt:g}, depth={steps.depth}, total_time={steps.total_time:g}: "
            f"the euler wall rho < 1/Lt caps every step at max_step={steps.max_step:.4g}, {room:.2f}x the uniform "
            f"step, so an adaptive rule (AdaptiveSteps) has almost no room to act. Use scheme='exponential' "
            f"(no wall), more blocks, or a smaller effective_depth.", UserWarning, stacklevel=3)


def _branch_norm_layer(block: nn.Module, shortcut: Iterable[str]) -> Optional[nn.Module]:
    skip = {id(m) for name in shortcut if isinstance(getattr(block, name, None), nn.Module)
            for m in getattr(block, name).modules()}
    norms = [m for m in block.modules() if id(m) not in skip and m is not block
             and isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
             and getattr(m, "weight", None) is not None]
    return norms[-1] if norms else None


@torch.no_grad()
def balance_branches_(model: nn.Module, gain: BranchGain = "balanced") -> list:
    """Initialise every residual branch in ``model`` at the balanced gain for its group's Lt (in place).

    - a ``LeakyResidual`` built with ``branch_gain``: its gain is reset to ``balanced_gain(Lt)`` (or ``gain``);
    - a block made leaky by ``adaptive_depth.wrap`` (a torchvision / timm ResNet): the last affine norm
      layer of its branch (``bn2`` of a BasicBlock, ``bn3`` of a Bottleneck) is multiplied by the gain, so
      the branch, already normalised, starts balanced against the leak.

    Call it once, right after building or wrapping (a wrapped block's norm is scaled, not overwritten, so
    pretrained weights keep their shape; a second call scales again). Returns the names of the blocks
    changed. Raises ``ValueError`` (changing nothing) when a block has neither a gain nor a normalised branch.
    """
    if gain is None:
        raise ValueError("gain must be 'balanced' or a positive finite number, got None")
    _check_branch_options(False, gain, 0.0)
    plan = []
    for name, module in model.named_modules():
        if isinstance(module, LeakyResidual) and module.gain is not None:
            lt = float(module._group.effective_depth)
            plan.append((name, module.gain, None, lt))
        elif isinstance(module, LeakyResidual):
            raise ValueError(f"block {name!r} has no gain: build the LeakyResNet with branch_gain='balanced'")
        elif "_leaky_group" in module.__dict__:
            norm = _branch_norm_layer(module, module.__dict__["_leaky_adapter"].shortcut)
            if norm is None:
                raise ValueError(f"wrapped block {name!r} has no affine norm layer in its branch to carry a gain; "
                                 f"add one or wrap a model whose blocks end in a norm")
            plan.append((name, norm.weight, norm.bias, float(module.__dict__["_leaky_group"].effective_depth)))
    if not plan:
        raise ValueError("model has no leaky blocks: build it with LeakyResNet(..., branch_gain='balanced') "
                         "or adaptive_depth.wrap()")
    for name, weight, bias, lt in plan:
        g = _check_branch_options(False, gain, lt)[1]
        if bias is None:  # a LeakyResidual's own gain: set it
            weight.fill_(g)
        else:  # a norm layer's affine map: scale it
            weight.mul_(g)
            bias.mul_(g)
    return [name for name, *_ in plan]
