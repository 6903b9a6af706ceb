"""Growth runs against the full arm of another ``adaptive-depth grow`` JSON, paired by seed.

Used for docs/depth.md (Growth 6): growth to 16 blocks measured against the 8-block full net of growth3 (the same
seeds, width and settings). Target and reach as ``adaptive-depth grow`` computes them (``growth.target_metric``,
``growth._reach``): the reference's median final accuracy minus 1 point, or its median final loss x 1.01 (the
teacher); speed-up: the reference's CPU seconds to the target over the arm's, per seed; a seed where either run
never reaches the target counts as a miss.

    python benchmarks/growth_vs_reference.py REFERENCE.json GROWN.json
    python benchmarks/growth_vs_reference.py RUNS.json RUNS.json --ref-arm uniform   # adaptive vs uniform growth

``--ref-arm``: the reference file's arm to measure against (default ``full``); ``--by``: the speed-up in CPU
seconds (default), optimizer steps or block-steps (both free of machine noise, so the measure for two growth arms
of equal cost per step). For a loss the paired final ratio (arm / reference) is printed too, on the test set and,
for runs that recorded it, the training set; for an accuracy, the paired difference on the training set.
"""
import argparse
import json
import statistics

from adaptive_depth.experiments.growth import ARMS, _higher_better, _reach, target_metric

SLACK = 0.01  # grow's default --slack


def _spread(values, fmt):
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}, {max(values):{fmt}}]"


def main(reference: str, grown: str, ref_arm: str = "full", by: str = "cpu") -> None:
    ref = {r["seed"]: r for r in json.load(open(reference))["runs"] if r["arm"] == ref_arm}
    if not ref:
        raise SystemExit(f"{reference} has no runs of arm {ref_arm!r} (--ref-arm)")
    runs = json.load(open(grown))["runs"]
    higher = _higher_better(next(iter(ref.values())).get("task", ""))
    target = target_metric(statistics.median(r["final"] for r in ref.values()), SLACK, higher)
    scale, unit = (100, "+.1f") if higher else (1, "+.2g")

    def to_target(run):
        reached = _reach(run, target, higher)  # (step, cpu, block_steps, wall)
        return reached[{"steps": 0, "cpu": 1, "block-steps": 2}[by]] if reached else None

    print(f"reference: the {ref_arm} arm; speed-up in {by}")
    print(f"target: the reference's median final {'minus 1 point' if higher else 'x 1.01'} = "
          f"{scale * target:{'.1f' if higher else '.4g'}}")
    for arm in ARMS:
        rows = [r for r in runs if r["arm"] == arm]
        if not rows:
            continue
        speed = []
        for r in rows:
            mine, theirs = to_target(r), to_target(ref[r["seed"]])
            speed.append(theirs / mine if mine and theirs else None)
        got = [s for s in speed if s]
        final = [scale * (r["final"] - ref[r["seed"]]["final"]) for r in rows]
        line = (f"{arm:9s}: final - reference {_spread(final, unit)}"
                f", CPU / reference's {_spread([r['cpu_s'] / ref[r['seed']]['cpu_s'] for r in rows], '.2f')}"
                f", speed-up to the target {_spread(got, '.2f') if got else '-'} on {len(got)} of {len(speed)}")
        if len(got) < len(speed):
            line += f" (median with misses as 0: {statistics.median([s or 0 for s in speed]):.2f})"
        paired = [r for r in rows if "final_train" in r and "final_train" in ref[r["seed"]]]
        if higher and paired:  # accuracy: the paired difference on the training set too
            train = [scale * (r["final_train"] - ref[r["seed"]]["final_train"]) for r in paired]
            line += (f"; train: final - reference {_spread(train, unit)}, higher on "
                     f"{sum(d > 0 for d in train)} of {len(train)}")
        if not higher:
            ratio = [r["final"] / ref[r["seed"]]["final"] for r in rows]
            line += (f", final / reference's {_spread(ratio, '.3f')}, lower on "
                     f"{sum(q < 1 for q in ratio)} of {len(ratio)}")
            train = [r["final_train"] / ref[r["seed"]]["final_train"] for r in paired]
            if train:  # runs since the train metric was recorded
                line += (f"; train: final / reference's {_spread(train, '.3f')}, lower on "
                         f"{sum(q < 1 for q in train)} of {len(train)}")
        print(line)


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("reference")
    cli.add_argument("grown")
    cli.add_argument("--ref-arm", default="full", choices=ARMS)
    cli.add_argument("--by", default="cpu", choices=["cpu", "steps", "block-steps"],
                     help="measure the speed-up in CPU seconds (default), optimizer steps or block-steps")
    a = cli.parse_args()
    main(a.reference, a.grown, a.ref_arm, a.by)
