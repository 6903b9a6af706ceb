"""Adaptive depth: grow (refine) or shrink (coarsen) the step groups of a network during training.

A step group is a run of leaky blocks sharing one time horizon ``T = sum_l rho_l`` (a ``LeakyResNet``, the
blocks of a ``LeakyMLP``, one stage of a ``wrap``-ed torchvision/timm ResNet). Refining a group splits the
step of a block into ``n`` pieces of ``rho / n`` and inserts ``n - 1`` new blocks after it, so the horizon
stays ``T``: the multi-level training of Chang et al. (2018) when every block is doubled (``how="uniform"``),
an adaptive mesh refinement when the pieces go to the blocks whose measured step-distance
``rho_l ||f_l - Lt x|| / ||x||`` is largest (``how="adaptive"``). Coarsening merges adjacent blocks whose
step-distance is smallest.

    model = LeakyResNet(blocks, total_time=1.0)              # 2 blocks
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    grow = DepthScheduler(model, opt, at=[500, 1000])        # 2 -> 4 -> 8
    for x, y in loader:
        loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad(); grow.step()

The optimizer is updated in place: new parameters join the parameter group of the block they were copied
from (right after that block's parameters, so the group keeps the order of ``model.parameters()``), with a
copy of that block's optimizer state or none (``state="fresh"``); removed parameters leave it. LR schedulers
keep working (they hold the same parameter groups). Under ``DistributedDataParallel`` refine the inner
module on every rank and wrap it in a new DDP afterwards (DDP fixes its parameter list when built).
"""
from __future__ import annotations

import copy
import functools
import inspect
import math
import types
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ._validate import check_choice
from .ops import step_coefficients
from .steps import StepSizes, step_groups
from .wrap import identity_coefficient

__all__ = ["refine", "coarsen", "refine_plan", "coarsen_plan", "measure_distances", "depths", "DepthScheduler",
           "HOWS", "INITS", "STATES"]  # and DepthCallback (made on first use: it needs Lightning)

HOWS = ("uniform", "adaptive")
INITS = ("copy", "interpolate", "zero")
STATES = ("copy", "fresh")
MERGES = ("merge", "drop")
DEFAULT_STATE = "fresh"  # measured: see docs/depth.md (growth benchmark, tuning seeds)
_AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm, nn.LayerNorm,
           nn.modules.batchnorm._BatchNorm)


# ------------------------------------------------------------------------------------------ groups
@dataclass
class _Group:
    """One step group seen from outside: its steps, its blocks and the container that holds them."""
    steps: StepSizes
    blocks: List[nn.Module]
    container: nn.Module     # an nn.Sequential / nn.ModuleList whose children include the blocks
    keys: List[str]          # the blocks' names in the container

    @property
    def depth(self) -> int:
        return len(self.blocks)


def _groups(model: nn.Module) -> List[_Group]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise TypeError("model is a DistributedDataParallel/DataParallel wrapper: refine its .module on every "
                        "rank, then wrap it in a new DistributedDataParallel (DDP fixes its parameters when built)")
    groups = step_groups(model)
    if not groups:
        raise ValueError("model has no step groups: build it with LeakyResNet / LeakyMLP or adaptive_depth.wrap()")
    parents: Dict[int, Tuple[nn.Module, str]] = {}
    for module in model.modules():
        for key, child in module._modules.items():
            if child is not None:
                parents.setdefault(id(child), (module, key))
    out = []
    for gi, g in enumerate(groups):
        blocks = list(g._layers)
        if len(blocks) != g.depth or not blocks:
            raise ValueError(f"step group {gi} is not bound to its {g.depth} blocks")
        where = [parents.get(id(b)) for b in blocks]
        if any(w is None for w in where):
            raise TypeError(f"step group {gi}: a standalone LeakyResidual (or a block outside the model) cannot "
                            f"change depth; use a LeakyResNet")
        container = where[0][0]
        keys = [w[1] for w in where]
        if any(w[0] is not container for w in where) or not isinstance(container, (nn.Sequential, nn.ModuleList)):
            raise TypeError(f"step group {gi}: its blocks must be the children of one nn.Sequential or "
                            f"nn.ModuleList to change depth (got a {type(container).__name__})")
        names = list(container._modules)
        pos = [names.index(k) for k in keys]
        if pos != list(range(pos[0], pos[0] + len(pos))):
            raise TypeError(f"step group {gi}: its blocks must be consecutive children of their container")
        if not all(k.isdigit() for k in names):
            raise TypeError(f"step group {gi}: the container's children must be numbered (an nn.Sequential "
                            f"built from a list), got names {names}")
        out.append(_Group(g, blocks, container, keys))
    return out


def _shortcut_modules(block: nn.Module) -> List[nn.Module]:
    adapter = block.__dict__.get("_leaky_adapter")
    if adapter is None:
        return []
    return [m for m in (getattr(block, n, None) for n in adapter.shortcut) if isinstance(m, nn.Module)]


def _splittable(block: nn.Module) -> bool:
    """A block can be copied next to itself only if it keeps the shape (no projection on its shortcut)."""
    return not _shortcut_modules(block)


def _branch_modules(block: nn.Module) -> List[nn.Module]:
    """The branch's submodules in registration order (a wrapped block without its shortcut and post-add
    activation)."""
    adapter = block.__dict__.get("_leaky_adapter")
    if adapter is None:
        root = getattr(block, "block", block)
        return list(root.modules())
    act = getattr(block, adapter.activation, None) if adapter.activation else None
    skip = {id(m) for s in _shortcut_modules(block) + ([act] if isinstance(act, nn.Module) else [])
            for m in s.modules()}
    return [m for m in block.modules() if id(m) not in skip]


