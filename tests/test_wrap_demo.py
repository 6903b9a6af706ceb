"""The wrap demo (``adaptive-depth wrap-demo``): its embedded shapes task and its run."""
import math

import pytest
import torch

pytest.importorskip("torchvision")


def test_shapes_task_is_seeded_and_balanced():
    from adaptive_depth.experiments.wrap_demo import CLASSES, shapes
    x, y = shapes(64, seed=3)
    x2, y2 = shapes(64, seed=3)
    assert x.shape == (64, 3, 32, 32) and torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.bincount(y, minlength=len(CLASSES)).tolist() == [8] * len(CLASSES)
    assert not torch.equal(shapes(64, seed=4)[0], x)
    # classes differ in their pixels, not only in their labels
    means = torch.stack([x[y == c].std(dim=(0, 1)).mean() for c in range(len(CLASSES))])
    assert means.std() > 0


def test_wrap_demo_runs_and_prints_the_table(capsys, tmp_path):
    import argparse
    import json
    from adaptive_depth.experiments import wrap_demo
    parser = argparse.ArgumentParser()
    wrap_demo.add_arguments(parser)
    out_json = tmp_path / "runs.json"
    args = parser.parse_args(["--steps", "4", "--batch-size", "8", "--train-size", "32", "--test-size", "16",
                              "--every", "2", "--plain", "--json", str(out_json)])
    assert wrap_demo.run(args) == 0
    out = capsys.readouterr().out
    for word in ("plain", "uniform", "adaptive", "test acc", "ms/step", "layer1:"):
        assert word in out
    runs = {r["config"]: r for r in json.loads(out_json.read_text())["runs"]}
    assert runs["uniform"]["steps"]["layer1"] == [1.0, 1.0]
    assert runs["adaptive"]["steps"]["layer1"] != [1.0, 1.0]
    assert wrap_demo.run(parser.parse_args(["--steps", "0"])) == 2


@pytest.mark.parametrize("init", ["balanced", "identity"])
def test_wrap_demo_large_lt_inits(capsys, tmp_path, init):
    import argparse
    import json
    from adaptive_depth.experiments import wrap_demo
    parser = argparse.ArgumentParser()
    wrap_demo.add_arguments(parser)
    out_json = tmp_path / "runs.json"
    args = parser.parse_args(["--steps", "3", "--batch-size", "8", "--train-size", "32", "--test-size", "16",
                              "--lt", "2", "--scheme", "exponential", "--init", init, "--json", str(out_json)])
    assert wrap_demo.run(args) == 0
    assert f"init {init}" in capsys.readouterr().out
    runs = json.loads(out_json.read_text())["runs"]
    assert all(math.isfinite(r["train_loss"]) for r in runs)
    assert wrap_demo.run(parser.parse_args(["--init", "identity", "--lt", "0"])) == 2


def test_wrap_demo_arms_selects_the_runs(tmp_path):
    """``--arms plain`` makes only the plain run, with the same numbers it has next to the other arms (one arm of
    an lr search); ``--plain`` puts plain first; an unknown arm is refused by the parser."""
    import argparse
    import json
    from adaptive_depth.experiments import wrap_demo
    parser = argparse.ArgumentParser()
    wrap_demo.add_arguments(parser)
    small = ["--steps", "3", "--batch-size", "8", "--train-size", "32", "--test-size", "16"]
    both, alone = tmp_path / "both.json", tmp_path / "alone.json"
    assert wrap_demo.run(parser.parse_args(small + ["--plain", "--json", str(both)])) == 0
    assert wrap_demo.run(parser.parse_args(small + ["--arms", "plain", "--json", str(alone)])) == 0
    runs_both = json.loads(both.read_text())["runs"]
    runs_alone = json.loads(alone.read_text())["runs"]
    assert [r["config"] for r in runs_both] == ["plain", "uniform", "adaptive"]
    assert [r["config"] for r in runs_alone] == ["plain"]
    for key in ("train_loss", "test_loss", "train_acc", "test_acc"):
        assert runs_alone[0][key] == runs_both[0][key]
    assert wrap_demo.arms(parser.parse_args(["--arms", "adaptive", "uniform", "adaptive", "--plain"])) == \
        ("plain", "adaptive", "uniform")
    with pytest.raises(SystemExit):
        parser.parse_args(["--arms", "wide"])


@pytest.mark.parametrize("argv, message", [
    (["--lr", "0"], "--lr must be a finite number > 0"), (["--lr", "inf"], "--lr must be a finite number > 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0"), (["--ramp", "-1"], "--ramp must be >= 0"),
    (["--init", "identity", "--lt", "0"], "--init identity needs --lt > 0")])
def test_wrap_demo_refuses_bad_arguments_by_name(capsys, argv, message):
    import argparse
    from adaptive_depth.experiments import wrap_demo
    parser = argparse.ArgumentParser()
    wrap_demo.add_arguments(parser)
    assert wrap_demo.run(parser.parse_args(argv)) == 2
    assert message in capsys.readouterr().out
