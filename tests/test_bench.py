"""``adaptive-depth bench --quick`` end to end: runs, writes JSON/markdown/PNG, keeps foreign JSON keys."""
import importlib.util
import json
import pathlib

import pytest

from adaptive_depth import bench
from adaptive_depth.cli import main


def test_quick_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    earlier = [_record("mnist1d", rule, s, 1.0) for rule in ("uniform", "equal_distance") for s in (0, 1)]
    out.write_text(json.dumps({"benchmarks": [{"name": "kept"}],  # as pytest-benchmark writes it
                               "convergence": {"runs": earlier, "meta": []}}))  # another task's command
    assert main(["bench", "--quick", "--rules", "uniform", "equal_distance", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["benchmarks"] == [{"name": "kept"}]
    conv = doc["convergence"]
    runs = [r for r in conv["runs"] if r["data"] == "teacher"]
    kept = [r for r in conv["runs"] if r["data"] == "mnist1d"]
    assert [r["test_loss"] for r in kept] == [r["test_loss"] for r in earlier]
    assert {(r["lt"], r["rule"], r["seed"]) for r in runs} == \
        {(lt, rule, s) for lt in (0.0, 10.0) for rule in ("uniform", "equal_distance") for s in (0, 1)}
    for r in runs:
        assert r["train_loss"] > 0 and r["test_loss"] > 0
        assert abs(sum(r["final_steps"]) - 1.0) < 1e-5
        # auto target = the worst final train loss of the cell: every run reaches it
        assert r["steps_to_target"] is not None and r["steps_to_target"] <= 40
    rows = {(r["lt"], r["rule"]): r for r in conv["summary"] if r["data"] == "teacher"}
    assert len(rows) == 4
    for (lt, rule), row in rows.items():
        assert row["seeds"] == 2
        assert row["test_loss"]["min"] <= row["test_loss"]["median"] <= row["test_loss"]["max"]
        if rule == "uniform":
            assert row["test_ratio"]["median"] == pytest.approx(1.0)
    assert "### teacher" in conv["table_markdown"] and "### mnist1d" in conv["table_markdown"]
    assert "equal_distance" in conv["table_markdown"]
    assert conv["meta"][-1]["command"].startswith("adaptive-depth bench")
    assert (tmp_path / "bench.md").read_text().startswith("# uniform vs adaptive")
    assert (tmp_path / "bench.png").stat().st_size > 1000

    (tmp_path / "bench.md").unlink()
    assert main(["bench", "--from-json", "--json", str(out)]) == 0  # no training: the same table again
    again = json.loads(out.read_text())["convergence"]
    assert again["table_markdown"] == conv["table_markdown"] and again["runs"] == conv["runs"]
    assert (tmp_path / "bench.md").exists()


def _record(data, rule, seed, loss, steps=10):
    return {"data": data, "lt": 1.0, "rule": rule, "seed": seed, "data_seed": seed, "train_loss": 1.0,
            "test_loss": loss, "test_error": loss, "steps_to_target": steps, "seconds_to_target": None,
            "seconds_per_step": 0.01, "target": 1.0,
            "curve": {"step": [0, 10], "train_loss": [2.0, 1.0], "test_loss": [2.0, loss], "seconds": [0.0, 0.1]}}


def test_summary_statistics():
    recs = [_record("t", rule, s, loss, steps)
            for rule, losses, steps in (("uniform", (1.0, 2.0, 4.0), (10, 20, 30)),
                                        ("ad", (0.5, 2.0, 2.0), (10, None, 30)))
            for s, loss, steps in zip(range(3), losses, steps)]
    rows = {r["rule"]: r for r in bench.summarize(recs)}
    assert rows["ad"]["test_loss"] == {"median": 2.0, "min": 0.5, "max": 2.0, "n": 3, "missing": 0}
    assert rows["ad"]["test_ratio"]["median"] == pytest.approx(0.5)  # paired: 0.5, 1.0, 0.5
    assert rows["ad"]["test_ratio"]["max"] == pytest.approx(1.0)
    assert rows["ad"]["steps_to_target"]["missing"] == 1
    # paired: first step with test loss <= uniform's final (ad's curves: 2.0 at step 0, then its loss)
    assert rows["ad"]["steps_to_baseline_test"] == {"median": 0, "min": 0, "max": 10, "n": 3, "missing": 0}
    assert rows["ad"]["within_baseline_spread"] is True
    assert "1 miss" in bench.tables(list(rows.values()))


def test_task_settings():
    assert bench.task_settings("teacher") == {"n_train": 1000, "batch_size": None}
    assert bench.task_settings("mnist1d") == {"n_train": 4000, "batch_size": 500}
    assert bench.task_settings("mnist1d", 1000, 1000) == {"n_train": 1000, "batch_size": 1000}


def test_merge_replaces_only_the_same_runs():
    def meta(rules, seeds):
        return {"args": {"data": ["t"], "rules": rules, "lt": [1.0], "seeds": seeds, "data_seeds": None}}

    old = [_record("t", "uniform", 0, 1.0), _record("t", "uniform", 1, 2.0), _record("t", "ad", 0, 3.0)]
    new = [_record("t", "uniform", 1, 5.0), _record("t", "uniform", 2, 6.0)]
    runs, metas = bench.merge(old, [meta(["uniform", "ad"], [0, 1]), meta(["uniform"], [1])], new)
    assert sorted((r["rule"], r["seed"], r["test_loss"]) for r in runs) == \
        [("ad", 0, 3.0), ("uniform", 0, 1.0), ("uniform", 1, 5.0), ("uniform", 2, 6.0)]
    assert [m["args"]["seeds"] for m in metas] == [[0, 1]]  # the second command's only run was redone


# ----------------------------------------------------------------- the task family's suite (--suite)
from adaptive_depth.experiments import suite  # noqa: E402


def _unit(seed, lr, val, test, rule="uniform", opt="adam"):
    return {"seed": seed, "optimizer": opt, "lt": 12.0, "rule": rule, "lr": lr, "val_loss": val,
            "test_loss": test, "train_loss": val, "test_error": test, "seconds_per_step": 0.01,
            "curve": {"step": [0, 4], "train_loss": [2.0, val], "test_loss": [2.0, test], "seconds": [0, 1]}}


def test_suite_selects_the_lr_by_validation_never_by_test():
    picked = suite.select([_unit(1000, 1e-3, 0.5, 0.1), _unit(1000, 1e-2, 0.4, 0.9),
                           _unit(1001, 1e-3, float("inf"), float("nan")), _unit(1001, 1e-2, 0.3, 0.3)])
    by_seed = {r["seed"]: r for r in picked}
    assert by_seed[1000]["lr"] == 1e-2 and by_seed[1000]["test_loss"] == 0.9  # the worse test loss: val decides
    assert by_seed[1001]["lr"] == 1e-2
    assert [s["lr"] for s in by_seed[1000]["lr_search"]] == [1e-3, 1e-2]
    assert all(r["data"] == "adam" and r["data_seed"] == r["seed"] for r in picked)
    # every lr of a cell diverged: no record for it
    assert suite.select([{**_unit(1002, 1e-3, float("inf"), 0.0), "diverged": "x"}]) == []


def test_suite_guard_refuses_heldout_tasks_for_tuning():
    with pytest.raises(ValueError, match="not a tuning seed"):
        suite.run_suite(suite.SuiteConfig(split="tuning", seeds=[1000], optimizers=["adam"], lts=[1.0]))
    with pytest.raises(ValueError, match="optimizers must be among"):
        suite.run_suite(suite.SuiteConfig(split="tuning", seeds=[0], optimizers=["adagrad"]))


def test_suite_end_to_end_and_merge(tmp_path):
    out = tmp_path / "suite.json"
    common = ["bench", "--suite", "tuning", "--tasks", "1", "--first-task", "6", "--lt", "4", "--budget", "4",
              "--eval-every", "2", "--json", str(out)]
    assert main(common + ["--optimizers", "adam"]) == 0
    assert main(common + ["--optimizers", "sgd"]) == 0
    doc = json.loads(out.read_text())["suite"]
    runs = doc["runs"]
    assert {(r["data"], r["rule"]) for r in runs} == {(o, a) for o in ("adam", "sgd")
                                                      for a in ("uniform", "equal_distance")}
    for r in runs:
        assert r["seed"] == 6 and r["spec"]["split"] == "tuning" and r["lt"] == 4.0
        assert len(r["lr_search"]) == len(suite.LR_GRIDS[r["data"]])
        assert r["val_loss"] == min(s["val_loss"] for s in r["lr_search"])
        assert r["curve"]["step"] == [0, 2, 4]
    assert len(doc["meta"]) == 2 and "### adam" in doc["table_markdown"] and "### sgd" in doc["table_markdown"]
    assert (tmp_path / "suite.md").read_text().count("adaptive-depth bench --suite tuning") == 2

    # --combine: no training, the same runs from two files (one of them a subset) give the same table
    part = tmp_path / "part.json"
    part.write_text(json.dumps({"suite": {**doc, "runs": [r for r in runs if r["data"] == "sgd"]}}))
    both = tmp_path / "both.json"
    assert main(["bench", "--suite", "tuning", "--combine", str(part), str(out), "--json", str(both)]) == 0
    again = json.loads(both.read_text())["suite"]
    assert sorted(map(json.dumps, again["runs"])) == sorted(map(json.dumps, runs))
    assert again["table_markdown"] == doc["table_markdown"]


def test_suite_lr_grid_override_and_edge_report(tmp_path, capsys):
    cfg = suite.SuiteConfig(split="tuning", seeds=[0], optimizers=["adam", "sgd"], lrs=[3e-2, 1e-3, 1e-2])
    assert suite.lr_grid(cfg, "adam") == suite.lr_grid(cfg, "sgd") == [1e-3, 1e-2, 3e-2]
    assert suite.lr_grid(suite.SuiteConfig(), "sgd") == sorted(suite.LR_GRIDS["sgd"])
    for bad in ([], [0.0], [-1e-3], [float("nan")]):
        with pytest.raises(ValueError, match="lrs must be positive"):
            suite.run_suite(suite.SuiteConfig(split="tuning", seeds=[0], optimizers=["adam"], lrs=bad))
    picked = suite.select([_unit(0, lr, val, 0.1) for lr, val in ((1e-3, 0.5), (1e-2, 0.4), (3e-2, 0.6))]
                          + [_unit(1, lr, val, 0.1) for lr, val in ((1e-3, 0.5), (1e-2, 0.6), (3e-2, 0.4))])
    assert [r["seed"] for r in suite.on_edge(picked)] == [1]  # task 1 picked the top of its grid

    out = tmp_path / "suite.json"
    assert main(["bench", "--suite", "tuning", "--tasks", "1", "--first-task", "6", "--lt", "4", "--budget", "2",
                 "--eval-every", "2", "--optimizers", "adam", "--rules", "uniform", "--lrs", "1e-3", "2e-3", "4e-3",
                 "--json", str(out)]) == 0
    doc = json.loads(out.read_text())["suite"]
    assert [s["lr"] for s in doc["runs"][0]["lr_search"]] == [1e-3, 2e-3, 4e-3]
    assert doc["meta"][0]["lr_grids"] == {"adam": [1e-3, 2e-3, 4e-3]}
    assert "lr picks on the edge of their grid" in capsys.readouterr().out


def test_suite_extend_grid_unions_the_searches_of_a_cell():
    old = suite.select([_unit(0, 1e-2, 0.4, 0.1), _unit(0, 3e-2, 0.3, 0.2), _unit(1, 1e-2, 0.5, 0.5)])
    new = suite.select([_unit(0, 1e-1, 0.2, 0.7)])
    merged, _ = suite._merge_existing_records(old, new, extend=True)
    cell = {r["seed"]: r for r in merged}
    assert cell[0]["lr"] == 1e-1 and cell[0]["test_loss"] == 0.7  # the lower validation loss wins
    assert [s["lr"] for s in cell[0]["lr_search"]] == [1e-2, 3e-2, 1e-1]
    assert cell[1]["lr"] == 1e-2  # untouched cell kept
    worse = suite.select([_unit(0, 1e-3, 0.9, 0.0)])
    kept, _ = suite._merge_existing_records(old, worse, extend=True)
    assert {r["seed"]: r for r in kept}[0]["lr"] == 3e-2
    replaced, _ = suite._merge_existing_records(old, worse)  # without extend: the new cell replaces the old
    assert {r["seed"]: r for r in replaced}[0]["lr"] == 1e-3


def test_extend_grid_counts_diverged_lrs_as_bracketing_the_pick():
    old = suite.select([_unit(0, 1e-2, 0.4, 0.1), _unit(0, 3e-2, 0.3, 0.2), _unit(1, 1e-2, 0.5, 0.5),
                        _unit(1, 3e-2, 0.4, 0.4)])
    assert [r["seed"] for r in suite.on_edge(old)] == [0, 1]  # both picked the top of their grid
    added = [{**_unit(0, 1e-1, float("inf"), float("nan")), "diverged": "loss is nan"},
             {**_unit(1, 1e-1, float("inf"), float("nan")), "diverged": "loss is nan"}, _unit(1, 3e-1, 0.45, 0.1)]
    new, searches = suite.select(added), suite.diverged_searches(added)
    assert [s["seed"] for s in searches] == [0] and searches[0]["lr_search"][0]["diverged"]
    merged, _ = suite._merge_existing_records(old, new, extend=True, searches=searches)
    cell = {r["seed"]: r for r in merged}
    assert cell[0]["lr"] == 3e-2 and cell[0]["test_loss"] == 0.2  # the run is the earlier pick's
    assert [(s["lr"], s["diverged"]) for s in cell[0]["lr_search"]] == [(1e-2, False), (3e-2, False), (1e-1, True)]
    assert [s["lr"] for s in cell[1]["lr_search"]] == [1e-2, 3e-2, 1e-1, 3e-1] and cell[1]["lr"] == 3e-2
    assert suite.on_edge(merged) == []  # both picks now have a higher lr in their search
    without, _ = suite._merge_existing_records(old, new, extend=True)  # as before: the diverged search is lost
    assert [r["seed"] for r in suite.on_edge(without)] == [0]
    alone, _ = suite._merge_existing_records([], new, extend=True, searches=searches)
    assert [r["seed"] for r in alone] == [1]  # a search with no earlier run adds no cell


def _lt_headroom():
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "lt_headroom.py"
    spec = importlib.util.spec_from_file_location("lt_headroom", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lt_headroom_picks_each_tasks_lt_by_validation_and_pairs_the_ratios(tmp_path, capsys):
    """benchmarks/lt_headroom.py: per task the Lt with the lowest validation loss (not test), every ratio over the
    reference Lt's test loss, tasks missing an Lt left out; a cell that differs between two files is refused."""
    mod = _lt_headroom()

    def run(seed, lt, val, test, rule="uniform", lr=0.01):
        return {"seed": seed, "lt": lt, "rule": rule, "optimizer": "adam", "lr": lr, "val_loss": val,
                "test_loss": test}
    a = [run(1000, 0.0, 1.0, 2.0), run(1000, 24.0, 2.0, 1.0),   # validation prefers Lt 0 though its test is worse
         run(1001, 0.0, 3.0, 3.0), run(1001, 24.0, 1.0, 4.0), run(1001, 0.0, 0.0, 0.0, rule="fine_ends"),
         run(1002, 0.0, 1.0, 1.0)]                              # no Lt 24 run: left out
    b = [run(1001, 24.0, 1.0, 4.0), run(1000, 3.0, 5.0, 0.5), run(1001, 3.0, 0.5, 2.0)]
    for name, runs in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps({"suite": {"runs": runs}}))
    rows = mod.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--ref", "24"])
    assert [r["task"] for r in rows] == [1000, 1001]
    assert [r["oracle_lt"] for r in rows] == [0.0, 3.0]
    assert rows[0]["oracle_ratio"] == pytest.approx(2.0) and rows[1]["oracle_ratio"] == pytest.approx(0.5)
    assert rows[0]["ratio"] == pytest.approx({0.0: 2.0, 3.0: 0.5, 24.0: 1.0})
    out = capsys.readouterr().out
    assert "| 1000 | 2 * | 0.5 | 1 | 0 |" in out and "oracle" in out
    with pytest.raises(SystemExit, match="--ref 12"):
        mod.main([str(tmp_path / "a.json"), "--ref", "12"])
    (tmp_path / "c.json").write_text(json.dumps({"suite": {"runs": [run(1000, 0.0, 1.0, 2.5)]}}))
    with pytest.raises(SystemExit, match="differs"):
        mod.main([str(tmp_path / "a.json"), str(tmp_path / "c.json")])