def _last_affine(block: nn.Module) -> nn.Module:
    """The branch's last registered leaf module (identities aside); it must be output-linear in its
    parameters (a Linear, Conv or affine norm layer), so that scaling them scales the branch."""
    leaves = [m for m in _branch_modules(block) if not m._modules and not isinstance(m, nn.Identity)]
    last = leaves[-1] if leaves else None
    if not isinstance(last, _AFFINE) or getattr(last, "weight", None) is None:
        found = type(last).__name__ if last is not None else "nothing"
        raise ValueError(f"init='zero' needs a branch whose last layer is a Linear, Conv or affine norm layer "
                         f"(scaling its weight and bias then scales the branch); this branch ends in {found}. "
                         f"Use init='copy'")
    return last


def _branch_scale_params(block: nn.Module) -> List[nn.Parameter]:
    """The parameters whose scaling scales the branch as the update sees it (``init="zero"``): the learned gain
    of a ``branch_norm`` block (the normalisation undoes any scaling of the branch's own layers), otherwise
    the weight and bias of the branch's last layer (a ``branch_identity`` block's ``r`` is set apart: see
    ``_scale_branch_``)."""
    if getattr(block, "branch_norm", False):
        gain = getattr(block, "gain", None)
        if not isinstance(gain, nn.Parameter):
            raise ValueError("init='zero' on a block with branch_norm=True needs a learned gain (build the "
                             "LeakyResNet with branch_gain='balanced' or a number): the RMS normalisation undoes "
                             "any scaling of the branch's layers. Use init='copy'")
        return [gain]
    return list(_last_affine(block).parameters(recurse=False))


def _scale_branch_(block: nn.Module, scale: float) -> None:
    """Scale the branch as the update sees it by ``scale`` (0: the branch zeroed). A ``branch_identity`` block's
    ``r - 1`` scales with it, so ``scale = 0`` leaves ``r = 1``: the block is then the identity map."""
    for p in _branch_scale_params(block):
        if scale:
            p.mul_(scale)
        else:
            p.zero_()
    r = identity_coefficient(block)
    if r is not None:  # (r has no effect at Lt = 0)
        r.sub_(1.0).mul_(scale).add_(1.0)


def _copy_block(block: nn.Module, group: StepSizes) -> nn.Module:
    """A deep copy of a block that still refers to the same step group (not a copy of it)."""
    return copy.deepcopy(block, memo={id(group): group})


def _set_index(block: nn.Module, index: int) -> None:
    if "_leaky_index" in block.__dict__:
        block.__dict__["_leaky_index"] = index
    else:
        block.index = index


# ------------------------------------------------------------------------------------ measurement
@torch.no_grad()
def measure_distances(model: nn.Module, inputs) -> List[Tensor]:
    """Per-block step-distances ``rho_l ||f_l - Lt x|| / ||x||`` of every group, measured on ``inputs``.

    One forward pass in train mode without gradients; the model's training flags, buffers (BatchNorm running
    statistics) and recorded statistics are left as they were. Under ``torch.distributed`` the sums are
    all-reduced, so every rank gets the same distances (and so the same refinement).
    """
    groups = step_groups(model)
    saved = [(g.recording, g.velocity_sq.clone(), g.input_sq.clone(), g.count.clone()) for g in groups]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for g in groups:
            g.reset_stats()
            g.recording = True
        model.train()
        model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)
        sums = [torch.stack([g.velocity_sq, g.input_sq]).clone() for g in groups]
    finally:
        for g, (rec, v, s, c) in zip(groups, saved):
            g.recording = rec
            g.velocity_sq.copy_(v), g.input_sq.copy_(s), g.count.copy_(c)
        for b, old in buffers:
            b.copy_(old)
        for m, mode in modes:
            m.training = mode
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for s in sums:
            torch.distributed.all_reduce(s)
    return [g.rho.detach().double().cpu() * (s[0] / s[1].clamp(min=1e-300)).sqrt().cpu()
            for g, s in zip(groups, sums)]


def _distances(model: nn.Module, inputs, what: str) -> List[Tensor]:
    if inputs is not None:
        return measure_distances(model, inputs)
    out = []
    for g in step_groups(model):
        if not bool((g.count > 0).all()):
            raise ValueError(f"{what} needs the blocks' measured speeds: pass inputs=<a batch> (measured with one "
                             f"forward pass), or call it right after a forward pass that recorded statistics")
        out.append(g.rho.detach().double().cpu() * g.speed())
    return out


def _allocate(distance: Tensor, allowed: Sequence[bool], total: int) -> List[int]:
    """Pieces per block summing to ``total``: repeatedly give one more to the block with the largest
    distance per piece (equidistribution, the h-refinement rule); ties go to the first block."""
    n = [1] * len(allowed)
    d = [float(v) if math.isfinite(float(v)) else 0.0 for v in distance]
    for _ in range(total - len(n)):
        best = max((i for i, ok in enumerate(allowed) if ok), key=lambda i: (d[i] / n[i], -i))
        n[best] += 1
    return n


# ------------------------------------------------------------------------------ optimizer surgery
def _insert_after(optimizer, anchors: Sequence[nn.Parameter], new: Sequence[nn.Parameter]) -> None:
    """Insert ``new`` (a block's parameters) right after the last of ``anchors`` in its parameter group."""
    for group in optimizer.param_groups:
        params = group["params"]
        here = {id(p) for p in params}
        last = max((i for i, p in enumerate(params) if id(p) in {id(a) for a in anchors}), default=None)
        if last is not None:
            params[last + 1:last + 1] = [p for p, a in zip(new, anchors) if id(a) in here]


