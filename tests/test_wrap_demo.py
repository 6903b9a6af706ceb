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
