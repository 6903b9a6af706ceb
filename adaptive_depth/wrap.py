"""Turn the residual blocks of an existing ResNet (torchvision, timm) into leaky ones, in place and exactly.

    y = act(a * shortcut(x) + b * branch(x))        (a, b) from (rho, Lt, scheme), see ``ops``

``wrap`` keeps every block's own submodules and their names (plain checkpoints load, ``unwrap`` gives the
same weights back): each supported block's class is swapped for a subclass whose forward runs the block's
own modules in their original order and combines shortcut and branch with ``ops.fused_update`` (the
post-add ReLU fused into it). With ``effective_depth=0`` and unit steps (the default: horizon = number of
blocks in the group) the wrapped model computes bit for bit what the original computed.

The steps of each group live in one ``StepSizes`` registered once, under ``model.leaky_steps``; the blocks
refer to their group by an unregistered reference and an index.

Supported out of the box: torchvision ``BasicBlock`` / ``Bottleneck`` and timm's ResNet ``BasicBlock`` /
``Bottleneck`` (with their attention, drop-block, anti-aliasing and drop-path parts). Other block types
are added with ``register_adapter``.
"""
from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import rules
from .ops import check_backend, check_effective_depth, check_scheme, fused_update
from .residual import (LeakyResidual, StepsOwner, build_steps, refuse_torchscript_trace, torchscript_error,
                       with_identity)
from .steps import StepSizes

__all__ = ["wrap", "unwrap", "register_adapter", "unregister_adapter", "Adapter", "StepGroups",
           "wrapped_blocks"]

STEPS_NAME = "leaky_steps"
GROUPINGS = ("stage", "global")
Split = Callable[[nn.Module, Tensor], Tuple[Tensor, Tensor]]
Groups = Union[str, Sequence[Sequence[str]], Mapping[str, Sequence[str]]]


# ----------------------------------------------------------------------------------------- adapters
@dataclass(frozen=True)
class Adapter:
    """How to run one block type as a leaky step.

    Attributes:
        split: ``split(block, x) -> (shortcut, branch)``: the block's forward up to (not including) the
            residual add, calling the block's own submodules in the original order.
        activation: name of the block attribute holding the post-add activation (``None``: none). An
            ``nn.ReLU`` there is fused into the update; any other module is applied after it.
        shortcut: names of the block attributes that form the shortcut (their parameters are not part of
            the residual branch that the rho-scaled weight decay acts on).
    """
    split: Split
    activation: Optional[str] = None
    shortcut: Tuple[str, ...] = ("downsample",)


_ADAPTERS: Dict[type, Adapter] = {}


def register_adapter(block_type: type, split: Split, *, activation: Optional[str] = None,
                     shortcut: Sequence[str] = ("downsample",), replace: bool = False) -> Adapter:
    """Teach ``wrap`` a new residual block type.

    Args:
        block_type: the block class (matched exactly, subclasses are not covered).
        split: ``split(block, x) -> (shortcut, branch)``: the block's computation before the residual add,
            using the block's own submodules in the original order (so that ``Lt=0`` is exact).
        activation: attribute name of the activation applied after the add (``None``: no activation).
        shortcut: attribute names of the modules on the shortcut path (default ``("downsample",)``).
        replace: allow replacing an existing adapter (also a built-in one).

    Example:
        >>> class MyBlock(nn.Module):                     # forward: relu(self.proj(x) + self.body(x))
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.body, self.proj, self.act = nn.Conv2d(8, 8, 3, padding=1), nn.Identity(), nn.ReLU()
        ...     def forward(self, x):
        ...         return self.act(self.proj(x) + self.body(x))
        >>> register_adapter(MyBlock, lambda blk, x: (blk.proj(x), blk.body(x)),
        ...                  activation="act", shortcut=("proj",))
    """
    if not isinstance(block_type, type) or not issubclass(block_type, nn.Module):
        raise TypeError(f"block_type must be an nn.Module subclass, got {block_type!r}")
    if issubclass(block_type, _LeakyBlock):
        raise TypeError(f"block_type {block_type.__name__} is already a wrapped (leaky) block class")
    if not callable(split):
        raise TypeError(f"split must be callable as split(block, x) -> (shortcut, branch), got "
                        f"{type(split).__name__}")
    if activation is not None and not isinstance(activation, str):
        raise TypeError(f"activation must be None or an attribute name (str), got {type(activation).__name__}")
    if isinstance(shortcut, str) or not all(isinstance(s, str) for s in shortcut):
        raise TypeError(f"shortcut must be a sequence of attribute names, got {shortcut!r}")
    if block_type in _adapters() and not replace:
        raise ValueError(f"an adapter for {_qualname(block_type)} is already registered; pass replace=True "
                         f"to replace it")
    adapter = Adapter(split, activation, tuple(shortcut))
    _ADAPTERS[block_type] = adapter
    return adapter


