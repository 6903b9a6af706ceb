"""``adaptive-depth bench --suite tuning|heldout``: uniform against adaptive steps on the task family.

Every task of the split (``experiments.tasks``: its own teacher, k*, sizes, and the student's width, depth
and batch size) is trained under every optimizer and effective depth of the matrix, by every arm (rule).
Each arm gets the same learning-rate search: a small grid per optimizer, each value trained once, the one
with the lowest final *validation* loss kept (the test split is never looked at to choose). The table then
pairs, per (optimizer, Lt), each arm's test loss with uniform's on the same task and seed: median and
[min, max] over tasks of the ratio, and the steps each arm takes to reach uniform's final test loss.

    adaptive-depth bench --suite heldout --tasks 5 --jobs 2 --json benchmarks/results/heldout_family.json
    adaptive-depth bench --suite tuning --tasks 3 --optimizers adam --lt 12 --rules uniform equal_distance
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time
from typing import Dict, List, Optional, Sequence

from .tasks import SPLITS, draw, split_seeds
from .train import OPTIMIZERS, RunConfig, run as train_run

__all__ = ["LR_GRIDS", "lr_grid", "on_edge", "SuiteConfig", "run_suite", "select", "diverged_searches", "add_suite_arguments", "run_from_args"]

#: the learning rates each arm tries, per optimizer (the same grid for every arm). Two points, for the CPU
#: budget: with 600 steps, 1e-3 lost to 3e-3 and 1e-2 for Adam on both arms (first held-out task, by its
#: validation loss), so the grids start at 3e-3 (x3 for Lamb and SGD with momentum)
LR_GRIDS: Dict[str, Sequence[float]] = {"adam": (3e-3, 1e-2), "adamw": (3e-3, 1e-2), "radam": (3e-3, 1e-2),
                                        "lamb": (1e-2, 3e-2), "sgd": (1e-2, 3e-2)}


@dataclasses.dataclass
class SuiteConfig:
    split: str = "heldout"
    seeds: Sequence[int] = (1000, 1001, 1002, 1003, 1004)
    optimizers: Sequence[str] = ("adam", "adamw", "sgd", "lamb")
    lts: Sequence[float] = (1.0, 12.0)
    rules: Sequence[str] = ("uniform", "equal_distance")
    budget: int = 1000
    eval_every: int = 50
    scheme: str = "exponential"
    plugin: Dict = dataclasses.field(default_factory=dict)
    jobs: int = 1
    lrs: Optional[Sequence[float]] = None  # one grid for every optimizer instead of LR_GRIDS


def lr_grid(cfg: SuiteConfig, optimizer: str) -> List[float]:
    """The learning rates every arm tries under ``optimizer``: ``cfg.lrs`` if given, else ``LR_GRIDS``."""
    return sorted(cfg.lrs if cfg.lrs else LR_GRIDS[optimizer])


def on_edge(records: Sequence[Dict]) -> List[Dict]:
    """The selected records whose lr is the smallest or largest of their grid (a search that does not bracket
    the optimum: widen the grid)."""
    out = []
    for r in records:
        grid = sorted(s["lr"] for s in r.get("lr_search", []))
        if len(grid) > 1 and r["lr"] in (grid[0], grid[-1]):
            out.append(r)
    return out


def _units(cfg: SuiteConfig) -> List[Dict]:
    return [dict(seed=s, optimizer=o, lt=float(lt), rule=r, lr=lr) for s in cfg.seeds for o in cfg.optimizers
            for lt in cfg.lts for r in cfg.rules for lr in lr_grid(cfg, o)]


def _train_unit(args) -> Dict:
    """One training run (a worker process may call it): the unit's task, optimizer, Lt, rule and lr."""
    unit, cfg = args
    import torch
    torch.set_num_threads(1)
    spec, task = draw(unit["seed"], cfg["split"])
    config = RunConfig(data=spec.name, width=spec.width, depth=spec.depth, effective_depth=unit["lt"],
                       scheme=cfg["scheme"], rule=unit["rule"], steps=cfg["budget"], lr=unit["lr"],
                       batch_size=spec.batch_size, optimizer=unit["optimizer"], seed=unit["seed"],
                       data_seed=unit["seed"], n_train=spec.n_train, n_test=spec.n_test,
                       eval_every=cfg["eval_every"], plugin=dict(cfg["plugin"]))
    try:
        result = train_run(config, task)
    except FloatingPointError as err:
        return {**unit, "diverged": str(err), "val_loss": math.inf}
    h = result.history
    val = h["val_loss"][-1]
    return {**unit, "spec": spec.to_dict(), "val_loss": val if math.isfinite(val) else math.inf,
            "train_loss": result.train_loss, "test_loss": result.test_loss, "test_error": result.test_error,
            "seconds_per_step": result.seconds_per_step, "final_steps": result.final_steps,
            "curve": {k: h[k] for k in ("step", "train_loss", "test_loss", "val_loss", "seconds")}}


