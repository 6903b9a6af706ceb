"""``adaptive-depth grow``: does growing the network during training save time?

Three arms train the same final architecture (8 leaky blocks, or ``--depth``) with the same optimizer, data
order and step budget, on one CPU thread:

- ``full``: 8 blocks from the start;
- ``uniform``: 2 blocks, every block doubled (a copy, half the step) at two fractions of the budget
  (2 -> 4 -> 8, Chang et al.'s multi-level training);
- ``adaptive``: 2 blocks, grown to 4 then 8 at the same times, the pieces going to the blocks with the
  largest measured step-distance (``refine(how="adaptive")``, measured on the current batch).

Controls (``--arms``): ``shallow`` (the start depth throughout), ``mirror`` (adaptive's measured allocation
reversed, the same uneven steps at the other end of each group: does it matter *where* the steps go?) and
``shuffled`` (adaptive's measured pieces in a random order: the same unevenness at random places).

Tasks: MNIST-1D (1-D conv Leaky ResNet, blocks relu -> conv -> GroupNorm, RESEARCH.md section 3),
scikit-learn digits (a small 2-D conv Leaky ResNet, same blocks), the paper's teacher 30 -> 3 -> 30 (a
``LeakyMLP``, Lt = 2, exponential scheme; test MSE instead of accuracy). Steps are fixed (no
``AdaptiveSteps``: with the equal-distance rule every block has the same distance and an adaptive
refinement is a uniform one), AdamW with cosine decay.

Per run: a test curve (every ``--eval-every`` steps; evaluation time is not counted) with the process CPU
time and the wall time of training (growth included), the optimizer steps and the block-steps (sum over steps
of the number of blocks) spent so far. With one thread the CPU time is the compute spent, far less disturbed
by other jobs on a shared machine than the wall time (both are recorded). Per (task, arm) over seeds: the
final metric; the CPU/wall time, steps and block-steps to reach the target (per task: the full arm's median
final metric minus ``--slack`` (accuracy, as a fraction), or times ``1 + slack`` for a loss); the paired
speed-up to the target (full / arm, same seed); the full arm's metric at the CPU time each growth arm needed
for its whole budget (equal time). Tuning seeds 0-1 (``--tune``) choose the growth times and the optimizer state of
new blocks; held-out seeds 100+ report.

    adaptive-depth grow --tune --json benchmarks/results/growth_tune.json
    adaptive-depth grow --seeds 100 101 102 103 104 --json benchmarks/results/growth.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .._validate import check_choice, check_int, check_positive, check_range
from ..depth import DepthScheduler, refine, refine_plan
from ..recipes import identity_param_groups
from ..residual import LeakyMLP, LeakyResNet
from ._common import command_argv as _argv, spread as _spread
from .data import Task, teacher

__all__ = ["add_arguments", "run", "train_one", "summarize", "TASKS", "ARMS"]

TASKS = ("mnist1d", "digits", "teacher", "family")
MLP_TASKS = ("teacher", "family")  # a LeakyMLP on a teacher's data, test MSE
ARMS = ("full", "uniform", "adaptive", "shallow", "mirror", "shuffled")
GROWING = ("uniform", "adaptive", "mirror", "shuffled")
TUNING_SEEDS = (0, 1)
HELD_OUT_SEEDS = (100, 101, 102, 103, 104)
#: the grid tuned on seeds 0-1: growth times (fractions of the budget) and the new blocks' optimizer state
TUNE_GRID = [{"at": at, "state": st} for at in ((0.2, 0.4), (1 / 3, 2 / 3)) for st in ("fresh", "copy")]
FINAL_DEPTH, START_DEPTH = 8, 2
TEACHER_LT = 2.0  # the teacher's LeakyMLP (exponential scheme); the conv tasks' default is 0
TEACHER_DIMS = (30, 3, 30)  # the teacher task's maps: input, bottleneck rank k*, output (data.teacher)


# ------------------------------------------------------------------------------------------ tasks
def digits(seed: int) -> Task:
    """scikit-learn's 8x8 digits, a seeded 1297/500 split, pixels scaled to [0, 1] then standardised."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    mean, std = x[:1297].mean(), x[:1297].std()
    x = (x - mean) / std
    return Task("digits", x[:1297], y[:1297], x[1297:], y[1297:], "ce")


def get_task(name: str, seed: int, noise: float = 0.0, dims: Optional[Sequence[int]] = None) -> Task:
    """Task ``name`` drawn with ``seed``; ``noise``: label noise (std, per output) of the teacher; ``dims``: the
    teacher's layer sizes (default ``TEACHER_DIMS``, 30 -> 3 -> 30; ReLU between maps)."""
    check_noise(name, noise)
    dims = check_dims(name, dims)
    if name == "mnist1d":
        from .data import mnist1d
        t = mnist1d(n_train=4000, n_test=1000, seed=seed)
        return Task(t.name, t.x_train.unsqueeze(1), t.y_train, t.x_test.unsqueeze(1), t.y_test, "ce")
    if name == "digits":
        return digits(seed)
    if name == "teacher":
        t = teacher(dims, n_train=1000, n_test=1000, seed=seed, noise=float(noise))
        t.name = "teacher"
        return t
    if name == "family":  # tasks.py's teacher family: only its data (grow's own width, depth and batch)
        from .tasks import draw
        _, t = draw(seed, family_split(seed))
        return Task("family", t.x_train, t.y_train, t.x_test, t.y_test, "mse")
    raise ValueError(f"task must be one of {TASKS}, got {name!r}")


def check_noise(task_name: str, noise: float) -> None:
    """``noise`` (label noise of the teacher's targets) must be finite, >= 0, and 0 for any other task."""
    check_range(noise, "noise", 0.0, math.inf)
    if noise and task_name != "teacher":
        raise ValueError(f"noise applies to the teacher task only (the family draws its own), not {task_name!r}")