def _clone_state(state: dict) -> dict:
    return {k: (v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in state.items()}


def _mix_states(states: Sequence[dict], weights: Sequence[float], shape) -> dict:
    """A weighted average of same-shaped tensor states (other entries from the first state)."""
    out = _clone_state(states[0])
    for k, v in out.items():
        if torch.is_tensor(v) and v.shape == shape and all(torch.is_tensor(s.get(k)) for s in states):
            acc = sum(w * s[k].detach().double() for s, w in zip(states, weights))
            out[k] = acc.to(v.dtype)
    return out


def _remove_params(optimizer, params: Iterable[nn.Parameter]) -> None:
    ids = {id(p) for p in params}
    for group in optimizer.param_groups:
        group["params"][:] = [p for p in group["params"] if id(p) not in ids]
    for p in [p for p in optimizer.state if id(p) in ids]:
        del optimizer.state[p]


def _remap_step_state(optimizer, rho: nn.Parameter, index: Sequence[Sequence[int]]) -> None:
    """Learned steps: entry j of the new rho's optimizer state is the mean over ``index[j]`` of the old."""
    state = optimizer.state.get(rho) if optimizer is not None else None
    if not state:
        return
    old = rho.shape[0]
    for k, v in list(state.items()):
        if torch.is_tensor(v) and v.dim() == 1 and v.shape[0] == old:
            state[k] = torch.stack([v[list(ix)].mean(0) for ix in index])


def _rebind(optimizer) -> None:
    """Tell an ``AdaptiveSteps`` that its groups changed depth (a plain optimizer needs nothing more)."""
    if optimizer is not None and hasattr(optimizer, "rebind"):
        optimizer.rebind()


# ------------------------------------------------------------------------------------------ plans
def _resize_steps(g: StepSizes, rho: Tensor, blocks: List[nn.Module]) -> None:
    """Give a group a new depth: steps, bounds, statistics (``StepSizes.resize_``), the blocks it steers."""
    g.resize_(rho)
    for i, b in enumerate(blocks):
        _set_index(b, i)
    g.bind(blocks)


def _set_container(group: _Group, blocks: List[nn.Module]) -> None:
    mods = group.container._modules
    names = list(mods)
    start = names.index(group.keys[0])
    children = [mods[k] for k in names[:start]] + blocks + [mods[k] for k in names[start + group.depth:]]
    mods.clear()
    for i, child in enumerate(children):
        mods[str(i)] = child


def _zero_split_scale(rho: float, n: int, lt: float, scheme: str, identity: bool = False) -> float:
    """Scale for the kept block's branch so that it followed by ``n - 1`` zero-branch blocks, all with step
    ``rho / n``, has the original branch coefficient (exact at Lt = 0, and under the exponential scheme).

    ``identity``: ``branch_identity`` blocks, whose zero-branch copies (``r = 1``) are the identity, not a leak.
    The kept block ``y = (a + b Lt r) x + b g f`` then keeps its map when ``g`` and ``r - 1`` are both scaled by
    ``b(rho) / b(rho / n)``, under either scheme (``a + b Lt = 1`` for both)."""
    r = torch.tensor([rho, rho / n], dtype=torch.float64)
    a, b = step_coefficients(r, lt, scheme)
    return float(b[0] / b[1] if identity else b[0] / (b[1] * a[1] ** (n - 1)))


def _check_distances(distances, groups: List[_Group]) -> List[Tensor]:
    """``distances`` as float64 vectors: one per group, one finite value >= 0 per block."""
    if isinstance(distances, (str, bytes)) or not isinstance(distances, Sequence) or len(distances) != len(groups):
        raise ValueError(f"distances must hold one vector per step group ({len(groups)}), got {distances!r}")
    out = []
    for gi, (grp, d) in enumerate(zip(groups, distances)):
        try:
            d = torch.as_tensor(d, dtype=torch.float64).detach().cpu().reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"distances of group {gi} must be {grp.depth} numbers, got {d!r}") from None
        if d.numel() != grp.depth or not bool(torch.isfinite(d).all()) or bool((d < 0).any()):
            raise ValueError(f"distances of group {gi} must be {grp.depth} finite numbers >= 0, got {d.tolist()}")
        out.append(d)
    return out


def _check_pieces(pieces, groups: List[_Group]) -> List[List[int]]:
    """``pieces`` as lists of ints: one list per group, one integer >= 1 per block."""
    def bad(why):
        return ValueError(f"pieces must hold, per step group, one integer >= 1 per block ({[g.depth for g in groups]} "
                          f"blocks): {why}, got {pieces!r}")
    if isinstance(pieces, (str, bytes)) or not isinstance(pieces, Sequence):
        raise bad("not a list of lists")
    if len(pieces) != len(groups):
        raise bad(f"{len(pieces)} groups for the model's {len(groups)}")
    out = []
    for gi, (grp, row) in enumerate(zip(groups, pieces)):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence) or len(row) != grp.depth:
            raise bad(f"group {gi} needs {grp.depth} entries")
        for n in row:
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise bad(f"group {gi} has {n!r}")
        out.append([int(n) for n in row])
    return out