def _cells(results: Sequence[Dict]) -> Dict[tuple, List[Dict]]:
    cells: Dict[tuple, List[Dict]] = {}
    for r in results:
        cells.setdefault((r["seed"], r["optimizer"], r["lt"], r["rule"]), []).append(r)
    return cells


def _search(rs: Sequence[Dict]) -> List[Dict]:
    return [{"lr": r["lr"], "val_loss": r["val_loss"], "diverged": "diverged" in r} for r in rs]


def select(results: Sequence[Dict]) -> List[Dict]:
    """Per (task, optimizer, Lt, rule): the run of the grid with the lowest final validation loss, as a
    record ``bench.summarize`` reads (``data`` = the optimizer, ``seed`` = ``data_seed`` = the task seed),
    with the whole grid's (lr, validation loss) under ``"lr_search"``."""
    out = []
    for (seed, opt, lt, rule), rs in _cells(results).items():
        best = min(rs, key=lambda r: (r["val_loss"], r["lr"]))
        if not math.isfinite(best["val_loss"]):
            continue  # every lr diverged: the cell has no run (shown as fewer seeds); see diverged_searches
        out.append({**best, "data": opt, "data_seed": seed, "lr_search": _search(rs)})
    return out


def diverged_searches(results: Sequence[Dict]) -> List[Dict]:
    """The cells ``select`` leaves out because every lr diverged: their searches alone, keyed like its records
    (no run). ``--extend-grid`` adds them to the same cell's earlier search, so a pick whose higher lrs
    diverged counts as bracketed."""
    return [{"seed": seed, "data": opt, "optimizer": opt, "lt": lt, "rule": rule, "lr_search": _search(rs)}
            for (seed, opt, lt, rule), rs in _cells(results).items()
            if not any(math.isfinite(r["val_loss"]) for r in rs)]


def run_suite(cfg: SuiteConfig, log=None, searches: Optional[List[Dict]] = None) -> List[Dict]:
    """Train every unit (in ``cfg.jobs`` processes) and return the selected records; ``searches``, a list,
    receives the searches of the cells where every lr diverged (``diverged_searches``)."""
    for s in cfg.seeds:
        draw(s, cfg.split)  # the split's guard, before any training
    bad = [o for o in cfg.optimizers if o not in OPTIMIZERS]
    if bad:
        raise ValueError(f"optimizers must be among {OPTIMIZERS}, got {bad}")
    if cfg.lrs is not None and (not cfg.lrs or any(not (math.isfinite(lr) and lr > 0) for lr in cfg.lrs)):
        raise ValueError(f"lrs must be positive finite learning rates, got {list(cfg.lrs)}")
    plain = dataclasses.asdict(cfg)
    work = [(u, plain) for u in _units(cfg)]
    if cfg.jobs > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(cfg.jobs) as pool:
            results = []
            for r in pool.imap_unordered(_train_unit, work):
                results.append(_logged(r, log))
    else:
        results = [_logged(_train_unit(w), log) for w in work]
    if searches is not None:
        searches.extend(diverged_searches(results))
    return select(results)


