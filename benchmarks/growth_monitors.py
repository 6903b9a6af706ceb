"""Other monitors for adaptive refinement, on the teacher's tuning seeds (docs/depth.md, Growth 8).

``refine(how="adaptive")`` equidistributes the step-distances ``rho_l ||f_l - Lt x|| / ||x||``. On teachers with a
hidden layer after the bottleneck that ends above uniform doubling (Growth 8). This script asks whether another
monitor, equidistributed the same way (``refine_plan(how="adaptive", distances=...)``, then ``refine(pieces=...)``),
tells the two kinds of teacher apart. Each monitor is the ``adaptive`` arm of ``growth.train_one`` with Growth 7's
Lt = 8 settings; the uniform arm is run once per seed; printed: adaptive / uniform final test MSE per seed.

Monitors (per block l of the ``LeakyMLP``; ``A_l`` the representation entering block l, ``D_l = A_{l+1} - A_l``,
``p_l`` the loss's gradient with respect to ``A_l`` on the growth step's batch):

- ``distance``: the library's step-distance (what ``how="adaptive"`` uses);
- ``angular``: ``||D_l`` orthogonal to ``A_l|| / ||A_{l+1}||`` (summed over examples): the leak's pure shrink not
  counted;
- ``symmetric``: the step-distances averaged with their reverse (fine at both ends, the paper's jump in and out);
- ``adjoint``: ``sqrt(mean_i |p_{l+1}|^2 |D_l|^2)``: motion weighted by the loss's sensitivity there;
- ``saliency``: ``|rho_l dL/drho_l|``: the loss's first-order change if the step were removed;
- ``adam1`` / ``adam2``: the norm of Adam's first moment (of the square root of the second) over the block's
  parameters: where the optimizer still pushes;
- ``splitgrad``: on a copy of the model with every block split in two (``refine(how="uniform")``), the norm of
  the difference between the loss's gradients with respect to the two halves' weights: how much the loss wants
  the halves to differ, the first-order gain a split can buy (splitting steepest descent, Liu et al. 2019);
- ``kernel``: ``||D_l||_K = sqrt(Tr[D_l^T (K_l + g I)^{-1} D_l])`` with the paper's kernel ``K_l = s(A_l) s(A_l)^T``
  (``g = 1e-3 ||K_l||_op``, the diagnostics' stabilisation): the norm of the smallest weight whose branch
  ``W s(A_l)`` makes the block's displacement, the arc length of the paper's kinetic energy (issue 9's "speed in
  the kernel metric"). Motion the representation's own features already span is cheap, motion out of it dear.

``--floor F`` equidistributes ``monitor / its mean + F`` instead (F large: uniform doubling); ``--when first|last``
follows the monitor at only one of the two growths and doubles uniformly at the other.

``--probe K`` makes each arm a choice by trial (Growth 10): at every growth, copies of the model and its optimizer
are grown once by uniform doubling and once by the monitor's plan, each copy trains ``K`` steps on the same
training batches (at the current learning rate), and the plan whose copy has the lower loss on the whole training
set is applied. The probes run inside the timed step, so their cost counts in the run's CPU time; they draw from
their own generator under ``torch.random.fork_rng``, so a run that picks uniform at every growth is the uniform
run bit for bit.

``--init zero`` grows every run (and every probe's copy) function-preservingly: the new blocks' branches zeroed and
the kept block rescaled (``refine(init="zero")``) instead of copies (Growth 12).

Tuning seeds only (0-99; grow's held-out seeds are 100+). ``--chosen-from`` then runs a tuning run's best arm (the
lowest median ratio), with uniform, on held-out seeds (Growth 13):

    python benchmarks/growth_monitors.py --dims 30 3 30 --seeds 0 1 2 3 --json out/monitors_30-3-30.json
    python benchmarks/growth_monitors.py --seeds 100 101 ... --chosen-from out/monitors_30-3-30.json
"""
import argparse
import copy
import json
import math
import statistics

import torch

from adaptive_depth import LeakyMLP
from adaptive_depth.depth import measure_distances, refine, refine_plan
from adaptive_depth.diagnostics import energies
from adaptive_depth.experiments import growth
from adaptive_depth.experiments.tasks import TUNING_SEEDS
from adaptive_depth.ops import step_coefficients

