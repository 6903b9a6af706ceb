"""The task family: reproducible draws, the tuning/held-out guard, the bottleneck the teacher claims, and
the recipe's parameter groups."""
import json
import math

import pytest
import torch

from adaptive_depth import AdaptiveSteps
from adaptive_depth.experiments import tasks
from adaptive_depth.experiments.train import RunConfig, make_optimizer, run
from adaptive_depth.recipes import bottleneck_param_groups, middle_rank, representation_ranks
from adaptive_depth.residual import LeakyMLP


def test_split_guard_refuses_the_other_split():
    tasks.draw(0, "tuning"), tasks.draw(1000, "heldout")
    for seed, split in ((1000, "tuning"), (99, "heldout"), (100, "tuning"), (-1, "tuning"), (2000, "heldout")):
        with pytest.raises(ValueError, match=f"not a {split} seed"):
            tasks.draw(seed, split)
    with pytest.raises(ValueError, match="split must be one of"):
        tasks.draw(0, "test")
    with pytest.raises(ValueError, match="not a tuning seed"):
        tasks.make_task(tasks.FamilySpec(**{**tasks.spec_for(1000, "heldout").to_dict(), "split": "tuning"}))
    assert tasks.split_seeds("heldout", 3) == [1000, 1001, 1002]
    assert tasks.split_seeds("tuning", 2, start=5) == [5, 6]
    assert not set(tasks.TUNING_SEEDS) & set(tasks.HELDOUT_SEEDS)


def test_draws_are_reproducible_and_varied():
    a, b = tasks.draw(7, "tuning"), tasks.draw(7, "tuning")
    assert a[0] == b[0]
    for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert torch.equal(getattr(a[1], name), getattr(b[1], name))
    specs = [tasks.spec_for(s, "tuning") for s in range(40)]
    for field in ("in_dim", "out_dim", "rank", "nonlinearity", "noise", "n_train", "width", "depth", "batch_size"):
        assert len({getattr(s, field) for s in specs}) >= 2, field
    assert {s.rank for s in specs} <= set(range(1, 7))


@pytest.mark.parametrize("seed,split", [(0, "tuning"), (3, "tuning"), (11, "tuning"), (1001, "heldout")])
def test_teacher_has_the_bottleneck_it_claims(seed, split):
    """The teacher's Jacobian has rank exactly k* everywhere (float64 autograd at random points, singular
    values against a relative 1e-9), and the data are that teacher, standardised, plus the stated noise."""
    spec, task = tasks.draw(seed, split)
    assert task.x_train.shape == (spec.n_train, spec.in_dim) and task.y_val.shape == (spec.n_val, spec.out_dim)
    assert task.rank == spec.rank and task.loss == "mse"
    f, q, _ = tasks.teacher_function(spec)
    gen = torch.Generator().manual_seed(1)
    for x in torch.randn(4, spec.in_dim, generator=gen, dtype=torch.float64):
        s = torch.linalg.svdvals(torch.autograd.functional.jacobian(f, x))
        assert int((s > 1e-9 * s[0]).sum()) == spec.rank
        step = torch.randn(spec.in_dim, generator=gen, dtype=torch.float64)
        step -= q @ (q.T @ step)  # orthogonal to the k* directions: the output does not move
        torch.testing.assert_close(f(x + 3 * step), f(x))
    y = f(task.x_train.double())
    y = (y - y.mean(0)) / y.std(0)
    resid = task.y_train.double() - y
    assert float(resid.std()) == pytest.approx(spec.noise, abs=0.01 + 0.1 * spec.noise)


def test_bottleneck_param_groups_split_io_branches_and_steps():
    torch.manual_seed(0)
    model = LeakyMLP(5, 3, 8, 4, effective_depth=6.0, scheme="exponential")
    groups = bottleneck_param_groups(model, lr=1e-3, io_decay=0.1, branch_lr_scale="lt")
    io, branches = groups  # fixed steps are a buffer, not a parameter: no steps group
    assert {id(p) for p in io["params"]} == {id(p) for m in (model.input, model.output) for p in m.parameters()}
    assert io["weight_decay"] == 0.1 and branches["weight_decay"] == 0.0
    assert branches["lr"] == pytest.approx(6e-3) and len(branches["params"]) == 8
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    learned = LeakyMLP(5, 3, 8, 4, effective_depth=6.0, scheme="exponential", steps="learned")
    io, branches, steps = bottleneck_param_groups(learned, lr=1e-3)  # learned steps: their own group
    assert steps["params"] == [learned.steps.rho] and steps["weight_decay"] == 0.0
    assert bottleneck_param_groups(model, lr=1e-3, branch_lr_scale=2.5)[1]["lr"] == pytest.approx(2.5e-3)
    for kw, match in (({"lr": 0}, "lr must be"), ({"lr": float("inf")}, "lr must be a finite number > 0"),
                      ({"lr": True}, "lr must be"), ({"lr": 1e-3, "io_decay": -1}, "io_decay must be"),
                      ({"lr": 1e-3, "branch_lr_scale": "deep"}, "branch_lr_scale must be")):
        with pytest.raises(ValueError, match=match):
            bottleneck_param_groups(model, **kw)
    with pytest.raises(ValueError, match="no step sizes"):
        bottleneck_param_groups(torch.nn.Linear(2, 2), lr=1e-3)


