"""``adaptive-depth demo``: uniform against adaptive steps on an embedded task, same seed and budget.

Prints a table (final train/test loss, steps to a target loss, time per step, step profile) and writes
``loss_curves.png``, ``step_profile.png``, ``effective_rank.png`` and ``results.json`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import List

from .data import TASKS, get_task
from .train import RunConfig, RunResult, compare, format_table

_BARS = "▁▂▃▄▅▆▇█"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", choices=TASKS, default="teacher", help="embedded task")
    p.add_argument("--lt", "--effective-depth", dest="lt", type=float, default=30.0,
                   help="effective depth Lt (large: the timescales separate and adaptive steps pay off)")
    p.add_argument("--depth", type=int, default=20, help="number of leaky blocks L")
    p.add_argument("--width", type=int, default=100, help="width of the representation")
    p.add_argument("--steps", type=int, default=2000, help="Adam steps")
    p.add_argument("--sgd-steps", type=int, default=0, help="SGD steps after Adam (the paper's recipe)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--rule", default="equal_distance",
                   choices=["equal_distance", "paper", "weight_norm", "learned", "irregular"],
                   help="adaptive rule compared against uniform steps")
    p.add_argument("--every", type=int, default=10, help="adapt the steps every N optimizer steps")
    p.add_argument("--scheme", choices=["euler", "exponential"], default="exponential")
    p.add_argument("--seed", type=int, default=0, help="model seed (the data seed is --data-seed)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--target", type=float, default=None,
                   help="target test loss for 'steps to target' (default: the uniform run's final test loss)")
    p.add_argument("--out", default=os.path.join("out", "demo"), help="folder for plots and results.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _spark(values: List[float]) -> str:
    lo, hi = min(values), max(values)
    span = hi - lo or 1.0
    return "".join(_BARS[min(len(_BARS) - 1, int((v - lo) / span * len(_BARS)))] for v in values)


def steps_to(result: RunResult, target: float, key: str = "test_loss"):
    """The first evaluated step at which ``history[key] <= target`` (None: not within the budget)."""
    for step, loss in zip(result.history["step"], result.history[key]):
        if loss <= target:
            return step
    return None


def run(args) -> int:
    config = RunConfig(data=args.data, width=args.width, depth=args.depth, effective_depth=args.lt,
                       scheme=args.scheme, steps=args.steps, sgd_steps=args.sgd_steps, lr=args.lr,
                       every=args.every, seed=args.seed, data_seed=args.data_seed,
                       eval_every=max(1, min(50, (args.steps + args.sgd_steps) // 20)))
    task = get_task(args.data, seed=args.data_seed)
    print(f"task {task.name}: {task.x_train.shape[0]} train / {task.x_test.shape[0]} test, "
          f"LeakyMLP width {args.width}, depth {args.depth}, Lt {args.lt:g}, scheme {args.scheme}, "
          f"{args.steps} Adam + {args.sgd_steps} SGD steps, seed {args.seed}")
    start = time.time()
    results = compare(config, rules=("uniform", args.rule), seeds=(args.seed,), progress=not args.no_progress,
                      keep_models=True, task=task)
    target = args.target if args.target is not None else results[0].test_loss
    rows = []
    for r in results:
        steps = r.final_steps
        rows.append({"steps": r.config.rule, "train loss": r.train_loss, "test loss": r.test_loss,
                     **({"test error": r.test_error} if task.loss == "ce" else {}),
                     f"steps to test {target:.4g}": steps_to(r, target), "ms/step": 1e3 * r.seconds_per_step,
                     "step profile (layer 1..L)": f"{_spark(steps)} {min(steps):.3f}..{max(steps):.3f}"})
    print(format_table(rows, list(rows[0])))
    base, ours = results[0], results[1]
    print(f"{args.rule} vs uniform: test loss {100 * (ours.test_loss / base.test_loss - 1):+.1f}%, "
          f"train loss {100 * (ours.train_loss / base.train_loss - 1):+.1f}%  ({time.time() - start:.0f} s)")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump({"target": target, "runs": [r.to_dict() for r in results]}, fh, indent=1)
    paths = plot(results, task, args.out)
    print("wrote " + ", ".join([os.path.join(args.out, "results.json")] + paths))
    return 0


def plot(results: List[RunResult], task, out: str) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..diagnostics import effective_rank

    paths = []
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        ax[0].plot(r.history["step"], r.history["train_loss"], label=r.config.rule)
        ax[1].plot(r.history["step"], r.history["test_loss"], label=r.config.rule)
    for a, name in zip(ax, ("train loss", "test loss")):
        a.set_yscale("log"), a.set_xlabel("optimizer step"), a.set_title(name), a.legend()
    paths.append(_save(fig, out, "loss_curves.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.plot(range(1, len(r.final_steps) + 1), r.final_steps, marker="o", label=r.config.rule)
    ax.set_xlabel("layer l"), ax.set_ylabel("step size rho_l"), ax.set_title("step profile"), ax.legend()
    paths.append(_save(fig, out, "step_profile.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        reps = r.model.representations(task.x_test)
        depth = [0.0]
        for s in r.final_steps:
            depth.append(depth[-1] + s)
        ax.plot(depth, [effective_rank(a, centered=True) for a in reps], marker=".", label=r.config.rule)
    ax.set_xlabel("depth p (cumulative steps)"), ax.set_ylabel("effective rank (entropy, centred)")
    ax.set_title("representation rank over depth"), ax.legend()
    paths.append(_save(fig, out, "effective_rank.png"))
    return paths


def _save(fig, out: str, name: str) -> str:
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path