MONITORS = ("distance", "angular", "symmetric", "adjoint", "saliency", "adam1", "adam2", "splitgrad", "kernel")
KERNEL_GAMMA = 1e-3


def _net(model):
    if not isinstance(model, LeakyMLP):
        raise TypeError(f"these monitors read a LeakyMLP's representations, got {type(model).__name__}")
    return model.net


def _trajectory(model, x, rho):
    """``[A_0, ..., A_L]`` with gradients (the steps ``rho`` a leaf), as ``LeakyMLP.representations`` steps."""
    net = _net(model)
    a, b = step_coefficients(rho, net.effective_depth, net.steps.scheme)
    h = model.input(x)
    out = [h]
    for l, blk in enumerate(net.blocks):
        h, _ = blk.step(h, a[l].to(h.dtype), b[l].to(h.dtype), False)
        h.retain_grad()
        out.append(h)
    return out


def monitor(name, model, opt, x, y):
    """One value >= 0 per block of ``model``'s single step group."""
    net = _net(model)
    if name == "distance":
        return measure_distances(model, x)[0]
    if name == "symmetric":
        d = measure_distances(model, x)[0]
        return (d + d.flip(0)) / 2
    if name in ("adam1", "adam2"):
        key = "exp_avg" if name == "adam1" else "exp_avg_sq"
        out = []
        for blk in net.blocks:
            v = [opt.state[p][key].double() for p in blk.parameters() if key in opt.state.get(p, {})]
            out.append(math.sqrt(sum(float((t if name == "adam1" else t.sqrt()).pow(2).sum()) for t in v)))
        return torch.tensor(out)
    if name == "splitgrad":
        twin = copy.deepcopy(model)
        refine(twin, how="uniform")  # block l -> twin blocks 2l, 2l + 1, each with half its step
        (twin(x) - y).pow(2).sum(1).mean().backward()
        halves = _net(twin).blocks
        out = []
        for l in range(net.depth):
            pairs = zip(halves[2 * l].parameters(), halves[2 * l + 1].parameters())
            out.append(math.sqrt(sum(float((a.grad.double() - b.grad.double()).pow(2).sum()) for a, b in pairs
                                     if a.grad is not None)))
        return torch.tensor(out)
    if name == "kernel":
        reps = [r.detach().double() for r in model.representations(x)]
        # energies' kinetic term is ||V||_K^2 / (2 Lt): at Lt = 1 with V = D_l, twice it is ||D_l||_K^2
        return torch.tensor([math.sqrt(2 * energies(a, b - a, 1.0, gamma=KERNEL_GAMMA)[0])
                             for a, b in zip(reps[:-1], reps[1:])])
    if name == "angular":
        reps = [r.double() for r in model.representations(x)]
        out = []
        for a, b in zip(reps[:-1], reps[1:]):
            perp = b - (a * b).sum(1, keepdim=True) / (a * a).sum(1, keepdim=True).clamp_min(1e-30) * a
            out.append(float((perp.pow(2).sum() / b.pow(2).sum()).sqrt()))
        return torch.tensor(out)
    rho = net.steps.rho.detach().clone().requires_grad_(True)
    reps = _trajectory(model, x, rho)
    loss = (model.output(reps[-1]) - y).pow(2).sum(1).mean()
    loss.backward()
    try:
        if name == "saliency":
            return (rho.grad * rho).detach().double().abs()
        out = []
        for l in range(net.depth):
            d, p = (reps[l + 1] - reps[l]).detach().double(), reps[l + 1].grad.double()
            out.append(float((p.pow(2).sum(1) * d.pow(2).sum(1)).mean().sqrt()))
        return torch.tensor(out)
    finally:
        model.zero_grad(set_to_none=True)  # the monitor's gradients are not the training step's


WHEN = ("all", "first", "last")


