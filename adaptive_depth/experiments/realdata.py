"""Real tasks against published numbers: MNIST-1D (MLP and conv families) and scikit-learn's digits.

Three arms per task, the same block and budget in each: ``plain`` (Lt = 0, uniform steps), ``uniform``
(large Lt, uniform steps) and ``adaptive`` (large Lt, ``AdaptiveSteps`` with its default rule). All conv
models use the large-Lt recipe of ``docs/large_lt.md`` (``branch_norm=True, branch_gain="balanced"``) in
every arm, so the comparison holds the block fixed. The ``raw-uniform`` arm is the ordinary conv block
without that recipe (the issue's underfitting baseline).

Protocol (no test data in any choice): for each arm the learning rate is picked from ``--lrs`` by the mean
final validation accuracy over the tuning seeds (0, 1), training on the train split minus a validation
split of ``--val`` examples; the report seeds (100-104) then train on the whole train split with that lr
and are scored on the test split. AdamW with a cosine schedule, batch 128, random-shift augmentation for
every arm on MNIST-1D (the data are translated templates).

    adaptive-depth realdata --task mnist1d-conv --out benchmarks/results/realdata_mnist1d_conv.json
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import check_choice, check_positive
from ..optim import AdaptiveSteps
from ..recipes import identity_param_groups
from ..residual import LeakyMLP, LeakyResNet, balanced_gain
from ..schedule import EffectiveDepthScheduler

__all__ = ["TASKS", "ARMS", "RealConfig", "load", "build_model", "train_one", "run_protocol", "summarise",
           "summarise_tuning", "to_markdown"]

#: task -> data, width and depth L of the leaky stack, large Lt (>= L/2), steps (sized for a shared 2-core
#: CPU), lr grid, target test accuracy for "time to target", published reference
TASKS: Dict[str, dict] = {
    "mnist1d-mlp": dict(data="mnist1d", width=100, depth=12, lt=6.0, steps=1000, lrs=(1e-3, 3e-3), target=0.68,
                        published="MLP 68%, CNN 94%, GRU 91%, human 96% (MNIST-1D README)"),
    "mnist1d-conv": dict(data="mnist1d", width=16, depth=8, lt=8.0, steps=600, lrs=(3e-3, 1e-2), target=0.94,
                         published="CNN 94%, GRU 91%, MLP 68%, human 96% (MNIST-1D README)"),
    "digits-conv": dict(data="digits", width=8, depth=6, lt=6.0, steps=300, lrs=(3e-3, 1e-2), target=0.97,
                        published="none quoted"),
}
ARMS = ("plain", "uniform", "adaptive", "raw-uniform")
TUNE_SEEDS = (0, 1)
REPORT_SEEDS = (100, 101, 102, 103, 104)


@dataclass
class RealConfig:
    """One training run."""

    task: str = "mnist1d-conv"
    arm: str = "plain"
    lr: float = 3e-3
    seed: int = 0
    steps: Optional[int] = None  # None: the task's budget
    batch_size: int = 128
    weight_decay: float = 0.01
    width: Optional[int] = None  # None: the task's
    depth: Optional[int] = None  # None: the task's
    validation: bool = False  # True: hold out `val` train examples and score on them (tuning)
    val: int = 500
    eval_every: int = 100
    augment: bool = True
    rescaled_gain: bool = False  # Adam on g / balanced_gain(Lt): the gains' lr x that factor, weight decay / it
    lt_warmup: float = 0.0  # fraction of the budget over which Lt rises linearly from 0 (EffectiveDepthScheduler)
    lt: Optional[float] = None  # the large-Lt arms' effective depth; None: the task's
    identity: bool = False  # conv arms: branch_identity=True, gain 1, the identity coefficients at lr / Lt
    identity_scale: float = 1.0  # with identity: the coefficients at identity_scale x lr / Lt

    def budget(self) -> int:
        return self.steps if self.steps is not None else TASKS[self.task]["steps"]

    def effective_depth(self) -> float:
        if self.arm == "plain":
            return 0.0
        return TASKS[self.task]["lt"] if self.lt is None else self.lt

    def canonical(self) -> "RealConfig":
        """The same run with the large-Lt options that do nothing at Lt = 0 reset (the plain arm), so a
        protocol with those options reuses the plain runs of one without them."""
        if self.effective_depth() > 0:
            return self
        return replace(self, rescaled_gain=False, lt_warmup=0.0, lt=None, identity=False, identity_scale=1.0)


@dataclass
class Split:
    x_train: Tensor
    y_train: Tensor
    x_eval: Tensor
    y_eval: Tensor


# ------------------------------------------------------------------------------------------- data
def load(task: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)``: MNIST-1D from ``make_dataset`` with its default arguments
    (4000/1000, standardised on train), or scikit-learn's digits (1797 8x8 images, a fixed stratified 75/25
    split, pixels / 16), images shaped ``(N, 1, 8, 8)``. Built once per process; each call returns copies."""
    return tuple(t.clone() for t in _load(TASKS[_check_task(task)]["data"]))