def check_dims(task_name: str, dims: Optional[Sequence[int]]) -> Tuple[int, ...]:
    """The teacher's layer sizes (``None``: ``TEACHER_DIMS``): at least two integers >= 1; the teacher task only."""
    if dims is None:
        return TEACHER_DIMS
    if task_name != "teacher":
        raise ValueError(f"teacher_dims applies to the teacher task only, not {task_name!r}")
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence) or len(dims) < 2:
        raise ValueError(f"teacher_dims must list at least two layer sizes (input ... output), got {dims!r}")
    return tuple(check_int(d, "teacher_dims (each layer size)", 1) for d in dims)


def family_split(seed: int) -> str:
    """The split of the teacher family a seed draws from: "tuning" (0-99) or "heldout" (1000-1999)."""
    from .tasks import SPLITS
    for split, seeds in SPLITS.items():
        if not isinstance(seed, bool) and isinstance(seed, int) and seed in seeds:
            return split
    raise ValueError("seeds of task 'family' must be tuning seeds 0-99 or held-out seeds 1000-1999 (tasks.py), "
                     f"got {seed!r}")


def _conv_block(conv: type, width: int) -> nn.Module:
    return nn.Sequential(nn.ReLU(), conv(width, width, 3, padding=1), nn.GroupNorm(4, width))


class ConvNet(nn.Module):
    """stem conv -> a Leaky ResNet of ``relu -> conv -> GroupNorm`` blocks (Lt = 0) -> pool -> linear.

    ``branch_norm=True``: the normalised branch of docs/large_lt.md (RMS-normalised, a learned gain, 1 at
    Lt = 0). ``lt`` > 0: that effective depth under the exponential scheme (needs ``branch_norm``).
    ``identity=True`` (with ``lt`` > 0): the leak cancelled at initialisation (``branch_identity=True``, gain 1),
    the recipe that makes the 8-block net at Lt = 8 train as far as Lt = 0 (docs/large_lt.md)."""

    def __init__(self, dims: int, in_ch: int, width: int, depth: int, classes: int, branch_norm: bool = False,
                 lt: float = 0.0, identity: bool = False):
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.stem = conv(in_ch, width, 3, padding=1)
        extra = dict(branch_norm=True, branch_gain="balanced") if branch_norm else {}
        if lt > 0:
            extra.update(effective_depth=lt, scheme="exponential")
        if identity:
            extra.update(branch_gain=1.0, branch_identity=True)
        self.body = LeakyResNet([_conv_block(conv, width) for _ in range(depth)], total_time=1.0, **extra)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = torch.relu(self.body(self.stem(x)))
        return self.head(h.flatten(2).mean(2))


def check_lt(task_name: str, lt: Optional[float], branch_norm: bool = False, identity: bool = False) -> float:
    """The effective depth a task's network gets (``lt``, or the task's default), validated (and ``identity``,
    which needs a conv task, ``branch_norm`` and ``lt`` > 0)."""
    if not isinstance(identity, bool):
        raise TypeError(f"branch_identity must be True or False, got {identity!r}")
    if lt is None:
        lt = TEACHER_LT if task_name in MLP_TASKS else 0.0
    else:
        lt = check_range(lt, "lt (the network's effective depth)", 0.0, math.inf)
    if identity and (task_name in MLP_TASKS or not branch_norm or lt == 0):
        raise ValueError("branch_identity needs a conv task (mnist1d, digits) with branch_norm=True and lt > 0, "
                         f"got task {task_name!r}, branch_norm={branch_norm}, lt={lt:g}")
    if lt > 0 and task_name not in MLP_TASKS and not branch_norm:
        raise ValueError("lt > 0 on a conv task (mnist1d, digits) needs branch_norm=True (the large-Lt recipe)")
    return lt


def make_model(task: Task, depth: int, width: int, branch_norm: bool = False,
               lt: Optional[float] = None, identity: bool = False) -> nn.Module:
    """The task's network. ``lt``: its effective depth; conv tasks: default 0, > 0 needs ``branch_norm`` (the
    large-Lt recipe, exponential scheme); the teacher's ``LeakyMLP``: default ``TEACHER_LT`` (exponential).
    ``identity``: conv tasks at ``lt`` > 0, the leak cancelled at initialisation (``ConvNet``)."""
    lt = check_lt(task.name, lt, branch_norm, identity)
    if task.name == "mnist1d":
        return ConvNet(1, 1, width, depth, 10, branch_norm, lt, identity)
    if task.name == "digits":
        return ConvNet(2, 1, width, depth, 10, branch_norm, lt, identity)
    if branch_norm:
        raise ValueError("branch_norm applies to the conv tasks (mnist1d, digits), not the teacher's LeakyMLP")
    return LeakyMLP(task.in_dim, task.out_dim, width=width, depth=depth, effective_depth=float(lt),
                    scheme="exponential")


#: per task: width, budget (optimizer steps), batch size, learning rate. Small on purpose: the machine these
#: were measured on has 2 cores shared by ~7 jobs (load average 12-14), where one step of the 8-block
#: MNIST-1D net takes ~0.1 s
SETTINGS = {"mnist1d": dict(width=16, steps=400, batch=64, lr=5e-3),
            "digits": dict(width=12, steps=300, batch=32, lr=5e-3),
            "teacher": dict(width=64, steps=600, batch=128, lr=3e-3),
            "family": dict(width=64, steps=600, batch=128, lr=3e-3)}
#: growth2: budgets 3-4x the first benchmark's (digits: the full net reaches 96.7% by step 600 of a
#: 1200-step run, growth_long_digits.md; MNIST-1D at width 16: ~86% after 1200 steps, still rising)
SETTINGS_LONG = {"mnist1d": dict(width=16, steps=1200, batch=64, lr=5e-3),
                 "digits": dict(width=12, steps=1000, batch=32, lr=5e-3),
                 "teacher": dict(width=64, steps=1200, batch=128, lr=3e-3),
                 "family": dict(width=64, steps=1200, batch=128, lr=3e-3)}
BUDGETS = {"short": SETTINGS, "long": SETTINGS_LONG}