def _logged(r: Dict, log) -> Dict:
    if log:
        tail = "diverged" if "diverged" in r else f"val {r['val_loss']:.4g} test {r['test_loss']:.4g}"
        log(f"task {r['seed']} {r['optimizer']:>5} Lt={r['lt']:g} {r['rule']:>14} lr={r['lr']:g}: {tail}")
    return r


def _command(cfg: SuiteConfig, first: int, out: str) -> str:
    """The command line that repeats ``cfg``."""
    parts = [f"--suite {cfg.split} --tasks {len(cfg.seeds)}", f"--first-task {first}" if first else "",
             "--optimizers " + " ".join(cfg.optimizers), "--lt " + " ".join(f"{v:g}" for v in cfg.lts),
             "--rules " + " ".join(cfg.rules),
             "--lrs " + " ".join(f"{v:g}" for v in cfg.lrs) if cfg.lrs else "", f"--budget {cfg.budget} --eval-every {cfg.eval_every}",
             f"--scheme {cfg.scheme}" if cfg.scheme != "exponential" else "",
             f"--plugin '{json.dumps(cfg.plugin)}'" if cfg.plugin else "", f"--jobs {cfg.jobs}" if cfg.jobs > 1 else "",
             f"--json {out}"]
    return "adaptive-depth bench " + " ".join(p for p in parts if p)


def _merge_existing_records(old: List[Dict], new: List[Dict], extend: bool = False, searches: Sequence[Dict] = ()):
    """``new``'s cells replace ``old``'s; with ``extend`` a cell's two lr searches are one search instead: the
    record with the lower validation loss is kept, with both grids under ``lr_search``. ``searches``
    (``diverged_searches``, with ``extend`` only): cells whose added lrs all diverged keep their earlier run,
    with the diverged lrs added to its search."""
    key = lambda r: (r["data"], r["lt"], r["rule"], r["seed"])  # noqa: E731
    done = {key(r) for r in new}
    if extend:
        before = {key(r): r for r in old}
        new = [_union(before[key(r)], r) if key(r) in before else r for r in new]
        extra = {key(s): s for s in searches if key(s) in before and key(s) not in done}
        old = [{**r, "lr_search": _joined_search(r, extra[key(r)])} if key(r) in extra else r for r in old]
    return [r for r in old if key(r) not in done] + new, done


def _union(a: Dict, b: Dict) -> Dict:
    best = min((a, b), key=lambda r: (r["val_loss"], r["lr"]))
    return {**best, "lr_search": _joined_search(a, b)}


def _joined_search(a: Dict, b: Dict) -> List[Dict]:
    """The two records' lr searches as one, by lr (``b``'s entry where both tried an lr)."""
    seen = {s["lr"]: s for s in a.get("lr_search", []) + b.get("lr_search", [])}
    return [seen[lr] for lr in sorted(seen)]


def _merge_existing(path: str, records: List[Dict], extend: bool = False, searches: Sequence[Dict] = ()):
    """Records of an earlier ``--suite`` command in ``path`` that this one did not redo, plus these (with
    ``extend``: merged into the earlier search of the same cell, diverged ``searches`` included)."""
    if not os.path.exists(path):
        return records, []
    with open(path) as fh:
        old = json.load(fh).get("suite") or {}
    return _merge_existing_records(old.get("runs", []), records, extend, searches)[0], list(old.get("meta", []))


def add_suite_arguments(p) -> None:
    p.add_argument("--suite", choices=sorted(SPLITS) + ["growth"], default=None,
                   help="run the task family's matrix on its tuning or held-out split instead of --data; "
                        "'growth': the depth-growth training-speed benchmark with its defaults "
                        "(adaptive-depth grow takes its options)")
    p.add_argument("--tasks", type=int, default=5, help="--suite: number of tasks (seeds) of the split")
    p.add_argument("--first-task", type=int, default=0, help="--suite: index of the first task in the split")
    p.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=["adam", "adamw", "sgd", "lamb"],
                   help="--suite: inner optimizers")
    p.add_argument("--jobs", type=int, default=1, help="--suite: worker processes (one thread each)")
    p.add_argument("--lrs", nargs="+", type=float, default=None,
                   help="--suite: one lr grid for every optimizer and arm (default: LR_GRIDS per optimizer)")
    p.add_argument("--extend-grid", action="store_true",
                   help="--suite: add these lrs to the search already in --json for the same cells (a grid "
                        "whose pick sat on its edge), instead of replacing those cells")
    p.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                   help="--suite: train nothing; merge the runs of these suite JSONs into --json and redo the table")