@functools.lru_cache(maxsize=None)
def _load(data: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if data == "mnist1d":
        from .data import mnist1d
        t = mnist1d()  # the package's default arguments: 4000 train / 1000 test, seed 42
        return t.x_train, t.y_train, t.x_test, t.y_test
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    i_tr, i_te = train_test_split(torch.arange(len(y)).numpy(), test_size=0.25, random_state=0, stratify=d.target)
    return x[i_tr], y[i_tr], x[i_te], y[i_te]


def _split(task: str, config: RealConfig) -> Split:
    x, y, x_test, y_test = load(task)
    if not config.validation:
        return Split(x, y, x_test, y_test)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(10_000 + config.seed))
    val, tr = perm[:config.val], perm[config.val:]
    return Split(x[tr], y[tr], x[val], y[val])


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random shift of each 1-D signal by up to 4 positions (zero fill), the translation the data have."""
    if x.dim() != 2:
        return x
    shifts = torch.randint(-4, 5, (x.shape[0],), generator=gen)
    n = x.shape[1]
    idx = torch.arange(n).unsqueeze(0) - shifts.unsqueeze(1)
    valid = (idx >= 0) & (idx < n)
    return torch.gather(x, 1, idx.clamp(0, n - 1)) * valid


# ------------------------------------------------------------------------------------------ models
class ConvNet(nn.Module):
    """A conv stem, a ``LeakyResNet`` of ordinary conv blocks ``conv(relu(x))`` and a linear head.

    ``dims=1``: MNIST-1D signals ``(N, 40)``; ``dims=2``: images ``(N, 1, H, W)``."""

    def __init__(self, length: int, classes: int, width: int, depth: int, *, dims: int, effective_depth: float,
                 recipe: bool, identity: bool = False):
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.dims = dims
        self.stem = conv(1, width, 5 if dims == 1 else 3, padding="same")
        blocks = [nn.Sequential(nn.ReLU(), conv(width, width, 3, padding="same")) for _ in range(depth)]
        options = dict(branch_norm=True, branch_gain="balanced") if recipe else {}
        if identity:  # the leak cancelled at init: the block starts as x + b f(x)/rms with a plain branch weight
            options.update(branch_gain=1.0, branch_identity=True)
        self.net = LeakyResNet(blocks, effective_depth=effective_depth, scheme="exponential", **options)
        self.head = nn.Linear(width * length, classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.dims == 1:
            x = x.unsqueeze(1)
        return self.head(F.relu(self.net(self.stem(x))).flatten(1))


def build_model(config: RealConfig, in_shape: Sequence[int], classes: int) -> nn.Module:
    """The task's model for ``config.arm`` (seeded with ``config.seed``)."""
    spec = TASKS[config.task]
    lt = config.effective_depth()
    torch.manual_seed(config.seed)
    width, depth = config.width or spec["width"], config.depth or spec["depth"]
    if config.task == "mnist1d-mlp":
        return LeakyMLP(in_shape[0], classes, width=width, depth=depth, effective_depth=lt, scheme="exponential")
    dims = 1 if spec["data"] == "mnist1d" else 2
    length = math.prod(in_shape[-dims:])
    return ConvNet(length, classes, width, depth, dims=dims, effective_depth=lt, recipe=config.arm != "raw-uniform",
                   identity=config.identity)