def unregister_adapter(block_type: type) -> None:
    """Forget the adapter of ``block_type`` (blocks wrapped with it keep working)."""
    if block_type not in _adapters():
        raise ValueError(f"no adapter registered for {block_type!r}")
    del _ADAPTERS[block_type]


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _supported() -> str:
    return ", ".join(sorted(_qualname(t) for t in _adapters())) or "(none)"


def _call(block: nn.Module, name: str, x: Tensor) -> Tensor:
    """``block.<name>(x)``, or ``x`` when that part is absent (``None``) in this block."""
    module = getattr(block, name, None)
    return x if module is None else module(x)


def _torchvision_basic(block: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor]:
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.bn2(block.conv2(out))
    return _call(block, "downsample", x), out


def _torchvision_bottleneck(block: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor]:
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.relu(block.bn2(block.conv2(out)))
    out = block.bn3(block.conv3(out))
    return _call(block, "downsample", x), out


def _timm_basic(block: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor]:
    out = _call(block, "drop_block", block.bn1(block.conv1(x)))
    out = _call(block, "aa", block.act1(out))
    out = block.bn2(block.conv2(out))
    out = _call(block, "drop_path", _call(block, "se", out))
    return _call(block, "downsample", x), out


def _timm_bottleneck(block: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor]:
    out = block.act1(block.bn1(block.conv1(x)))
    out = _call(block, "drop_block", block.bn2(block.conv2(out)))
    out = _call(block, "aa", block.act2(out))
    out = block.bn3(block.conv3(out))
    out = _call(block, "drop_path", _call(block, "se", out))
    return _call(block, "downsample", x), out


# The zoo's block types, registered on first use and only if their module is already imported: the library
# never imports torchvision or timm itself (a model built from them has imported them).
_BUILTINS = {
    "torchvision.models.resnet": (("BasicBlock", _torchvision_basic, "relu"),
                                  ("Bottleneck", _torchvision_bottleneck, "relu")),
    "timm.models.resnet": (("BasicBlock", _timm_basic, "act2"), ("Bottleneck", _timm_bottleneck, "act3")),
}
_BUILTINS_SEEN: set = set()


def _adapters() -> Dict[type, Adapter]:
    """The registered adapters, with the built-in ones of every zoo module imported so far."""
    for module_name, entries in _BUILTINS.items():
        module = sys.modules.get(module_name)
        if module is None or module_name in _BUILTINS_SEEN:
            continue
        _BUILTINS_SEEN.add(module_name)
        for cls_name, split, activation in entries:
            cls = getattr(module, cls_name, None)
            if isinstance(cls, type) and cls not in _ADAPTERS:  # a user's own registration wins
                _ADAPTERS[cls] = Adapter(split, activation)
    return _ADAPTERS


