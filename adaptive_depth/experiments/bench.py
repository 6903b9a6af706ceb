"""``adaptive-depth bench``: uniform against adaptive steps over effective depths, rules and seeds.

For every task, every ``Lt`` and every seed, each rule trains the same ``LeakyMLP`` (same initialisation,
same data, same budget) with ``train.run``. Per run it records the final train and test loss (and test
error), the steps and the training wall time to reach a target train loss, and the final step profile.
Per (task, Lt, rule) it reports the median and the min/max over seeds, and the paired ratio to uniform
(rule / uniform on the same seed and data, median and min/max): a markdown table, a plot, and one JSON.

The JSON lives under the key ``"convergence"`` (``meta``: one entry per command that contributed, ``runs``,
``summary``, ``table_markdown``); when ``--json`` names a file that already exists (e.g. the output of
``pytest benchmarks/bench_steps.py --benchmark-json=FILE``) its other keys are kept, so both suites share one
file, and so are its runs that this command does not redo (same task, rule, Lt and seeds): ``--data
teacher`` then ``--data mnist1d`` (or ``--rules paper``, or more ``--seeds``) into the same file gives one
table of all.

Seeds: run ``i`` uses model seed ``seeds[i]`` and data seed ``data_seeds[i]`` (default: the same numbers),
so every seed is a fresh teacher or MNIST-1D draw as well as a fresh initialisation. Tune on data seed 0,
report on others.

Target: ``--target auto`` (default) takes, per (task, Lt), the largest final train loss among all its runs,
so every run reaches it and "steps to target" compares how fast each gets there; a number fixes it. The
column "steps to uniform's final test" is paired: the first evaluated step at which a run's test loss is at
or below the final test loss of the baseline run with the same seeds (the baseline itself: its budget, or
earlier if its test loss went up at the end; "miss": never within the budget).

    adaptive-depth bench --quick                       # seconds: a smoke test of the whole pipeline
    adaptive-depth bench --data teacher --lt 0 1 3 10 30 --seeds 1 2 3 4 5 --json bench.json
    adaptive-depth bench --from-json --json bench.json  # table and plot again from the stored runs
    adaptive-depth bench --suite heldout --tasks 5 --jobs 2   # the task family's held-out matrix (suite.py)
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

from . import candidates
from ._common import command_argv as _argv, spread as _spread
from .data import TASKS, get_task
from .suite import add_suite_arguments, run_from_args as run_suite_from_args
from .train import RunConfig, format_table, run as train_run

__all__ = ["add_arguments", "run", "bench", "summarize", "tables", "plot"]

DEFAULT_RULES = ("uniform", "equal_distance", "paper")
DEFAULT_LTS = (0.0, 1.0, 3.0, 10.0, 30.0)
DEFAULT_DATA = ("teacher", "mnist1d")
DEFAULT_JSON = os.path.join("out", "bench", "bench.json")
#: per-task settings used where --n-train / --batch-size are not given: the paper's 1000 points full batch
#: for the teachers; MNIST-1D overfits to a test cross-entropy of ~8 within 400 full-batch steps on 1000
#: examples, so it gets 4000 in mini-batches of 500
TASK_DEFAULTS: Dict[str, Dict] = {"teacher": {"n_train": 1000, "batch_size": None},
                                  "teacher-resnet": {"n_train": 1000, "batch_size": None},
                                  "mnist1d": {"n_train": 4000, "batch_size": 500}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", choices=TASKS, default=list(DEFAULT_DATA), help="embedded tasks")
    p.add_argument("--lt", nargs="+", type=float, default=list(DEFAULT_LTS), help="effective depths Lt")
    p.add_argument("--rules", nargs="+", default=list(DEFAULT_RULES),
                   help="rules compared: fixed profiles "
                        "'uniform', 'irregular' or plugin rules 'equal_distance', 'paper', 'weight_norm', "
                        "'learned', or candidates under test (experiments.candidates: "
                        + ", ".join(repr(n) for n in (*candidates.CANDIDATES, *candidates.PRESERVING))
                        + "; fixed profiles " + ", ".join(repr(n) for n in candidates.PROFILES) + ")")
    p.add_argument("--baseline", default="uniform", help="the rule paired ratios divide by")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5], help="model seeds")
    p.add_argument("--data-seeds", nargs="+", type=int, default=None,
                   help="data seeds, paired with --seeds (default: the same numbers)")
    p.add_argument("--budget", type=int, default=1000, help="Adam steps per run")
    p.add_argument("--sgd-steps", type=int, default=0, help="SGD steps after Adam")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--batch-size", type=int, default=None,
                   help="mini-batch size (default: per task, full batch except mnist1d: 500)")
    p.add_argument("--width", type=int, default=100)
    p.add_argument("--depth", type=int, default=20, help="number of leaky blocks L")
    p.add_argument("--n-train", type=int, default=None,
                   help="training examples (default: per task, 1000 except mnist1d: 4000)")
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--scheme", choices=["exponential", "euler"], default="exponential",
                   help="discretisation (euler needs Lt < L: it cannot run Lt = 30 with L = 20)")
    p.add_argument("--eval-every", type=int, default=25, help="evaluate every N steps (steps-to-target "
                                                               "has this resolution)")
    p.add_argument("--target", default="auto",
                   help="train loss to reach: 'auto' (the worst final train loss per task and Lt) or a number")
    p.add_argument("--plugin", default="{}",
                   help="extra AdaptiveSteps keyword arguments as JSON, for the plugin rules")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--json", dest="json_out", default=DEFAULT_JSON,
                   help="JSON output; an existing file keeps its other keys (pytest-benchmark's)")
    p.add_argument("--plot", default=None, help="PNG output (default: the JSON path with .png)")
    p.add_argument("--table", default=None, help="markdown output (default: the JSON path with .md)")
    p.add_argument("--from-json", action="store_true",
                   help="train nothing: recompute targets, summary, table and plot from the runs in --json")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: teacher only, Lt 0 and 10, 2 seeds, width 16, depth 4, 40 steps at lr 1e-2")
    add_suite_arguments(p)


def _quick(args) -> None:
    args.data, args.lt, args.seeds, args.data_seeds = ["teacher"], [0.0, 10.0], [0, 1], None
    args.budget, args.sgd_steps, args.width, args.depth, args.lr = 40, 0, 16, 4, 1e-2
    args.n_train, args.n_test, args.eval_every = 128, 128, 10


def run(args) -> int:
    if getattr(args, "suite", None) == "growth":  # depth growth's training-speed benchmark (experiments/growth.py)
        from . import growth
        parser = argparse.ArgumentParser(prog="adaptive-depth grow")
        growth.add_arguments(parser)
        return growth.run(parser.parse_args([]))
    if getattr(args, "suite", None):
        return run_suite_from_args(args)
    if args.quick:
        _quick(args)
    data_seeds = args.data_seeds if args.data_seeds is not None else args.seeds
    if len(data_seeds) != len(args.seeds):
        raise SystemExit(f"--data-seeds must pair with --seeds ({len(args.seeds)} values), got {len(data_seeds)}")
    target = None if str(args.target) == "auto" else float(args.target)
    plugin = json.loads(args.plugin)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    base = RunConfig(width=args.width, depth=args.depth, scheme=args.scheme, steps=args.budget,
                     sgd_steps=args.sgd_steps, lr=args.lr, n_test=args.n_test, eval_every=args.eval_every,
                     plugin=plugin)  # n_train and batch_size: per task, below
    start = time.time()
    out = args.json_out
    per_task = {name: task_settings(name, args.n_train, args.batch_size) for name in args.data}
    runs = [] if args.from_json else bench(base, data=args.data, lts=args.lt, rules=args.rules,
                                           seeds=list(zip(args.seeds, data_seeds)), target=target, log=print,
                                           per_task=per_task)
    stem = os.path.splitext(out)[0]
    plot_path, table_path = args.plot or stem + ".png", args.table or stem + ".md"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    document, metas = {}, []
    if os.path.exists(out):
        with open(out) as fh:
            document = json.load(fh)
        old = document.get("convergence") or {}
        runs, metas = merge(old.get("runs", []), old.get("meta", []), runs)
    if args.from_json and not runs:
        raise SystemExit(f"--from-json: no runs in {out}")
    if not args.from_json:
        metas.append(_meta(args, time.time() - start))
    _targets(runs, target)  # over every run of a cell, this command's and the kept ones
    rules = list(dict.fromkeys(r["rule"] for r in runs))
    summary = summarize(runs, baseline=args.baseline)
    md = tables(summary, args.baseline)
    print(md)
    with open(table_path, "w") as fh:
        fh.write("# uniform vs adaptive steps\n\n" + "".join(
            f"`{m['command']}`  \n{m['date']}, torch {m['versions']['torch']}, {m['threads']} thread(s), "
            f"{m['seconds']:.0f} s\n\n" for m in metas) + md + "\n")
    plot(summary, rules, plot_path, runs)
    document["convergence"] = {"meta": metas, "summary": summary, "table_markdown": md, "runs": runs}
    with open(out, "w") as fh:
        json.dump(document, fh, indent=1)
    print(f"wrote {out}, {table_path}, {plot_path} ({time.time() - start:.0f} s)")
    return 0


def _run_key(r: Dict) -> tuple:
    return r["data"], r["rule"], float(r["lt"]), r["seed"], r["data_seed"]


def _meta_keys(meta: Dict) -> set:
    a = meta["args"]
    pairs = list(zip(a["seeds"], a.get("data_seeds") or a["seeds"]))
    return {(d, rule, float(lt), s, t) for d in a["data"] for rule in a["rules"] for lt in a["lt"] for s, t in pairs}


def merge(old_runs: List[Dict], old_meta: List[Dict], runs: List[Dict]):
    """Stored runs plus new ones: a new run replaces the stored run of the same (task, rule, Lt, seeds);
    the others are kept, and so is every stored command that still contributes a run."""
    done = {_run_key(r) for r in runs}
    kept = [r for r in old_runs if _run_key(r) not in done]
    return kept + runs, [m for m in old_meta if not _meta_keys(m) <= done]


def task_settings(name: str, n_train: Optional[int] = None, batch_size: Optional[int] = None) -> Dict:
    """``n_train`` and ``batch_size`` for task ``name``: the given values, else ``TASK_DEFAULTS``."""
    defaults = TASK_DEFAULTS.get(name, {"n_train": 1000, "batch_size": None})
    return {"n_train": defaults["n_train"] if n_train is None else n_train,
            "batch_size": defaults["batch_size"] if batch_size is None else batch_size}


def bench(base: RunConfig, *, data: Sequence[str], lts: Sequence[float], rules: Sequence[str],
          seeds: Sequence[tuple], target: Optional[float] = None, log=None,
          per_task: Optional[Dict[str, Dict]] = None) -> List[Dict]:
    """Train every (task, Lt, seed, rule); one flat record per run (see the module docstring).
    ``per_task[name]`` overrides fields of ``base`` for that task (e.g. ``n_train``, ``batch_size``)."""
    records = []
    for name in data:
        task_base = dataclasses.replace(base, **(per_task or {}).get(name, {}))
        for model_seed, data_seed in seeds:
            task = get_task(name, seed=data_seed, n_train=task_base.n_train, n_test=task_base.n_test)
            for lt in lts:
                for rule in rules:
                    config = dataclasses.replace(task_base, data=name, effective_depth=float(lt), rule=rule,
                                                 seed=model_seed, data_seed=data_seed)
                    result = train_run(config, task)
                    h = result.history
                    records.append({
                        "data": name, "lt": float(lt), "rule": rule, "seed": model_seed, "data_seed": data_seed,
                        "n_train": config.n_train, "batch_size": config.batch_size, "budget": config.steps,
                        "train_loss": result.train_loss, "test_loss": result.test_loss,
                        "test_error": result.test_error, "seconds_per_step": result.seconds_per_step,
                        "final_steps": result.final_steps,
                        "curve": {k: h[k] for k in ("step", "train_loss", "test_loss", "seconds")},
                    })
                    if log:
                        log(f"{name} Lt={lt:g} seed={model_seed}/{data_seed} {rule:>14}: train "
                            f"{result.train_loss:.4g} test {result.test_loss:.4g} "
                            f"({1e3 * result.seconds_per_step:.1f} ms/step)")
    _targets(records, target)
    return records


def _targets(records: List[Dict], target: Optional[float]) -> None:
    cells: Dict[tuple, List[Dict]] = {}
    for r in records:
        cells.setdefault((r["data"], r["lt"]), []).append(r)
    for cell in cells.values():
        goal = target if target is not None else max(r["train_loss"] for r in cell)
        for r in cell:
            c = r["curve"]
            hit = next((i for i, v in enumerate(c["train_loss"]) if v <= goal), None)
            r["target"] = goal
            r["steps_to_target"] = None if hit is None else c["step"][hit]
            r["seconds_to_target"] = None if hit is None else c["seconds"][hit]


def _first_step(record: Dict, goal: float) -> Optional[int]:
    """The first evaluated step at which the run's test loss is <= ``goal`` (None: never)."""
    c = record.get("curve") or {}
    return next((s for s, v in zip(c.get("step", []), c.get("test_loss", [])) if v <= goal), None)