# ---------------------------------------------------------------------------------------- training
@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    acc = float(sum((model(xb).argmax(1) == yb).sum() for xb, yb in zip(x.split(1000), y.split(1000))) / len(y))
    model.train()
    return acc


def train_one(config: RealConfig, split: Optional[Split] = None) -> dict:
    """Train one run; returns its final train/eval accuracy, the eval curve (step, training seconds, accuracy),
    the first step and training time at which the eval accuracy reached the task's target, and the steps."""
    _check_task(config.task)
    check_choice(config.arm, "arm", ARMS)
    split = split or _split(config.task, config)
    classes = int(split.y_train.max()) + 1
    model = build_model(config, split.x_train.shape[1:], classes)
    inner = torch.optim.AdamW(_param_groups(model, config), lr=config.lr, weight_decay=config.weight_decay)
    total = config.budget()
    sched = torch.optim.lr_scheduler.LambdaLR(inner, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    opt = AdaptiveSteps(inner, model) if config.arm == "adaptive" else inner
    ramp = _lt_ramp(model, config)
    gen = torch.Generator().manual_seed(config.seed + 1)
    target = TASKS[config.task]["target"]
    curve, seconds, reached = [], 0.0, None
    n = len(split.y_train)
    for step in range(1, total + 1):
        start = time.perf_counter()
        idx = torch.randint(n, (config.batch_size,), generator=gen)
        xb = split.x_train[idx]
        if config.augment:
            xb = _augment(xb, gen)
        loss = F.cross_entropy(model(xb), split.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if ramp is not None:
            ramp.step()
        seconds += time.perf_counter() - start
        if not math.isfinite(float(loss.detach())):
            return _result(config, model, split, curve, None, seconds, diverged=step)
        if step % config.eval_every == 0 or step == total:
            acc = _accuracy(model, split.x_eval, split.y_eval)
            curve.append((step, round(seconds, 3), acc))
            if reached is None and acc >= target:
                reached = (step, round(seconds, 3))
    return _result(config, model, split, curve, reached, seconds)


def _param_groups(model: nn.Module, config: RealConfig) -> List[dict]:
    """One group of every weight, except:

    - ``rescaled_gain``: the branch gains apart, at lr x k and weight decay / k with ``k = balanced_gain(Lt)``:
      AdamW on ``g / k`` (which starts at 1) written in ``g`` (RESEARCH.md 1: Adam moves a weight by ~lr per
      step, and the balanced gains live at scale Lt);
    - ``identity``: the blocks' identity coefficients ``r`` apart, at lr / Lt: the leak they leave,
      ``Lt (1 - r)``, then moves by ~lr per step like any other weight instead of Lt x lr."""
    blocks = getattr(model.net, "blocks", [])
    groups, apart = [], set()
    if config.rescaled_gain:
        gains = [b.gain for b in blocks if getattr(b, "gain", None) is not None]
        if not gains:
            raise ValueError(f"rescaled_gain needs branch gains: arm {config.arm!r} of task {config.task!r} has none")
        k = balanced_gain(config.effective_depth())
        groups.append(dict(params=gains, lr=config.lr * k, weight_decay=config.weight_decay / k))
        apart |= {id(g) for g in gains}
    if config.identity and config.effective_depth() > 0:
        _, *identity = identity_param_groups(model, lr=config.lr, scale=config.identity_scale)  # [0]: the rest
        groups += identity
        apart |= {id(r) for g in identity for r in g["params"]}
    return [dict(params=[p for p in model.parameters() if id(p) not in apart])] + groups


def _lt_ramp(model: nn.Module, config: RealConfig) -> Optional[EffectiveDepthScheduler]:
    """With ``lt_warmup`` > 0 and a large-Lt arm, Lt rises linearly from 0 over that fraction of the budget."""
    _lt_ramp_check(config.lt_warmup)
    lt = config.effective_depth()
    if config.lt_warmup == 0.0 or lt == 0.0:
        return None
    return EffectiveDepthScheduler(model.net, target=lt, total_steps=max(1, round(config.lt_warmup * config.budget())))


def _lt_ramp_check(lt_warmup: float) -> None:
    if isinstance(lt_warmup, bool) or not isinstance(lt_warmup, (int, float)) or not 0.0 <= lt_warmup <= 1.0:
        raise ValueError(f"lt_warmup must be a fraction of the budget in [0, 1], got {lt_warmup!r}")


def _result(config, model, split, curve, reached, seconds, diverged=None) -> dict:
    steps = model.net.step_sizes().tolist()
    extra = {}
    if getattr(model.net.blocks[0], "identity", None) is not None:  # the leak each block kept: Lt (1 - r)
        extra["final_identity"] = [round(b.identity.item(), 4) for b in model.net.blocks]
    return dict(config=asdict(config), train_acc=_accuracy(model, split.x_train, split.y_train),
                eval_acc=curve[-1][2] if curve else float("nan"), curve=curve,
                reached_step=reached[0] if reached else None, reached_seconds=reached[1] if reached else None,
                seconds=round(seconds, 2), final_steps=steps, diverged_at=diverged, **extra)


# ---------------------------------------------------------------------------------------- protocol
def run_protocol(task: str, arms: Sequence[str], lrs: Optional[Sequence[float]] = None, *, tune_seeds=TUNE_SEEDS,
                 report_seeds=REPORT_SEEDS, steps: Optional[int] = None, workers: int = 1,
                 log: Optional[str] = None, logged_only: bool = False, rescaled_gain: bool = False,
                 lt_warmup: float = 0.0, lt: Optional[float] = None, identity: bool = False,
                 identity_scale: float = 1.0) -> dict:
    """Pick each arm's lr on validation (tuning seeds), then train the report seeds on train, score on test.

    ``log``: a JSON-lines file; each finished run is appended, and runs already in it are reused (resume).
    ``logged_only``: train nothing, tabulate what the log holds (missing runs are left out).
    ``rescaled_gain``, ``lt_warmup``: the large-Lt options of ``RealConfig`` for every arm (no-ops at Lt = 0).
    ``lt``: the large-Lt arms' effective depth (None: the task's). ``identity``: conv arms use
    ``branch_identity=True`` with gain 1 (``RealConfig.identity``), their coefficients at ``identity_scale`` x
    lr / Lt."""
    if not isinstance(identity, bool):
        raise TypeError(f"identity must be True or False, got {identity!r}")
    check_positive(identity_scale, "identity_scale")
    if identity_scale != 1.0 and not identity:
        raise ValueError("identity_scale applies with identity=True (--identity) only")
    if identity and task == "mnist1d-mlp":
        raise ValueError("identity applies to the conv tasks; the MLP task has LeakyMLP's own near-identity init")
    if lt is not None:
        check_positive(lt, "lt (the large-Lt arms' effective depth)")
    base = RealConfig(task=_check_task(task), steps=steps, rescaled_gain=rescaled_gain, lt_warmup=lt_warmup, lt=lt,
                      identity=identity, identity_scale=float(identity_scale))
    _lt_ramp_check(lt_warmup)
    lrs = list(lrs or TASKS[task]["lrs"])
    canon = lambda c: c.canonical()  # noqa: E731
    tune = [canon(replace(base, arm=a, lr=lr, seed=s, validation=True)) for a in arms for lr in lrs for s in tune_seeds]
    tuned = _map(tune, workers, log, logged_only)
    chosen = {a: _best_lr(tuned, a, lrs) for a in arms}
    # seed-major order: a run cut short still leaves every arm with the same seeds
    report = [canon(replace(base, arm=a, lr=chosen[a], seed=s)) for s in report_seeds for a in arms]
    return dict(task=task, spec=TASKS[task], lrs=lrs, steps=steps, tune_seeds=list(tune_seeds),
                report_seeds=list(report_seeds), chosen_lr=chosen, tuning=tuned,
                report=_map(report, workers, log, logged_only), rescaled_gain=rescaled_gain, lt_warmup=lt_warmup,
                lt=lt, identity=identity, identity_scale=float(identity_scale))


def _best_lr(runs: List[dict], arm: str, lrs: Sequence[float]) -> float:
    def score(lr):
        accs = [r["eval_acc"] for r in runs if r["config"]["arm"] == arm and r["config"]["lr"] == lr]
        return statistics.fmean(a if math.isfinite(a) else 0.0 for a in accs) if accs else -1.0
    return max(lrs, key=score)


def _worker(config: RealConfig) -> dict:
    torch.set_num_threads(1)
    return train_one(config)


def _key(config: RealConfig) -> str:
    return json.dumps(asdict(config), sort_keys=True)


def _read_log(log: Optional[str]) -> Dict[str, dict]:
    done = {}
    if log:
        try:
            with open(log) as fh:
                for line in fh:
                    r = json.loads(line)
                    done[_key(RealConfig(**r["config"]))] = r  # fields added since the run: their defaults
        except FileNotFoundError:
            pass
    return done


def _map(configs: List[RealConfig], workers: int, log: Optional[str], logged_only: bool = False) -> List[dict]:
    done = _read_log(log)
    todo = [] if logged_only else [c for c in configs if _key(c) not in done]
    if workers > 1 and len(todo) > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(workers) as pool:
            for c, r in zip(todo, pool.imap(_worker, todo)):
                done[_key(c)] = _logged(r, log)
    else:
        for c in todo:
            done[_key(c)] = _logged(_worker(c), log)
    return [done[_key(c)] for c in configs if _key(c) in done]


def _logged(result: dict, log: Optional[str]) -> dict:
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps(result) + "\n")
    return result


# ------------------------------------------------------------------------------------------ tables
def summarise(result: dict) -> List[dict]:
    """Per arm over the report seeds: median and range of test/train accuracy, steps and seconds to target."""
    rows = []
    for arm in dict.fromkeys(r["config"]["arm"] for r in result["report"]):
        runs = [r for r in result["report"] if r["config"]["arm"] == arm]
        hit = [r for r in runs if r["reached_step"] is not None]
        rows.append(dict(arm=arm, lr=result["chosen_lr"][arm], seeds=len(runs),
                         test=_stats([r["eval_acc"] for r in runs]), train=_stats([r["train_acc"] for r in runs]),
                         reached=f"{len(hit)}/{len(runs)}",
                         steps_to_target=_stats([r["reached_step"] for r in hit]) if hit else None,
                         seconds_to_target=_stats([r["reached_seconds"] for r in hit]) if hit else None,
                         seconds=_stats([r["seconds"] for r in runs])))
    return rows


def summarise_tuning(result: dict) -> Dict[str, Dict[float, dict]]:
    """Per arm and lr: the mean validation accuracy over the tuning seeds that ran (a diverged run scores 0)
    and their number; lrs of the grid with no run are left out."""
    table: Dict[str, Dict[float, dict]] = {}
    for r in result.get("tuning", []):
        c = r["config"]
        acc = r["eval_acc"] if math.isfinite(r["eval_acc"]) else 0.0
        table.setdefault(c["arm"], {}).setdefault(c["lr"], []).append(acc)
    return {arm: {lr: dict(mean=statistics.fmean(v), runs=len(v)) for lr, v in sorted(by_lr.items())}
            for arm, by_lr in table.items()}


def _tuning_lines(result: dict) -> List[str]:
    table = summarise_tuning(result)
    if not table:
        return []
    lrs = result["lrs"]
    lines = ["", f"Tuning: validation accuracy %, mean over tuning seeds {result.get('tune_seeds')} (chosen lr in "
             "bold; - : not run)", "", "| arm | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
             "|---" * (len(lrs) + 1) + "|"]
    for arm, by_lr in table.items():
        cells = []
        for lr in lrs:
            if lr not in by_lr:
                cells.append("-")
                continue
            text = f"{100 * by_lr[lr]['mean']:.1f}" + ("" if by_lr[lr]["runs"] == len(result.get("tune_seeds", [])) else
                                                     f" ({by_lr[lr]['runs']} runs)")
            cells.append(f"**{text}**" if result["chosen_lr"].get(arm) == lr else text)
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def _stats(values: List[float]) -> dict:
    return dict(median=statistics.median(values), min=min(values), max=max(values))


def _fmt(s: Optional[dict], pct: bool = False, nd: int = 0) -> str:
    if s is None:
        return "not reached"
    f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.{nd}f}")
    return f"{f(s['median'])} [{f(s['min'])}, {f(s['max'])}]"