# ------------------------------------------------------------------------------------------- runs
def _metric(model: nn.Module, task: Task, split: str = "test") -> float:
    """Accuracy (classification) or MSE (teacher) on the test set, or on the training set (``split="train"``)."""
    x, y = (task.x_test, task.y_test) if split == "test" else (task.x_train, task.y_train)
    was = model.training
    model.eval()
    with torch.no_grad():
        pred = model(x)
    model.train(was)
    if task.loss == "ce":
        return float((pred.argmax(1) == y).float().mean())
    return float(task.loss_fn(pred, y))


def start_depth(at: Sequence[float], final: int = FINAL_DEPTH) -> int:
    """The depth a growth arm starts at: it doubles once per growth time and ends at ``final``
    (for 8, ``at`` of length 1, 2, 3: 4 -> 8, 2 -> 4 -> 8, 1 -> 2 -> 4 -> 8)."""
    at = list(at)
    if not 1 <= len(at) <= 3 or any(not 0 < f < 1 for f in at) or at != sorted(set(at)):
        raise ValueError(f"at must list 1 to 3 increasing fractions of the budget in (0, 1), got {at!r}")
    if isinstance(final, bool) or not isinstance(final, int) or final < 2 or final % (1 << len(at)):
        raise ValueError(f"depth (the final depth) must be a multiple of 2 ** len(at) = {1 << len(at)}, each "
                         f"growth doubling it; got {final!r}")
    return final >> len(at)


def growth_steps(at: Sequence[float], steps: int) -> List[int]:
    """The optimizer steps after which a run of ``steps`` steps grows, for fractions ``at`` of the budget."""
    return sorted({max(1, round(f * steps)) for f in at})


def long_growth(task_name: str, lr: float, steps: Optional[int] = None) -> Dict:
    """``train_one``'s budget and schedule for the 16-block growth runs of docs/depth.md Growth 7-13: the long
    budget (``steps`` overrides it), growth at 1/3 and 2/3 of it from 4 blocks, the lr held until the last growth."""
    settings = dict(SETTINGS_LONG[task_name], depth=16, lr=lr)
    if steps:
        settings["steps"] = steps
    return {"settings": settings, "at": (1 / 3, 2 / 3), "hold": 2 / 3}


def lr_multiplier(step: int, steps: int, grow_at: Sequence[int] = (), *, rewarm: int = 0,
                  hold: float = 0.0) -> float:
    """The learning rate of optimizer step ``step + 1`` over the base rate (``step`` steps done so far).

    Constant until ``hold * steps`` steps, then a cosine decay to 0 at ``steps``; after each growth (at the
    step counts in ``grow_at``) a linear warm-up over ``rewarm`` steps, ``k / (rewarm + 1)`` of that rate for
    the k-th step after the growth, so the new blocks (fresh optimizer state) start gently.
    """
    start = round(hold * steps)
    base = 1.0 if step < start else 0.5 * (1.0 + math.cos(math.pi * (step - start) / max(1, steps - start)))
    since = [step - g for g in grow_at if g <= step]
    if rewarm and since and min(since) < rewarm:
        base *= (min(since) + 1) / (rewarm + 1)
    return base


def _check_variant(arm: str, init: str, rewarm: int, hold: float) -> None:
    check_choice(arm, "arm", ARMS)
    if init not in ("copy", "zero", "interpolate"):
        raise ValueError(f"init must be 'copy', 'zero' or 'interpolate', got {init!r}")
    if isinstance(rewarm, bool) or not isinstance(rewarm, int) or rewarm < 0:
        raise ValueError(f"rewarm must be an integer >= 0 (warm-up steps after a growth), got {rewarm!r}")
    if not 0 <= hold < 1:
        raise ValueError(f"hold must be a fraction of the budget in [0, 1), got {hold!r}")


