"""``adaptive-depth paper fig1|fig2 --quick`` end to end: tables, JSON and plots exist and make sense."""
import json
import math

import pytest
import torch

from adaptive_depth.cli import main
from adaptive_depth.data import teacher
from adaptive_depth.paper import paper_model
from adaptive_depth.train import RunConfig

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _json(path):
    with open(path) as fh:
        return json.load(fh)


def test_fig1_quick(tmp_path, capsys):
    assert main(["paper", "fig1", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "-2H/Lt median" in capsys.readouterr().out
    for name in ("fig1.json", "fig1.md", "fig1.png", "fig1_layers_Lt6.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "fig1.png").read_bytes()[:8] == PNG
    data = _json(tmp_path / "fig1.json")
    assert [r["Lt"] for r in data["rows"]] == [1.0, 6.0]
    for row, run in zip(data["rows"], data["runs"]):
        hist = run["run"]["history"]["train_loss"]
        assert math.isfinite(hist[-1]) and hist[-1] < hist[0]  # it trained
        assert row["-2H/Lt min"] <= row["-2H/Lt median"] <= row["-2H/Lt max"]
        assert row["min COI"] > 0 and row["min COI_g"] > 0
        layers = run["diagnostics"]["layers"]
        assert len(layers) == 8 + 1 and layers[-1]["depth"] == pytest.approx(1.0, abs=1e-6)
    assert data["meta"]["settings"]["depth"] == 8 and data["meta"]["seconds"] > 0


def test_fig2_quick(tmp_path):
    assert main(["paper", "fig2", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    for name in ("fig2.json", "fig2.md", "fig2.png"):
        assert (tmp_path / name).stat().st_size > 0
    data = _json(tmp_path / "fig2.json")
    rules = ["uniform", "irregular", "paper", "equal_distance", "learned"]
    assert [(r["L"], r["rule"]) for r in data["rows"]] == [(d, r) for d in (4, 6) for r in rules]
    assert len(data["runs"]) == 2 * 5 * 2
    for run in data["runs"]:
        assert math.isfinite(run["test_loss"]) and run["history"]["train_loss"][-1] < run["history"]["train_loss"][0]
        assert sum(run["final_steps"]) == pytest.approx(1.0, rel=1e-5)
    profile = {run["rule"]: run["final_steps"] for run in data["runs"] if run["depth"] == 6 and run["seed"] == 0}
    assert profile["uniform"] == pytest.approx([1 / 6] * 6, rel=1e-5)
    assert profile["irregular"][2] > profile["irregular"][0]  # the fixed profile is larger mid-way
    assert profile["paper"] != pytest.approx([1 / 6] * 6, rel=1e-4)  # the adaptive rules moved the steps
    uniform = [r for r in data["rows"] if r["rule"] == "uniform"]
    assert all(r["vs uniform"] is None for r in uniform)


def test_paper_model_fixed_io_is_zero_padding():
    task = teacher((30, 3, 30), n_train=8, n_test=8)
    config = RunConfig(width=40, depth=3, effective_depth=2.0, scheme="euler")
    model = paper_model(config, task, "fixed")
    x = task.x_train
    assert torch.equal(model.input(x), torch.cat([x, torch.zeros(8, 10)], 1))
    h = torch.randn(8, 40)
    assert torch.equal(model.output(h), h[:, :30])
    assert not any(p.requires_grad for p in (*model.input.parameters(), *model.output.parameters()))
    assert all(p.requires_grad for p in paper_model(config, task, "free").parameters() if p.dim() == 2)
    with pytest.raises(ValueError, match="width"):
        paper_model(RunConfig(width=20, depth=3), task, "fixed")
    with pytest.raises(ValueError, match="io"):
        paper_model(config, task, "bogus")


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="--lts"):
        main(["paper", "fig1", "--quick", "--lts", "0", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--seeds"):
        main(["paper", "fig2", "--quick", "--seeds", "0", "--out", str(tmp_path)])
