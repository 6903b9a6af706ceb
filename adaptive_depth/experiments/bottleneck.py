"""Does a ``LeakyMLP`` trained the way a user trains reach the bottleneck rank k*? (issue 9, item 3)

For tasks of the family (``tasks.py``), trains one network per recipe and reports the rank of the middle
representation (singular values of the centred A_{L/2} above 10% of the largest, on the test inputs)
against k*, and the train / test loss against the Lt = 0 network trained the default way.

Recipes (``recipes.bottleneck_param_groups``): ``c`` sets the paper's penalty ``lambda = c / Lt`` on the
blocks (the plugin's ``weight_decay``); ``io`` the L2 decay on the input/output layers (``"c"``: c, ``"lam"``:
lambda, None: unpenalised); ``scale`` the branch learning rate in units of lr (``"lt"``: Lt, Adam's
equivalent of W = Lt V).

    python -m adaptive_depth.experiments.bottleneck --split tuning --seeds 18 23 10 --json out/bottleneck.json
    python -m adaptive_depth.experiments.bottleneck --table a.json b.json --recipe c0.1+io+lt --md out/table.md
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import time
from typing import Dict, List, Optional, Tuple

import torch

from .._validate import check_choice, check_int, check_range
from ..recipes import representation_ranks
from .tasks import NONLINEARITIES, SPLITS, make_task, spec_for
from .train import RunConfig, run as train_run

RECIPES: Dict[str, Dict] = {
    "default": {"c": None, "io": None, "scale": 1.0},      # the library's default decay 1e-3 / Lt, io free
    "c0.01": {"c": 0.01, "io": None, "scale": 1.0},
    "c0.01+io": {"c": 0.01, "io": "c", "scale": 1.0},
    "c0.1+io": {"c": 0.1, "io": "c", "scale": 1.0},
    "c0.01+io+lt": {"c": 0.01, "io": "c", "scale": "lt"},
    "c0.1+io+lt": {"c": 0.1, "io": "c", "scale": "lt"},
    # the same, then a finishing phase with the penalty off (``--finish-steps``, ``--finish-lr``)
    "c0.1+io+lt+finish": {"c": 0.1, "io": "c", "scale": "lt", "finish": True},
}


def recipe_config(name: str, lt: float, *, finish_steps: Optional[int] = None, finish_lr: Optional[float] = None,
                  finish_keep: float = 0.0, finish_guard: int = 0, guard_slack: int = 0, **kw) -> RunConfig:
    """The ``RunConfig`` of recipe ``name`` at effective depth ``lt`` (other fields from ``kw``). A ``finish``
    recipe adds the finishing phase: ``finish_steps`` (None: as many as ``kw["steps"]``) at ``finish_lr`` (None:
    the first phase's lr), with ``finish_keep`` of the penalties (default 0: off), guarded by a ``RankGuard``
    checking every ``finish_guard`` steps (0: none) with ``guard_slack``."""
    r = RECIPES[name]
    lam = None if r["c"] is None else (r["c"] / lt if lt > 0 else r["c"])
    io = None if r["io"] is None else (r["c"] if r["io"] == "c" else lam)
    if r.get("finish"):
        kw.update(finish_steps=kw.get("steps", RunConfig.steps) if finish_steps is None else finish_steps,
                  finish_lr=finish_lr, finish_keep=finish_keep, finish_guard=finish_guard, guard_slack=guard_slack)
    elif finish_keep or finish_guard:
        given = [arg for arg, value in (("finish_keep", finish_keep), ("finish_guard", finish_guard)) if value]
        raise ValueError(f"{' and '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to a finish recipe, "
                         f"not {name!r}")
    return RunConfig(effective_depth=lt, weight_decay=lam, io_decay=io, branch_lr_scale=r["scale"], **kw)


def measure(seed: int, split: str, lt: float, recipe: str, *, width: int, depth: int, steps: int, lr: float,
            rule: str = "uniform", schedule: str = "cosine", optimizer: str = "adam",
            plugin: Optional[Dict] = None, finish_steps: Optional[int] = None,
            finish_lr: Optional[float] = None, finish_keep: float = 0.0, finish_guard: int = 0,
            guard_slack: int = 0, eval_every: Optional[int] = None, model_seed: Optional[int] = None,
            noise: Optional[float] = None, n_train: Optional[int] = None,
            nonlinearity: Optional[str] = None) -> Dict:
    """Train one network and return its losses (``clean_test_loss``: on the test labels before the noise, the
    excess test loss), its rank profile and k*; with ``eval_every``, also its curve (``"curve"``: step and the
    train, test, validation and clean test losses every ``eval_every`` steps; evaluating does not change training).
    ``model_seed`` seeds the initialisation (and minibatch order) apart from the task's data (None: the task seed,
    as in every run before it existed). ``noise`` replaces the task's label noise (the inputs and clean labels stay
    the task's; None: its own). ``n_train`` replaces its training-set size: the teacher stays, the inputs are drawn
    afresh (None: its own). ``nonlinearity`` replaces the teacher's: its weights and the inputs stay (None: its own)."""
    if eval_every is not None:
        check_int(eval_every, "eval_every", 1)
    if model_seed is not None:
        check_int(model_seed, "model_seed", 0)
    spec = spec_for(seed, split)
    if noise is not None:
        spec = dataclasses.replace(spec, noise=check_range(noise, "noise", 0.0, math.inf))
    if n_train is not None:
        spec = dataclasses.replace(spec, n_train=check_int(n_train, "n_train", 2))
    if nonlinearity is not None:
        nonlinearity = check_choice(nonlinearity, "nonlinearity", sorted(NONLINEARITIES))
        spec = dataclasses.replace(spec, nonlinearity=nonlinearity)
    task = make_task(spec)  # what draw(seed, split) builds, with the noise, size or nonlinearity replaced
    config = recipe_config(recipe, lt, finish_steps=finish_steps, finish_lr=finish_lr, finish_keep=finish_keep,
                           finish_guard=finish_guard, guard_slack=guard_slack,
                           data=spec.name, width=width, depth=depth, steps=steps, lr=lr, rule=rule,
                           scheme="exponential", seed=seed if model_seed is None else model_seed, data_seed=seed,
                           n_train=spec.n_train, n_test=spec.n_test, eval_every=eval_every or steps,
                           schedule=schedule, optimizer=optimizer, plugin=dict(plugin or {}))
    result = train_run(config, task, keep_model=True)
    ranks = representation_ranks(result.model, task.x_test)
    ranks1 = representation_ranks(result.model, task.x_test, threshold=0.01)
    return {"seed": seed, "model_seed": config.seed, "noise": spec.noise, "n_train": spec.n_train,
            "nonlinearity": spec.nonlinearity, "k": spec.rank, "lt": lt, "recipe": recipe, "rule": rule,
            "optimizer": optimizer, "plugin": dict(plugin or {}),
            "train_loss": result.train_loss, "test_loss": result.test_loss, "val_loss": result.history["val_loss"][-1],
            "clean_test_loss": result.history["clean_test_loss"][-1],
            "middle_rank": ranks[len(ranks) // 2], "min_rank": min(ranks[1:-1]), "ranks": ranks,
            "middle_rank_1pct": ranks1[len(ranks1) // 2], "final_steps": result.final_steps,
            "steps": steps, "finish_steps": config.finish_steps, "finish_lr": config.finish_lr,
            "finish_keep": config.finish_keep, "finish_guard": config.finish_guard,
            "guard_slack": config.guard_slack, "guard": result.history.get("guard"),
            "guard_kept_at": (result.history.get("guard_kept_at") or [None])[0],
            "curve": None if eval_every is None else
            {k: result.history[k] for k in ("step", "train_loss", "test_loss", "val_loss", "clean_test_loss")}}


def _model_seed(row: Dict) -> int:
    """A row's model seed; rows from before ``--model-seeds`` were initialised from their task seed."""
    return row.get("model_seed", row["seed"])


def seed_spread(rows: List[Dict], rule: str, against: str = "uniform") -> Dict[int, List[float]]:
    """Per task, the test-loss ratios ``rule`` / ``against`` paired by model seed (rows of one recipe and Lt; a pair
    with either run missing is left out)."""
    cell = {(r["seed"], _model_seed(r), r["rule"]): r["test_loss"] for r in rows}
    out: Dict[int, List[float]] = {}
    for (task, model, name), loss in sorted(cell.items()):
        base = cell.get((task, model, against))
        if name == rule and base is not None:
            out.setdefault(task, []).append(loss / base)
    return out


def steps_to(curve: Dict, target: float) -> Optional[int]:
    """The first evaluated step whose test loss is at most ``target`` (None: never)."""
    return next((s for s, loss in zip(curve["step"], curve["test_loss"]) if loss <= target), None)


def at_best_val(curve: Dict, key: str = "clean_test_loss") -> Tuple[int, float]:
    """``(step, curve[key] there)`` at the evaluated step of least validation loss (the first, on a tie): the
    checkpoint early stopping on the validation split keeps. The test labels play no part in the choice."""
    best = min(range(len(curve["val_loss"])), key=lambda i: (curve["val_loss"][i], i))
    return curve["step"][best], curve[key][best]


def noise_floor(seed: int, noise: Optional[float] = None) -> Optional[float]:
    """The train loss of the noiseless teacher on the noisy labels of family task ``seed``: out_dim x noise^2
    (the loss sums over outputs; the noise is added after standardising), with the task's own noise or ``noise``
    where a run replaced it (``--noise``). None for a seed outside the family."""
    split = next((name for name, seeds in SPLITS.items() if seed in seeds), None)
    if split is None:
        return None
    spec = spec_for(seed, split)
    return spec.out_dim * (spec.noise if noise is None else noise) ** 2


def table(rows: List[Dict], recipe: str, lt: float, rules=("uniform", "equal_distance")) -> str:
    """Markdown: per task, the noise floor (``noise_floor``, at the noise the recipe's runs trained on), the Lt = 0
    default network against ``recipe`` at ``lt`` under each rule (middle rank against k*, train and test loss as
    ratios to Lt = 0), then the count of tasks meeting the issue's goal (middle rank <= k* + 1 and train loss
    within 10% of Lt = 0's, under the first rule), and the count with the train clause read noise-aware (within 10%
    of Lt = 0's, or at or below the noise floor, where matching Lt = 0 means fitting the label noise). A later row
    of the same (task, Lt, recipe, rule) replaces an earlier one (``--model-seed`` picks one seed's rows)."""
    cell = {(r["seed"], r["lt"], r["recipe"], r["rule"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows if r["lt"] == lt and r["recipe"] == recipe})
    head = ["task", "k*", "noise floor", "Lt = 0: middle rank / train / test"] + [
        f"Lt = {lt:g} {rule}: middle rank (1%) / train vs Lt = 0 / test vs Lt = 0" for rule in rules]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    met = met_noise = counted = 0
    for seed in seeds:
        base = cell.get((seed, 0.0, "default", "uniform"))
        runs = [cell.get((seed, lt, recipe, rule)) for rule in rules]
        k = next(r["k"] for r in [base, *runs] if r is not None)
        floor = noise_floor(seed, next((r.get("noise") for r in (*runs, base) if r is not None), None))
        out = [str(seed), str(k), "-" if floor is None else f"{floor:.3g}", "-" if base is None else
               f"{base['middle_rank']} / {base['train_loss']:.4g} / {base['test_loss']:.4g}"]
        for r in runs:
            if r is None:
                out.append("-")
            else:
                rank = f"{r['middle_rank']} ({r['middle_rank_1pct']})"
                out.append(f"{rank} / {r['train_loss']:.4g} / {r['test_loss']:.4g}" if base is None else
                           f"{rank} / {r['train_loss'] / base['train_loss'] - 1:+.1%}"
                           f" / {r['test_loss'] / base['test_loss'] - 1:+.1%}")
        if base is not None and runs[0] is not None:
            counted += 1
            rank_ok = runs[0]["middle_rank"] <= k + 1
            fit_ok = runs[0]["train_loss"] <= 1.1 * base["train_loss"]
            met += rank_ok and fit_ok
            met_noise += rank_ok and (fit_ok or (floor is not None and runs[0]["train_loss"] <= floor))
        lines.append("| " + " | ".join(out) + " |")
    lines.append(f"\nGoal (middle rank <= k* + 1 and train loss within 10% of Lt = 0, {rules[0]} steps): "
                 f"met on {met} of {counted} tasks.")
    lines.append(f"Read noise-aware (train loss within 10% of Lt = 0's or at most the noise floor): met on "
                 f"{met_noise} of {counted} tasks.")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", nargs="+", default=None, metavar="JSON",
                   help="train nothing: tabulate the rows of these JSONs (with --recipe, --lt, --rules, --md)")
    p.add_argument("--recipe", default="c0.1+io+lt", choices=list(RECIPES))
    p.add_argument("--md", default=None, help="--table: also write the table here")
    p.add_argument("--split", default="tuning")
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--lt", nargs="+", type=float, default=[12.0])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--rules", nargs="+", default=None,
                   help="step rules to train (default: uniform) or, with --table, to tabulate (default: uniform and "
                        "equal_distance)")
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--plugin", default="{}", help="extra AdaptiveSteps keyword arguments as JSON")
    p.add_argument("--finish-steps", type=int, default=None, help="the finish recipe's last phase (penalty off "
                   "unless --finish-keep; default: as many steps as --steps)")
    p.add_argument("--finish-lr", type=float, default=None, help="its lr (default: --lr)")
    p.add_argument("--finish-keep", type=float, default=0.0, help="the fraction of the penalties it keeps "
                   "(default 0: off)")
    p.add_argument("--finish-guard", type=int, default=0, metavar="N", help="check the middle rank (training "
                   "inputs) every N finish steps and end the finish on the last weights whose rank is at most the "
                   "finish's start rank + --guard-slack (default 0: no guard)")
    p.add_argument("--guard-slack", type=int, default=0)
    p.add_argument("--model-seeds", nargs="+", type=int, default=None, metavar="S", help="train each task once per "
                   "model seed (the initialisation; the data stay the task's); default: the task seed")
    p.add_argument("--noise", type=float, default=None, help="replace every task's label noise (sd per output; "
                   "the inputs and clean labels stay the task's); default: the task's own")
    p.add_argument("--n-train", type=int, default=None, metavar="N", help="replace every task's training-set size "
                   "(the teacher stays; the inputs are drawn afresh); default: the task's own")
    p.add_argument("--nonlinearity", default=None, choices=sorted(NONLINEARITIES), help="replace every teacher's "
                   "nonlinearity (its weights and the inputs stay); default: the task's own")
    p.add_argument("--eval-every", type=int, default=None, metavar="N", help="also record the test-loss curve "
                   "every N steps (default: the end only)")
    p.add_argument("--json", default=os.path.join("out", "bottleneck.json"))
    p.add_argument("--model-seed", type=int, default=None, metavar="S", help="--table: only the rows of model seed "
                   "S (a row without one has its task seed); default: all, a later row of a (task, Lt, recipe, "
                   "rule) replacing an earlier one")
    args = p.parse_args(argv)
    if args.model_seed is not None and not args.table:
        p.error("--model-seed picks rows for --table; to train several, use --model-seeds")
    if args.table:
        rows = [r for path in args.table for r in json.load(open(path))["rows"]
                if args.model_seed is None or _model_seed(r) == args.model_seed]
        if not rows:
            p.error(f"--model-seed {args.model_seed}: no row of {' '.join(args.table)} has that model seed")
        rules = tuple(args.rules) if args.rules else ("uniform", "equal_distance")
        md = table(rows, args.recipe, args.lt[0], rules)
        if args.md:
            with open(args.md, "w") as fh:
                fh.write(md + "\n")
        print(md)
        return 0
    if not args.seeds:
        p.error("--seeds is required (unless --table)")
    torch.set_num_threads(1)
    rows = []
    grid = itertools.product(args.seeds, args.model_seeds or [None], args.lt, args.recipes, args.rules or ["uniform"])
    for seed, model_seed, lt, recipe, rule in grid:
        start = time.time()
        r = measure(seed, args.split, lt, recipe, width=args.width, depth=args.depth, steps=args.steps, lr=args.lr,
                    rule=rule, optimizer=args.optimizer, plugin=json.loads(args.plugin),
                    finish_steps=args.finish_steps, finish_lr=args.finish_lr, finish_keep=args.finish_keep,
                    finish_guard=args.finish_guard, guard_slack=args.guard_slack, eval_every=args.eval_every,
                    model_seed=model_seed, noise=args.noise, n_train=args.n_train, nonlinearity=args.nonlinearity)
        rows.append(r)
        print(f"seed {seed} model {r['model_seed']} k*={r['k']} Lt={lt:g} {recipe:>12} {rule:>14}: middle rank "
              f"{r['middle_rank']} (1%: {r['middle_rank_1pct']}) min {r['min_rank']} train {r['train_loss']:.4g} "
              f"test {r['test_loss']:.4g} ({time.time() - start:.0f} s) ranks {r['ranks']}"
              + (f" guard {r['guard']} kept at {r['guard_kept_at']}" if r["guard"] else ""), flush=True)
        _save(args, rows)  # after every run: a stopped sweep keeps what it measured
    return 0


def _save(args, rows: List[Dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump({"args": vars(args), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())