def _paired(result: dict, a: str, b: str, key: str = "eval_acc") -> Optional[dict]:
    acc = {(r["config"]["arm"], r["config"]["seed"]): r[key] for r in result["report"]}
    diffs = [acc[(a, s)] - acc[(b, s)] for (arm, s) in acc if arm == a and (b, s) in acc]
    return _stats(diffs) if diffs else None


def _options_line(result: dict) -> str:
    parts = []
    if result.get("rescaled_gain"):
        parts.append("branch gains trained as g / Lt (lr x Lt, weight decay / Lt)")
    if result.get("identity"):
        parts.append("branch_identity=True with branch gain 1 (the leak cancelled at initialisation, "
                     f"Lt * r * x learned from r = 1, r at {_scale_word(result.get('identity_scale', 1.0))}lr / Lt)")
    if result.get("lt_warmup"):
        parts.append(f"Lt raised linearly from 0 over the first {100 * result['lt_warmup']:g}% of the steps")
    return f" Large-Lt arms: {'; '.join(parts)} (no-ops at Lt = 0)." if parts else ""


def _scale_word(scale: float) -> str:
    return "" if scale == 1.0 else f"{scale:g} x "


def to_markdown(result: dict, command: str) -> str:
    spec = result["spec"]
    tune, report = result.get("tune_seeds", list(TUNE_SEEDS)), result.get("report_seeds", list(REPORT_SEEDS))
    title = f"report seeds {report}" if result["report"] else "the lr search alone, no report run"
    lines = [f"# {result['task']}: plain vs uniform vs adaptive ({title})", "",
             f"Command: `{command}`", "",
             f"L = {spec['depth']} blocks of width {spec['width']}, large Lt = "
             f"{result.get('lt') or spec['lt']:g}, exponential scheme, "
             f"{result.get('steps') or spec['steps']} steps at batch 128, AdamW + cosine; lr per arm from "
             f"{result['lrs']} by validation accuracy on tuning seeds {tune}. Target (time to "
             f"target): {100 * spec['target']:.0f}% test accuracy. Published: {spec['published']}."
             + _options_line(result)]
    if result["report"]:
        lines += ["", "| arm | lr | test acc % median [min, max] | train acc % | reached | steps to target | "
                  "train seconds to target | train seconds total |", "|---|---|---|---|---|---|---|---|"]
    for row in summarise(result):
        lines.append(f"| {row['arm']} | {row['lr']:g} | {_fmt(row['test'], True)} | {_fmt(row['train'], True)} | "
                     f"{row['reached']} | {_fmt(row['steps_to_target'])} | {_fmt(row['seconds_to_target'], nd=1)} | "
                     f"{_fmt(row['seconds'], nd=1)} |")
    lines.append("")
    for key, name in (("eval_acc", "test"), ("train_acc", "train")):
        for a, b in (("adaptive", "uniform"), ("adaptive", "plain"), ("uniform", "plain")):
            d = _paired(result, a, b, key)
            if d:
                lines.append(f"- {a} minus {b}, {name} accuracy paired by seed (points): median "
                             f"{100 * d['median']:+.1f} [{100 * d['min']:+.1f}, {100 * d['max']:+.1f}]")
    return "\n".join(lines + _tuning_lines(result)) + "\n"


# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=sorted(TASKS), default="mnist1d-conv")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=["plain", "uniform", "adaptive"])
    parser.add_argument("--lrs", nargs="+", type=float, default=None, help="lr grid (default: the task's)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the task's budget)")
    parser.add_argument("--tune-seeds", nargs="+", type=int, default=list(TUNE_SEEDS))
    parser.add_argument("--report-seeds", nargs="+", type=int, default=list(REPORT_SEEDS))
    parser.add_argument("--workers", type=int, default=1, help="processes (one thread each)")
    parser.add_argument("--out", default=None, help="write the JSON here and the table next to it (.md)")
    parser.add_argument("--log", default=None, help="append each finished run to this JSON-lines file; runs "
                        "already in it are reused (resume)")
    parser.add_argument("--logged-only", action="store_true", help="train nothing: tabulate the runs in --log")
    parser.add_argument("--tune-only", action="store_true", help="train the tuning runs only (no report seeds): "
                        "the table then shows the lr search alone")
    parser.add_argument("--rescaled-gain", action="store_true", help="large-Lt arms: AdamW on g / balanced_gain(Lt) "
                        "(the branch gains' lr x that factor, their weight decay / it)")
    parser.add_argument("--lt-warmup", type=float, default=0.0, help="large-Lt arms: raise Lt linearly from 0 over "
                        "this fraction of the budget (default 0: no warm-up)")
    parser.add_argument("--lt", type=float, default=None, help="the large-Lt arms' effective depth (default: the "
                        "task's); the plain arm stays at 0")
    parser.add_argument("--identity", action="store_true", help="conv large-Lt arms: branch_identity=True with "
                        "branch gain 1, the identity coefficients at lr / Lt (the leak cancelled at initialisation; "
                        "docs/large_lt.md)")
    parser.add_argument("--identity-scale", type=float, default=1.0, help="with --identity: the identity "
                        "coefficients at this x lr / Lt (default 1; recipes.identity_param_groups(scale=))")


