"""The jump a refinement makes in the function: test MSE just after / just before each growth of the teacher's
uniform growth arm (Growth 7's settings), copy against zero init, at Lt 4, 8 and 12, tuning seeds 0-1
(docs/depth.md, Growth 12). Evaluates at every step, so it takes a few minutes.

The "before" evaluation comes before the growth step's own optimizer step (``growth.train_one`` trains, then grows,
then evaluates), so each ratio includes one training step as well as the refinement.

    python benchmarks/growth_jump.py
"""
import argparse
import math

import torch

from adaptive_depth.experiments import growth
from adaptive_depth.experiments.tasks import TUNING_SEEDS


def jump(lt: float, init: str, seed: int, steps=None, lr: float = 0.01):
    """Test MSE after / before each growth of one uniform growth run."""
    run = growth.long_growth("teacher", lr, steps)
    r = growth.train_one(growth.get_task("teacher", seed), "uniform", seed, lt=lt, init=init, eval_every=1, **run)
    c = {row[0]: row[3] for row in r["curve"]}
    return [c[k] / c[k - 1] for k in growth.growth_steps(run["at"], run["settings"]["steps"])]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lts", nargs="+", type=float, default=[4.0, 8.0, 12.0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="tuning seeds (0-99)")
    p.add_argument("--steps", type=int, default=None, help="override the budget (smoke tests)")
    args = p.parse_args(argv)
    bad = [s for s in args.seeds if s not in TUNING_SEEDS]
    if bad:
        raise SystemExit(f"--seeds must be tuning seeds 0-99 (grow's held-out seeds are 100+), got {bad}")
    if not all(math.isfinite(v) and v > 0 for v in args.lts):
        raise SystemExit(f"--lts must be finite and > 0, got {args.lts}")
    torch.set_num_threads(1)
    out = {}
    for lt in args.lts:
        for init in ("copy", "zero"):
            out[lt, init] = [jump(lt, init, seed, args.steps) for seed in args.seeds]
            print(f"Lt {lt:g} {init}: test MSE after / before each growth (seeds {', '.join(map(str, args.seeds))}): "
                  + "; ".join(" ".join(f"{v:.2f}" for v in r) for r in out[lt, init]), flush=True)
    return out


if __name__ == "__main__":
    main()