@torch.no_grad()
def _apply_refine(model, optimizer, plan: dict, groups: Optional[List[_Group]] = None) -> None:
    """Apply a refinement plan: ``plan["pieces"][gi][l]`` pieces for block l of group gi."""
    groups = _groups(model) if groups is None else groups
    init, state_policy = plan["init"], plan["state"]
    # --- validate and build everything first: a failed call leaves model and optimizer as they were
    work = []
    for gi, (grp, pieces) in enumerate(zip(groups, _check_pieces(plan["pieces"], groups))):
        for l, n in enumerate(pieces):
            if n > 1 and not _splittable(grp.blocks[l]):
                raise ValueError(f"group {gi}: block {l} has a projection on its shortcut and cannot be split")
        rho = grp.steps.rho.detach().double().cpu()
        lt, scheme = float(grp.steps.effective_depth), grp.steps.scheme
        new_rho, new_blocks, made = [], [], []
        for l, n in enumerate(pieces):
            blk = grp.blocks[l]
            new_rho += [float(rho[l]) / n] * n
            copies = [_copy_block(blk, grp.steps) for _ in range(n - 1)]
            scale = None
            if init == "zero" and n > 1:
                scale = _zero_split_scale(float(rho[l]), n, lt, scheme, identity_coefficient(blk) is not None)
                _branch_scale_params(blk)  # raises here, before any change
                for c in copies:
                    _scale_branch_(c, 0.0)
            elif init == "interpolate" and n > 1 and l + 1 < grp.depth and _same_shapes(blk, grp.blocks[l + 1]):
                nxt = dict(grp.blocks[l + 1].named_parameters())
                for j, c in enumerate(copies, start=1):
                    for name, p in c.named_parameters():
                        p.copy_(torch.lerp(p.double(), nxt[name].double(), j / n).to(p.dtype))
            new_blocks.append(blk)
            new_blocks += copies
            made.append((l, blk, copies, scale))
        new_rho = torch.tensor(new_rho, dtype=torch.float64)
        if scheme == "euler" and float(new_rho.max()) * lt >= 1.0:
            raise ValueError(f"group {gi}: the split steps break rho * Lt < 1")  # cannot happen (smaller steps)
        work.append((grp, new_rho, new_blocks, made))
    # --- apply
    for grp, new_rho, new_blocks, made in work:
        index = [[l] for l, _, copies, _ in made for _ in range(1 + len(copies))]
        _remap_step_state(optimizer, grp.steps.rho, index)
        for l, blk, copies, scale in made:
            if scale is not None:
                _scale_branch_(blk, scale)
            if optimizer is not None:
                _add_copies(optimizer, blk, copies, grp, l, init, state_policy)
        _set_container(grp, new_blocks)
        _resize_steps(grp.steps, new_rho, new_blocks)
    _rebind(optimizer)


def _same_shapes(a: nn.Module, b: nn.Module) -> bool:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(pa[k].shape == pb[k].shape for k in pa)


def _add_copies(optimizer, blk, copies, grp: _Group, l: int, init: str, state_policy: str) -> None:
    src = list(blk.parameters())
    nxt = dict(grp.blocks[l + 1].named_parameters()) if l + 1 < grp.depth else {}
    names = [n for n, _ in blk.named_parameters()]
    anchors = src
    n = len(copies) + 1
    for j, c in enumerate(copies, start=1):
        new = list(c.parameters())
        _insert_after(optimizer, anchors, new)
        if state_policy == "copy":
            for name, p_src, p_new in zip(names, src, new):
                s = optimizer.state.get(p_src)
                if not s:
                    continue
                s_next = optimizer.state.get(nxt.get(name)) if init == "interpolate" and name in nxt else None
                if s_next and nxt[name].shape == p_src.shape:
                    optimizer.state[p_new] = _mix_states([s, s_next], [1 - j / n, j / n], p_src.shape)
                else:
                    optimizer.state[p_new] = _clone_state(s)
        anchors = new


# ---------------------------------------------------------------------------------------- refine
def refine(model: nn.Module, optimizer=None, *, how: str = "uniform", factor: int = 2, init: str = "copy",
           state: str = DEFAULT_STATE, inputs=None, pieces: Optional[Sequence[Sequence[int]]] = None) -> nn.Module:
    """Grow every step group of ``model`` in place: split steps, insert blocks; return ``model``.

    Args:
        model: a ``LeakyResNet``, ``LeakyMLP``, a ``wrap``-ed ResNet, or any module holding them (not a DDP
            wrapper: refine its ``.module`` and wrap it again).
        optimizer: the optimizer (or ``AdaptiveSteps``) training ``model``, updated to match; or ``None``.
        how: ``"uniform"``: every block becomes ``factor`` blocks with ``rho / factor`` each (Chang et al.'s
            multi-level step; blocks with a projection shortcut, e.g. a stage's downsampling block, stay);
            ``"adaptive"``: the group grows to ``factor * L`` blocks, the pieces going to the blocks with the
            largest step-distance ``rho_l ||f_l - Lt x|| / ||x||`` (equidistribution).
        factor: integer >= 2.
        init: the new blocks: ``"copy"`` of the block they split (Chang), ``"interpolate"`` between it and
            the next block's weights, or ``"zero"`` (the new blocks' last layer zeroed and the kept block's
            last layer rescaled: the network's function is unchanged, exactly at Lt = 0 and under the
            exponential scheme; with ``branch_identity`` the new blocks are the identity, ``g = 0`` and
            ``r = 1``, and the kept block's ``g`` and ``r - 1`` are rescaled, exact under either scheme).
        state: optimizer state of the new parameters: ``"copy"`` of the source's or ``"fresh"`` (none).
        inputs: a batch to measure the step-distances on (``how="adaptive"``); without it the statistics the
            last forward pass recorded are used.
        pieces: your own split instead of ``how`` and ``factor``: per step group, the number of blocks each
            block becomes (integers >= 1; 1 leaves it), e.g. ``refine_plan(...)["pieces"]`` edited, or a split
            chosen by another rule. Block l of a group then gets ``pieces[g][l]`` steps of ``rho_l /
            pieces[g][l]``.
    """
    check_choice(how, "how", HOWS)
    check_choice(init, "init", INITS)
    check_choice(state, "state", STATES)
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
        raise ValueError(f"factor must be an integer >= 2, got {factor!r}")
    if pieces is None:
        plan = refine_plan(model, how=how, factor=factor, inputs=inputs)
    elif how != "uniform" or factor != 2 or inputs is not None:
        raise ValueError("pieces is a split of its own: pass it without how, factor or inputs")
    else:
        plan = {"op": "refine", "pieces": pieces}  # checked by _apply_refine, as a replayed checkpoint's are
    plan.update(init=init, state=state)
    _apply_refine(model, optimizer, plan)
    return model