def splitter(name, floor=0.0, when="all", start_depth=4):
    """The adaptive arm's split: equidistribute ``monitor / its mean + floor`` (a moving mesh's floor: ``floor``
    -> infinity is uniform doubling, 0 the monitor alone). ``when``: at every growth, or only at the ``first``
    (from ``start_depth`` blocks) or the ``last`` (the others double uniformly)."""
    def split(model, opt, x, y):
        first = _net(model).depth == start_depth
        if when != "all" and first != (when == "first"):
            return refine_plan(model, how="uniform")["pieces"]
        d = monitor(name, model, opt, x, y).double()
        d = d / d.mean().clamp_min(1e-30) + floor
        return refine_plan(model, how="adaptive", distances=[d])["pieces"]
    return split


def selector(name, task, probe, floor=0.0, when="all", start_depth=4, seed=0, batch=128, init="copy"):
    """The ``--probe`` arm's split: the better of uniform doubling and ``splitter(name, ...)``'s plan after ``probe``
    training steps on copies (see the module docstring). ``split.chosen`` records 0 (uniform) or 1 (the monitor)
    per growth, ``split.losses`` the two probes' training losses (``None`` where the plans agree). ``init``: the new
    blocks in the probes' copies, as the run's own refinements make them."""
    follow = splitter(name, floor, when, start_depth)
    gen = torch.Generator().manual_seed(seed + 777)

    def split(model, opt, x, y):
        plans = [refine_plan(model, how="uniform")["pieces"], follow(model, opt, x, y)]
        if plans[0] == plans[1]:
            split.chosen.append(0)
            split.losses.append(None)
            return plans[0]
        n = task.x_train.shape[0]
        batches = [torch.randint(n, (batch,), generator=gen) for _ in range(probe)]
        losses = []
        with torch.random.fork_rng():
            for pieces in plans:
                m, o = copy.deepcopy((model, opt))
                refine(m, o, pieces=pieces, init=init)
                for i in batches:
                    task.loss_fn(m(task.x_train[i]), task.y_train[i]).backward()
                    o.step()
                    o.zero_grad(set_to_none=True)
                with torch.no_grad():
                    losses.append(float(task.loss_fn(m(task.x_train), task.y_train)))
        k = int(losses[1] < losses[0])
        split.chosen.append(k)
        split.losses.append(losses)
        return plans[k]
    split.chosen, split.losses = [], []
    return split


def chosen(path: str):
    """The arm of tuning run ``path`` with the lowest median ratio to uniform, as ``(monitor, floor)``, and that run's
    arguments."""
    with open(path) as fh:
        result = json.load(fh)
    tuned = result["args"]
    bad = [s for s in tuned["seeds"] if s not in TUNING_SEEDS]
    if bad or tuned.get("chosen_from"):
        raise SystemExit(f"--chosen-from must hold a tuning run (seeds 0-99, no --chosen-from), {path} has seeds "
                         f"{tuned['seeds']}")
    arms = [(m, f) for m in tuned["monitors"] for f in tuned["floor"]]
    names = {_arm_name(m, f, tuned.get("when", "all"), tuned.get("probe", 0)): (m, f) for m, f in arms}
    best = min(result["ratios"], key=lambda a: statistics.median(result["ratios"][a]))
    return names[best], {"init": "copy", "probe": 0, "when": "all", **tuned}


