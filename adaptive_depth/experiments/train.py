"""A small, complete training loop: the demo, the benchmarks and the paper experiments share it.

    result = run(RunConfig(data="teacher", effective_depth=5, rule="equal_distance"))

Full-batch (or mini-batch) Adam, optionally followed by SGD at a smaller rate (the paper's recipe), with
the ``AdaptiveSteps`` plugin in every run: ``rule="uniform"`` / ``"irregular"`` keep that fixed profile
(the plugin then only applies the rho-scaled decay, so every run optimises the same cost).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from ..diagnostics import format_table  # noqa: F401 - re-exported for the experiments
from .data import Task, get_task
from . import candidates, mechanism
from .._validate import check_int
from ..optim import AdaptiveSteps
from ..recipes import bottleneck_param_groups
from .rank_guard import RankGuard
from ..residual import LeakyMLP
from ..steps import over_lt

__all__ = ["RunConfig", "RunResult", "FIXED_PROFILES", "OPTIMIZERS", "build_model", "make_optimizer", "run",
           "compare", "format_table"]

FIXED_PROFILES = ("uniform", "irregular") + candidates.PROFILES


@dataclass
class RunConfig:
    """One training run. ``rule``: a fixed profile (``uniform``, ``irregular``, or one of
    ``candidates.PROFILES``) or a plugin rule
    (``equal_distance``, ``paper``, ``weight_norm``, ``learned``)."""

    data: str = "teacher"
    width: int = 100
    depth: int = 20
    effective_depth: float = 5.0
    scheme: str = "exponential"
    total_time: float = 1.0
    rule: str = "uniform"
    steps: int = 2000
    lr: float = 1e-3
    sgd_steps: int = 0
    sgd_lr: float = 1e-2
    batch_size: Optional[int] = None
    weight_decay: Optional[float] = None  # None: the paper's lambda = 1e-3 / Lt (1e-3 at Lt = 0)
    every: int = 10
    plugin: Dict = field(default_factory=dict)  # extra AdaptiveSteps keyword arguments
    seed: int = 0
    data_seed: int = 0
    n_train: int = 1000
    n_test: int = 1000
    eval_every: int = 50
    target_loss: Optional[float] = None
    #: inner optimizer of the first phase: "adam" (default), "adamw", "sgd" (momentum 0.9), "lamb", "radam"
    #: (the last two from torch_optimizer)
    optimizer: str = "adam"
    #: the bottleneck recipe (``adaptive_depth.recipes.bottleneck_param_groups``): L2 on the input/output
    #: layers (None: not penalised, as before) and the branch weights' learning rate in units of ``lr``
    #: (``"lt"``: times max(Lt, 1), Adam's equivalent of the reparametrisation W = Lt V)
    io_decay: Optional[float] = None
    branch_lr_scale: object = 1.0
    #: learning-rate schedule of the first phase: "constant" (default) or "cosine" (to 0 at its last step)
    schedule: str = "constant"
    #: a finishing phase after the others: this many steps with the penalty off (the plugin's weight decay and
    #: the io decay 0), a fresh optimizer of the same kind at ``finish_lr`` (None: ``lr``), the same schedule
    finish_steps: int = 0
    finish_lr: Optional[float] = None
    #: the fraction of the first phase's penalties (the plugin's weight decay, the io decay) the finishing phase
    #: keeps: 0 (default) turns them off, 1 keeps them whole
    finish_keep: float = 0.0
    #: ``rank_guard.RankGuard`` on the finishing phase (lost held out: off by default): check the middle rank
    #: (training inputs) every this many steps and end the phase on the last weights whose rank is at most the
    #: phase's start rank + ``guard_slack`` (0: no guard)
    finish_guard: int = 0
    guard_slack: int = 0

    def decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return over_lt(1e-3, self.effective_depth)


@dataclass
class RunResult:
    config: RunConfig
    history: Dict[str, List[float]]
    final_steps: List[float]
    seconds_per_step: float
    steps_to_target: Optional[int]
    model: Optional[torch.nn.Module] = None

    @property
    def train_loss(self) -> float:
        return self.history["train_loss"][-1]

    @property
    def test_loss(self) -> float:
        return self.history["test_loss"][-1]

    @property
    def test_error(self) -> float:
        return self.history["test_error"][-1]

    def to_dict(self) -> dict:
        return {"config": dataclasses.asdict(self.config), "history": self.history,
                "final_steps": self.final_steps, "seconds_per_step": self.seconds_per_step,
                "steps_to_target": self.steps_to_target, "train_loss": self.train_loss,
                "test_loss": self.test_loss, "test_error": self.test_error}


def build_model(config: RunConfig, task: Task) -> LeakyMLP:
    steps = config.rule if config.rule in FIXED_PROFILES else "uniform"
    if steps in candidates.PROFILES:
        steps = candidates.profile_steps(steps, config.depth, config.total_time)
    torch.manual_seed(config.seed)
    return LeakyMLP(task.in_dim, task.out_dim, config.width, config.depth,
                    effective_depth=config.effective_depth, total_time=config.total_time, steps=steps,
                    scheme=config.scheme)


OPTIMIZERS = ("adam", "adamw", "sgd", "lamb", "radam")


def make_optimizer(config: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The first phase's inner optimizer (``config.optimizer`` at ``config.lr``); with ``io_decay`` or a
    ``branch_lr_scale`` other than 1, over the bottleneck recipe's parameter groups."""
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {config.optimizer!r}")
    if config.io_decay is None and config.branch_lr_scale == 1.0:
        params = model.parameters()
    else:
        params = bottleneck_param_groups(model, lr=config.lr, io_decay=config.io_decay or 0.0,
                                         branch_lr_scale=config.branch_lr_scale)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9)
    import torch_optimizer
    return (torch_optimizer.Lamb if config.optimizer == "lamb" else torch_optimizer.RAdam)(params, lr=config.lr)