# ------------------------------------------------------------------------------------ leaky blocks
class _LeakyBlock(nn.Module):
    """Mixin put in front of a block's class by ``wrap``; never instantiated on its own."""

    leaky_base: type  # the original block class (set on each generated subclass)

    def forward(self, x: Tensor) -> Tensor:
        d = self.__dict__
        refuse_torchscript_trace(type(self).__name__)
        shortcut, f = d["_leaky_adapter"].split(self, x)
        # branch_identity's r (getattr: under FX tracing a get_attr of the live parameter)
        r = getattr(self, IDENTITY_NAME) if IDENTITY_NAME in self._parameters else None
        activation = d["_leaky_adapter"].activation
        act = None if activation is None else getattr(self, activation)
        relu = type(act) is nn.ReLU
        y = _leaky_block_update(d["_leaky_group"], d["_leaky_index"], shortcut, f, relu, self.training,
                                d["_leaky_backend"], type(self).__name__, r)
        return y if act is None or relu else act(y)

    def __prepare_scriptable__(self):
        raise torchscript_error(type(self).__name__)

    def branch_parameters(self) -> Iterable[nn.Parameter]:
        """Parameters of the residual branch (all but the shortcut's), for the rho-scaled weight decay."""
        skip = {id(p) for name in self.__dict__["_leaky_adapter"].shortcut
                if isinstance(getattr(self, name, None), nn.Module) for p in getattr(self, name).parameters()}
        skip.add(id(self._parameters.get(IDENTITY_NAME)))
        return [p for p in self.parameters() if id(p) not in skip]

    def _load_from_state_dict(self, state_dict, prefix, *args):
        # a checkpoint of the plain model (or one wrapped without branch_identity) leaves r at its value
        missing = args[2]  # (local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        before = len(missing)
        super()._load_from_state_dict(state_dict, prefix, *args)
        missing[before:] = [k for k in missing[before:] if k != prefix + IDENTITY_NAME]

    def __reduce_ex__(self, protocol):
        # the class is made at run time; pickle (and deepcopy) rebuild it from the original block class
        return _rebuild, (type(self).leaky_base,), self.__dict__

    def extra_repr(self) -> str:
        d = self.__dict__
        base = super().extra_repr()
        return (base + ", " if base else "") + f"leaky_group={d['_leaky_group_name']!r}, index={d['_leaky_index']}"


_CLASSES: Dict[type, type] = {}


def _leaky_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Leaky{cls.__name__}", (_LeakyBlock, cls),
                             {"__module__": __name__, "leaky_base": cls,
                              "__doc__": f"{cls.__name__} as a leaky residual step (made by adaptive_depth.wrap)."})
    return _CLASSES[cls]


def _rebuild(cls: type) -> nn.Module:
    leaky = _leaky_class(cls)
    return leaky.__new__(leaky)


#: the learned identity coefficient r of a block wrapped with ``branch_identity=True``
IDENTITY_NAME = "leaky_identity"


def identity_coefficient(block: nn.Module) -> Optional[nn.Parameter]:
    """The ``branch_identity`` coefficient r of a leaky block (a ``LeakyResidual`` or a wrapped block), or None."""
    return block._parameters.get("identity" if isinstance(block, LeakyResidual) else IDENTITY_NAME)
_LEAKY_ATTRS = ("_leaky_adapter", "_leaky_group", "_leaky_group_name", "_leaky_index", "_leaky_backend")


# ------------------------------------------------------------------------------------------ update
def _leaky_block_update(group: StepSizes, index: int, shortcut: Tensor, f: Tensor, relu: bool, training: bool,
                        backend: str, name: str, identity: Optional[Tensor] = None) -> Tensor:
    """``act(a x + b f)`` of block ``index`` of ``group``, from the group's live steps.

    The coefficients are computed at every call from ``rho`` and ``Lt`` (a handful of scalar ops): a cache
    keyed by version counters misses in-place writes through ``.data``, so it is not kept. Under
    ``torch.fx`` tracing this function is a leaf (``torch.fx.wrap``): the graph calls it with the group
    itself (a ``get_attr`` of the live ``StepSizes``), so a traced model (``create_feature_extractor``)
    follows later step changes and records statistics while the group records.
    """
    if f.shape != shortcut.shape:
        raise ValueError(f"{name}: the residual branch gives shape {tuple(f.shape)} but the shortcut gives "
                         f"{tuple(shortcut.shape)}; check the block's adapter")
    if identity is not None:  # branch_identity: + Lt r shortcut
        f = with_identity(f, shortcut, group.effective_depth, identity)
    a, b = group.coefficients()
    record = group.recording and training
    y, s = fused_update(shortcut, f, a, b, group.effective_depth, relu=relu, stats=record, backend=backend,
                        index=index)
    if record:
        group.record(index, s)
    return y