def test_io_decay_is_the_l2_penalty_under_adam():
    """One Adam step on the groups equals one Adam step on loss + io_decay/2 ||W_io||^2 (written out)."""
    torch.manual_seed(0)
    a = LeakyMLP(4, 2, 6, 3, effective_depth=2.0, scheme="exponential")
    b = LeakyMLP(4, 2, 6, 3, effective_depth=2.0, scheme="exponential")
    b.load_state_dict(a.state_dict())
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    opt_a = torch.optim.Adam(bottleneck_param_groups(a, lr=1e-2, io_decay=0.3), lr=1e-2)
    opt_b = torch.optim.Adam(b.parameters(), lr=1e-2)
    ((a(x) - y) ** 2).mean().backward()
    penalty = 0.15 * sum((p ** 2).sum() for m in (b.input, b.output) for p in m.parameters())
    (((b(x) - y) ** 2).mean() + penalty).backward()
    opt_a.step(), opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


def test_representation_ranks_against_a_plain_svd():
    torch.manual_seed(1)
    model = LeakyMLP(6, 2, 10, 4, effective_depth=3.0, scheme="exponential")
    x = torch.randn(64, 6)
    ranks = representation_ranks(model, x, threshold=0.1)
    assert len(ranks) == 5
    h = model.input(x).double()
    s = torch.linalg.svdvals(h - h.mean(0))
    assert ranks[0] == int((s > 0.1 * s[0]).sum())
    # a rank-2 input layer gives a rank-2 first representation
    with torch.no_grad():
        model.input.weight.copy_(torch.randn(10, 2) @ torch.randn(2, 6))
    assert representation_ranks(model, x)[0] == 2 and middle_rank(model, x) >= 1
    with pytest.raises(ValueError, match="threshold"):
        representation_ranks(model, x, threshold=1.5)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "lamb", "radam"])
def test_every_optimizer_of_the_matrix_trains(name):
    spec, task = tasks.draw(1, "tuning")
    config = RunConfig(width=16, depth=3, effective_depth=4.0, scheme="exponential", steps=30, lr=3e-3,
                       optimizer=name, eval_every=10, rule="equal_distance", schedule="cosine",
                       io_decay=0.01, branch_lr_scale="lt")
    result = run(config, task)
    assert len(result.history["val_loss"]) == len(result.history["step"]) == 4
    assert result.train_loss < result.history["train_loss"][0] and math.isfinite(result.test_loss)
    assert type(make_optimizer(config, LeakyMLP(2, 2, 4, 2))).__name__.lower() == name
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_optimizer(RunConfig(optimizer="adagrad"), LeakyMLP(2, 2, 4, 2))


def test_recipe_groups_work_inside_the_plugin():
    torch.manual_seed(0)
    model = LeakyMLP(4, 2, 8, 3, effective_depth=6.0, scheme="exponential")
    inner = torch.optim.Adam(bottleneck_param_groups(model, lr=1e-3, io_decay=0.01, branch_lr_scale="lt"), lr=1e-3)
    opt = AdaptiveSteps(inner, model, weight_decay=0.01 / 6)
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    for _ in range(12):
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(float(model.step_sizes().sum()) - 1.0) < 1e-5
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 6e-3])  # io, branches (steps: a buffer)


def test_bottleneck_recipes_map_to_the_documented_settings():
    from adaptive_depth.experiments.bottleneck import recipe_config
    c = recipe_config("c0.1+io+lt", 12.0, width=8)
    assert c.decay() == pytest.approx(0.1 / 12) and c.io_decay == 0.1 and c.branch_lr_scale == "lt"
    assert recipe_config("c0.1+io+lt", 0.0).decay() == pytest.approx(0.1)
    d = recipe_config("default", 12.0)
    assert d.decay() == pytest.approx(1e-3 / 12) and d.io_decay is None and d.branch_lr_scale == 1.0