def train_one(task: Task, arm: str, seed: int, *, at=(1 / 3, 2 / 3), state: str = "fresh",
              eval_every: int = 50, settings: Optional[Dict] = None, init: str = "copy", rewarm: int = 0,
              hold: float = 0.0, branch_norm: bool = False, lt: Optional[float] = None,
              split: Optional[Callable] = None, branch_identity: bool = False, plateau: int = 0) -> Dict:
    """One run; returns its curve ``[(step, wall_s, block_steps, metric, cpu_s), ...]`` and the final metric.

    ``arm``: ``"full"`` (``settings["depth"]`` blocks throughout, default ``FINAL_DEPTH``), ``"uniform"`` /
    ``"adaptive"`` (start at ``start_depth(at, depth)`` and double at the fractions ``at`` of the budget) or
    ``"shallow"`` (the growth arms' start depth throughout, a control) or ``"mirror"`` (a control for
    ``"adaptive"``: its measured allocation reversed within each group, so the same uneven steps sit at the other
    end) or ``"shuffled"`` (the measured pieces in a random order, drawn from ``seed``). ``init``/``state``: the
    new blocks (``refine``). ``rewarm``, ``hold``: the learning-rate schedule (``lr_multiplier``; the defaults are
    a plain cosine decay). ``branch_norm``: the normalised branch with a learned gain (conv tasks); ``lt``: the
    effective depth (``make_model``: conv default 0, teacher default ``TEACHER_LT``). ``branch_identity``: conv
    tasks at ``lt`` > 0, the leak cancelled at initialisation, its coefficients trained at lr / Lt
    (``recipes.identity_param_groups``; a refinement puts the new blocks' in that group too). ``split``: for the
    ``"adaptive"`` arm, another rule: ``split(model, optimizer, x, y)`` (the step's batch) returns ``refine``'s
    ``pieces``. ``plateau``: the growth arms ``"uniform"``/``"adaptive"`` also grow when the training loss
    plateaus, through the library's ``DepthScheduler(plateau=True, patience=plateau, max_depth=..., rewarm=rewarm)``
    fed an exponential moving average (0.98) of the minibatch loss, as a user would run it: the fixed times ``at``
    stay as fallbacks, so each growth comes at the earlier of the two; the scheduler's rewarm follows the growths
    where they happen (and its warm-up steps do not count towards a plateau); ``hold`` stays a fixed fraction.
    0: off (ignored by the other arms, which do not grow).
    """
    _check_variant(arm, init, rewarm, hold)
    check_int(plateau, "plateau", 0)
    plateau = plateau if arm in GROWING else 0
    if plateau and arm not in ("uniform", "adaptive"):
        raise ValueError(f"plateau applies to the 'uniform' and 'adaptive' arms, not {arm!r}")
    if plateau and split is not None:
        raise ValueError("plateau and split (another refinement rule) cannot be combined")
    if split is not None and arm != "adaptive":
        raise ValueError(f"split (another refinement rule) applies to the 'adaptive' arm, not {arm!r}")
    s = dict(SETTINGS[task.name] if settings is None else settings)
    torch.manual_seed(seed)
    final = s.get("depth", FINAL_DEPTH)
    depth = final if arm == "full" else start_depth(at, final)
    lt = check_lt(task.name, lt, branch_norm, branch_identity)
    model = make_model(task, depth, s["width"], branch_norm, lt, branch_identity)
    params = identity_param_groups(model, lr=s["lr"], scale=s.get("identity_lr_scale", 1.0)) if branch_identity \
        else model.parameters()
    opt = torch.optim.AdamW(params, lr=s["lr"], weight_decay=1e-4)
    grow_at = growth_steps(at, s["steps"]) if arm in GROWING else []
    grower = None
    if plateau:  # the fixed times become the scheduler's; grow_at then lists the growths as they happen
        grower = DepthScheduler(model, opt, at=grow_at, how=arm, init=init, state=state, plateau=True,
                                patience=plateau, max_depth=final, rewarm=rewarm)
        grow_at, ema = [], None
    if rewarm == 0 and hold == 0 and not plateau:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s["steps"])  # the first benchmark's
    else:  # (with plateau, the rewarm is the DepthScheduler's)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k: lr_multiplier(k, s["steps"], grow_at, rewarm=0 if plateau else rewarm, hold=hold))
    gen = torch.Generator().manual_seed(seed + 12345)
    n = task.x_train.shape[0]
    perm, pos = torch.randperm(n, generator=gen), 0
    wall, cpu, block_steps, curve = 0.0, 0.0, 0, [(0, 0.0, 0, _metric(model, task), 0.0)]
    blocks, lr_trace = depth, []
    shuffle = torch.Generator().manual_seed(seed + 54321)  # the shuffled arm's orders
    for step in range(1, s["steps"] + 1):
        if pos + s["batch"] > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + s["batch"]]
        pos += s["batch"]
        x, y = task.x_train[idx], task.y_train[idx]
        lr_trace.append(opt.param_groups[0]["lr"] * (grower.lr_factor() if grower is not None else 1.0))
        t0, c0 = time.perf_counter(), time.process_time()
        loss = task.loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        block_steps += blocks  # the blocks this step trained (before any growth after it)
        if grower is not None:
            ema = float(loss.detach()) if ema is None else 0.98 * ema + 0.02 * float(loss.detach())
            if grower.step(loss=ema, inputs=x if arm == "adaptive" else None):
                grow_at.append(step)
                blocks = sum(g.depth for g in _groups(model))
        elif step in grow_at:
            if arm == "adaptive" and split is not None:
                refine(model, opt, pieces=split(model, opt, x, y), state=state, init=init)
            elif arm in ("mirror", "shuffled"):
                pieces = refine_plan(model, how="adaptive", inputs=x)["pieces"]
                if arm == "mirror":
                    pieces = [p[::-1] for p in pieces]
                else:
                    pieces = [[p[i] for i in torch.randperm(len(p), generator=shuffle)] for p in pieces]
                refine(model, opt, pieces=pieces, state=state, init=init)
            else:
                refine(model, opt, how=arm, state=state, init=init, inputs=x if arm == "adaptive" else None)
            blocks = sum(g.depth for g in _groups(model))
        sched.step()  # after a growth: the new parameters are in the groups the scheduler sets
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        if step % eval_every == 0 or step == s["steps"]:
            curve.append((step, wall, block_steps, _metric(model, task), cpu))
    profile = [g.rho.detach().double().tolist() for g in _groups(model)]
    return {"task": task.name, "arm": arm, "seed": seed, "at": list(at), "state": state, "init": init,
            "rewarm": rewarm, "hold": hold, "plateau": plateau, "grew_at": list(grow_at),
            "branch_norm": branch_norm, "branch_identity": branch_identity,
            "lt": lt, "settings": s,
            "start_depth": depth, "curve": curve, "final": curve[-1][3], "final_train": _metric(model, task, "train"),
            "wall_s": wall, "cpu_s": cpu,
            "block_steps": block_steps, "steps_profile": profile, "lr_trace": lr_trace}


def _groups(model):
    from ..steps import step_groups
    return step_groups(model)


# ---------------------------------------------------------------------------------------- summary
def _higher_better(task: str) -> bool:
    return task not in MLP_TASKS


def target_metric(reference: float, slack: float, higher: bool) -> float:
    """A task's target from the full arm's (median) final metric: ``slack`` below it for an accuracy, a fraction
    ``slack`` above it for a loss."""
    return reference - slack if higher else reference * (1 + slack)


def _reach(run: Dict, target: float, higher: bool) -> Optional[tuple]:
    for step, wall, bs, m, cpu in run["curve"]:
        if (m >= target) if higher else (m <= target):
            return step, cpu, bs, wall
    return None


def _at_time(run: Dict, cpu: float) -> float:
    """The run's metric at CPU time ``cpu`` (the last evaluation not after it)."""
    best = run["curve"][0][3]
    for _, _, _, m, c in run["curve"]:
        if c <= cpu:
            best = m
    return best


