"""Does a ``LeakyMLP`` trained the way a user trains reach the bottleneck rank k*? (issue 9, item 3)

For tasks of the family (``tasks.py``), trains one network per recipe and reports the rank of the middle
representation (singular values of the centred A_{L/2} above 10% of the largest, on the test inputs)
against k*, and the train / test loss against the Lt = 0 network trained the default way.

Recipes (``recipes.bottleneck_param_groups``): ``c`` sets the paper's penalty ``lambda = c / Lt`` on the
blocks (the plugin's ``weight_decay``); ``io`` the L2 decay on the input/output layers (``"c"``: c, ``"lam"``:
lambda, None: unpenalised); ``scale`` the branch learning rate in units of lr (``"lt"``: Lt, Adam's
equivalent of W = Lt V).

    python -m adaptive_depth.experiments.bottleneck --split tuning --seeds 18 23 10 --json out/bottleneck.json
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Dict, List, Optional

import torch

from ..recipes import representation_ranks
from .tasks import draw
from .train import RunConfig, run as train_run

RECIPES: Dict[str, Dict] = {
    "default": {"c": None, "io": None, "scale": 1.0},      # the library's default decay 1e-3 / Lt, io free
    "c0.01": {"c": 0.01, "io": None, "scale": 1.0},
    "c0.01+io": {"c": 0.01, "io": "c", "scale": 1.0},
    "c0.1+io": {"c": 0.1, "io": "c", "scale": 1.0},
    "c0.01+io+lt": {"c": 0.01, "io": "c", "scale": "lt"},
    "c0.1+io+lt": {"c": 0.1, "io": "c", "scale": "lt"},
}


def recipe_config(name: str, lt: float, **kw) -> RunConfig:
    """The ``RunConfig`` of recipe ``name`` at effective depth ``lt`` (other fields from ``kw``)."""
    r = RECIPES[name]
    lam = None if r["c"] is None else (r["c"] / lt if lt > 0 else r["c"])
    io = None if r["io"] is None else (r["c"] if r["io"] == "c" else lam)
    return RunConfig(effective_depth=lt, weight_decay=lam, io_decay=io, branch_lr_scale=r["scale"], **kw)


def measure(seed: int, split: str, lt: float, recipe: str, *, width: int, depth: int, steps: int, lr: float,
            rule: str = "uniform", schedule: str = "cosine", optimizer: str = "adam",
            plugin: Optional[Dict] = None) -> Dict:
    """Train one network and return its losses, its rank profile and k*."""
    spec, task = draw(seed, split)
    config = recipe_config(recipe, lt, data=spec.name, width=width, depth=depth, steps=steps, lr=lr, rule=rule,
                           scheme="exponential", seed=seed, data_seed=seed, n_train=spec.n_train,
                           n_test=spec.n_test, eval_every=steps, schedule=schedule, optimizer=optimizer,
                           plugin=dict(plugin or {}))
    result = train_run(config, task, keep_model=True)
    ranks = representation_ranks(result.model, task.x_test)
    ranks1 = representation_ranks(result.model, task.x_test, threshold=0.01)
    return {"seed": seed, "k": spec.rank, "lt": lt, "recipe": recipe, "rule": rule, "optimizer": optimizer,
            "plugin": dict(plugin or {}),
            "train_loss": result.train_loss, "test_loss": result.test_loss, "val_loss": result.history["val_loss"][-1],
            "middle_rank": ranks[len(ranks) // 2], "min_rank": min(ranks[1:-1]), "ranks": ranks,
            "middle_rank_1pct": ranks1[len(ranks1) // 2], "final_steps": result.final_steps}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", default="tuning")
    p.add_argument("--seeds", nargs="+", type=int, required=True)
    p.add_argument("--lt", nargs="+", type=float, default=[12.0])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--rules", nargs="+", default=["uniform"])
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--plugin", default="{}", help="extra AdaptiveSteps keyword arguments as JSON")
    p.add_argument("--json", default=os.path.join("out", "bottleneck.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for seed in args.seeds:
        for lt in args.lt:
            for recipe in args.recipes:
                for rule in args.rules:
                    start = time.time()
                    r = measure(seed, args.split, lt, recipe, width=args.width, depth=args.depth, steps=args.steps,
                                lr=args.lr, rule=rule, optimizer=args.optimizer, plugin=json.loads(args.plugin))
                    rows.append(r)
                    print(f"seed {seed} k*={r['k']} Lt={lt:g} {recipe:>12} {rule:>14}: middle rank {r['middle_rank']} "
                          f"(1%: {r['middle_rank_1pct']}) min {r['min_rank']} train {r['train_loss']:.4g} "
                          f"test {r['test_loss']:.4g} ({time.time() - start:.0f} s) ranks {r['ranks']}", flush=True)
                    _save(args, rows)  # after every run: a stopped sweep keeps what it measured
    return 0


def _save(args, rows: List[Dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump({"args": vars(args), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())