def _plugin(config: RunConfig, optimizer, model) -> AdaptiveSteps:
    rule = "fixed" if config.rule in FIXED_PROFILES else candidates.resolve(config.rule)
    settings = dict(every=config.every, weight_decay=config.decay())
    settings.update(config.plugin)  # the plugin's extra arguments win (e.g. '{"weight_decay": 0}': no penalty)
    return AdaptiveSteps(optimizer, model, rule=rule, **settings)


@torch.no_grad()
def _evaluate(model, task: Task, y_clean: Optional[torch.Tensor] = None):
    """(train loss, test loss, test error, test loss on ``y_clean`` or None), inputs in the model's dtype (the
    paper's runs end in float64); one forward pass over the test inputs serves both test labels."""
    dtype = next(model.parameters()).dtype
    model.eval()
    train_loss = float(task.loss_fn(model(task.x_train.to(dtype)), task.y_train))
    pred = model(task.x_test.to(dtype))
    model.train()
    clean = None if y_clean is None else float(task.loss_fn(pred, y_clean))
    return train_loss, float(task.loss_fn(pred, task.y_test)), task.error(pred, task.y_test), clean


def _schedule(opt, name: str, count: int):
    if name == "constant":
        return None
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(count, 1))
    raise ValueError(f"schedule must be 'constant' or 'cosine', got {name!r}")


@torch.no_grad()
def _loss(model, task: Task, x, y) -> float:
    """The task's loss on ``(x, y)`` in eval mode."""
    model.eval()
    value = float(task.loss_fn(model(x.to(next(model.parameters()).dtype)), y))
    model.train()
    return value


