"""What choosing the effective depth per task could buy: the headroom of "adapting Lt" (issue 9 item 4, idea c).

Reads ``adaptive-depth bench --suite`` JSONs holding one rule (default ``uniform``) at several Lt on the same
tasks, each run at the learning rate its validation split chose. Per task it takes the Lt whose run has the lowest
*validation* loss (an oracle over a grid of Lt, chosen with hindsight, as a rule that sets Lt from the data could
at best) and prints, paired by task, every fixed Lt's and the oracle's test loss over a reference Lt's.

    python benchmarks/lt_headroom.py benchmarks/results/heldout_lt_sweep.json --ref 24
"""
import argparse
import json
import statistics


def load(paths, rule="uniform", optimizer="adam"):
    """``{task: {lt: run}}`` from suite JSONs; the same cell in two files must hold the same run."""
    cells = {}
    for path in paths:
        with open(path) as fh:
            for r in json.load(fh)["suite"]["runs"]:
                if r["rule"] != rule or r["optimizer"] != optimizer:
                    continue
                key = (r["seed"], float(r["lt"]))
                old = cells.get(key)
                if old is not None and (old["test_loss"], old["lr"]) != (r["test_loss"], r["lr"]):
                    raise SystemExit(f"task {key[0]} at Lt {key[1]:g} differs between the files: {old['test_loss']} "
                                     f"(lr {old['lr']}) and {r['test_loss']} (lr {r['lr']})")
                cells[key] = r
    out = {}
    for (task, lt), r in cells.items():
        out.setdefault(task, {})[lt] = r
    return out


def headroom(tasks, ref):
    """Per task: the oracle's Lt and every ratio ``test(Lt) / test(ref)``; tasks lacking an Lt are left out."""
    lts = sorted(set().union(*(t.keys() for t in tasks.values())))
    if ref not in lts:
        raise SystemExit(f"--ref {ref:g} is not among the Lt in the files: {[f'{l:g}' for l in lts]}")
    rows = []
    for task in sorted(tasks):
        runs = tasks[task]
        if set(runs) != set(lts):
            continue
        best = min(lts, key=lambda l: runs[l]["val_loss"])
        base = runs[ref]["test_loss"]
        rows.append({"task": task, "oracle_lt": best, "test": {l: runs[l]["test_loss"] for l in lts},
                     "ratio": {l: runs[l]["test_loss"] / base for l in lts},
                     "oracle_ratio": runs[best]["test_loss"] / base})
    return lts, rows


def _spread(v):
    return f"{statistics.median(v):.3f} [{min(v):.3f}, {max(v):.3f}], lower on {sum(x < 1 for x in v)} of {len(v)}"


def table(lts, rows, ref):
    head = "| task | " + " | ".join(f"Lt = {l:g}" for l in lts) + " | oracle's Lt (by validation) |"
    lines = [head, "| --- " * (len(lts) + 2) + "|"]
    for r in rows:
        cells = [f"{r['test'][l]:.4g}" + (" *" if l == r["oracle_lt"] else "") for l in lts]
        lines.append(f"| {r['task']} | " + " | ".join(cells) + f" | {r['oracle_lt']:g} |")
    lines += ["", f"Test loss over Lt = {ref:g}'s, paired by task, median [min, max]:", ""]
    for l in lts:
        if l != ref:
            lines.append(f"- Lt = {l:g}: {_spread([r['ratio'][l] for r in rows])}")
    lines.append(f"- the oracle (per task the Lt with the lowest validation loss): "
                 f"{_spread([r['oracle_ratio'] for r in rows])}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", help="adaptive-depth bench --suite JSONs")
    p.add_argument("--ref", type=float, default=24.0, help="the Lt the ratios divide by")
    p.add_argument("--rule", default="uniform")
    p.add_argument("--optimizer", default="adam")
    args = p.parse_args(argv)
    lts, rows = headroom(load(args.json, args.rule, args.optimizer), args.ref)
    if not rows:
        raise SystemExit("no task has a run at every Lt in the files")
    print(table(lts, rows, args.ref))
    return rows


if __name__ == "__main__":
    main()
