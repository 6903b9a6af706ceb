"""``adaptive-depth paper fig1|fig2``: the experiments of Jacot & Kaiser, reproduced on a CPU.

fig1  teacher 30 -> 3 -> 30, width 100, L = 20, equidistant steps, Lt swept: -(2/Lt) H (median, min and max
      over the layers) should approach the bottleneck rank k* = 3 from below as Lt grows, and min_p COI(A_p)
      from above; spectra of the representations and weights at one Lt.
fig2  teacher 30 -> 6 -> 3 -> 30 made of random ResNets, Lt = 3, L swept: test error of equidistant,
      irregular, paper-adaptive, guarded-adaptive and learned steps over seeds; step profiles at L = 18.

Training as in the paper: Adam, then SGD at a smaller rate, on ``C + lambda/(2 Lt) sum rho_l ||W_l||^2`` with
``lambda = 1e-3 / Lt`` (``train.RunConfig.decay()``, applied by ``AdaptiveSteps(weight_decay=...)``).

``--io fixed`` (default) is the paper's network: ``A_0 = X`` (zero-padded to the width) and the output is
the first ``d_out`` coordinates of ``A_1``, nothing trained outside the leaky blocks. ``--io free`` is the
library's ``LeakyMLP`` with trained, unregularised input and output layers; there ``A -> c A`` with the
output layer divided by c leaves the data cost unchanged, so at a critical point ``Tr[B_0 A_0^T] = 0``
and ``H = (Lt/2) ||B_0 s(A_0)^T||^2 >= 0``: -(2/Lt) H cannot approach k* > 0 (see the README of the results).

Writes ``figN.json``, ``figN.md`` (the tables) and PNGs to ``--out``; ``--quick`` is a one-minute smoke run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from typing import Dict, List, Sequence

import torch

from .data import Task, get_task, teacher
from .diagnostics import diagnose
from .train import RunConfig, build_model, format_table, run as train_run

__all__ = ["add_arguments", "run", "paper_model", "fig1", "fig2"]

FIG1_LTS = (0.5, 1.0, 2.0, 4.0, 8.0, 12.0)
FIG2_DEPTHS = (6, 12, 18)
FIG2_RULES = ("uniform", "irregular", "paper", "equal_distance", "learned")
K_STAR = 3

# full budgets and the --quick ones (Adam steps, SGD steps, width, depth, n_train / n_test, ...)
DEFAULTS = {
    "fig1": dict(steps=3000, sgd_steps=1000, width=100, depth=20, n=1000, lts=FIG1_LTS, spectra_lt=8.0),
    "fig2": dict(steps=600, sgd_steps=200, width=100, depth=None, n=1000, depths=FIG2_DEPTHS, seeds=5,
                 profile_depth=18),
}
QUICK = {
    "fig1": dict(steps=150, sgd_steps=50, width=40, depth=8, n=200, lts=(1.0, 6.0), spectra_lt=6.0),
    "fig2": dict(steps=100, sgd_steps=50, width=40, depth=None, n=200, depths=(4, 6), seeds=2, profile_depth=6),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("figure", choices=("fig1", "fig2"), help="which figure of the paper")
    p.add_argument("--quick", action="store_true", help="a small smoke run (about a minute)")
    p.add_argument("--lts", type=float, nargs="+", default=None, help="fig1: effective depths Lt to sweep")
    p.add_argument("--spectra-lt", type=float, default=None, help="fig1: the Lt whose spectra are plotted")
    p.add_argument("--depths", type=int, nargs="+", default=None, help="fig2: numbers of blocks L to sweep")
    p.add_argument("--rules", nargs="+", default=list(FIG2_RULES),
                   choices=list(FIG2_RULES) + ["weight_norm"], help="fig2: step-size schemes")
    p.add_argument("--seeds", type=int, default=None, help="fig2: model seeds 0..N-1 per (L, rule)")
    p.add_argument("--profile-depth", type=int, default=None, help="fig2: L whose step profiles are plotted")
    p.add_argument("--lt", type=float, default=3.0, help="fig2: effective depth Lt")
    p.add_argument("--depth", type=int, default=None, help="fig1: number of blocks L (default 20)")
    p.add_argument("--width", type=int, default=None, help="width w of the representation (default 100)")
    p.add_argument("--steps", type=int, default=None, help="Adam steps")
    p.add_argument("--sgd-steps", type=int, default=None, help="SGD steps after Adam")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--sgd-lr", type=float, default=1e-3, help="SGD learning rate (the paper: smaller than Adam's phase)")
    p.add_argument("--lam", type=float, default=1e-3,
                   help="lambda * Lt of the parameter-norm cost (the paper: lambda = 1e-3 / Lt)")
    p.add_argument("--scheme", choices=("euler", "exponential"), default="euler", help="the paper: euler")
    p.add_argument("--io", choices=("fixed", "free"), default="fixed",
                   help="fixed: the paper's A_0 = X, output = first coordinates of A_1; free: trained "
                        "input / output layers (the library's LeakyMLP)")
    p.add_argument("--n", type=int, default=None, help="train and test points each (default 1000)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest on a shared machine: 2 threads were 20x slower here)")
    p.add_argument("--out", default=os.path.join("out", "paper"), help="folder for tables, JSON and plots")
    p.add_argument("--no-progress", action="store_true", help="no per-run lines")


def run(args) -> int:
    settings = dict(QUICK[args.figure] if args.quick else DEFAULTS[args.figure])
    for key in ("steps", "sgd_steps", "width", "depth", "n", "lts", "spectra_lt", "depths", "seeds", "profile_depth"):
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    _check(args, settings)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    result = fig1(args, settings) if args.figure == "fig1" else fig2(args, settings)
    result["meta"] = _meta(args, settings, time.time() - start)
    path = os.path.join(args.out, f"{args.figure}.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {path} ({time.time() - start:.0f} s)")
    return 0


def _check(args, s: Dict) -> None:
    for key in ("steps", "sgd_steps", "width", "n"):
        if s[key] is None or s[key] < (0 if key == "sgd_steps" else 1):
            raise ValueError(f"--{key.replace('_', '-')} must be >= {0 if key == 'sgd_steps' else 1}, got {s[key]}")
    if args.figure == "fig1" and (not s["lts"] or min(s["lts"]) <= 0):
        raise ValueError(f"--lts must list effective depths > 0, got {s['lts']}")
    if args.figure == "fig2":
        if not s["depths"] or min(s["depths"]) < 1:
            raise ValueError(f"--depths must list numbers of blocks >= 1, got {s['depths']}")
        if s["seeds"] < 1:
            raise ValueError(f"--seeds must be >= 1, got {s['seeds']}")
    if not args.lam > 0:
        raise ValueError(f"--lam must be > 0, got {args.lam}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")


# ---------------------------------------------------------------------------------------- the model
def paper_model(config: RunConfig, task: Task, io: str = "fixed") -> torch.nn.Module:
    """``train.build_model`` (a LeakyMLP with the config's steps); ``io="fixed"`` replaces its input and output
    layers by the paper's fixed maps: zero-padding ``x -> (x, 0)`` and the first ``d_out`` coordinates."""
    model = build_model(config, task)
    if io == "free":
        return model
    if io != "fixed":
        raise ValueError(f"io must be 'fixed' or 'free', got {io!r}")
    if config.width < max(task.in_dim, task.out_dim):
        raise ValueError(f"width must be >= the input and output dimensions ({task.in_dim}, {task.out_dim}) "
                         f"with io='fixed' (zero padding), got {config.width}")
    with torch.no_grad():
        for lin in (model.input, model.output):
            lin.weight.zero_()
            lin.weight.fill_diagonal_(1.0)
            lin.bias.zero_()
            lin.requires_grad_(False)
    return model


def _train(config: RunConfig, task: Task, io: str, label: str, progress: bool):
    t0 = time.time()
    result = train_run(config, task, keep_model=True, model=paper_model(config, task, io))
    if progress:
        print(f"  {label}: train {result.train_loss:.4g}  test {result.test_loss:.4g}  "
              f"({time.time() - t0:.0f} s, {1e3 * result.seconds_per_step:.0f} ms/step)", flush=True)
    return result


def _config(args, s: Dict, **kw) -> RunConfig:
    total = s["steps"] + s["sgd_steps"]
    lt = kw["effective_depth"]
    kw["weight_decay"] = args.lam / lt if lt > 0 else args.lam
    return RunConfig(width=s["width"], scheme=args.scheme, steps=s["steps"], sgd_steps=s["sgd_steps"], lr=args.lr,
                     sgd_lr=args.sgd_lr, n_train=s["n"], n_test=s["n"], data_seed=args.data_seed,
                     eval_every=max(1, total // 10), **kw)


# --------------------------------------------------------------------------------------------- fig1
def fig1(args, s: Dict) -> Dict:
    task = teacher((30, K_STAR, 30), n_train=s["n"], n_test=s["n"], seed=args.data_seed)
    print(f"fig1: {task.name}, width {s['width']}, L={s['depth']}, io={args.io}, {args.scheme}, "
          f"{s['steps']} Adam + {s['sgd_steps']} SGD steps, Lt in {list(s['lts'])}", flush=True)
    rows, runs = [], []
    for lt in s["lts"]:
        config = _config(args, s, data="teacher", depth=s["depth"], effective_depth=lt, rule="uniform")
        result = _train(config, task, args.io, f"Lt={lt:g}", not args.no_progress)
        diag = diagnose(result.model, task.x_train, task.y_train, lam=config.decay())
        b, bs = diag.bottleneck("hamiltonian"), diag.bottleneck("hamiltonian_step")
        rows.append({"Lt": lt, "-2H/Lt median": b["h_median"], "-2H/Lt min": b["h_min"], "-2H/Lt max": b["h_max"],
                     "step-pair median": bs["h_median"], "min COI": b["coi_min"], "min COI_g": b["coi_stable_min"],
                     "min rank": min(diag.column("rank_threshold_centered")),
                     "stationarity": b.get("stationarity_max"), "train loss": result.train_loss,
                     "train loss / lambda": result.train_loss / config.decay(),
                     "test loss": result.test_loss, "ms/step": 1e3 * result.seconds_per_step})
        runs.append({"run": _run_dict(result), "diagnostics": diag.to_dict()})
        if lt == s["spectra_lt"]:
            path = diag.plot(os.path.join(args.out, f"fig1_layers_Lt{lt:g}.png"),
                             title=f"fig1 layers at Lt={lt:g} ({args.io} io, L={s['depth']}, w={s['width']})")
            print(f"  wrote {path}")
    table = format_table(rows, list(rows[0]))
    print(table)
    _write_table(args.out, "fig1", table, f"k* = {K_STAR}; -(2/Lt) H over the layers l = 0..L with H = H(A_l, B_l); "
                 "'step-pair' uses H(A_{l-1}, B_l); min COI over the layers (exact, and stabilised with g0 = 1e-3); "
                 "min rank: smallest centred threshold rank (1e-2) over the layers; stationarity: max over blocks "
                 "of |W_l - Lt B_l s(A_{l-1})^T| / |W_l| (0 at a critical point, where H is conserved).")
    _plot_fig1(args.out, rows, runs, args.io)
    return {"figure": "fig1", "rows": rows, "runs": runs}


def _plot_fig1(out: str, rows: List[Dict], runs: List[Dict], io: str) -> None:
    """Left: -(2/Lt) H over Lt (symlog: far from a critical point it is orders of magnitude off); middle: the
    smallest COI over the layers against k*; right: -(2/Lt) H along depth for every Lt (symlog)."""
    plt = _pyplot()
    lts = [r["Lt"] for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(17, 4.8))
    a = ax[0]
    a.fill_between(lts, [r["-2H/Lt min"] for r in rows], [r["-2H/Lt max"] for r in rows], alpha=0.25,
                   label="-(2/Lt) H: min..max over layers")
    a.plot(lts, [r["-2H/Lt median"] for r in rows], "o-", label="-(2/Lt) H: median over layers")
    a.plot(lts, [r["min COI_g"] for r in rows], "^--", label="min COI (g0=1e-3)")
    a.axhline(K_STAR, color="k", ls=":", label=f"k* = {K_STAR}")
    a.set_yscale("symlog", linthresh=10)
    a.set_xlabel("effective depth Lt"), a.set_title(f"fig1: -(2/Lt) H ({io} io; symlog)"), a.legend(fontsize=8)
    a = ax[1]
    a.plot(lts, [r["min COI_g"] for r in rows], "^-", label="min over layers of COI (g0=1e-3)")
    a.plot(lts, [r["min rank"] for r in rows], "x--", label="min over layers of rank (centred, 1e-2)")
    a.plot(lts, [r["min COI"] for r in rows], "s:", label="min over layers of exact COI")
    a.axhline(K_STAR, color="k", ls=":", label=f"k* = {K_STAR}")
    a.set_yscale("log"), a.set_xlabel("effective depth Lt"), a.set_title("bottleneck: COI and rank")
    a.legend(fontsize=8)
    a = ax[2]
    for r in runs:
        d = r["diagnostics"]
        lt = d["effective_depth"]
        p = [layer["depth"] for layer in d["layers"]]
        a.plot(p, [-2 / lt * layer["hamiltonian"] for layer in d["layers"]], "-", label=f"Lt={lt:g}")
    a.axhline(K_STAR, color="k", ls=":")
    a.set_yscale("symlog", linthresh=10)
    a.set_xlabel("depth p"), a.set_ylabel("-(2/Lt) H(A_p, B_p)"), a.set_title("Hamiltonian along depth (symlog)")
    a.legend(fontsize=8)
    _save(fig, os.path.join(out, "fig1.png"))


# --------------------------------------------------------------------------------------------- fig2
def fig2(args, s: Dict) -> Dict:
    task = get_task("teacher-resnet", seed=args.data_seed, n_train=s["n"], n_test=s["n"])
    seeds = list(range(s["seeds"]))
    print(f"fig2: {task.name}, width {s['width']}, Lt={args.lt:g}, io={args.io}, {args.scheme}, "
          f"{s['steps']} Adam + {s['sgd_steps']} SGD steps, L in {list(s['depths'])}, rules {args.rules}, "
          f"seeds {seeds}", flush=True)
    runs = []
    for depth in s["depths"]:
        for rule in args.rules:
            for seed in seeds:
                config = _config(args, s, data="teacher-resnet", depth=depth, effective_depth=args.lt, rule=rule,
                                 seed=seed)
                result = _train(config, task, args.io, f"L={depth} {rule} seed {seed}", not args.no_progress)
                runs.append(_run_dict(result))
    rows = _fig2_rows(runs, s["depths"], args.rules)
    table = format_table(rows, list(rows[0]))
    print(table)
    _write_table(args.out, "fig2", table, f"test error = test MSE; median [min, max] over {len(seeds)} seeds; "
                 "'vs uniform' = median over seeds of the ratio to the uniform run with the same seed; "
                 "'wins' = seeds where the rule beats uniform.")
    _plot_fig2(args.out, runs, rows, s["depths"], args.rules, s["profile_depth"])
    return {"figure": "fig2", "rows": rows, "runs": runs}


def _fig2_rows(runs: List[Dict], depths: Sequence[int], rules: Sequence[str]) -> List[Dict]:
    rows = []
    for depth in depths:
        base = {r["seed"]: r["test_loss"] for r in runs if r["depth"] == depth and r["rule"] == "uniform"}
        for rule in rules:
            mine = [r for r in runs if r["depth"] == depth and r["rule"] == rule]
            err = [r["test_loss"] for r in mine]
            ratios = [r["test_loss"] / base[r["seed"]] for r in mine if r["seed"] in base]
            rows.append({"L": depth, "rule": rule, "test error (median)": statistics.median(err),
                         "min": min(err), "max": max(err),
                         "train loss (median)": statistics.median(r["train_loss"] for r in mine),
                         "vs uniform": statistics.median(ratios) if ratios and rule != "uniform" else None,
                         "wins": f"{sum(q < 1 for q in ratios)}/{len(ratios)}" if ratios and rule != "uniform" else None})
    return rows


def _plot_fig2(out, runs, rows, depths, rules, profile_depth) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    a = ax[0]
    for i, rule in enumerate(rules):
        mine = [r for r in rows if r["rule"] == rule]
        x = [r["L"] + 0.12 * (i - len(rules) / 2) for r in mine]
        med = [r["test error (median)"] for r in mine]
        a.errorbar(x, med, yerr=[[m - r["min"] for m, r in zip(med, mine)], [r["max"] - m for m, r in zip(med, mine)]],
                   fmt="o-", capsize=3, label=rule)
    a.set_xlabel("number of blocks L"), a.set_ylabel("test error (MSE), median and min..max over seeds")
    a.set_yscale("log"), a.set_title("fig2: test error against L"), a.legend(fontsize=8)
    a = ax[1]
    for rule in rules:
        profiles = [r["final_steps"] for r in runs if r["depth"] == profile_depth and r["rule"] == rule]
        if profiles:
            t = torch.tensor(profiles, dtype=torch.float64)
            a.plot(range(1, t.shape[1] + 1), t.median(0).values.tolist(), "o-", ms=3, label=rule)
    a.set_xlabel("block l"), a.set_ylabel("step size rho_l (median over seeds)")
    a.set_title(f"step profiles at L={profile_depth}"), a.legend(fontsize=8)
    _save(fig, os.path.join(out, "fig2.png"))


# ------------------------------------------------------------------------------------------ helpers
def _run_dict(result) -> Dict:
    c = result.config
    return {"depth": c.depth, "effective_depth": c.effective_depth, "rule": c.rule, "seed": c.seed,
            "train_loss": result.train_loss, "test_loss": result.test_loss, "final_steps": result.final_steps,
            "seconds_per_step": result.seconds_per_step, "history": result.history,
            "config": dataclasses.asdict(c)}


def _write_table(out: str, name: str, table: str, note: str) -> None:
    with open(os.path.join(out, f"{name}.md"), "w") as fh:
        fh.write(f"{table}\n\n{note}\n")


def _meta(args, s: Dict, seconds: float) -> Dict:
    return {"command": "adaptive-depth paper " + args.figure + (" --quick" if args.quick else ""),
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()},
            "args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "seconds": seconds,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "commit": _commit()}


def _commit() -> str:
    """The git commit of the checkout (and '+changes' when the tree differs), or '' outside git."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + ("+changes" if head and dirty else "")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    print(f"  wrote {path}")