def summarize(runs: List[Dict], slack: float) -> List[Dict]:
    """Per (task, arm): final metric, cost to target, metric of the full arm at equal (CPU) time."""
    out = []
    for task in sorted({r["task"] for r in runs}):
        higher = _higher_better(task)
        full = {r["seed"]: r for r in runs if r["task"] == task and r["arm"] == "full"}
        if not full:
            continue
        target = target_metric(statistics.median(r["final"] for r in full.values()), slack, higher)
        for arm in ARMS:
            mine = [r for r in runs if r["task"] == task and r["arm"] == arm]
            if not mine:
                continue
            reach = [_reach(r, target, higher) for r in mine]
            speedup = []
            for r, w in zip(mine, reach):
                f = full.get(r["seed"])
                fr = _reach(f, target, higher) if f else None
                speedup.append(fr[1] / w[1] if (w and fr and w[1] > 0) else None)
            out.append({
                "task": task, "arm": arm, "target": target, "seeds": [r["seed"] for r in mine],
                "final": _spread([r["final"] for r in mine]),
                "cpu_s": _spread([r["cpu_s"] for r in mine]),
                "wall_s": _spread([r["wall_s"] for r in mine]),
                "cpu_to_target": _spread([w[1] if w else None for w in reach]),
                "wall_to_target": _spread([w[3] if w else None for w in reach]),
                "steps_to_target": _spread([w[0] if w else None for w in reach]),
                "block_steps_to_target": _spread([w[2] if w else None for w in reach]),
                "speedup_to_target": _spread(speedup),
                "full_at_equal_time": _spread([_at_time(full[r["seed"]], r["cpu_s"]) if r["seed"] in full
                                               else None for r in mine]),
                "final_minus_full": _spread([r["final"] - full[r["seed"]]["final"] if r["seed"] in full else None
                                             for r in mine]),
                "cpu_ratio": _spread([r["cpu_s"] / full[r["seed"]]["cpu_s"] if r["seed"] in full else None
                                      for r in mine]),
                "equal_time_minus_full": _spread([r["final"] - _at_time(full[r["seed"]], r["cpu_s"])
                                                  if r["seed"] in full else None for r in mine]),
            })
    return out


def _f(s: Dict, scale: float = 1.0, fmt: str = ".3g") -> str:
    if s["median"] is None:
        return f"miss ({s['missing']})"
    txt = f"{s['median'] * scale:{fmt}} [{s['min'] * scale:{fmt}}, {s['max'] * scale:{fmt}}]"
    return txt + (f" ({s['missing']} miss)" if s["missing"] else "")