def summarize(records: List[Dict], baseline: str = "uniform") -> List[Dict]:
    """Median and min/max over seeds per (task, Lt, rule), with paired ratios to ``baseline``."""
    groups: Dict[tuple, List[Dict]] = {}
    for r in records:
        groups.setdefault((r["data"], r["lt"], r["rule"]), []).append(r)
    out = []
    for (name, lt, rule), rs in groups.items():
        base = {(b["seed"], b["data_seed"]): b for b in groups.get((name, lt, baseline), [])}
        paired = [r["test_loss"] / base[k]["test_loss"] for r in rs
                  if (k := (r["seed"], r["data_seed"])) in base and base[k]["test_loss"] > 0]
        row = {"data": name, "lt": lt, "rule": rule, "seeds": len(rs)}
        for key in ("train_loss", "test_loss", "test_error", "steps_to_target", "seconds_to_target",
                    "seconds_per_step"):
            row[key] = _spread([r[key] for r in rs])
        row["test_ratio"] = _spread(paired)
        row["steps_to_baseline_test"] = _spread([_first_step(r, base[k]["test_loss"]) for r in rs
                                                 if (k := (r["seed"], r["data_seed"])) in base])
        base_test = _spread([b["test_loss"] for b in base.values()])
        row["within_baseline_spread"] = (None if base_test["max"] is None else
                                         row["test_loss"]["median"] <= base_test["max"])
        row["target"] = rs[0].get("target")
        out.append(row)
    data_order = list(dict.fromkeys(r["data"] for r in records))
    rule_order = [baseline] + [r for r in dict.fromkeys(r["rule"] for r in records) if r != baseline]
    return sorted(out, key=lambda r: (data_order.index(r["data"]), r["lt"], rule_order.index(r["rule"])))


