"""``adaptive-depth paper fig1|fig2 --quick`` end to end: tables, JSON and plots exist and make sense."""
import json
import math

import pytest
import torch

from adaptive_depth.cli import main
from adaptive_depth.data import Task, teacher
from adaptive_depth.diagnostics import diagnose
from adaptive_depth.paper import converge, paper_model
from adaptive_depth.train import RunConfig

PNG = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.usefixtures("torch_one_thread")


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
        # the L-BFGS phase ran in float64 on the regularised cost, and the stationarity it read off the gradient
        # is the one diagnose computes from the momenta afterwards
        conv = run["run"]["lbfgs"]
        assert conv["dtype"] == "float64" and 0 < conv["iteration"] <= 100 and row["L-BFGS its"] == conv["iteration"]
        costs = [h["cost"] for h in conv["history"]]
        assert all(b <= a for a, b in zip(costs, costs[1:])) and costs[-1] < costs[0]
        assert conv["stationarity_max"] == pytest.approx(row["stationarity"], rel=1e-6)
        assert row["test loss"] == pytest.approx(run["run"]["test_loss"])
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
        conv = run["lbfgs"]  # Adam, then L-BFGS with the steps frozen; the final losses are after it
        assert conv["dtype"] == "float32" and conv["iteration"] <= 50 and conv["stop"] in ("max_iter", "stalled")
        assert conv["history"][-1]["test_loss"] == pytest.approx(run["test_loss"], rel=1e-6)
        assert run["train_loss"] == pytest.approx(conv["data_cost"], rel=1e-5)
        assert run["train_loss"] < run["history"]["train_loss"][-1]
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


def _small_paper_net(seed=0, lt=2.0, depth=4, width=6, n=24):
    """The paper's form (fixed zero-padding input, output = first coordinates) on positive data, where the
    ReLUs stay active and the cost is smooth near the critical point L-BFGS finds."""
    g = torch.Generator().manual_seed(seed)
    x = 1 + torch.rand(2 * n, 3, generator=g)
    y = 1.5 * x @ torch.rand(3, 3, generator=g) / 3 + 0.5
    task = Task("positive", x[:n], y[:n], x[n:], y[n:], "mse")
    config = RunConfig(width=width, depth=depth, effective_depth=lt, scheme="euler", seed=seed)
    return paper_model(config, task, "fixed"), task


def test_converge_reaches_a_critical_point_and_agrees_with_diagnose():
    """L-BFGS in float64 on a small paper-form net: the stationarity it reads off the gradient is the field
    ``diagnose`` computes from the momenta (two independent routes), it falls below the target, the cost falls
    monotonically, and the steps stay frozen."""
    torch.manual_seed(0)
    model, task = _small_paper_net()
    before = model.step_sizes().double()
    lam = 0.05
    out = converge(model, task.x_train, task.y_train, lam, max_iter=4000, tol=1e-6, dtype=torch.float64,
                   history_size=50)
    assert out["stop"] == "tol" and out["converged"], out["stationarity_max"]
    assert out["stationarity_max"] < 1e-6 and out["dtype"] == "float64"
    costs = [h["cost"] for h in out["history"]]
    assert all(b <= a for a, b in zip(costs, costs[1:]))
    assert torch.equal(model.step_sizes().double(), before) and not model.steps.rho.requires_grad
    assert next(model.parameters()).dtype == torch.float64
    d = diagnose(model, task.x_train, task.y_train, lam=lam)
    assert d.bottleneck()["stationarity_max"] == pytest.approx(out["stationarity_max"], rel=1e-3, abs=1e-9)
    # away from the critical point the two routes agree to rounding
    model2, _ = _small_paper_net(seed=1)
    mid = converge(model2, task.x_train, task.y_train, lam, max_iter=20, dtype=torch.float64)
    d2 = diagnose(model2, task.x_train, task.y_train, lam=lam)
    assert mid["stop"] == "max_iter" and mid["iteration"] == 20 and not mid["converged"]
    assert d2.bottleneck()["stationarity_max"] == pytest.approx(mid["stationarity_max"], rel=1e-8)
    stat = sorted(v for v in d2.column("stationarity") if v is not None)
    assert stat[len(stat) // 2] == pytest.approx(mid["stationarity_median"], rel=1e-8)


def test_converge_errors():
    with pytest.raises(ValueError, match="step sizes"):
        converge(torch.nn.Linear(3, 3), torch.randn(4, 3), torch.randn(4, 3), 0.1, max_iter=5)