def table(summary: List[Dict]) -> str:
    lines = ["| task | arm | final metric | CPU s (whole budget) | wall s (whole budget) | target | "
             "CPU s to target | wall s to target | speed-up to target (CPU, paired: full / arm) | steps to target | "
             "block-steps to target | full arm's metric at this arm's CPU time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        pct = 100.0 if _higher_better(s["task"]) else 1.0
        lines.append(f"| {s['task']} | {s['arm']} | {_f(s['final'], pct)} | {_f(s['cpu_s'])} | {_f(s['wall_s'])} | "
                     f"{s['target'] * pct:.4g} | {_f(s['cpu_to_target'])} | {_f(s['wall_to_target'])} | "
                     f"{_f(s['speedup_to_target'])} | "
                     f"{_f(s['steps_to_target'], 1, '.0f')} | {_f(s['block_steps_to_target'], 1, '.0f')} | "
                     f"{_f(s['full_at_equal_time'], pct)} |")
    lines += ["", "Paired per seed, this arm against the full arm (median [min, max]):", "",
              "| task | arm | final - full | CPU time / full's | final - full's metric at this arm's CPU time |",
              "|---|---|---|---|---|"]
    for s in summary:
        if s["arm"] == "full" or "final_minus_full" not in s:
            continue
        pct = 100.0 if _higher_better(s["task"]) else 1.0
        lines.append(f"| {s['task']} | {s['arm']} | {_f(s['final_minus_full'], pct, '+.3g')} | "
                     f"{_f(s['cpu_ratio'], 1, '.2f')} | {_f(s['equal_time_minus_full'], pct, '+.3g')} |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS[:3]),
                   help="'family': a teacher of tasks.py's family per seed (seeds 0-99 tuning, 1000-1999 held out), "
                        "trained with the teacher's settings")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=["full", "uniform", "adaptive"])
    p.add_argument("--seeds", nargs="+", type=int, default=list(HELD_OUT_SEEDS),
                   help="held-out seeds (100+) to report on")
    p.add_argument("--tune", action="store_true",
                   help="run the tuning grid (growth times x optimizer state) on seeds 0-1 instead")
    p.add_argument("--at", nargs="+", type=float, default=None,
                   help="growth times as fractions of the budget (default: the tuned choice in --tuned)")
    p.add_argument("--state", choices=["fresh", "copy"], default=None)
    p.add_argument("--tune2", action="store_true",
                   help="run growth2's staged search (block, schedule shape, lr after growth, init; see "
                        "FULL_HOLDS, SHAPES, LR_MODES) on seeds 0-1 instead; writes the choice to --json")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="short",
                   help="per-task settings: 'short' (the first benchmark) or 'long' (growth2: near convergence)")
    p.add_argument("--init", choices=["copy", "zero", "interpolate"], default=None, help="the new blocks")
    p.add_argument("--rewarm", type=int, default=None, help="linear lr warm-up steps after each growth")
    p.add_argument("--plateau", type=int, default=0,
                   help="uniform/adaptive arms: also grow when the training loss (moving average) has not improved "
                        "by 0.1%% for this many steps, at the latest at --at (DepthScheduler's plateau trigger)")
    p.add_argument("--hold", type=float, default=None,
                   help="growth arms: constant lr for this fraction of the budget, then cosine")
    p.add_argument("--full-hold", type=float, default=None, help="the same for the full arm")
    p.add_argument("--branch-norm", choices=["on", "off"], default=None,
                   help="the normalised branch with a learned gain (every arm the same block)")
    p.add_argument("--branch-identity", choices=["on", "off"], default="off",
                   help="held-out runs, conv tasks at --lt > 0 with --branch-norm on: the leak cancelled at "
                        "initialisation (branch_identity, its coefficients at lr / Lt; docs/large_lt.md)")
    p.add_argument("--identity-lr-scale", type=float, default=None,
                   help="with --branch-identity on: the coefficients' lr is this times lr / Lt (default 1)")
    p.add_argument("--tuned", default=os.path.join("benchmarks", "results", "growth_tune.json"),
                   help="the tuning JSON the defaults of --at/--state (and, from --tune2, of --init, --rewarm, "
                        "--hold, --full-hold, --branch-norm) are read from")
    p.add_argument("--slack", type=float, default=0.01,
                   help="target: full arm's median final accuracy minus this (or its test MSE times 1 + this)")
    p.add_argument("--growth-budget", type=float, default=1.0, help="held-out runs: the growth and shallow arms "
                   "train this fraction of the full arm's steps (default 1: the same budget)")
    p.add_argument("--growth-lr", type=float, default=None, help="held-out runs: the growth and shallow arms' lr "
                   "(default: --lr, or the task's), so arms tuned to different lrs still run interleaved per seed")
    p.add_argument("--lt", type=float, default=None, help="held-out runs: every task's effective depth: the conv "
                   f"nets' (exponential scheme, needs --branch-norm on; default 0), the teacher's LeakyMLP (default "
                   f"{TEACHER_LT:g})")
    p.add_argument("--noise", type=float, default=0.0, help="held-out runs: label noise (std per output) of the "
                   "teacher task's targets, train and test (default 0: noiseless)")
    p.add_argument("--teacher-dims", nargs="+", type=int, default=None, metavar="N",
                   help="held-out runs: the teacher task's layer sizes, input ... output, the narrowest the "
                        f"bottleneck rank (default {' '.join(map(str, TEACHER_DIMS))}; ReLU between maps)")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--steps", type=int, default=None, help="override every task's budget (smoke tests)")
    p.add_argument("--width", type=int, default=None, help="override every task's width (channels or units): "
                   "wider blocks make the blocks, which growth saves, a larger share of a step's cost")
    p.add_argument("--lr", type=float, default=None, help="override every task's AdamW learning rate (every arm)")
    p.add_argument("--depth", type=int, default=None, help=f"every arm's final depth (default {FINAL_DEPTH}); "
                   "the growth arms start at it halved once per growth time")
    p.add_argument("--json", dest="json_out", default=os.path.join("out", "growth.json"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--from-json", nargs="+", default=None, metavar="FILE",
                   help="no training: summarise the runs stored in these JSON files (e.g. one per task)")


#: ``--tune2`` (growth2, docs/depth.md): the search on the tuning seeds, in stages (uniform arm only; the
#: adaptive arm takes the uniform arm's choice). A: the block (plain or normalised branch), by the full arm's
#: median final metric with a cosine schedule; then the full arm's schedule on that block (cosine, or constant
#: for half the budget then cosine), again by its final metric: the strongest full network sets the target.
#: B: the schedule's shape x the lr after a growth. C: the new blocks' init. B and C choose the least median
#: CPU time to the target (the chosen full arm's median final metric minus ``--slack``), a miss on any tuning
#: seed counting as never (ties: the better final metric).
FULL_HOLDS = (0.0, 0.5)
SHAPES = ((1 / 3, 2 / 3), (0.5, 0.75), (0.25, 0.5, 0.75))
LR_MODES = ({"rewarm": 0, "hold": "none"}, {"rewarm": 50, "hold": "none"}, {"rewarm": 0, "hold": "last"})
INIT_CHOICES = ("copy", "zero")


def _lr_mode(mode: Dict, at: Sequence[float]) -> Dict:
    """A ``LR_MODES`` entry as ``train_one`` arguments: ``hold="last"`` keeps the lr constant until the last
    growth (no cosine decay before it)."""
    return {"rewarm": mode["rewarm"], "hold": float(at[-1]) if mode["hold"] == "last" else 0.0}


def _cpu_score(runs: List[Dict], target: float, higher: bool) -> float:
    """Median over seeds of the CPU seconds to ``target``; ``inf`` if any run missed it."""
    got = [_reach(r, target, higher) for r in runs]
    if any(g is None for g in got):
        return math.inf
    return statistics.median(g[1] for g in got)


def tune2(task_name: str, settings: Dict, *, slack: float, eval_every: int, seeds=TUNING_SEEDS,
          log=None) -> Dict:
    """The staged search (``FULL_HOLDS``, ``SHAPES``, ``LR_MODES``, ``INIT_CHOICES``) on ``seeds``; returns
    ``{"runs": [...], "choice": {...}}``, the choice holding everything ``run`` needs for the held-out seeds."""
    log = log or _log
    tasks = {seed: get_task(task_name, seed) for seed in seeds}
    higher = _higher_better(task_name)
    runs: List[Dict] = []

    def batch(arm: str, **kw) -> List[Dict]:
        out = [train_one(tasks[seed], arm, seed, eval_every=eval_every, settings=settings, **kw) for seed in seeds]
        for r in out:
            log(r)
        runs.extend(out)
        return out

    sign = 1 if higher else -1
    # A: the block, then the full arm's schedule on it
    full = {(bn, FULL_HOLDS[0]): batch("full", branch_norm=bn, hold=FULL_HOLDS[0]) for bn in (False, True)}
    finals = {k: statistics.median(r["final"] for r in v) for k, v in full.items()}
    bn = max(finals, key=lambda k: (sign * finals[k], not k[0]))[0]
    for h in FULL_HOLDS[1:]:
        finals[(bn, h)] = statistics.median(r["final"] for r in batch("full", branch_norm=bn, hold=h))
    full_hold = max((k for k in finals if k[0] == bn), key=lambda k: (sign * finals[k], -k[1]))[1]
    target = target_metric(finals[(bn, full_hold)], slack, higher)
    scores: Dict[str, Dict] = {}

    def score(kw: Dict) -> None:
        got = batch("uniform", **kw)
        scores[json.dumps(kw)] = {"cpu_to_target": _cpu_score(got, target, higher),
                                  "final": statistics.median(r["final"] for r in got), "kw": kw}

    def best_so_far() -> Dict:
        return min(scores.values(), key=lambda v: (v["cpu_to_target"], -sign * v["final"]))

    # B: shape x lr after growth
    for at in SHAPES:
        for mode in LR_MODES:
            score(dict(at=at, branch_norm=bn, **_lr_mode(mode, at)))
    # C: the new blocks' init, on the best of B
    chosen = best_so_far()["kw"]
    for init in INIT_CHOICES[1:]:
        score(dict(chosen, init=init))
    best = best_so_far()
    choice = dict({"init": "copy", "state": "fresh"}, **best["kw"], full_hold=full_hold, target=target,
                  full_finals={f"branch_norm={k[0]}/hold={k[1]}": v for k, v in finals.items()},
                  scores={k: {"cpu_to_target": v["cpu_to_target"], "final": v["final"]} for k, v in scores.items()})
    choice["at"] = list(choice["at"])
    return {"runs": runs, "choice": {task_name: choice}}


def _growth_budget(settings: Dict, fraction: float, lr: Optional[float] = None) -> Dict:
    """The growth (and shallow) arms' settings with ``fraction`` of the full arm's steps (their growth times
    and lr schedule are fractions of that shorter budget) and, unless None, their own ``lr``."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"--growth-budget must be a fraction of the full arm's steps in (0, 1], got {fraction!r}")
    if lr is not None:
        check_positive(lr, "--growth-lr")
    return dict(settings, steps=max(1, round(fraction * settings["steps"])), **({} if lr is None else {"lr": lr}))


def _settings(args, task_name: str) -> Dict:
    s = dict(BUDGETS[getattr(args, "budget", "short")][task_name])
    for name in ("steps", "width", "depth"):
        value = getattr(args, name, None)
        if value is not None:
            if value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")
            s[name] = value
    lr = getattr(args, "lr", None)
    if lr is not None:
        s["lr"] = check_positive(lr, "--lr")
    scale = getattr(args, "identity_lr_scale", None)
    if scale is not None:
        if getattr(args, "branch_identity", "off") != "on":
            raise ValueError("--identity-lr-scale applies with --branch-identity on only")
        s["identity_lr_scale"] = check_positive(scale, "--identity-lr-scale")
    return s


def _variant(args, tuned: Dict) -> Dict:
    """The held-out runs' settings: the command line's, else the tuned choice's, else the first benchmark's."""
    pick = lambda name, default: tuned.get(name, default) if getattr(args, name, None) is None \
        else getattr(args, name)  # noqa: E731
    bn = getattr(args, "branch_norm", None)
    return {"at": tuple(args.at) if args.at else tuple(tuned.get("at", (1 / 3, 2 / 3))),
            "state": pick("state", "fresh"), "init": pick("init", "copy"), "rewarm": pick("rewarm", 0),
            "hold": pick("hold", 0.0), "full_hold": pick("full_hold", 0.0),
            "branch_norm": bool(tuned.get("branch_norm", False)) if bn is None else bn == "on",
            "lt": getattr(args, "lt", None), "branch_identity": getattr(args, "branch_identity", "off") == "on",
            "plateau": getattr(args, "plateau", 0)}


def tune2_table(result: Dict) -> str:
    """The ``--tune2`` runs as markdown: one row per (task, arm, variant) with the median over the tuning
    seeds, and each task's choice."""
    lines = ["| task | arm | block | growth at | lr: hold, rewarm | init | final (median [min, max]) | "
             "CPU s (budget) | CPU s to the tuning target |", "|---|---|---|---|---|---|---|---|---|"]
    rows: Dict[tuple, List[Dict]] = {}
    for r in result["runs"]:
        key = (r["task"], r["arm"], r["branch_norm"], tuple(r["at"]) if r["arm"] != "full" else (),
               r["hold"], r["rewarm"], r["init"] if r["arm"] != "full" else "-")
        rows.setdefault(key, []).append(r)
    for (task, arm, bn, at, hold, rewarm, init), rs in rows.items():
        pct = 100.0 if _higher_better(task) else 1.0
        target = result["choice"].get(task, {}).get("target")
        cpu = _cpu_score(rs, target, _higher_better(task)) if target is not None else math.nan
        final = rs[0]["settings"].get("depth", FINAL_DEPTH)
        grow = " -> ".join(str(final >> k) for k in range(len(at), -1, -1)) + \
            f" at {', '.join(f'{a:.2f}' for a in at)}" if at else "-"
        lines.append(f"| {task} | {arm} | {'normalised' if bn else 'plain'} | {grow} | {hold:.2f}, {rewarm} | "
                     f"{init} | {_f(_spread([r['final'] for r in rs]), pct)} | "
                     f"{_f(_spread([r['cpu_s'] for r in rs]))} | {cpu:.3g} |")
    for task, c in result["choice"].items():
        keep = {k: v for k, v in c.items() if k not in ("scores", "full_finals")}
        lines.append(f"\nChoice for {task}: `{json.dumps(keep)}`")
    return "\n".join(lines)


def _tuned_choice(path: str, task: str) -> Optional[Dict]:
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh).get("choice", {}).get(task)