def _fmt(s: Dict, scale: float = 1.0, digits: str = ".4g") -> str:
    if s["median"] is None:
        return "-"
    text = f"{s['median'] * scale:{digits}} [{s['min'] * scale:{digits}}, {s['max'] * scale:{digits}}]"
    return text + (f" ({s['missing']} miss)" if s.get("missing") else "")


def tables(summary: List[Dict], baseline: str = "uniform") -> str:
    """One markdown table per task: median [min, max] over seeds."""
    parts = []
    for name in dict.fromkeys(r["data"] for r in summary):
        rows = []
        classify = any(r["data"] == name and r["test_error"]["median"] not in (None, r["test_loss"]["median"])
                       for r in summary)
        for r in (r for r in summary if r["data"] == name):
            row = {"Lt": f"{r['lt']:g}", "rule": r["rule"], "seeds": str(r["seeds"]),
                   "test loss": _fmt(r["test_loss"]),
                   f"test / {baseline} (paired)": _fmt(r["test_ratio"], digits=".3f"),
                   f"steps to {baseline}'s final test": _fmt(r["steps_to_baseline_test"], digits=".0f")}
            if classify:
                row["test error %"] = _fmt(r["test_error"], 100, ".3g")
            row.update({"train loss": _fmt(r["train_loss"]), "target (train)": f"{r['target']:.3g}",
                        "steps to target": _fmt(r["steps_to_target"], digits=".0f"),
                        "s to target": _fmt(r["seconds_to_target"], digits=".3g"),
                        "ms/step": _fmt(r["seconds_per_step"], 1e3, ".3g")})
            rows.append(row)
        cols = list(dict.fromkeys(k for row in rows for k in row))
        parts.append(f"### {name} (median [min, max] over seeds)\n\n" + format_table(rows, cols))
    return "\n\n".join(parts)


