"""Growth runs against the full arm of another ``adaptive-depth grow`` JSON, paired by seed.

Used for docs/depth.md (Growth 6): growth to 16 blocks measured against the 8-block full net of growth3 (the same
seeds, width and settings). Target: the reference's median final accuracy minus 1 point; speed-up: the reference's
CPU seconds to the target over the arm's, per seed; a seed whose run never reaches the target counts as a miss.

    python benchmarks/growth_vs_reference.py REFERENCE.json GROWN.json
"""
import json
import statistics
import sys


def _spread(values, fmt):
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}, {max(values):{fmt}}]"


def main(reference: str, grown: str) -> None:
    ref = {r["seed"]: r for r in json.load(open(reference))["runs"] if r["arm"] == "full"}
    runs = json.load(open(grown))["runs"]
    target = statistics.median(r["final"] for r in ref.values()) - 0.01

    def cpu_to_target(run):
        return next((c[4] for c in run["curve"] if c[3] >= target - 1e-9), None)

    print(f"target: the reference's median final minus 1 point = {100 * target:.1f}")
    for arm in ("full", "uniform", "adaptive"):
        rows = [r for r in runs if r["arm"] == arm]
        if not rows:
            continue
        speed = [cpu_to_target(ref[r["seed"]]) / cpu_to_target(r) if cpu_to_target(r) else None for r in rows]
        got = [s for s in speed if s]
        final = [100 * (r["final"] - ref[r["seed"]]["final"]) for r in rows]
        line = (f"{arm:9s}: final - reference {_spread(final, '+.1f')}"
                f", CPU / reference's {_spread([r['cpu_s'] / ref[r['seed']]['cpu_s'] for r in rows], '.2f')}"
                f", speed-up to the target {_spread(got, '.2f') if got else '-'} on {len(got)} of {len(speed)}")
        if len(got) < len(speed):
            line += f" (median with misses as 0: {statistics.median([s or 0 for s in speed]):.2f})"
        print(line)


if __name__ == "__main__":
    main(*sys.argv[1:3])