def _arm_name(monitor_name, floor, when, probe):
    return ((monitor_name if floor == 0 else f"{monitor_name}+{floor:g}") + ("" if when == "all" else f"@{when}")
            + (f"?{probe}" if probe else ""))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", nargs="+", type=int, default=None,
                   help=f"the teacher's layer sizes (default {list(growth.TEACHER_DIMS)}; with --chosen-from, the "
                        "tuning run's: pass them to apply its arm to another teacher)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3], help="tuning seeds (0-99)")
    p.add_argument("--monitors", nargs="+", choices=MONITORS, default=list(MONITORS))
    p.add_argument("--floor", nargs="+", type=float, default=[0.0],
                   help="floors added to each monitor (over its mean) before equidistribution; one arm per floor")
    p.add_argument("--when", choices=WHEN, default="all",
                   help="follow the monitor at every growth, or only at the first or the last (the other uniform)")
    p.add_argument("--probe", type=int, default=0,
                   help="K > 0: at each growth keep uniform's or the monitor's plan, whichever trains lower in K steps")
    p.add_argument("--init", choices=("copy", "zero"), default="copy",
                   help="the new blocks at every refinement (the runs' and the probes'): copies, or zeroed branches "
                        "(function-preserving)")
    p.add_argument("--lt", type=float, default=8.0)
    p.add_argument("--steps", type=int, default=None, help="override the budget (smoke tests)")
    p.add_argument("--chosen-from", default=None,
                   help="a tuning run's JSON: run only its best arm (its monitor, floor, --when, --probe, --init, --lt "
                        "and, unless given, --dims), with uniform, on --seeds, held-out ones included")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.chosen_from:
        fixed = [k for k in ("monitors", "floor", "when", "probe", "init", "lt")
                 if getattr(args, k) != p.get_default(k)]
        if fixed:
            raise SystemExit(f"--chosen-from takes the arm and its settings from the tuning run; drop "
                             f"{', '.join('--' + k for k in fixed)}")
        arm, tuned = chosen(args.chosen_from)
        for key in ("when", "probe", "init", "lt"):
            setattr(args, key, tuned[key])
        args.dims = args.dims or tuned["dims"]
        args.monitors, args.floor = [arm[0]], [arm[1]]
    args.dims = args.dims or list(growth.TEACHER_DIMS)
    if not all(math.isfinite(f) and f >= 0 for f in args.floor):
        raise SystemExit(f"--floor values must be finite and >= 0, got {args.floor}")
    if args.probe < 0:
        raise SystemExit(f"--probe must be >= 0 (0: no trial, follow the monitor), got {args.probe}")
    bad = [s for s in args.seeds if s not in TUNING_SEEDS]
    if bad and not args.chosen_from:
        raise SystemExit(f"--seeds must be tuning seeds 0-99 (grow's held-out seeds are 100+), got {bad}; held-out "
                         "seeds run an arm chosen on tuning seeds (--chosen-from)")
    torch.set_num_threads(1)
    common = dict(growth.long_growth("teacher", 0.01, args.steps), lt=args.lt, init=args.init)
    settings = common["settings"]
    common["eval_every"] = settings["steps"]
    arms = {_arm_name(m, f, args.when, args.probe): (m, f) for m in args.monitors for f in args.floor}
    start = growth.start_depth(common["at"], settings["depth"])
    ratios = {a: [] for a in arms}
    runs = []
    for seed in args.seeds:
        task = growth.get_task("teacher", seed, dims=args.dims)
        base = growth.train_one(task, "uniform", seed, **common)
        runs.append({"seed": seed, "arm": "uniform", "final": base["final"], "cpu_s": base["cpu_s"]})
        for a, (m, f) in arms.items():
            split = (selector(m, task, args.probe, f, args.when, start, seed, settings["batch"], args.init)
                     if args.probe else splitter(m, f, args.when, start))
            r = growth.train_one(task, "adaptive", seed, split=split, **common)
            rho = r["steps_profile"][0]
            runs.append({"seed": seed, "arm": a, "final": r["final"], "cpu_s": r["cpu_s"],
                         "steps": [len(rho) * v / sum(rho) for v in rho]})
            if args.probe:
                runs[-1].update(chosen=split.chosen, probe_losses=split.losses)
            ratios[a].append(r["final"] / base["final"])
            print(f"seed {seed:3d} {a:12s} adaptive / uniform {ratios[a][-1]:.3f}   steps / uniform's: "
                  + " ".join(f"{v:.2f}" for v in runs[-1]["steps"])
                  + (f"   chose {split.chosen}, CPU / uniform's {r['cpu_s'] / base['cpu_s']:.2f}" if args.probe
                     else ""), flush=True)
    print(f"\nteacher {'-'.join(map(str, args.dims))}, Lt {args.lt:g}, seeds {args.seeds}: adaptive / uniform final "
          "test MSE, median [min, max]")
    for m, v in ratios.items():
        print(f"{m:12s} {statistics.median(v):.3f} [{min(v):.3f}, {max(v):.3f}]  lower on {sum(r < 1 for r in v)} "
              f"of {len(v)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "runs": runs, "ratios": ratios}, fh, indent=1)


if __name__ == "__main__":
    main()