def refine_plan(model: nn.Module, *, how: str = "uniform", factor: int = 2, inputs=None,
                distances: Optional[Sequence] = None) -> dict:
    """The refinement ``refine`` would apply: ``{"op": "refine", "pieces": [[n_l per block] per group]}``.

    ``distances`` (``how="adaptive"`` only, instead of ``inputs``): your own monitor, per group one finite value
    >= 0 per block, equidistributed as the measured step-distances would be; ``refine(..., pieces=plan["pieces"])``
    then applies the plan."""
    check_choice(how, "how", HOWS)
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
        raise ValueError(f"factor must be an integer >= 2, got {factor!r}")
    groups = _groups(model)
    if distances is not None:
        if how != "adaptive" or inputs is not None:
            raise ValueError("distances replace the measured step-distances: pass them with how='adaptive' and "
                             "without inputs")
        distances = _check_distances(distances, groups)
    allowed = [[_splittable(b) for b in grp.blocks] for grp in groups]
    if not any(any(ok) for ok in allowed):
        raise ValueError("no block of the model can be split (all have projection shortcuts)")
    if how == "uniform":
        pieces = [[factor if a else 1 for a in ok] for ok in allowed]
    else:
        dist = distances if distances is not None else _distances(model, inputs, "refine(how='adaptive')")
        pieces = [_allocate(d, ok, factor * sum(ok) + (len(ok) - sum(ok))) for d, ok in zip(dist, allowed)]
    return {"op": "refine", "pieces": pieces}


# --------------------------------------------------------------------------------------- coarsen
def coarsen(model: nn.Module, optimizer=None, *, to: Optional[int] = None, how: str = "merge",
            inputs=None) -> nn.Module:
    """Shrink every step group of ``model`` in place to ``to`` blocks (default: half, rounded up).

    Repeatedly merges the adjacent pair of blocks whose summed step-distance is smallest; the merged block
    takes the sum of their steps. ``how="merge"``: its weights are the step-weighted mean of the pair's
    (first-order exact for nearby weights, e.g. after a copy refinement), its optimizer state likewise;
    ``how="drop"``: it keeps the weights of the pair's member that moves the representation most. A block
    with a projection shortcut is never dropped. Distances come from ``inputs`` (one forward pass) or the
    statistics recorded by the last forward pass.
    """
    check_choice(how, "how", MERGES)
    if to is not None and (isinstance(to, bool) or not isinstance(to, int) or to < 1):
        raise ValueError(f"to must be None or an integer >= 1 (blocks per group), got {to!r}")
    plan = coarsen_plan(model, to=to, inputs=inputs)
    plan["how"] = how
    _apply_coarsen(model, optimizer, plan)
    return model


def coarsen_plan(model: nn.Module, *, to: Optional[int] = None, inputs=None) -> dict:
    """The merge ``coarsen`` would apply: ``{"op": "coarsen", "runs": [[[block indices] per new block]]}``."""
    if to is not None and (isinstance(to, bool) or not isinstance(to, int) or to < 1):
        raise ValueError(f"to must be None or an integer >= 1 (blocks per group), got {to!r}")
    groups = _groups(model)
    dist = _distances(model, inputs, "coarsen()")
    runs_all = []
    for gi, (grp, d) in enumerate(zip(groups, dist)):
        target = (grp.depth + 1) // 2 if to is None else to
        runs = [[l] for l in range(grp.depth)]
        dist_run = [float(v) if math.isfinite(float(v)) else 0.0 for v in d]
        while len(runs) > target:
            pairs = [i for i in range(len(runs) - 1) if _mergeable(grp, runs[i] + runs[i + 1])]
            if not pairs:
                raise ValueError(f"group {gi}: cannot merge down to {target} blocks (blocks with projection "
                                 f"shortcuts cannot be merged with each other)")
            i = min(pairs, key=lambda i: (dist_run[i] + dist_run[i + 1], i))
            runs[i:i + 2] = [runs[i] + runs[i + 1]]
            dist_run[i:i + 2] = [dist_run[i] + dist_run[i + 1]]
        runs_all.append(runs)
    return {"op": "coarsen", "runs": runs_all}


def _mergeable(grp: _Group, run: Sequence[int]) -> bool:
    return sum(not _splittable(grp.blocks[l]) for l in run) <= 1