def _choose(runs: List[Dict]) -> Dict:
    """Per task: the grid point with the best median final metric over the growth arms on the tuning seeds
    (ties: the earlier growth, the cheaper run)."""
    choice = {}
    for task in sorted({r["task"] for r in runs}):
        higher = _higher_better(task)
        scores = {}
        for r in runs:
            if r["task"] == task and r["arm"] != "full":
                scores.setdefault((tuple(r["at"]), r["state"]), []).append(r["final"])
        key = max(scores, key=lambda k: (statistics.median(scores[k]) * (1 if higher else -1), -k[0][0]))
        choice[task] = {"at": list(key[0]), "state": key[1],
                        "scores": {f"{list(k[0])}/{k[1]}": statistics.median(v) for k, v in scores.items()}}
    return choice


def run(args) -> int:
    growth_lr = getattr(args, "growth_lr", None)
    _growth_budget({"steps": 1}, getattr(args, "growth_budget", 1.0), growth_lr)  # bad values fail before training
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    runs: List[Dict] = []
    t_start = time.time()
    noise, dims = getattr(args, "noise", 0.0), getattr(args, "teacher_dims", None)
    identity = getattr(args, "branch_identity", "off") == "on"
    for flag, value in (("--noise", noise), ("--teacher-dims", dims), ("--branch-identity on", identity),
                        ("--growth-lr", growth_lr)):
        if value and (args.from_json or args.tune or args.tune2):
            raise ValueError(f"{flag} applies to held-out runs only, not to --tune, --tune2 or --from-json")
    sources = None
    if args.from_json:
        sources = []
        for path in args.from_json:
            with open(path) as fh:
                got = json.load(fh)
            runs += got["runs"]
            sources.append({"path": path, "command": got.get("meta", {}).get("command")})
        for r in runs:  # the per-step lr is lr * lr_multiplier(...) of the run's settings: not kept twice
            r.pop("lr_trace", None)
        summary = summarize(runs, args.slack)
        result = {"runs": runs, "summary": summary, "table_markdown": table(summary)}
        print(result["table_markdown"])
    elif args.tune:
        seeds = list(TUNING_SEEDS)
        for task_name in args.tasks:
            for seed in seeds:
                task = get_task(task_name, seed)
                settings = _settings(args, task_name)
                if "full" in args.arms:
                    runs.append(train_one(task, "full", seed, eval_every=args.eval_every, settings=settings))
                    _log(runs[-1])
                for point in TUNE_GRID:
                    for arm in [a for a in args.arms if a != "full"]:
                        runs.append(train_one(task, arm, seed, at=point["at"], state=point["state"],
                                              eval_every=args.eval_every, settings=settings))
                        _log(runs[-1])
        result = {"runs": runs, "choice": _choose(runs)}
    elif args.tune2:
        result = {"runs": [], "choice": {}}
        for task_name in args.tasks:
            got = tune2(task_name, _settings(args, task_name), slack=args.slack, eval_every=args.eval_every)
            result["runs"] += got["runs"]
            result["choice"].update(got["choice"])
            _dump(args.json_out, dict(result, partial=True))
        result["table_markdown"] = tune2_table(result)
        print(result["table_markdown"])
    else:
        if any(s in TUNING_SEEDS for s in args.seeds):
            print(f"note: seeds {TUNING_SEEDS} are the tuning seeds; report on held-out seeds (100+)")
        variants = {t: _variant(args, _tuned_choice(args.tuned, t) or {}) for t in args.tasks}
        check_int(args.plateau, "--plateau", 0)
        if args.plateau and set(args.arms) & {"mirror", "shuffled"}:
            raise ValueError("--plateau applies to the uniform and adaptive arms; drop mirror/shuffled from --arms")
        for t, v in variants.items():  # a schedule the final depth cannot follow fails before any training
            start_depth(v["at"], _settings(args, t).get("depth", FINAL_DEPTH))
            check_lt(t, v["lt"], v["branch_norm"], v["branch_identity"])
            if t == "family":
                for seed in args.seeds:
                    family_split(seed)
            check_noise(t, noise)
            check_dims(t, dims)
        for task_name in args.tasks:
            v = variants[task_name]
            for seed in args.seeds:
                task = get_task(task_name, seed, noise, dims)
                settings = _settings(args, task_name)
                for arm in args.arms:  # interleaved per seed: the arms see the same machine load
                    kw = dict(v, hold=v["full_hold"] if arm == "full" else v["hold"])
                    del kw["full_hold"]
                    mine = settings if arm == "full" else \
                        _growth_budget(settings, getattr(args, "growth_budget", 1.0), growth_lr)
                    runs.append(train_one(task, arm, seed, eval_every=args.eval_every, settings=mine, **kw))
                    _log(runs[-1])
                    _dump(args.json_out, {"runs": runs, "partial": True})
        summary = summarize(runs, args.slack)
        result = {"runs": runs, "summary": summary, "table_markdown": table(summary)}
        print(result["table_markdown"])
    # a merge's own flags are --from-json, --slack and --json: the rest of args are defaults no run saw
    argv = (["--from-json", *args.from_json, "--slack", str(args.slack), "--json", args.json_out] if sources
            else _argv(args))
    result["meta"] = {"command": "adaptive-depth grow " + " ".join(argv), "torch": torch.__version__,
                      "threads": args.threads, "platform": platform.platform(),
                      "elapsed_s": time.time() - t_start}
    if sources:
        result["meta"]["sources"] = sources
    os.makedirs(os.path.dirname(args.json_out) or ".", exist_ok=True)
    with open(args.json_out, "w") as fh:
        json.dump(result, fh, indent=1)
    if "table_markdown" in result:
        with open(os.path.splitext(args.json_out)[0] + ".md", "w") as fh:
            fh.write(f"Command: `{result['meta']['command']}`\n\n")
            if sources:  # the commands that made the merged runs
                fh.write("".join(f"- from `{src['path']}`: `{src['command'] or 'no command recorded'}`\n"
                                 for src in sources) + "\n")
            fh.write(f"{result['table_markdown']}\n")
    if args.tune:
        print(json.dumps(result["choice"], indent=1))
    return 0


def _dump(path: str, result: Dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)


def _log(r: Dict) -> None:
    extra = (f" init {r.get('init', 'copy')} rewarm {r.get('rewarm', 0)} hold {r.get('hold', 0.0):.2f} "
             f"bn {int(r.get('branch_norm', False))}" + (" identity" if r.get("branch_identity") else "")
             + (f" plateau {r['plateau']} grew at {r['grew_at']}" if r.get("plateau") else ""))
    print(f"{r['task']:8s} {r['arm']:9s} seed {r['seed']:4d} at {[round(a, 3) for a in r['at']]} "
          f"{r['state']:5s}{extra}: final {r['final']:.4f}  cpu {r.get('cpu_s', float('nan')):.1f}s  "
          f"wall {r['wall_s']:.1f}s", flush=True)