def test_bottleneck_table_counts_the_goal_per_task():
    from adaptive_depth.experiments.bottleneck import table

    def row(seed, lt, recipe, rule, rank, train, test, k=2):
        return {"seed": seed, "k": k, "lt": lt, "recipe": recipe, "rule": rule, "middle_rank": rank,
                "middle_rank_1pct": rank + 1, "train_loss": train, "test_loss": test}
    rows = [row(1, 0.0, "default", "uniform", 9, 1.0, 2.0), row(1, 12.0, "r", "uniform", 3, 1.09, 1.0),
            row(2, 0.0, "default", "uniform", 9, 1.0, 2.0), row(2, 12.0, "r", "uniform", 3, 1.2, 1.0),  # underfits
            row(3, 0.0, "default", "uniform", 9, 1.0, 2.0), row(3, 12.0, "r", "uniform", 4, 0.5, 1.0),  # rank k*+2
            row(4, 12.0, "r", "uniform", 2, 0.5, 1.0),  # no Lt = 0 run: shown, not counted
            row(1, 12.0, "r", "uniform", 3, 1.05, 1.0)]  # a later row replaces the earlier one
    md = table(rows, "r", 12.0, ("uniform",))
    assert "met on 1 of 3 tasks" in md
    assert "| 1 | 2 | 0 | 9 / 1 / 2 | 3 (4) / +5.0% / -50.0% |" in md
    assert "| 4 | 2 | 0 | - | 2 (3) / 0.5 / 1 |" in md
    assert "noise-aware (train loss within 10% of Lt = 0's or at most the noise floor): met on 1 of 3" in md
    # task 2 (24 outputs, noise 0.1: floor 0.24) underfits Lt = 0 by 20% but sits below the floor: noise-aware, met
    low = [row(2, 0.0, "default", "uniform", 9, 0.1, 2.0), row(2, 12.0, "r", "uniform", 3, 0.12, 1.0),
           row(3, 0.0, "default", "uniform", 9, 0.1, 2.0), row(3, 12.0, "r", "uniform", 3, 0.21, 1.0),  # at 0.2
           row(5, 0.0, "default", "uniform", 9, 0.1, 2.0), row(5, 12.0, "r", "uniform", 4, 0.1, 1.0)]  # rank
    md = table(low, "r", 12.0, ("uniform",))
    assert "| 2 | 2 | 0.24 |" in md and "| 3 | 2 | 0.2 |" in md
    assert "met on 0 of 3 tasks" in md and "noise floor): met on 1 of 3 tasks" in md
    from adaptive_depth.experiments.bottleneck import noise_floor
    assert noise_floor(2) == pytest.approx(24 * 0.1 ** 2) and noise_floor(1) == 0.0 and noise_floor(500) is None
    assert noise_floor(1003) == pytest.approx(16 * 0.1 ** 2)
    assert noise_floor(2, 0.05) == pytest.approx(24 * 0.05 ** 2) and noise_floor(1, 0.1) == pytest.approx(
        tasks.spec_for(1, "tuning").out_dim * 0.01) and noise_floor(2, 0.0) == 0.0
    # rows trained under --noise carry their noise: the floor is theirs, not the task's own
    replaced = [dict(r, noise=0.0) for r in low]
    assert "| 2 | 2 | 0 |" in table(replaced, "r", 12.0, ("uniform",))