@torch.no_grad()
def _apply_coarsen(model, optimizer, plan: dict) -> None:
    groups = _groups(model)
    how = plan["how"]
    if len(plan["runs"]) != len(groups):
        raise ValueError(f"the plan has {len(plan['runs'])} groups, the model {len(groups)}")
    work = []
    for gi, (grp, runs) in enumerate(zip(groups, plan["runs"])):
        if sorted(l for r in runs for l in r) != list(range(grp.depth)) or \
                any(r != list(range(r[0], r[0] + len(r))) for r in runs):
            raise ValueError(f"group {gi}: runs must partition the {grp.depth} blocks into consecutive runs")
        rho = grp.steps.rho.detach().double().cpu()
        lt, scheme = float(grp.steps.effective_depth), grp.steps.scheme
        new_rho = torch.stack([rho[r].sum() for r in runs])
        if scheme == "euler" and float(new_rho.max()) * lt >= 1.0:
            raise ValueError(f"group {gi}: a merged step {float(new_rho.max()):g} would break rho * Lt < 1 "
                             f"(Lt = {lt:g}) under scheme='euler'; coarsen less (larger to=) or use "
                             f"scheme='exponential'")
        if not all(_mergeable(grp, r) for r in runs):
            raise ValueError(f"group {gi}: a run holds two blocks with projection shortcuts")
        work.append((grp, runs, rho, new_rho))
    for grp, runs, rho, new_rho in work:
        _remap_step_state(optimizer, grp.steps.rho, runs)
        kept = []
        for r in runs:
            members = [grp.blocks[l] for l in r]
            keep = _keeper(members, [float(rho[l]) for l in r], how)
            if len(r) > 1 and how == "merge" and all(_splittable(m) for m in members) and \
                    all(_same_shapes(members[0], m) for m in members):
                _merge_into(members[keep], members, [float(rho[l]) for l in r], optimizer)
            if optimizer is not None:
                _remove_params(optimizer, [p for i, m in enumerate(members) if i != keep for p in m.parameters()])
            kept.append(members[keep])
        _set_container(grp, kept)
        _resize_steps(grp.steps, new_rho, kept)
    _rebind(optimizer)


def _keeper(members: List[nn.Module], steps: List[float], how: str) -> int:
    fixed = [i for i, m in enumerate(members) if not _splittable(m)]
    if fixed:
        return fixed[0]
    return 0 if how == "merge" else max(range(len(members)), key=lambda i: steps[i])


def _merge_into(target: nn.Module, members: List[nn.Module], steps: List[float], optimizer) -> None:
    w = [s / sum(steps) for s in steps]
    params = [dict(m.named_parameters()) for m in members]
    for name, p in target.named_parameters():
        srcs = [ps[name] for ps in params]
        if optimizer is not None:
            states = [optimizer.state.get(s) for s in srcs]
            if all(states):
                optimizer.state[p] = _mix_states(states, w, p.shape)
        p.copy_(sum(wi * s.double() for wi, s in zip(w, srcs)).to(p.dtype))
    buffers = [dict(m.named_buffers()) for m in members]
    for name, b in target.named_buffers():
        if b.is_floating_point():
            b.copy_(sum(wi * bs[name].double() for wi, bs in zip(w, buffers)).to(b.dtype))


def _apply(model, optimizer, plan: dict) -> None:
    if plan["op"] == "refine":
        _apply_refine(model, optimizer, plan)
    elif plan["op"] == "coarsen":
        _apply_coarsen(model, optimizer, plan)
    else:
        raise ValueError(f"unknown depth operation {plan.get('op')!r}")


def depths(model: nn.Module) -> List[int]:
    """The number of blocks of every step group of ``model``."""
    return [g.depth for g in step_groups(model)]