def run_from_args(args) -> int:
    """The ``--suite`` branch of ``adaptive-depth bench``."""
    from . import bench
    lts = args.lt if args.lt != list(bench.DEFAULT_LTS) else [1.0, 12.0]
    rules = args.rules if args.rules != list(bench.DEFAULT_RULES) else ["uniform", "equal_distance"]
    out = args.json_out if args.json_out != bench.DEFAULT_JSON else os.path.join("out", "bench", f"{args.suite}.json")
    cfg = SuiteConfig(split=args.suite, seeds=split_seeds(args.suite, args.tasks, args.first_task),
                      optimizers=args.optimizers, lts=lts, rules=rules, budget=args.budget,
                      eval_every=args.eval_every, scheme=args.scheme, plugin=json.loads(args.plugin), jobs=args.jobs,
                      lrs=args.lrs)
    start = time.time()
    if args.combine:
        return _combine(args.combine, out, args.baseline)
    searches: List[Dict] = []
    records = run_suite(cfg, log=print, searches=searches)
    records, metas = _merge_existing(out, records, args.extend_grid, searches)
    bench._targets(records, None)
    summary = bench.summarize(records, baseline=args.baseline)
    md = bench.tables(summary, args.baseline)
    command = ("adaptive-depth " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else
               _command(cfg, args.first_task, out))
    meta_entry = {"command": command, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "platform": platform.platform(), "seconds": time.time() - start, "config": dataclasses.asdict(cfg),
            "lr_grids": {o: lr_grid(cfg, o) for o in cfg.optimizers}}
    metas.append(meta_entry)
    _write(out, args.suite, records, metas, summary, md)
    print(md)
    edge = on_edge(records)
    print(f"lr picks on the edge of their grid: {len(edge)} of {len(records)} cells"
          + "".join(f"\n  task {r['seed']} {r['optimizer']} Lt={r['lt']:g} {r['rule']}: lr {r['lr']:g}" for r in edge))
    print(f"wrote {out} ({time.time() - start:.0f} s)")
    return 0


def _write(out: str, split: str, records, metas, summary, md) -> None:
    head = (f"# task family, {split} split\n\n" + "".join(
        f"`{m['command']}`  \n{m['date']}, {m['seconds']:.0f} s, lr grids {m['lr_grids']}\n\n" for m in metas)
        + "One table per optimizer (rows: Lt, arm); each arm's lr chosen per task from its grid by the final "
          "validation loss; ratios paired by task.\n\n")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        json.dump({"suite": {"meta": metas, "summary": summary, "table_markdown": md, "runs": records}}, fh, indent=1)
    with open(os.path.splitext(out)[0] + ".md", "w") as fh:
        fh.write(head + md + "\n")


def _combine(paths: Sequence[str], out: str, baseline: str) -> int:
    """Merge suite JSONs (a later file's run replaces an earlier one's of the same cell) into ``out``."""
    from . import bench
    records, metas, split = [], [], None
    for path in paths:
        with open(path) as fh:
            doc = json.load(fh)["suite"]
        records, _ = _merge_existing_records(records, doc["runs"])
        metas += [m for m in doc["meta"] if m not in metas]
        split = split or doc["meta"][0]["config"]["split"]
    bench._targets(records, None)
    summary = bench.summarize(records, baseline=baseline)
    md = bench.tables(summary, baseline)
    _write(out, split, records, metas, summary, md)
    print(md)
    print(f"wrote {out} from {len(paths)} file(s)")
    return 0