def run(args: argparse.Namespace) -> int:
    if set(args.tune_seeds) & set(args.report_seeds):
        raise ValueError("--tune-seeds and --report-seeds must not overlap (tune on some, report on others)")
    torch.set_num_threads(1)
    report_seeds = [] if args.tune_only else args.report_seeds
    result = run_protocol(args.task, args.arms, args.lrs, tune_seeds=args.tune_seeds, report_seeds=report_seeds,
                          steps=args.steps, workers=args.workers, log=args.log, logged_only=args.logged_only,
                          rescaled_gain=args.rescaled_gain, lt_warmup=args.lt_warmup, lt=args.lt,
                          identity=args.identity, identity_scale=args.identity_scale)
    command = _command(args)
    md = to_markdown(result, command)
    print(md)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(result, summary=summarise(result), command=command), fh, indent=1)
        with open(args.out.rsplit(".", 1)[0] + ".md", "w") as fh:
            fh.write(md)
    return 0


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces ``args`` (flags at their off value and the log options left out)."""
    words = ["adaptive-depth realdata"]
    for k, v in vars(args).items():
        if k.startswith("_") or k in ("command", "log", "logged_only") or v is None or v is False:
            continue
        if (k == "lt_warmup" and v == 0) or (k == "identity_scale" and v == 1.0):
            continue
        flag = f"--{k.replace('_', '-')}"
        words.append(flag if v is True else f"{flag} {' '.join(map(str, v)) if isinstance(v, list) else v}")
    return " ".join(words)


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    return task