# -------------------------------------------------------------------------------------- schedule
def _check_schedule(*, at, how, factor, init, state, patience, threshold, cooldown, max_depth, rewarm,
                    **_) -> List[int]:
    """Check ``DepthScheduler``'s arguments (also ``DepthCallback``'s, when it is built); returns ``at`` as a list."""
    check_choice(how, "how", HOWS)
    check_choice(init, "init", INITS)
    check_choice(state, "state", STATES)
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
        raise ValueError(f"factor must be an integer >= 2, got {factor!r}")
    at = list(at)
    if any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in at):
        raise ValueError(f"at must list integers >= 1 (step counts), got {at!r}")
    for name, value, low in (("patience", patience, 1), ("cooldown", cooldown, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not (isinstance(threshold, (int, float)) and 0 <= threshold < 1):
        raise ValueError(f"threshold must lie in [0, 1), got {threshold!r}")
    if max_depth is not None and (isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 1):
        raise ValueError(f"max_depth must be None or an integer >= 1, got {max_depth!r}")
    if isinstance(rewarm, bool) or not isinstance(rewarm, int) or rewarm < 0:
        raise ValueError(f"rewarm must be an integer >= 0 (optimizer steps of lr warm-up after a growth), "
                         f"got {rewarm!r}")
    return at


def _warm_up_steps(optimizer, scheduler: "DepthScheduler") -> None:
    """Wrap ``optimizer.step`` (this instance only) so each step runs at ``scheduler.lr_factor()`` of every group's
    lr, put back when the step returns or raises: an LR scheduler never sees the factor. Not a step hook, since
    torch runs those twice for an optimizer subclass whose ``step`` calls ``super().step()``, and a step that raises
    skips the post-hook that would put the lr back."""
    step = optimizer.step

    @functools.wraps(step)
    def warmed_step(self, *args, **kwargs):
        factor = scheduler.lr_factor()
        if factor == 1.0:  # outside a warm-up the step is the optimizer's own, lrs untouched
            out = step(*args, **kwargs)
        else:
            lrs = [group["lr"] for group in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * factor
            try:
                out = step(*args, **kwargs)
            finally:
                for group, lr in zip(optimizer.param_groups, lrs):
                    group["lr"] = lr
        if scheduler._since is not None:
            scheduler._since += 1
        return out

    # a bound method, as torch's LR schedulers expect when they wrap ``step`` in turn (they call its __func__)
    optimizer.step = types.MethodType(warmed_step, optimizer)


class DepthScheduler:
    """Grow ``model`` during training, like an LR scheduler: call ``step()`` after ``optimizer.step()``.

    Args:
        model, optimizer: as ``refine``.
        at: the step counts (number of ``step()`` calls so far, e.g. optimizer steps or epochs) after which
            to refine; e.g. ``[500, 1000]`` grows 2 -> 4 -> 8 with ``factor=2``.
        how, factor, init, state: as ``refine``.
        plateau: also refine when the loss passed to ``step(loss)`` has not improved by a relative
            ``threshold`` for ``patience`` calls (like ``ReduceLROnPlateau``), at most once per ``cooldown``
            calls; calls during a rewarm's warm-up do not count.
        max_depth: never grow a group beyond this many blocks.
        rewarm: after each growth, warm the learning rate up again over this many optimizer steps: the k-th
            step after a growth runs at ``k / (rewarm + 1)`` of every group's lr (a wrapper on ``optimizer.step``
            scales the lr for that step only, so any LR scheduler composes with it and sees its own values; a
            step that raises or that ``GradScaler`` skips does not count).
            On a ``LeakyMLP`` the new blocks' fresh optimizer state otherwise shocks the net; ~25 steps helped on
            held-out teachers, and a rewarm changed nothing on conv nets (docs/depth.md, Growth 13-14). 0: off.

    ``state_dict()`` holds the refinements made so far; ``load_state_dict`` replays them on the (fresh) model
    and optimizer, so load it *before* ``model.load_state_dict`` and ``optimizer.load_state_dict``.
    ``step()`` returns True when it changed the depth (rebuild a ``DistributedDataParallel`` wrapper then).
    A copy or an unpickled optimizer loses the rewarm's wrapper (as it loses an LR scheduler's): to move the
    schedule, build a new ``DepthScheduler`` on the new optimizer and load the ``state_dict()``.
    """

    def __init__(self, model: nn.Module, optimizer=None, *, at: Sequence[int] = (), how: str = "uniform",
                 factor: int = 2, init: str = "copy", state: str = DEFAULT_STATE, plateau: bool = False,
                 patience: int = 100, threshold: float = 1e-3, cooldown: int = 0,
                 max_depth: Optional[int] = None, rewarm: int = 0):
        at = _check_schedule(at=at, how=how, factor=factor, init=init, state=state, patience=patience,
                             threshold=threshold, cooldown=cooldown, max_depth=max_depth, rewarm=rewarm)
        if rewarm and not (callable(getattr(optimizer, "step", None)) and hasattr(optimizer, "param_groups")):
            raise ValueError(f"rewarm={rewarm} needs the torch.optim.Optimizer that trains the model, "
                             f"got optimizer={optimizer!r}")
        _groups(model)
        self.model, self.optimizer = model, optimizer
        self.at, self.how, self.factor, self.init, self.state = sorted(set(at)), how, factor, init, state
        self.plateau, self.patience, self.threshold, self.cooldown = plateau, patience, threshold, cooldown
        self.max_depth, self.rewarm = max_depth, rewarm
        self.steps_done = 0
        self.history: List[dict] = []
        self._best, self._bad, self._cool = math.inf, 0, 0
        self._since: Optional[int] = None  # optimizer steps since the last growth (rewarm only)
        if rewarm:
            _warm_up_steps(optimizer, self)

    def lr_factor(self) -> float:
        """The factor the rewarm puts on every lr for the next optimizer step (1.0 outside a warm-up)."""
        if self._since is None or self._since >= self.rewarm:
            return 1.0
        return (self._since + 1) / (self.rewarm + 1)

    def _plateaued(self, loss) -> bool:
        if not self.plateau or loss is None:
            return False
        value = float(loss)
        self._cool = max(0, self._cool - 1)
        if value < self._best * (1 - self.threshold):
            self._best, self._bad = value, 0
            return False
        self._bad += 1
        if self._since is not None and self._since <= self.rewarm:  # the last step ran warming up: a slow
            self._bad = 0                                                # start is not a plateau
        return self._bad >= self.patience and self._cool == 0

    def step(self, loss=None, inputs=None) -> bool:
        """Advance one step; refine when due. ``loss``: for the plateau trigger; ``inputs``: a batch to
        measure on (``how="adaptive"``; without it, the statistics of the last recorded forward pass)."""
        self.steps_done += 1
        due = self.steps_done in self.at
        due = self._plateaued(loss) or due
        if not due:
            return False
        if self.max_depth is not None and max(depths(self.model)) * self.factor > self.max_depth:
            return False
        plan = refine_plan(self.model, how=self.how, factor=self.factor, inputs=inputs)
        plan.update(init=self.init, state=self.state)
        _apply_refine(self.model, self.optimizer, plan)
        self.history.append(plan)
        self._best, self._bad, self._cool = math.inf, 0, self.cooldown
        if self.rewarm:
            self._since = 0
        return True

    def state_dict(self) -> dict:
        return {"steps_done": self.steps_done, "history": copy.deepcopy(self.history),
                "plateau": {"best": self._best, "bad": self._bad, "cool": self._cool},
                "rewarm_since": self._since}

    @staticmethod
    def _counts(state_dict: dict) -> dict:
        """The counters of a ``state_dict()``, read (and so checked) before anything changes."""
        p = state_dict.get("plateau", {})
        since = state_dict.get("rewarm_since")
        return {"steps_done": int(state_dict["steps_done"]), "_best": float(p.get("best", math.inf)),
                "_bad": int(p.get("bad", 0)), "_cool": int(p.get("cool", 0)),
                "_since": None if since is None else int(since)}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the count and replay the saved refinements not yet applied to this model."""
        if not isinstance(state_dict, dict) or "history" not in state_dict:
            raise ValueError("state_dict must come from DepthScheduler.state_dict()")
        history = state_dict["history"]
        if history[:len(self.history)] != self.history:
            raise ValueError("state_dict's refinements do not extend the ones this scheduler already made")
        counts = self._counts(state_dict)
        for plan in history[len(self.history):]:
            _apply(self.model, self.optimizer, plan)
            self.history.append(copy.deepcopy(plan))
        vars(self).update(counts)


def _lightning_callback_base():
    try:
        import pytorch_lightning as pl
    except ImportError:
        try:
            import lightning.pytorch as pl
        except ImportError:
            raise ImportError("DepthCallback needs PyTorch Lightning: pip install pytorch-lightning") from None
    return pl.Callback


_CALLBACK_CLASS = None


def __getattr__(name: str):
    # DepthCallback subclasses Lightning's Callback: it is made on first use, so that importing this module
    # (and the package) imports torch only, never Lightning
    global _CALLBACK_CLASS
    if name == "DepthCallback":
        if _CALLBACK_CLASS is None:
            _CALLBACK_CLASS = type("DepthCallback", (_DepthCallbackMixin, _lightning_callback_base()),
                                   {"__module__": __name__, "__doc__": _DepthCallbackMixin.__doc__})
        return _CALLBACK_CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _DepthCallbackMixin:
    """A PyTorch Lightning callback that grows the LightningModule (or its attribute ``attr``) on a schedule.

    ``at`` counts training batches (``every="step"``: ``on_train_batch_end``; with gradient accumulation,
    micro-batches) or epochs (``every="epoch"``); the other keyword arguments go to ``DepthScheduler``. The
    optimizer is ``trainer.optimizers[0]``. For ``how="adaptive"`` the distances are measured by the module's
    forward on ``inputs(batch)`` (default: ``batch[0]``). Resume: call ``DepthCallback.replay(module,
    checkpoint_path)`` on the fresh module before ``trainer.fit(..., ckpt_path=...)``: Lightning loads the
    weights before it restores callbacks, so the depth must be in place first. Importing it needs Lightning.
    """

    def __init__(self, at: Sequence[int] = (), *, every: str = "step", attr: Optional[str] = None,
                 inputs: Callable = lambda batch: batch[0], **kwargs):
        if every not in ("step", "epoch"):
            raise ValueError(f"every must be 'step' or 'epoch', got {every!r}")
        if "optimizer" in kwargs:
            raise TypeError("DepthCallback takes the optimizer from the trainer (trainer.optimizers[0]); "
                            "do not pass optimizer=")
        try:  # check the DepthScheduler arguments now, not at the first training batch
            bound = inspect.signature(DepthScheduler).bind(None, at=at, **kwargs)
        except TypeError as err:
            raise TypeError(f"DepthCallback passes its keyword arguments to DepthScheduler: {err}") from None
        bound.apply_defaults()
        _check_schedule(**bound.arguments)
        super().__init__()
        self.at, self.every, self.attr, self.inputs, self.kwargs = list(at), every, attr, inputs, kwargs
        self.scheduler: Optional[DepthScheduler] = None
        self._pending: Optional[dict] = None

    def _target(self, pl_module) -> nn.Module:
        return pl_module if self.attr is None else getattr(pl_module, self.attr)

    def _scheduler(self, trainer, pl_module) -> DepthScheduler:
        if self.scheduler is None:
            opt = trainer.optimizers[0] if trainer.optimizers else None
            self.scheduler = DepthScheduler(self._target(pl_module), opt, at=self.at, **self.kwargs)
            if self._pending is not None:
                vars(self.scheduler).update(DepthScheduler._counts(self._pending),
                                            history=copy.deepcopy(self._pending["history"]))
                self._pending = None
        return self.scheduler

    def on_train_start(self, trainer, pl_module):
        self._scheduler(trainer, pl_module)  # before the first step: a rewarm must see every step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every == "step":
            inputs = self.inputs(batch) if self.kwargs.get("how") == "adaptive" else None
            self._scheduler(trainer, pl_module).step(inputs=inputs)

    def on_train_epoch_end(self, trainer, pl_module):
        if self.every == "epoch":
            self._scheduler(trainer, pl_module).step()

    def state_dict(self) -> dict:
        if self.scheduler is None:
            return self._pending or {"steps_done": 0, "history": []}
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        # the model was already grown by replay() before Lightning loaded the weights
        self._pending = dict(state_dict)
        self.scheduler = None

    @staticmethod
    def replay(module: nn.Module, checkpoint_path, attr: Optional[str] = None) -> nn.Module:
        """Grow a fresh module to the depth recorded in a Lightning checkpoint (before resuming from it)."""
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        states = [v for k, v in ckpt.get("callbacks", {}).items() if k.startswith("DepthCallback")]
        if not states:
            raise ValueError(f"{checkpoint_path} holds no DepthCallback state")
        target = module if attr is None else getattr(module, attr)
        for plan in states[0]["history"]:
            _apply(target, None, plan)
        return module