def plot(summary: List[Dict], rules: Sequence[str], path: str, runs: Optional[List[Dict]] = None) -> str:
    """Per task (one column): test loss against Lt and the paired ratio to the baseline (median, min/max
    bars), and, given ``runs``, the final step profiles at the largest Lt (median over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["data"] for r in summary))
    n_rows = 3 if runs else 2
    fig, axes = plt.subplots(n_rows, len(names), figsize=(5 * len(names), 3.4 * n_rows), squeeze=False)
    for j, name in enumerate(names):
        for k, rule in enumerate(rules):
            rows = sorted((r for r in summary if r["data"] == name and r["rule"] == rule), key=lambda r: r["lt"])
            for i, key in enumerate(("test_loss", "test_ratio")):
                pts = [(r["lt"], r[key]) for r in rows if r[key]["median"] is not None]
                if not pts:
                    continue
                x = [p[0] * (1 + 0.04 * (k - (len(rules) - 1) / 2)) + 0.02 * k for p in pts]
                med = [p[1]["median"] for p in pts]
                err = [[m - p[1]["min"] for m, p in zip(med, pts)], [p[1]["max"] - m for m, p in zip(med, pts)]]
                axes[i][j].errorbar(x, med, yerr=err, marker="o", capsize=3, label=rule)
        axes[0][j].set_title(f"{name}: test loss (median, min/max over seeds)")
        axes[1][j].set_title(f"{name}: test loss / baseline, paired by seed")
        axes[1][j].axhline(1.0, color="grey", lw=0.8)
        axes[1][j].axhline(0.8, color="grey", lw=0.8, ls=":")
        for i in range(2):
            axes[i][j].set_xscale("symlog", linthresh=1.0)
            axes[i][j].set_xlim(left=-0.3)
            axes[i][j].set_xlabel("effective depth Lt")
            axes[i][j].legend()
        axes[0][j].set_yscale("log")
        if runs:
            top = max(r["lt"] for r in runs if r["data"] == name)
            for rule in rules:
                profiles = [r["final_steps"] for r in runs if r["data"] == name and r["lt"] == top
                            and r["rule"] == rule and "final_steps" in r]
                if profiles:
                    med = [statistics.median(col) for col in zip(*profiles)]
                    axes[2][j].plot(range(1, len(med) + 1), med, marker=".", label=rule)
            axes[2][j].set_title(f"{name}: final steps at Lt = {top:g} (median over seeds)")
            axes[2][j].set_xlabel("layer l"), axes[2][j].set_ylabel("rho_l")
            if axes[2][j].lines:
                axes[2][j].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _meta(args, seconds: float) -> Dict:
    import torch
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("numpy", "mnist1d", "matplotlib"):
        try:
            versions[mod] = getattr(__import__(mod), "__version__", "?")
        except ImportError:
            pass
    try:
        from .. import __version__
        versions["adaptive_depth"] = __version__
    except ImportError:
        pass
    cli = "adaptive-depth bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else \
        "adaptive-depth bench " + " ".join(_argv(args))
    return {"command": cli, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions, "platform": platform.platform(), "threads": torch.get_num_threads(),
            "seconds": seconds, "args": {k: v for k, v in vars(args).items() if not k.startswith("_")}}