def run(config: RunConfig, task: Optional[Task] = None, *, progress: bool = False,
        keep_model: bool = False, model: Optional[torch.nn.Module] = None) -> RunResult:
    """Train one model with ``config``; evaluates every ``eval_every`` steps and at the end.

    ``model``: train this module instead of ``build_model(config, task)`` (it must hold the step sizes, and
    its fixed profile is the caller's business); parameters with ``requires_grad=False`` stay fixed.
    """
    if config.finish_guard and not config.finish_steps:
        raise ValueError(f"finish_guard guards the finishing phase: it needs finish_steps > 0, "
                         f"got finish_guard={config.finish_guard!r} with finish_steps={config.finish_steps!r}")
    task = task or get_task(config.data, seed=config.data_seed, n_train=config.n_train, n_test=config.n_test)
    model = build_model(config, task) if model is None else model
    preserve = candidates.preserves(config.rule)
    if preserve and not isinstance(model, LeakyMLP):
        raise ValueError(f"rule {config.rule!r} rescales a LeakyMLP's weights; got a {type(model).__name__}")
    history: Dict[str, List[float]] = {"step": [], "train_loss": [], "test_loss": [], "test_error": [],
                                       "seconds": []}
    x_val = getattr(task, "x_val", None)
    if x_val is not None:
        history["val_loss"] = []
    y_clean = getattr(task, "y_test_clean", None)
    if y_clean is not None:
        history["clean_test_loss"] = []
    phases = [(make_optimizer(config, model), config.steps, config, config.schedule)]
    if config.sgd_steps:
        phases.append((torch.optim.SGD(model.parameters(), lr=config.sgd_lr), config.sgd_steps, config, "constant"))
    if config.finish_steps:
        fin = finishing_config(config)
        phases.append((make_optimizer(fin, model), config.finish_steps, fin, config.schedule))
    total = sum(n for _, n, _, _ in phases)
    bar = _progress(total, f"{config.rule} Lt={config.effective_depth:g}") if progress else None
    gen = torch.Generator().manual_seed(config.seed + 1)
    n = task.x_train.shape[0]
    step, train_seconds, reached = 0, 0.0, None

    def record():
        tr, te, err, clean = _evaluate(model, task, y_clean)
        for key, value in zip(("step", "train_loss", "test_loss", "test_error", "seconds"),
                              (step, tr, te, err, train_seconds)):
            history[key].append(value)
        if x_val is not None:
            history["val_loss"].append(_loss(model, task, x_val, task.y_val))
        if y_clean is not None:
            history["clean_test_loss"].append(clean)
        return tr

    record()
    for index, (inner, count, phase_config, schedule) in enumerate(phases):
        opt = _plugin(phase_config, inner, model)
        sched = _schedule(opt, schedule, count)
        guard = (RankGuard(model, task.x_train, every=config.finish_guard, slack=config.guard_slack)
                 if config.finish_guard and index == len(phases) - 1 else None)
        for _ in range(count):
            start = time.perf_counter()
            if config.batch_size and config.batch_size < n:
                idx = torch.randint(n, (config.batch_size,), generator=gen)
                xb, yb = task.x_train[idx], task.y_train[idx]
            else:
                xb, yb = task.x_train, task.y_train
            loss = task.loss_fn(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            before = _coefficients(model) if preserve else None
            opt.step()
            if preserve and not torch.equal(before[0], _coefficients(model)[0]):
                mechanism.preserve_function_(model, before, opt)
            if sched is not None:
                sched.step()
            train_seconds += time.perf_counter() - start
            step += 1
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"training diverged at step {step} (loss {float(loss.detach())}); "
                                         f"lower lr or use scheme='exponential'")
            if step % config.eval_every == 0 or step == total:
                tr = record()
                if reached is None and config.target_loss is not None and tr <= config.target_loss:
                    reached = step
                if bar is not None:
                    bar.set_postfix(train=f"{tr:.4f}", test=f"{history['test_loss'][-1]:.4f}")
            if bar is not None:
                bar.update(1)
            if guard is not None and guard.step():
                break
        if guard is not None:
            guard.restore()
            history["guard"] = [list(check) for check in guard.history]
            history["guard_kept_at"] = [guard.kept_at]
            if guard.tripped or history["step"][-1] != step:
                record()  # the weights the phase ended on
    if bar is not None:
        bar.close()
    return RunResult(config, history, model.step_sizes().tolist(), train_seconds / max(step, 1), reached,
                     model if keep_model else None)


def finishing_config(config: RunConfig) -> RunConfig:
    """The finishing phase's settings: the penalties (plugin and io decay) times ``finish_keep`` (default 0: off),
    lr ``finish_lr``."""
    check_int(config.finish_steps, "finish_steps", 0)
    if config.finish_lr is not None and not (isinstance(config.finish_lr, (int, float)) and config.finish_lr > 0):
        raise ValueError(f"finish_lr must be None (the first phase's lr) or a number > 0, got {config.finish_lr!r}")
    check_int(config.finish_guard, "finish_guard", 0)
    check_int(config.guard_slack, "guard_slack", 0)
    keep = config.finish_keep
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 <= keep <= 1:
        raise ValueError(f"finish_keep must be a number in [0, 1] (the fraction of the penalties kept), got {keep!r}")
    decay = keep * config.plugin.get("weight_decay", config.decay())
    return dataclasses.replace(config, weight_decay=decay, io_decay=None if config.io_decay is None else
                               keep * config.io_decay, lr=config.finish_lr or config.lr,
                               plugin={**config.plugin, "weight_decay": decay})


@torch.no_grad()
def _coefficients(model):
    return tuple(t.detach().clone() for t in model.net.steps.coefficients())


def compare(config: RunConfig, rules: Sequence[str] = ("uniform", "equal_distance"),
            seeds: Sequence[int] = (0,), *, progress: bool = False, keep_models: bool = False,
            task: Optional[Task] = None) -> List[RunResult]:
    """The same task, seed and budget for each rule (and each seed)."""
    task = task or get_task(config.data, seed=config.data_seed, n_train=config.n_train, n_test=config.n_test)
    return [run(dataclasses.replace(config, rule=rule, seed=seed), task, progress=progress,
                keep_model=keep_models) for seed in seeds for rule in rules]


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