def test_finishing_phase_turns_the_penalty_off_or_down_and_trains_on():
    import dataclasses
    from adaptive_depth.experiments.bottleneck import recipe_config
    from adaptive_depth.experiments.train import finishing_config
    c = recipe_config("c0.1+io+lt+finish", 12.0, steps=40, finish_lr=1e-4)
    assert (c.finish_steps, c.finish_lr, c.decay()) == (40, 1e-4, pytest.approx(0.1 / 12))
    fin = finishing_config(c)
    assert (fin.decay(), fin.io_decay, fin.lr, fin.plugin["weight_decay"]) == (0.0, 0.0, 1e-4, 0.0)
    assert fin.branch_lr_scale == "lt" and recipe_config("c0.1+io+lt", 12.0).finish_steps == 0
    for bad in (dict(finish_steps=-1), dict(finish_steps=1.5), dict(finish_lr=0.0), dict(finish_keep=-0.1),
                dict(finish_keep=1.5), dict(finish_keep=math.nan), dict(finish_keep=True)):
        with pytest.raises(ValueError, match="finish_"):
            finishing_config(dataclasses.replace(c, **bad))
    kept = finishing_config(recipe_config("c0.1+io+lt+finish", 12.0, steps=40, finish_keep=0.25))
    assert (kept.decay(), kept.io_decay, kept.plugin["weight_decay"]) == pytest.approx((0.025 / 12, 0.025, 0.025 / 12))
    with pytest.raises(ValueError, match="finish_keep applies to a finish recipe"):
        recipe_config("c0.1+io+lt", 12.0, finish_keep=0.5)
    # a first phase at lr 0 changes nothing; the finish then equals plain Adam with finish_keep x the decays
    spec, task = tasks.draw(1, "tuning")
    for keep in (0.0, 0.5):
        config = RunConfig(width=8, depth=3, effective_depth=4.0, scheme="exponential", steps=2, lr=1e-12,
                           weight_decay=0.5, io_decay=0.5, branch_lr_scale="lt", eval_every=1, finish_steps=3,
                           finish_lr=1e-2, data_seed=1, finish_keep=keep)
        result = run(config, task, keep_model=True)
        assert result.history["step"] == [0, 1, 2, 3, 4, 5]
        torch.manual_seed(config.seed)
        ref = LeakyMLP(task.in_dim, task.out_dim, 8, 3, effective_depth=4.0, scheme="exponential")
        groups = bottleneck_param_groups(ref, lr=1e-2, io_decay=0.5 * keep, branch_lr_scale="lt")
        opt = AdaptiveSteps(torch.optim.Adam(groups, lr=1e-2), ref, weight_decay=0.5 * keep, rule="fixed")
        for _ in range(3):
            loss = task.loss_fn(ref(task.x_train), task.y_train)
            opt.zero_grad()
            loss.backward()
            opt.step()
        for p, q in zip(result.model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_bottleneck_table_cli_shows_the_rules_asked_for(tmp_path, capsys):
    from adaptive_depth.experiments.bottleneck import main
    rows = [{"seed": 1, "k": 2, "lt": lt, "recipe": recipe, "rule": "uniform", "middle_rank": rank,
             "middle_rank_1pct": rank, "train_loss": 1.0, "test_loss": 1.0}
            for lt, recipe, rank in ((0.0, "default", 9), (12.0, "c0.1+io+lt", 3))]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"rows": rows}))
    assert main(["--table", str(path), "--rules", "uniform"]) == 0
    only = capsys.readouterr().out
    assert "Lt = 12 uniform" in only and "equal_distance" not in only
    assert main(["--table", str(path)]) == 0  # the default: both rules, equal_distance's column empty here
    both = capsys.readouterr().out
    assert "Lt = 12 equal_distance" in both and "| 1 | 2 | 0 | 9 / 1 / 1 | 3 (3) / +0.0% / +0.0% | - |" in both


def _rank_one_mlp():
    """A LeakyMLP at Lt = 0 with zero branches, so every representation is the input layer's: rank 1 here."""
    torch.manual_seed(0)
    model = LeakyMLP(6, 3, 8, 4, effective_depth=0.0)
    with torch.no_grad():
        for block in model.blocks:
            block.block.linear.weight.zero_()
            block.block.linear.bias.zero_()
        model.input.weight.copy_(torch.outer(torch.randn(8), torch.randn(6)))
    return model, torch.randn(64, 6)


def _raise_rank(model):
    with torch.no_grad():
        model.input.weight.add_(torch.outer(torch.randn(8), torch.randn(6)))


def test_rank_guard_trips_when_the_rank_rises_and_restores_the_last_weights_that_held_it():
    from adaptive_depth.experiments.rank_guard import RankGuard
    model, x = _rank_one_mlp()
    guard = RankGuard(model, x, every=2)
    assert guard.reference == middle_rank(model, x) == 1
    assert [guard.step(), guard.step()] == [False, False]  # the check at 2 holds the rank
    held = model.input.weight.detach().clone()
    _raise_rank(model)
    assert middle_rank(model, x) == 2
    assert guard.step() is False  # no check at 3
    assert guard.step() is True and guard.tripped  # the check at 4 sees rank 2
    assert guard.step() is True and guard.history == [(0, 1), (2, 1), (4, 2)]  # measures nothing more
    assert guard.kept_at == 2
    assert guard.restore() is model
    torch.testing.assert_close(model.input.weight, held, rtol=0, atol=0)
    assert middle_rank(model, x) == 1


def test_rank_guard_checks_the_last_steps_at_the_end_and_honours_the_slack():
    from adaptive_depth.experiments.rank_guard import RankGuard
    model, x = _rank_one_mlp()
    guard = RankGuard(model, x, every=3)
    assert [guard.step() for _ in range(4)] == [False] * 4  # checked at 3 only
    held = model.input.weight.detach().clone()
    _raise_rank(model)  # after the last check: restore() must look again
    guard.restore()
    assert guard.history == [(0, 1), (3, 1), (4, 2)] and guard.tripped and guard.kept_at == 3
    torch.testing.assert_close(model.input.weight, held, rtol=0, atol=0)
    # an unchanged rank keeps the current weights, unchecked steps included
    model, x = _rank_one_mlp()
    guard = RankGuard(model, x, every=3)
    guard.step()
    with torch.no_grad():
        model.input.weight.mul_(2.0)  # same rank
    now = model.input.weight.detach().clone()
    guard.restore()
    assert not guard.tripped and guard.history == [(0, 1), (1, 1)]
    torch.testing.assert_close(model.input.weight, now, rtol=0, atol=0)
    # slack 1 lets the rank rise by one
    model, x = _rank_one_mlp()
    guard = RankGuard(model, x, every=1, slack=1)
    _raise_rank(model)
    assert guard.step() is False and guard.history == [(0, 1), (1, 2)] and guard.limit == 2