torch.fx.wrap("_leaky_block_update")


# ----------------------------------------------------------------------------------------- groups
class StepGroups(StepsOwner, nn.ModuleDict):
    """The ``StepSizes`` of a wrapped model, one per group, registered once as ``model.leaky_steps``.

    It is placed first among the model's children and its forward is the identity, so idioms such as
    ``nn.Sequential(*list(model.children())[:-1])`` keep working (and keep the steps). ``reset_parameters()``
    (and ``to_empty()`` of a model wrapped on the meta device) puts every group back to the steps and
    effective depth ``wrap`` gave it.
    """

    def forward(self, x):
        return x

    def _owned_steps(self):
        initial = self.__dict__.get("_leaky_initial", {})
        return [(group, initial[key]) for key, group in self.items() if key in initial]

    def __prepare_scriptable__(self):
        raise torchscript_error("a model wrapped by adaptive_depth.wrap")


def _blocks_by_name(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The supported blocks of ``model`` in module order; TypeError for residual-looking blocks we lack."""
    blocks, unknown = [], {}
    for name, module in model.named_modules():
        cls = type(module)
        if isinstance(module, _LeakyBlock):
            raise ValueError(f"model is already wrapped ({name or 'the model'} is a {cls.__name__}); call "
                             f"unwrap(model) first")
        if cls in _adapters():
            blocks.append((name, module))
        elif _looks_residual(cls):
            unknown.setdefault(_qualname(cls), name)
    if unknown:
        found = ", ".join(f"{t} (at {n!r})" for t, n in unknown.items())
        raise TypeError(f"model contains residual blocks wrap() does not support: {found}. Supported: "
                        f"{_supported()}. Register one with adaptive_depth.register_adapter(BlockType, "
                        f"split, activation=..., shortcut=...), where split(block, x) returns (shortcut, "
                        f"branch) computed by the block's own modules")
    if not blocks:
        raise TypeError(f"model ({type(model).__name__}) contains no supported residual block. Supported: "
                        f"{_supported()}. Register one with adaptive_depth.register_adapter(BlockType, "
                        f"split, activation=..., shortcut=...)")
    return blocks


def _looks_residual(cls: type) -> bool:
    """Blocks we must not silently skip: subclasses of supported blocks, and classes named like blocks."""
    if any(issubclass(cls, t) for t in _adapters()):
        return True
    return cls.__name__.endswith(("Block", "Bottleneck"))


def _key(name: str) -> str:
    return name.replace(".", "_") or "blocks"


def _assign_groups(blocks: List[Tuple[str, nn.Module]], groups: Groups) -> Dict[str, List[str]]:
    """Group name -> block names, in module order; ValueError/TypeError naming ``groups`` otherwise."""
    names = [n for n, _ in blocks]
    if isinstance(groups, str):
        if groups == "global":
            return {"global": names}
        if groups != "stage":
            raise ValueError(f"groups must be one of {GROUPINGS} or explicit groups (a list of lists of block "
                             f"names, or a dict name -> block names), got {groups!r}")
        out: Dict[str, List[str]] = {}
        last = None
        for n in names:
            parent = n.rpartition(".")[0]
            if parent != last:
                key, k = _key(parent), 1
                while key in out:
                    key, k = f"{_key(parent)}_{k}", k + 1
                out[key], last = [], parent
            out[key].append(n)
        return out
    if isinstance(groups, Mapping):
        items = list(groups.items())
    elif isinstance(groups, Sequence):
        items = [(f"group{i}", g) for i, g in enumerate(groups)]
    else:
        raise TypeError(f"groups must be a string, a list of lists of block names or a dict, got "
                        f"{type(groups).__name__}")
    out, seen = {}, {}
    for key, members in items:
        if not isinstance(key, str) or not key or "." in key:
            raise ValueError(f"groups: group names must be non-empty strings without '.', got {key!r}")
        if isinstance(members, str) or not isinstance(members, Sequence) or not members:
            raise ValueError(f"groups[{key!r}] must be a non-empty list of block names, got {members!r}")
        for n in members:
            if n not in names:
                raise ValueError(f"groups[{key!r}] names {n!r}, which is not a supported block of the model; "
                                 f"blocks: {names}")
            if n in seen:
                raise ValueError(f"groups: block {n!r} is in both {seen[n]!r} and {key!r}")
            seen[n] = key
        out[key] = list(members)
    missing = [n for n in names if n not in seen]
    if missing:
        raise ValueError(f"groups must place every block in one group; missing: {missing}")
    return out


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    inner = getattr(model, "module", None) if isinstance(
        model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.Module):
        raise TypeError(f"model is a {type(model).__name__} around a {type(inner).__name__}: wrap the inner "
                        f"module first, then apply DistributedDataParallel / torch.compile to it")


# ------------------------------------------------------------------------------------------- wrap
def wrap(model: nn.Module, *, effective_depth: float = 0.0, scheme: str = "euler", groups: Groups = "stage",
         inplace: bool = True, total_time: Optional[float] = None, steps: str = "uniform",
         backend: Optional[str] = None, branch_identity: bool = False) -> nn.Module:
    """Make every residual block of ``model`` a leaky one with adaptive step sizes.

        y = act(a_l * shortcut_l(x) + b_l * branch_l(x))    euler: a = 1 - rho_l Lt, b = rho_l

    With ``effective_depth=0`` and the default horizon (unit steps) the model computes exactly what it
    computed before, in train and eval mode, BatchNorm included; raise ``Lt`` over training with
    ``adaptive_depth.schedule.EffectiveDepthScheduler`` on a pretrained model.

    Args:
        model: a torchvision or timm ResNet (or any model whose blocks have adapters, see
            ``register_adapter``). Not a DDP / compiled wrapper: wrap first, then apply those.
        effective_depth: Lt >= 0 for every group (0: the original network).
        scheme: ``"euler"`` (the paper; needs ``rho * Lt < 1``, so ``Lt < 1`` at unit steps) or
            ``"exponential"`` (any Lt).
        groups: ``"stage"`` (default: one time horizon per stage, i.e. per run of blocks sharing a parent
            container such as ``layer1``), ``"global"`` (one for the whole model), or explicit groups: a list
            of lists of block names (``model.named_modules()`` names) or a dict ``group name -> names``.
        inplace: modify ``model`` (default) or a deep copy of it.
        total_time: the horizon T of every group; ``None`` (default): the number of blocks in the group,
            which makes the steps 1 and the wrapped model equal to the original at Lt = 0.
        steps: initial steps, ``"uniform"``, ``"irregular"`` (the paper's fixed profile) or ``"fine_ends"``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` for ``ops.fused_update``.
        branch_identity: give every block a learned scalar ``leaky_identity`` (r, from 1) and add
            ``Lt * r * shortcut(x)`` to its branch: the leak is cancelled at initialisation, so at any Lt the
            wrapped model starts as the original with its branches scaled by ``b`` (exactly the original under
            euler with unit steps). Train r at lr / Lt (``recipes.identity_param_groups``); ``docs/large_lt.md``.
            A checkpoint without the coefficients loads and leaves them at 1.

    Returns:
        The wrapped model (``model`` itself when ``inplace``). Its groups are ``model.leaky_steps`` (one
        ``StepSizes`` each); ``AdaptiveSteps(optimizer, model)`` and ``step_sizes(model)`` find them. Their
        per-rank statistics are plain tensors, not buffers, so ``DistributedDataParallel(model)`` does not
        overwrite them with rank 0's (the plugin all-reduces them).

    Example:
        >>> model = wrap(torchvision.models.resnet18(num_classes=10))     # exact: Lt = 0, unit steps
        >>> opt = AdaptiveSteps(torch.optim.SGD(model.parameters(), lr=0.1), model)
    """
    _check_model(model)
    lt = check_effective_depth(effective_depth)
    check_scheme(scheme)
    backend = check_backend(backend)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    if not isinstance(branch_identity, bool):
        raise TypeError(f"branch_identity must be True or False, got {branch_identity!r}")
    if not isinstance(steps, str) or steps not in rules.PROFILES:
        raise ValueError(f"steps must be one of {sorted(rules.PROFILES)}, got {steps!r}")
    if total_time is not None and (isinstance(total_time, bool) or not isinstance(total_time, (int, float))
                                   or not (math.isfinite(total_time) and total_time > 0)):
        raise ValueError(f"total_time must be None (number of blocks per group) or a finite number > 0, got "
                         f"{total_time!r}")
    blocks = _blocks_by_name(model)
    if hasattr(model, STEPS_NAME):
        raise ValueError(f"model already has an attribute {STEPS_NAME!r}; wrap() registers the steps there")
    assignment = _assign_groups(blocks, groups)

    # every check (the euler wall included) happens in StepSizes before the model is touched
    made = {}
    for key, members in assignment.items():
        horizon = float(len(members)) if total_time is None else float(total_time)
        try:
            made[key] = build_steps(len(members), total_time=horizon, effective_depth=lt, scheme=scheme,
                                    init=steps)
        except ValueError as err:
            raise ValueError(f"group {key!r} ({len(members)} blocks): {err}") from None
    if not inplace:
        model = copy.deepcopy(model)

    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    by_name = dict(model.named_modules())
    container = StepGroups()
    container.__dict__["_leaky_initial"] = {key: snapshot for key, (_, snapshot) in made.items()}
    for key, members in assignment.items():
        group = made[key][0].to(device)
        group.optional_in_checkpoint = True
        layers = []
        for index, name in enumerate(members):
            block = by_name[name]
            adapter = _adapters()[type(block)]
            block.__class__ = _leaky_class(type(block))
            block.__dict__.update(_leaky_adapter=adapter, _leaky_group=group, _leaky_group_name=key,
                                  _leaky_index=index, _leaky_backend=backend)
            if branch_identity:
                dtype = next((p.dtype for p in block.parameters() if p.is_floating_point()), torch.float32)
                block.register_parameter(IDENTITY_NAME, nn.Parameter(torch.ones((), dtype=dtype, device=device)))
            layers.append(block)
        group.bind(layers)
        container[key] = group
    children = list(model._modules.items())
    model._modules.clear()
    model._modules[STEPS_NAME] = container
    model._modules.update(children)
    return model


def unwrap(model: nn.Module, *, inplace: bool = True) -> nn.Module:
    """Undo ``wrap``: the plain model with the same weights (the step sizes are dropped).

    The plain model computes what the wrapped one did only at ``Lt = 0`` with unit steps; otherwise it is
    the original architecture carrying the trained weights.
    """
    _check_model(model)
    if not isinstance(model._modules.get(STEPS_NAME), StepGroups):
        raise ValueError(f"model is not wrapped (no {STEPS_NAME!r} from adaptive_depth.wrap)")
    if not inplace:
        model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, _LeakyBlock):
            for attr in _LEAKY_ATTRS:
                module.__dict__.pop(attr, None)
            module._parameters.pop(IDENTITY_NAME, None)
            module.__class__ = type(module).leaky_base
    del model._modules[STEPS_NAME]
    return model


def wrapped_blocks(model: nn.Module) -> List[Tuple[str, str, int]]:
    """``(block name, group name, index in the group)`` for every leaky block ``wrap`` made in ``model``."""
    return [(name, m.__dict__["_leaky_group_name"], m.__dict__["_leaky_index"])
            for name, m in model.named_modules() if isinstance(m, _LeakyBlock)]


