"""The four noise-free held-out sets pooled: the default, ``power_distance_3`` and the choices between them.

Used for ``benchmarks/results/heldout_bottleneck_clean4.md`` (the pooled counts and the post hoc correlations) and
docs/science.md 3g. Reads the committed rows of the recipe ``c0.1+io+lt+finish`` at Lt = 12; a task counts when its
bottleneck forms (uniform's 10% middle rank <= k* + 1 on more than half its seeds). A task's ratio is the median over
its seeds of the arm's test loss over uniform's, paired by model seed; *beyond the spread* means the arm's median
test loss lies above uniform's largest. Nothing here chooses anything; it only counts.

    python benchmarks/power_pooled.py             # all five sets (37 formed tasks)
    python benchmarks/power_pooled.py --sets 4    # the first four (29), as quoted in heldout_bottleneck_clean4.md
"""
import json
import math
import statistics
from pathlib import Path

from scipy.stats import spearmanr  # scipy comes with scikit-learn, a dependency

from adaptive_depth.experiments.bottleneck import _model_seed
from adaptive_depth.experiments.tasks import spec_for

RESULTS = Path(__file__).resolve().parent / "results"
SETS = {  # held-out set -> its result files (heldout_bottleneck_<name>.json); sets 1-2 got p = 3 in power_clean*
    1: ["clean_lt12", "clean_seeds_a", "clean_seeds_b", "power_clean_a", "power_clean_b"],
    2: ["clean2_a", "clean2_b", "power_clean2"],
    3: ["clean3_a", "clean3_b"],
    4: ["clean4_a", "clean4_b", "clean4_c", "clean4_d"],
    5: ["clean5_a", "clean5_b"],
}
ARMS = {
    "equal_distance": lambda u, e, p: e,
    "power_distance_3": lambda u, e, p: p,
    "validation choice": lambda u, e, p: p if p["val_loss"] < e["val_loss"] else e,
    "train-loss choice (post hoc)": lambda u, e, p: p if p["train_loss"] < e["train_loss"] else e,
}


def load(sets: int = 5):
    """Per formed task: the (uniform, equal_distance, power_distance_3) rows of each model seed that has all three."""
    cell = {}
    for name in (name for n in range(1, sets + 1) for name in SETS[n]):
        for r in json.load(open(RESULTS / f"heldout_bottleneck_{name}.json"))["rows"]:
            if r.get("recipe") == "c0.1+io+lt+finish" and r.get("lt") == 12.0:
                cell[(r["seed"], _model_seed(r), r["rule"])] = r
    tasks = {}
    for task in sorted({t for t, _, _ in cell}):
        seeds = sorted(m for t, m, rule in cell if t == task and rule == "power_distance_3"
                       and (t, m, "uniform") in cell and (t, m, "equal_distance") in cell)
        triples = [tuple(cell[(task, m, rule)] for rule in ("uniform", "equal_distance", "power_distance_3"))
                   for m in seeds]
        k = spec_for(task, "heldout").rank
        if triples and 2 * sum(u["middle_rank"] <= k + 1 for u, _, _ in triples) > len(triples):
            tasks[task] = triples
    return tasks


def main(sets: int = 5) -> None:
    tasks = load(sets)
    med = statistics.median
    print(f"{len(tasks)} formed tasks: {' '.join(map(str, tasks))}\n")
    print("| arm | task ratio <= 0.80 | above 1 | beyond uniform's seed spread | median task ratio |")
    print("| --- | --- | --- | --- | --- |")
    for name, pick in ARMS.items():
        ratios = {t: med([pick(*s)["test_loss"] / s[0]["test_loss"] for s in tr]) for t, tr in tasks.items()}
        beyond = [t for t, tr in tasks.items()
                  if med([pick(*s)["test_loss"] for s in tr]) > max(s[0]["test_loss"] for s in tr)]
        above = [t for t, v in ratios.items() if v > 1]
        print(f"| {name} | {sum(v <= 0.80 for v in ratios.values())} | {len(above)} {above} | {beyond or 'none'} | "
              f"{med(ratios.values()):.3f} |")
    # what goes with p = 3 losing to the default, per task
    target = [math.log(med([p["test_loss"] / e["test_loss"] for u, e, p in tr])) for tr in tasks.values()]
    specs = [spec_for(t, "heldout") for t in tasks]
    features = {
        "uniform's train loss / test loss": [med([u["train_loss"] / u["test_loss"] for u, _, _ in tr])
                                             for tr in tasks.values()],
        "power_distance_3's train loss / uniform's": [med([p["train_loss"] / u["train_loss"] for u, _, p in tr])
                                                      for tr in tasks.values()],
        "input dimension": [s.in_dim for s in specs],
        "output dimension": [s.out_dim for s in specs],
        "n_train": [s.n_train for s in specs],
        "k*": [s.rank for s in specs],
        "uniform's test loss": [med([u["test_loss"] for u, _, _ in tr]) for tr in tasks.values()],
        "the default's largest step / mean step": [med([max(e["final_steps"]) * len(e["final_steps"])
                                                        / sum(e["final_steps"]) for _, e, _ in tr])
                                                   for tr in tasks.values()],
    }
    print("\nlog(power_distance_3 / equal_distance) per task against:\n")
    print("| quantity | Spearman rho | p |\n| --- | --- | --- |")
    for name, values in features.items():
        rho, p = spearmanr(values, target)
        print(f"| {name} | {rho:+.2f} | {p:.3f} |")


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", type=int, default=5, choices=sorted(SETS), help="pool the first N held-out sets")
    main(parser.parse_args().sets)