def test_rank_guard_refuses_bad_arguments_by_name():
    from adaptive_depth.experiments.rank_guard import RankGuard
    model, x = _rank_one_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for kwargs, name in ((dict(every=0), "every"), (dict(every=True), "every"), (dict(every=2.0), "every"),
                         (dict(threshold=0.0), "threshold"), (dict(threshold=1.0), "threshold"),
                         (dict(threshold=math.nan), "threshold"), (dict(slack=-1), "slack")):
        with pytest.raises(ValueError, match=name):
            RankGuard(model, x, **kwargs)
    with pytest.raises(TypeError, match="x must be a Tensor"):
        RankGuard(model, x.tolist())
    with pytest.raises(TypeError, match="LeakyMLP"):
        RankGuard(torch.nn.Linear(6, 6), x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_finish_guard_in_the_training_loop():
    from adaptive_depth.experiments.bottleneck import recipe_config
    spec, task = tasks.draw(1, "tuning")
    base = dict(width=8, depth=3, steps=20, lr=1e-2, eval_every=10, finish_steps=30, data_seed=1,
                data=spec.name, n_train=spec.n_train, n_test=spec.n_test)
    plain = run(recipe_config("c0.1+io+lt+finish", 4.0, **base), task)
    # a guard that cannot trip only watches: the same run to the last bit
    watched = run(recipe_config("c0.1+io+lt+finish", 4.0, finish_guard=7, guard_slack=99, **base), task)
    assert watched.history["train_loss"] == plain.history["train_loss"]
    assert [c for c, _ in watched.history["guard"]] == [0, 7, 14, 21, 28, 30]
    assert watched.history["guard_kept_at"] == [30]
    # slack 0: whatever happened, the run ends on weights whose rank the start of the finish held
    guarded = run(recipe_config("c0.1+io+lt+finish", 4.0, finish_guard=5, **base), task, keep_model=True)
    reference = guarded.history["guard"][0][1]
    assert middle_rank(guarded.model, task.x_train) <= reference
    with torch.no_grad():
        final = float(task.loss_fn(guarded.model.eval()(task.x_train), task.y_train))
    assert guarded.history["train_loss"][-1] == pytest.approx(final, rel=1e-6)
    with pytest.raises(ValueError, match="finish_guard guards the finishing phase"):
        run(RunConfig(width=8, depth=3, steps=2, finish_guard=5), task)
    with pytest.raises(ValueError, match="finish_guard applies to a finish recipe"):
        recipe_config("c0.1+io+lt", 4.0, finish_guard=5)
    with pytest.raises(ValueError, match="guard_slack must be an integer >= 0"):
        run(recipe_config("c0.1+io+lt+finish", 4.0, finish_guard=5, guard_slack=-1, **base), task)
    with pytest.raises(ValueError, match="finish_guard must be an integer >= 0"):
        run(recipe_config("c0.1+io+lt+finish", 4.0, finish_guard=True, **base), task)
    # seconds per step counts the steps taken (fewer than planned when the guard trips)
    h = guarded.history
    assert guarded.seconds_per_step == pytest.approx(h["seconds"][-1] / h["step"][-1])
    # a finish that raises the rank at once (width 16, finish lr 5e-2): the guard trips at its first check and the
    # run ends on the penalised phase's weights, those of the same recipe without a finish
    short = dict(base, width=16, steps=100, eval_every=50, finish_steps=60, finish_lr=5e-2)
    tripped = run(recipe_config("c0.1+io+lt+finish", 4.0, finish_guard=5, **short), task)
    g = tripped.history["guard"]
    assert g[-1][1] > g[0][1] and tripped.history["guard_kept_at"] == [0] and tripped.history["step"][-1] < 160
    no_finish = run(recipe_config("c0.1+io+lt", 4.0, **dict(short, finish_steps=0, finish_lr=None)), task)
    assert tripped.history["train_loss"][-1] == no_finish.train_loss
    assert tripped.history["test_loss"][-1] == no_finish.test_loss


@pytest.mark.parametrize("seed, split", [(2, "tuning"), (1003, "heldout"), (1014, "heldout")])
def test_noise_floor_is_the_noiseless_teachers_train_loss(seed, split):
    """Rebuild the clean labels from the teacher (same generator order as make_task) and measure the loss of the
    clean teacher on the noisy training labels: the noise floor, up to sampling error."""
    from adaptive_depth.experiments.bottleneck import noise_floor
    spec, task = tasks.draw(seed, split)
    x, y, _ = _rebuilt(spec)
    clean = y[:spec.n_train].float()
    torch.testing.assert_close(task.x_train, x[:spec.n_train].float())
    measured = float(task.loss_fn(clean, task.y_train))
    assert spec.noise > 0
    # a mean of n_train sums of out_dim squared N(0, noise^2): relative sd sqrt(2 / (n out_dim)) < 3%
    assert measured == pytest.approx(noise_floor(seed), rel=0.1)


def test_bottleneck_curve_leaves_training_unchanged_and_steps_to_reads_it():
    from adaptive_depth.experiments.bottleneck import measure, steps_to
    kw = dict(width=8, depth=3, steps=20, lr=1e-2, finish_steps=20)
    plain = measure(1, "tuning", 4.0, "c0.1+io+lt+finish", **kw)
    traced = measure(1, "tuning", 4.0, "c0.1+io+lt+finish", eval_every=10, **kw)
    assert plain["curve"] is None
    assert (traced["train_loss"], traced["test_loss"], traced["ranks"]) == (
        plain["train_loss"], plain["test_loss"], plain["ranks"])
    curve = traced["curve"]
    assert curve["step"] == [0, 10, 20, 30, 40] and curve["test_loss"][-1] == traced["test_loss"]
    losses = curve["test_loss"]
    assert steps_to(curve, min(losses)) == curve["step"][losses.index(min(losses))]
    assert steps_to(curve, losses[0]) == 0 and steps_to(curve, min(losses) / 2) is None
    with pytest.raises(ValueError, match="eval_every must be an integer >= 1"):
        measure(1, "tuning", 4.0, "c0.1+io+lt+finish", eval_every=0, **kw)


def test_bottleneck_model_seeds_vary_the_init_only_and_pair_by_seed(tmp_path, capsys):
    from adaptive_depth.experiments.bottleneck import main, measure, seed_spread
    kw = dict(width=8, depth=3, steps=10, lr=1e-2)
    default = measure(1, "tuning", 4.0, "c0.1+io+lt", **kw)
    same = measure(1, "tuning", 4.0, "c0.1+io+lt", model_seed=1, **kw)
    other = measure(1, "tuning", 4.0, "c0.1+io+lt", model_seed=7, **kw)
    assert default["model_seed"] == same["model_seed"] == 1 and other["model_seed"] == 7
    assert same["test_loss"] == default["test_loss"] and other["test_loss"] != default["test_loss"]
    with pytest.raises(ValueError, match="model_seed must be an integer >= 0"):
        measure(1, "tuning", 4.0, "c0.1+io+lt", model_seed=-1, **kw)
    out = tmp_path / "rows.json"
    assert main(["--split", "tuning", "--seeds", "1", "--model-seeds", "0", "7", "--steps", "10", "--width", "8",
                 "--depth", "3", "--lr", "0.01", "--lt", "4", "--recipes", "c0.1+io+lt",
                 "--rules", "uniform", "equal_distance", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model_seed"], r["rule"]) for r in rows] == [(0, "uniform"), (0, "equal_distance"),
                                                           (7, "uniform"), (7, "equal_distance")]
    assert rows[2]["test_loss"] == other["test_loss"]
    ratios = seed_spread(rows, "equal_distance")
    assert list(ratios) == [1] and ratios[1] == pytest.approx(
        [rows[1]["test_loss"] / rows[0]["test_loss"], rows[3]["test_loss"] / rows[2]["test_loss"]])
    assert seed_spread(rows[:3], "equal_distance") == {1: [pytest.approx(rows[1]["test_loss"] / rows[0]["test_loss"])]}
    # --table --model-seed S tabulates that seed's rows; without it the later seed's rows replace the earlier's
    assert f"{rows[0]['test_loss']:.4g}" != f"{rows[2]['test_loss']:.4g}"
    table_args = ["--table", str(out), "--recipe", "c0.1+io+lt", "--lt", "4", "--rules", "uniform"]
    for seed, row in ((0, rows[0]), (7, rows[2]), (None, rows[2])):
        capsys.readouterr()
        assert main(table_args + ([] if seed is None else ["--model-seed", str(seed)])) == 0
        assert f"/ {row['test_loss']:.4g} |" in capsys.readouterr().out
    for bad in (table_args + ["--model-seed", "3"], ["--seeds", "1", "--model-seed", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(bad)
        assert exc.value.code == 2 and "--model-seed" in capsys.readouterr().err


def test_bottleneck_noise_replaces_the_label_noise_only():
    import dataclasses
    from adaptive_depth.experiments.bottleneck import measure
    spec, task = tasks.draw(2, "tuning")  # noise 0.1
    clean = tasks.make_task(dataclasses.replace(spec, noise=0.0))
    assert torch.equal(clean.x_train, task.x_train) and torch.equal(clean.x_test, task.x_test)
    # the same clean labels under the noise: the difference is noise of sd 0.1 per entry
    diff = (task.y_train - clean.y_train).double()
    assert 0.09 < float(diff.std()) < 0.11 and abs(float(diff.mean())) < 0.01
    kw = dict(width=8, depth=3, steps=10, lr=1e-2)
    own = measure(2, "tuning", 4.0, "c0.1+io+lt", **kw)
    same = measure(2, "tuning", 4.0, "c0.1+io+lt", noise=0.1, **kw)
    none = measure(2, "tuning", 4.0, "c0.1+io+lt", noise=0.0, **kw)
    assert (own["noise"], none["noise"]) == (0.1, 0.0) and same["test_loss"] == own["test_loss"]
    assert none["test_loss"] != own["test_loss"]
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="noise"):
            measure(2, "tuning", 4.0, "c0.1+io+lt", noise=bad, **kw)


def _rebuilt(spec):
    """``(x, clean, noisy)``: a task's inputs and labels rebuilt in float64 from its spec's generator, written out
    apart from ``make_task``: the standardised teacher, then the noise drawn next."""
    f, _, gen = tasks.teacher_function(spec)
    x = torch.randn(spec.n_train + spec.n_val + spec.n_test, spec.in_dim, generator=gen, dtype=torch.float64)
    y = f(x)
    y = (y - y[:spec.n_train].mean(0)) / y[:spec.n_train].std(0)
    noisy = y + spec.noise * torch.randn(y.shape, generator=gen, dtype=torch.float64) if spec.noise > 0 else y
    return x, y, noisy


@pytest.mark.parametrize("seed,split", [(2, "tuning"), (1003, "heldout"), (1, "tuning")])
def test_clean_test_labels_are_the_teacher_before_the_noise(seed, split):
    """``y_test_clean`` is the standardised teacher on the test inputs (rebuilt here in float64 from the spec's
    generator); the noisy labels are it plus the noise drawn next, exactly as before the field existed."""
    spec, task = tasks.draw(seed, split)
    _, y, noisy = _rebuilt(spec)
    test = slice(spec.n_train + spec.n_val, y.shape[0])
    torch.testing.assert_close(task.y_test_clean, y[test].float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(task.y_test, noisy[test].float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(task.y_train, noisy[:spec.n_train].float(), rtol=1e-6, atol=1e-6)
    if spec.noise == 0:
        assert torch.equal(task.y_test_clean, task.y_test)


def test_clean_test_loss_is_the_loss_on_the_clean_labels_and_the_noise_adds_its_floor():
    """The run records the test loss on the clean labels; with noise, the noisy test loss is it plus the noise
    floor out_dim x noise^2, up to sampling error (500 test points)."""
    from adaptive_depth.experiments.bottleneck import noise_floor
    spec, task = tasks.draw(2, "tuning")  # noise 0.1, 24 outputs: floor 0.24
    config = RunConfig(data=spec.name, width=16, depth=3, steps=30, lr=1e-2, effective_depth=2.0, eval_every=10,
                       scheme="exponential", seed=3, n_train=spec.n_train, n_test=spec.n_test)
    result = run(config, task, keep_model=True)
    model = result.model.eval()
    with torch.no_grad():
        pred = model(task.x_test).double()
    by_hand = float(((pred - task.y_test_clean.double()) ** 2).sum(1).mean())
    assert result.history["clean_test_loss"][-1] == pytest.approx(by_hand, rel=1e-5)
    assert len(result.history["clean_test_loss"]) == len(result.history["step"]) == 4
    gap = result.history["test_loss"][-1] - result.history["clean_test_loss"][-1]
    assert gap == pytest.approx(noise_floor(2), rel=0.25)


def test_at_best_val_reads_the_checkpoint_early_stopping_keeps():
    from adaptive_depth.experiments.bottleneck import at_best_val, measure
    curve = {"step": [0, 50, 100, 150], "val_loss": [3.0, 1.0, 1.0, 2.0], "clean_test_loss": [4.0, 0.5, 0.4, 0.1],
             "test_loss": [5.0, 0.7, 0.6, 0.3]}
    assert at_best_val(curve) == (50, 0.5)  # the first of a tie; never the test's own minimum (150)
    assert at_best_val(curve, "test_loss") == (50, 0.7)
    row = measure(2, "tuning", 4.0, "c0.1+io+lt+finish", width=8, depth=3, steps=20, lr=1e-2, finish_steps=20,
                  eval_every=10)
    curve = row["curve"]
    assert (curve["val_loss"][-1], curve["clean_test_loss"][-1]) == (row["val_loss"], row["clean_test_loss"])
    step, value = at_best_val(curve)
    assert curve["val_loss"][curve["step"].index(step)] == min(curve["val_loss"])
    assert value == curve["clean_test_loss"][curve["step"].index(step)]


def test_bottleneck_n_train_keeps_the_teacher_and_redraws_the_sample():
    import dataclasses
    from adaptive_depth.experiments.bottleneck import main, measure
    spec = tasks.spec_for(1, "tuning")
    small = dataclasses.replace(spec, n_train=spec.n_train // 2)
    f, q, _ = tasks.teacher_function(spec)
    g, r, _ = tasks.teacher_function(small)
    x = torch.randn(5, spec.in_dim, dtype=torch.float64)
    assert torch.equal(f(x), g(x)) and torch.equal(q, r)  # the same teacher
    task = tasks.make_task(small)
    assert task.x_train.shape[0] == spec.n_train // 2 and task.x_test.shape[0] == spec.n_test
    kw = dict(width=8, depth=3, steps=10, lr=1e-2)
    own = measure(1, "tuning", 4.0, "c0.1+io+lt", **kw)
    same = measure(1, "tuning", 4.0, "c0.1+io+lt", n_train=spec.n_train, **kw)
    half = measure(1, "tuning", 4.0, "c0.1+io+lt", n_train=spec.n_train // 2, **kw)
    assert (own["n_train"], half["n_train"]) == (spec.n_train, spec.n_train // 2)
    assert same["test_loss"] == own["test_loss"] and half["test_loss"] != own["test_loss"]
    for bad in (1, 0, -5, 2.5, True):
        with pytest.raises(ValueError, match="n_train must be an integer >= 2"):
            measure(1, "tuning", 4.0, "c0.1+io+lt", n_train=bad, **kw)
    with pytest.raises(ValueError, match="n_train"):
        main(["--split", "tuning", "--seeds", "1", "--n-train", "1", "--steps", "10", "--width", "8", "--depth", "3",
              "--recipes", "c0.1+io+lt", "--json", "/dev/null"])


def test_bottleneck_nonlinearity_keeps_the_teachers_weights_and_the_inputs():
    import dataclasses
    from adaptive_depth.experiments.bottleneck import main, measure
    spec, task = tasks.draw(1, "tuning")
    other = next(name for name in tasks.NONLINEARITIES if name != spec.nonlinearity)
    swapped = dataclasses.replace(spec, nonlinearity=other)
    # the same weights under the other nonlinearity, written out: M phi(U q^T x + c), drawn in the spec's order
    gen = torch.Generator().manual_seed(104729 * spec.seed + 3)
    f64 = dict(generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(spec.in_dim, spec.rank, **f64))
    u = spec.gain * torch.randn(spec.hidden, spec.rank, **f64)
    c = 0.5 * torch.randn(spec.hidden, **f64)
    m = torch.randn(spec.out_dim, spec.hidden, **f64) / math.sqrt(spec.hidden)
    x = torch.randn(7, spec.in_dim, dtype=torch.float64)
    for s_, name in ((spec, spec.nonlinearity), (swapped, other)):
        f, _, _ = tasks.teacher_function(s_)
        torch.testing.assert_close(f(x), tasks.NONLINEARITIES[name]((x @ q) @ u.T + c) @ m.T)
    new = tasks.make_task(swapped)
    assert torch.equal(new.x_train, task.x_train) and torch.equal(new.x_test, task.x_test)
    assert not torch.equal(new.y_train, task.y_train)
    kw = dict(width=8, depth=3, steps=10, lr=1e-2)
    own = measure(1, "tuning", 4.0, "c0.1+io+lt", **kw)
    same = measure(1, "tuning", 4.0, "c0.1+io+lt", nonlinearity=spec.nonlinearity, **kw)
    changed = measure(1, "tuning", 4.0, "c0.1+io+lt", nonlinearity=other, **kw)
    assert same["test_loss"] == own["test_loss"] and changed["test_loss"] != own["test_loss"]
    assert (own["nonlinearity"], changed["nonlinearity"]) == (spec.nonlinearity, other)
    with pytest.raises(ValueError, match="nonlinearity must be one of"):
        measure(1, "tuning", 4.0, "c0.1+io+lt", nonlinearity="gelu", **kw)
    with pytest.raises(SystemExit):
        main(["--split", "tuning", "--seeds", "1", "--nonlinearity", "gelu", "--json", "/dev/null"])

