"""The growth benchmark's options (growth2: issue 12 goals): schedule shapes, the lr after a growth, the
normalised branch, function-preserving growth of a normalised branch, the staged search and the CLI."""
import copy
import importlib.util
import itertools
import json
import math
import pathlib
import sys

import pytest
import torch
from torch import nn

from adaptive_depth import LeakyMLP, LeakyResNet
from adaptive_depth.depth import refine, refine_plan
from adaptive_depth.experiments import growth
from adaptive_depth.experiments.cli import main as cli_main
from adaptive_depth.experiments.data import teacher
from adaptive_depth.experiments.growth import (ConvNet, get_task, lr_multiplier, start_depth, summarize, table,
                                               train_one)


# ------------------------------------------------------------------------------------------ lr schedule
def _cosine(k, steps, start=0):
    """The cosine decay written out: 1 before ``start``, then (1 + cos(pi (k - start) / (steps - start))) / 2."""
    if k < start:
        return 1.0
    return (1 + math.cos(math.pi * (k - start) / (steps - start))) / 2


def test_lr_multiplier_plain_is_torch_cosine():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40)
    for k in range(40):
        assert math.isclose(lr_multiplier(k, 40), opt.param_groups[0]["lr"], rel_tol=1e-9, abs_tol=1e-12)
        opt.step()
        sched.step()


def test_lr_multiplier_hold_and_rewarm_by_hand():
    steps, grow_at = 100, [30, 60]
    for k in range(steps):
        plain = _cosine(k, steps, start=60)
        assert lr_multiplier(k, steps, grow_at, hold=0.6) == pytest.approx(plain, abs=1e-15)
    # warm-up over 4 steps after each growth: 1/5, 2/5, 3/5, 4/5 of the cosine rate, then the rate itself
    got = [lr_multiplier(k, steps, grow_at, rewarm=4) for k in range(steps)]
    for k in range(steps):
        since = [k - g for g in grow_at if g <= k]
        w = (min(since) + 1) / 5 if since and min(since) < 4 else 1.0
        assert got[k] == pytest.approx(w * _cosine(k, steps), abs=1e-15)
    assert got[30] == pytest.approx(_cosine(30, steps) / 5) and got[34] == pytest.approx(_cosine(34, steps))
    assert got[29] == pytest.approx(_cosine(29, steps))  # before the first growth: untouched


def test_train_one_applies_the_schedule_it_reports():
    task = get_task("digits", 0)
    settings = dict(growth.SETTINGS["digits"], steps=12, width=4, batch=16)
    r = train_one(task, "uniform", 0, at=(0.25, 0.5), settings=settings, eval_every=6, rewarm=2, hold=0.5)
    assert r["lr_trace"] == pytest.approx([settings["lr"] * lr_multiplier(k, 12, [3, 6], rewarm=2, hold=0.5)
                                           for k in range(12)], rel=1e-12)
    assert r["lr_trace"][3] == pytest.approx(settings["lr"] / 3)  # the first step after the growth at 3


def test_plateau_trigger_that_never_fires_is_the_fixed_schedule():
    """plateau=P runs the growths and the rewarm through the library's DepthScheduler (fixed times as fallbacks):
    with a patience longer than the run it makes the fixed-time run's growths and lr schedule (the rewarm's factor
    multiplies the lr in another order: float rounding apart), so the same run."""
    task = get_task("teacher", 0)
    settings = dict(growth.SETTINGS["teacher"], steps=16, width=8)
    for arm in ("uniform", "adaptive"):
        fixed = train_one(task, arm, 0, at=(0.25, 0.5), settings=settings, eval_every=4, rewarm=2, init="zero")
        late = train_one(task, arm, 0, at=(0.25, 0.5), settings=settings, eval_every=4, rewarm=2, init="zero",
                         plateau=1000)
        assert late["grew_at"] == fixed["grew_at"] == [4, 8] and late["plateau"] == 1000
        assert [c[:3:2] for c in late["curve"]] == [c[:3:2] for c in fixed["curve"]]  # steps, block-steps
        assert [c[3] for c in late["curve"]] == pytest.approx([c[3] for c in fixed["curve"]], rel=1e-4)
        assert late["steps_profile"][0] == pytest.approx(fixed["steps_profile"][0], rel=1e-5)
        assert late["block_steps"] == fixed["block_steps"]
        assert late["lr_trace"] == pytest.approx(fixed["lr_trace"], rel=1e-12)


def test_plateau_trigger_grows_before_the_fixed_times_and_the_rewarm_follows_it():
    task = get_task("teacher", 0)
    settings = dict(growth.SETTINGS["teacher"], steps=60, width=8, lr=1e-9)  # nothing improves: a plateau
    r = train_one(task, "uniform", 0, at=(0.5, 0.75), settings=settings, eval_every=30, rewarm=3, plateau=3)
    assert len(r["grew_at"]) == 2 and r["grew_at"][1] < 30  # both growths long before the first fixed time
    assert len(r["steps_profile"][0]) == 8 and r["start_depth"] == 2  # and no third: max_depth is the final
    assert r["block_steps"] == 2 * r["grew_at"][0] + 4 * (r["grew_at"][1] - r["grew_at"][0]) \
        + 8 * (60 - r["grew_at"][1])
    assert r["lr_trace"] == pytest.approx([1e-9 * lr_multiplier(k, 60, r["grew_at"], rewarm=3) for k in range(60)],
                                          rel=1e-12)
    assert train_one(task, "full", 0, settings=settings, eval_every=30, plateau=3)["plateau"] == 0  # no growth
    with pytest.raises(ValueError, match="plateau must be an integer >= 0"):
        train_one(task, "uniform", 0, settings=settings, plateau=-1)
    with pytest.raises(ValueError, match="plateau applies to the 'uniform' and 'adaptive' arms"):
        train_one(task, "mirror", 0, settings=settings, plateau=5)


# ------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("at, start, depths", [((0.5,), 4, [4] * 6 + [8] * 6),
                                               ((0.25, 0.5, 0.75), 1, [1] * 3 + [2] * 3 + [4] * 3 + [8] * 3)])
def test_schedule_shapes_grow_to_full_depth(at, start, depths):
    assert start_depth(at) == start
    task = get_task("teacher", 0)
    settings = dict(growth.SETTINGS["teacher"], steps=12, width=8)
    r = train_one(task, "uniform", 0, at=at, settings=settings, eval_every=6)
    assert r["start_depth"] == start and r["block_steps"] == sum(depths)
    assert len(r["steps_profile"][0]) == 8 and math.isclose(sum(r["steps_profile"][0]), 1.0, rel_tol=1e-6)
    shallow = train_one(task, "shallow", 0, at=at, settings=settings, eval_every=6)
    assert shallow["block_steps"] == 12 * start and len(shallow["steps_profile"][0]) == start


@pytest.mark.parametrize("at", [(), (0.2, 0.4, 0.6, 0.8), (0.5, 0.3), (0.0, 0.5), (0.5, 1.0), (0.5, 0.5)])
def test_start_depth_rejects_bad_schedules(at):
    with pytest.raises(ValueError, match="at must list"):
        start_depth(at)


@pytest.mark.parametrize("kw, match", [(dict(arm="deep"), "arm"), (dict(init="ones"), "init"),
                                       (dict(rewarm=-1), "rewarm"), (dict(hold=1.0), "hold")])
def test_train_one_validates(kw, match):
    args = dict(arm="uniform")
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        train_one(get_task("teacher", 0), args.pop("arm"), 0, settings=dict(growth.SETTINGS["teacher"], steps=2),
                  **args)


# ---------------------------------------------------------------------------- normalised-branch growth
def _norm_net(lt, dtype=torch.float32, gain="balanced"):
    torch.manual_seed(3)
    blocks = [nn.Sequential(nn.ReLU(), nn.Conv1d(6, 6, 3, padding=1), nn.GroupNorm(2, 6)) for _ in range(2)]
    net = LeakyResNet(blocks, effective_depth=lt, scheme="exponential", branch_norm=True, branch_gain=gain)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))  # gains and GroupNorm affines away from their init
    return net.to(dtype)


def test_zero_growth_of_normalised_branch_is_exact_at_lt0():
    """The RMS normalisation undoes any scaling of the branch's last layer: the kept block's gain must carry
    the rescale (before the fix the output changed by ~the branch's size)."""
    net = _norm_net(0.0)
    x = torch.randn(5, 6, 10)
    before = net(x)
    refine(net, init="zero")
    assert net.depth == 4
    assert torch.equal(net(x), before)
    assert float(net.blocks[1].gain.detach()) == 0.0 and float(net.blocks[3].gain.detach()) == 0.0


@pytest.mark.parametrize("lt", [0.5, 4.0])
def test_zero_growth_of_normalised_branch_exponential_exact(lt):
    net = _norm_net(lt, torch.float64)
    x = torch.randn(4, 6, 10, dtype=torch.float64)
    before = net(x)
    refine(net, init="zero", factor=3)
    assert net.depth == 6
    torch.testing.assert_close(net(x), before, rtol=1e-12, atol=1e-12)


def test_zero_growth_of_normalised_branch_without_gain_refuses_and_changes_nothing():
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.ReLU(), nn.Linear(5, 5)) for _ in range(2)]
    net = LeakyResNet(blocks, branch_norm=True)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(3, 5)).sum().backward()
    opt.step()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    n_params = len(opt.param_groups[0]["params"])
    with pytest.raises(ValueError, match="branch_gain"):
        refine(net, opt, init="zero")
    assert net.depth == 2 and len(opt.param_groups[0]["params"]) == n_params
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_convnet_branch_norm_builds_the_recipe():
    net = ConvNet(1, 1, 8, 2, 10, branch_norm=True)
    assert all(b.branch_norm and isinstance(b.gain, nn.Parameter) and float(b.gain) == 1.0
               for b in net.body.blocks)
    assert net(torch.randn(3, 1, 40)).shape == (3, 10)


def test_convnet_lt_builds_the_large_lt_recipe_and_bad_lt_is_named():
    net = ConvNet(1, 1, 8, 2, 10, branch_norm=True, lt=8.0)
    assert net.body.effective_depth == 8.0 and net.body.scheme == "exponential"
    assert all(float(b.gain) == 8.0 for b in net.body.blocks)  # the balanced gain at Lt = 8
    task = get_task("digits", 100)
    for bad, kw in ((-1.0, dict(branch_norm=True)), (float("nan"), dict(branch_norm=True)), (2.0, {})):
        with pytest.raises(ValueError, match="lt"):
            growth.make_model(task, 2, 4, lt=bad, **kw)


def test_branch_identity_growth_keeps_every_identity_coefficient_at_lr_over_lt(tmp_path, monkeypatch):
    """``--branch-identity on`` (Growth 11): the conv net at Lt = 8 with the leak cancelled at initialisation (gain 1,
    ``r`` from 1); its identity coefficients train at lr / Lt, and the blocks a refinement inserts bring theirs into
    that group, so after both growths all 16 are there and nothing else is. Bad combinations are refused by name
    before any training."""
    net = ConvNet(1, 1, 8, 2, 10, branch_norm=True, lt=8.0, identity=True)
    assert all(float(b.gain.detach()) == 1.0 and float(b.identity.detach()) == 1.0 for b in net.body.blocks)
    task = get_task("mnist1d", 0)
    settings = dict(growth.SETTINGS_LONG["mnist1d"], depth=16, steps=6, batch=16, lr=0.02)
    seen = {}
    real_refine = growth.refine

    def spy(model, opt=None, **kw):
        out = real_refine(model, opt, **kw)
        rs = {id(b.identity) for b in model.body.blocks}
        seen[len(rs)] = [(g["lr"], {id(p) for p in g["params"]} == rs)
                         for g in opt.param_groups if {id(p) for p in g["params"]} & rs]
        return out
    monkeypatch.setattr(growth, "refine", spy)
    run = growth.train_one(task, "uniform", 0, at=(1 / 3, 2 / 3), eval_every=6, settings=settings, lt=8.0,
                           branch_norm=True, branch_identity=True, hold=2 / 3)
    assert run["branch_identity"] and run["steps_profile"] and len(run["steps_profile"][0]) == 16
    assert seen == {8: [(0.02 / 8, True)], 16: [(0.02 / 8, True)]}  # one group, only the r's, at lr / Lt
    for kw in (dict(lt=8.0), dict(lt=0.0, branch_norm=True)):
        with pytest.raises(ValueError, match="branch_identity"):
            growth.make_model(task, 2, 4, identity=True, **kw)
    with pytest.raises(ValueError, match="branch_identity"):
        growth.make_model(get_task("teacher", 0, dims=[8, 2, 8]), 2, 4, identity=True)
    with pytest.raises(ValueError, match="--branch-identity"):
        cli_main(["grow", "--tune", "--tasks", "digits", "--branch-identity", "on", "--json", str(tmp_path / "t.json")])


def test_identity_lr_scale_sets_the_coefficients_lr_and_is_refused_without_the_identity_term(tmp_path, monkeypatch):
    """``--identity-lr-scale c``: the identity coefficients train at c * lr / Lt (the run records c); it needs
    ``--branch-identity on`` and a finite c > 0, and a bad value fails before any training."""
    out = tmp_path / "g.json"
    common = ["grow", "--tasks", "digits", "--arms", "full", "--seeds", "100", "--steps", "2", "--width", "4",
              "--depth", "4", "--lt", "8", "--branch-norm", "on", "--lr", "0.02", "--eval-every", "2"]
    assert cli_main(common + ["--branch-identity", "on", "--identity-lr-scale", "0.25", "--json", str(out)]) == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["settings"]["identity_lr_scale"] == 0.25 and run["branch_identity"]
    task = get_task("digits", 100)
    settings = dict(run["settings"], steps=1)
    seen = []
    real = growth.identity_param_groups

    def spy(model, **kw):
        groups = real(model, **kw)
        seen.append([g.get("lr") for g in groups])  # before the optimizer and its schedule fill them in
        return groups
    monkeypatch.setattr(growth, "identity_param_groups", spy)
    growth.train_one(task, "full", 100, eval_every=1, settings=settings, lt=8.0, branch_norm=True,
                     branch_identity=True)
    assert seen == [[None, 0.25 * 0.02 / 8]]
    for extra, match in ((["--identity-lr-scale", "0.5"], "--branch-identity on"),
                         (["--branch-identity", "on", "--identity-lr-scale", "0"], "finite number > 0"),
                         (["--branch-identity", "on", "--identity-lr-scale", "inf"], "finite number > 0")):
        bad = tmp_path / "bad.json"
        with pytest.raises(ValueError, match=match):
            cli_main(common + extra + ["--json", str(bad)])
        assert not bad.exists()


# ------------------------------------------------------------------------------------------ search and CLI
def test_tune2_stages_and_choice():
    settings = dict(growth.SETTINGS["digits"], steps=4, width=4, batch=8)
    got = growth.tune2("digits", settings, slack=0.5, eval_every=4, seeds=(0,), log=lambda r: None)
    runs, choice = got["runs"], got["choice"]["digits"]
    n_full = 2 + len(growth.FULL_HOLDS) - 1
    assert [r["arm"] for r in runs[:n_full]] == ["full"] * n_full
    assert len(runs) == n_full + len(growth.SHAPES) * len(growth.LR_MODES) + len(growth.INIT_CHOICES) - 1
    assert {"at", "init", "rewarm", "hold", "branch_norm", "full_hold", "target", "scores"} <= set(choice)
    # the block of the better cosine full arm; then the best full schedule on that block sets the target
    plain, normed = runs[0], runs[1]
    assert not plain["branch_norm"] and normed["branch_norm"]
    assert choice["branch_norm"] == (normed["final"] > plain["final"])
    on_block = [r for r in runs[:n_full] if r["branch_norm"] == choice["branch_norm"]]
    best_full = max(on_block, key=lambda r: (r["final"], -r["hold"]))
    assert choice["full_hold"] == best_full["hold"]
    assert choice["target"] == pytest.approx(best_full["final"] - 0.5)
    assert all(r["branch_norm"] == choice["branch_norm"] for r in runs[n_full:])
    # stage C ran the chosen shape and lr with init="zero"
    assert runs[-1]["init"] == "zero" and choice["init"] in growth.INIT_CHOICES
    md = growth.tune2_table(got)
    assert md.count("| digits | uniform |") == len(growth.SHAPES) * len(growth.LR_MODES) + 1
    assert md.count("| digits | full |") == n_full and "1 -> 2 -> 4 -> 8 at 0.25, 0.50, 0.75" in md


def test_cli_growth2_options_and_tuned_choice(tmp_path):
    tuned = tmp_path / "tune.json"
    tuned.write_text(json.dumps({"choice": {"digits": {"at": [0.5], "init": "zero", "rewarm": 2, "hold": 0.5,
                                                        "full_hold": 0.25, "branch_norm": True,
                                                        "state": "fresh"}}}))
    out = tmp_path / "g.json"
    rc = cli_main(["grow", "--tasks", "digits", "--arms", "full", "uniform", "shallow", "--seeds", "100",
                   "--steps", "6", "--eval-every", "3", "--tuned", str(tuned), "--rewarm", "1",
                   "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    full, uni, shallow = data["runs"]
    assert (full["hold"], full["branch_norm"], full["start_depth"]) == (0.25, True, 8)
    assert (uni["at"], uni["init"], uni["rewarm"], uni["hold"]) == ([0.5], "zero", 1, 0.5)  # --rewarm wins
    assert full["lt"] == uni["lt"] == 0.0
    assert shallow["start_depth"] == 4 and shallow["block_steps"] == 24
    md = (tmp_path / "g.md").read_text()
    assert "CPU time / full's" in md and "| digits | shallow |" in md


def test_cli_width_overrides_the_task_width_and_bad_values_are_named(tmp_path):
    out = tmp_path / "w.json"
    assert cli_main(["grow", "--tasks", "digits", "--arms", "full", "--seeds", "100", "--steps", "2",
                     "--eval-every", "1", "--width", "4", "--json", str(out)]) == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert run["settings"]["width"] == 4 and run["settings"]["steps"] == 2
    model = growth.make_model(growth.get_task("digits", 100), 8, run["settings"]["width"])
    assert model.head.in_features == 4
    assert cli_main(["grow", "--tasks", "digits", "--arms", "full", "--seeds", "100", "--steps", "2",
                     "--eval-every", "1", "--width", "4", "--lr", "0.0125", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["runs"][0]["settings"]["lr"] == 0.0125
    for bad in ("0", "nan"):
        with pytest.raises(ValueError, match="--lr must be a finite number > 0"):
            cli_main(["grow", "--tasks", "digits", "--arms", "full", "--seeds", "100", "--steps", "2", "--lr", bad,
                      "--json", str(tmp_path / "bad.json")])
    with pytest.raises(ValueError, match="--width must be >= 1, got 0"):
        cli_main(["grow", "--tasks", "digits", "--arms", "full", "--seeds", "100", "--steps", "2", "--width", "0",
                  "--json", str(tmp_path / "bad.json")])


def test_cli_from_json_records_the_merge_and_the_commands_that_made_the_runs(tmp_path):
    """A merge's command is the merge (not the defaults of every other flag), and the .md names each source's
    command."""
    parts = []
    for seed in ("100", "101"):
        parts.append(tmp_path / f"part{seed}.json")
        assert cli_main(["grow", "--tasks", "digits", "--arms", "full", "--seeds", seed, "--steps", "2",
                         "--eval-every", "1", "--lr", "0.03", "--json", str(parts[-1])]) == 0
    out = tmp_path / "merged.json"
    assert cli_main(["grow", "--from-json", *map(str, parts), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["seed"] for r in data["runs"]] == [100, 101]
    meta = data["meta"]
    assert meta["command"] == f"adaptive-depth grow --from-json {parts[0]} {parts[1]} --slack 0.01 --json {out}"
    made = [json.loads(p.read_text())["meta"]["command"] for p in parts]
    assert [s["command"] for s in meta["sources"]] == made and "--lr 0.03" in made[0] and "--seeds 100" in made[0]
    md = (tmp_path / "merged.md").read_text()
    assert "--budget" not in md.splitlines()[0] and all(f"`{c}`" in md for c in made)


def test_paired_summary_by_hand():
    def run(arm, seed, final, cpu):
        return {"task": "digits", "arm": arm, "seed": seed, "final": final, "cpu_s": cpu, "wall_s": cpu,
                "curve": [(0, 0.0, 0, 0.1, 0.0), (10, cpu / 2, 5, final - 0.01, cpu / 2), (20, cpu, 10, final, cpu)]}
    runs = [run("full", 1, 0.90, 10.0), run("full", 2, 0.80, 12.0),
            run("uniform", 1, 0.88, 5.0), run("uniform", 2, 0.83, 6.0)]
    uni = [s for s in summarize(runs, slack=0.0) if s["arm"] == "uniform"][0]
    assert uni["final_minus_full"]["min"] == pytest.approx(-0.02)
    assert uni["final_minus_full"]["max"] == pytest.approx(0.03)
    assert uni["cpu_ratio"]["median"] == pytest.approx(0.5)
    # the full runs' metric at CPU 5 and 6: their evaluations at 5.0 (0.89) and at 6.0 (0.79)
    assert uni["equal_time_minus_full"]["min"] == pytest.approx(0.88 - 0.89)
    assert uni["equal_time_minus_full"]["max"] == pytest.approx(0.83 - 0.79)
    assert "| digits | uniform |" in table(summarize(runs, slack=0.0))


def test_cli_lt_runs_every_arm_at_that_effective_depth(tmp_path):
    out = tmp_path / "lt.json"
    assert cli_main(["grow", "--tasks", "digits", "--arms", "full", "adaptive", "--seeds", "100", "--steps", "4",
                     "--eval-every", "2", "--branch-norm", "on", "--lt", "4", "--at", "0.5",
                     "--json", str(out)]) == 0
    full, adaptive = json.loads(out.read_text())["runs"]
    assert full["lt"] == adaptive["lt"] == 4.0 and adaptive["start_depth"] == 4
    assert "--lt 4.0" in json.loads(out.read_text())["meta"]["command"]


def test_cli_lt_sets_the_teachers_effective_depth_and_is_checked_first(tmp_path):
    """The teacher's LeakyMLP takes --lt (default TEACHER_LT = 2); a conv task's --lt > 0 without the
    normalised branch is refused before any run, naming lt."""
    out = tmp_path / "t.json"
    assert cli_main(["grow", "--tasks", "teacher", "--arms", "full", "uniform", "--seeds", "100", "--steps", "4",
                     "--eval-every", "2", "--at", "0.5", "--lt", "8", "--json", str(out)]) == 0
    full, uniform = json.loads(out.read_text())["runs"]
    assert full["lt"] == uniform["lt"] == 8.0
    # the train MSE is recorded at the end (checked by hand in test_metric_on_train_and_test_by_hand)
    assert math.isfinite(full["final_train"]) and full["final_train"] != full["final"]
    task = get_task("teacher", 100)
    assert growth.make_model(task, 2, 8).effective_depth == growth.TEACHER_LT == 2.0
    assert growth.make_model(task, 2, 8, lt=8.0).effective_depth == 8.0
    default = tmp_path / "d.json"
    assert cli_main(["grow", "--tasks", "teacher", "--arms", "full", "--seeds", "100", "--steps", "2",
                     "--eval-every", "2", "--json", str(default)]) == 0
    assert json.loads(default.read_text())["runs"][0]["lt"] == 2.0
    for bad in (["--lt", "-1"], ["--lt", "nan"], ["--lt", "4", "--branch-norm", "off"]):
        with pytest.raises(ValueError, match="lt"):
            cli_main(["grow", "--tasks", "teacher", "digits", "--arms", "full", "--seeds", "100", "--steps", "2",
                      "--json", str(tmp_path / "bad.json")] + bad)
        assert not (tmp_path / "bad.json").exists()


def test_cli_plateau_reaches_the_growth_arms_and_is_checked_first(tmp_path):
    out = tmp_path / "p.json"
    assert cli_main(["grow", "--tasks", "teacher", "--arms", "full", "uniform", "--seeds", "100", "--steps", "8",
                     "--width", "8", "--eval-every", "4", "--plateau", "2", "--json", str(out)]) == 0
    runs = {r["arm"]: r for r in json.loads(out.read_text())["runs"]}
    assert runs["uniform"]["plateau"] == 2 and runs["full"]["plateau"] == 0
    assert "--plateau 2" in json.loads(out.read_text())["meta"]["command"]
    for bad, match in ((["--plateau", "-3"], "--plateau must be an integer >= 0"),
                       (["--plateau", "5", "--arms", "uniform", "mirror"], "--plateau applies")):
        with pytest.raises(ValueError, match=match):
            cli_main(["grow", "--tasks", "teacher", "--seeds", "100", "--steps", "2", "--json",
                      str(tmp_path / "bad.json")] + bad)
        assert not (tmp_path / "bad.json").exists()


def test_cli_growth_budget_shortens_the_growth_arms_only(tmp_path):
    out = tmp_path / "gb.json"
    assert cli_main(["grow", "--tasks", "digits", "--arms", "full", "uniform", "shallow", "--seeds", "100",
                     "--steps", "8", "--eval-every", "2", "--at", "0.5", "--growth-budget", "0.5",
                     "--json", str(out)]) == 0
    full, uniform, shallow = json.loads(out.read_text())["runs"]
    assert full["settings"]["steps"] == 8 and uniform["settings"]["steps"] == shallow["settings"]["steps"] == 4
    assert uniform["curve"][-1][0] == 4 and uniform["block_steps"] == 2 * 4 + 2 * 8  # grew at step 2 of 4
    for bad in ("0", "1.5"):
        with pytest.raises(ValueError, match="--growth-budget must be a fraction"):
            cli_main(["grow", "--tasks", "digits", "--arms", "full", "--seeds", "100", "--steps", "2",
                      "--growth-budget", bad, "--json", str(tmp_path / "bad.json")])
    assert not (tmp_path / "bad.json").exists()


def test_cli_growth_lr_sets_the_growth_arms_lr_only_and_they_train_with_it(tmp_path):
    """``--growth-lr``: the growth and shallow arms' own lr, the full arm keeps ``--lr``; both run interleaved per
    seed. The lr each step used (``lr_trace``, the cosine from its start) starts at the arm's lr. Bad values, and
    the tuning and merge modes, are refused before any training."""
    out = tmp_path / "glr.json"
    assert cli_main(["grow", "--tasks", "digits", "--arms", "full", "uniform", "shallow", "--seeds", "100",
                     "--steps", "4", "--eval-every", "2", "--at", "0.5", "--lr", "0.02", "--growth-lr", "0.05",
                     "--json", str(out)]) == 0
    full, uniform, shallow = json.loads(out.read_text())["runs"]
    assert full["settings"]["lr"] == 0.02 and uniform["settings"]["lr"] == shallow["settings"]["lr"] == 0.05
    assert (full["lr_trace"][0], uniform["lr_trace"][0], shallow["lr_trace"][0]) == (0.02, 0.05, 0.05)
    for extra, match in ((["--growth-lr", "0"], "--growth-lr must be a finite number > 0"),
                         (["--growth-lr", "nan"], "--growth-lr must be a finite number > 0"),
                         (["--growth-lr", "0.01", "--tune"], "--growth-lr applies to held-out runs only")):
        with pytest.raises(ValueError, match=match):
            cli_main(["grow", "--tasks", "digits", "--arms", "full", "--seeds", "100", "--steps", "2", *extra,
                      "--json", str(tmp_path / "bad.json")])
    assert not (tmp_path / "bad.json").exists()


def test_cli_depth_sets_every_arms_final_depth(tmp_path):
    out = tmp_path / "d.json"
    assert cli_main(["grow", "--tasks", "digits", "--arms", "full", "uniform", "--seeds", "100", "--steps", "8",
                     "--eval-every", "4", "--width", "4", "--at", "0.25", "0.5", "0.75", "--depth", "16",
                     "--json", str(out)]) == 0
    full, uniform = json.loads(out.read_text())["runs"]
    assert full["start_depth"] == 16 and full["block_steps"] == 16 * 8
    assert uniform["start_depth"] == 2 and uniform["block_steps"] == 2 * 2 + 4 * 2 + 8 * 2 + 16 * 2
    assert len(uniform["steps_profile"][0]) == 16 and math.isclose(sum(uniform["steps_profile"][0]), 1.0,
                                                                   rel_tol=1e-6)
    # 2 -> 4 -> 8 from 6 blocks is impossible: refused before any run, naming the rule
    rule = r"depth \(the final depth\) must be a multiple of 2 \*\* len\(at\) = 4, .*got 6"
    with pytest.raises(ValueError, match=rule):
        cli_main(["grow", "--tasks", "digits", "--arms", "full", "uniform", "--seeds", "100", "--steps", "2",
                  "--at", "0.3", "0.6", "--depth", "6", "--json", str(tmp_path / "bad.json")])
    assert not (tmp_path / "bad.json").exists()
    assert start_depth((0.5,), 12) == 6


def test_growth_vs_reference_script_pairs_by_seed_by_hand(tmp_path, capsys):
    """benchmarks/growth_vs_reference.py (the numbers of docs/depth.md Growth 6) on runs built by hand."""
    script = _script("growth_vs_reference")

    def run(arm, seed, final, hit_cpu, cpu):  # curve rows: (step, wall, block_steps, metric, cpu)
        curve = [(0, 0.0, 0, 0.1, 0.0), (10, 1.0, 5, final - 0.05, hit_cpu / 2), (20, 2.0, 10, final, hit_cpu)]
        return {"arm": arm, "seed": seed, "final": final, "cpu_s": cpu, "curve": curve}
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"runs": [run("full", 1, 0.90, 8.0, 10.0), run("full", 2, 0.92, 6.0, 12.0)]}))
    grown = tmp_path / "grown.json"  # target: median(0.90, 0.92) - 0.01 = 0.90
    grown.write_text(json.dumps({"runs": [run("uniform", 1, 0.91, 2.0, 5.0), run("uniform", 2, 0.89, 3.0, 6.0)]}))
    script.main(str(ref), str(grown))
    out = capsys.readouterr().out
    assert "target: the reference's median final minus 1 point = 90.0" in out
    # seed 1: 8.0 / 2.0 = 4x; seed 2 never reaches 0.90 (0.89): a miss, counted as 0 in the second median
    assert ("uniform  : final - reference -1.0 [-3.0, +1.0], CPU / reference's 0.50 [0.50, 0.50], "
            "speed-up to the target 4.00 [4.00, 4.00] on 1 of 2 (median with misses as 0: 2.00)\n") in out
    for path, trains in ((ref, (0.95, 0.99)), (grown, (0.97, 0.985))):  # runs that recorded train accuracy
        got = json.loads(path.read_text())
        for r, train in zip(got["runs"], trains):
            r["final_train"] = train
        path.write_text(json.dumps(got))
    script.main(str(ref), str(grown))  # train: 0.97 - 0.95 and 0.985 - 0.99, in points
    assert ("(median with misses as 0: 2.00); train: final - reference +0.8 [-0.5, +2.0], higher on 1 of 2\n"
            in capsys.readouterr().out)
    # a loss (the teacher): the target is the reference's median x 1.01 and lower is better; a seed whose
    # reference never reaches it is a miss too
    def mse(arm, seed, final, hit_cpu, cpu):
        curve = [(0, 0.0, 0, 9.0, 0.0), (10, 1.0, 5, final + 0.05, hit_cpu / 2), (20, 2.0, 10, final, hit_cpu)]
        return {"task": "teacher", "arm": arm, "seed": seed, "final": final, "cpu_s": cpu, "curve": curve}
    ref.write_text(json.dumps({"runs": [mse("full", 1, 0.10, 8.0, 10.0), mse("full", 2, 0.30, 6.0, 12.0)]}))
    grown.write_text(json.dumps({"runs": [mse("uniform", 1, 0.15, 2.0, 5.0), mse("uniform", 2, 0.20, 3.0, 6.0)]}))
    script.main(str(ref), str(grown))  # target: median(0.10, 0.30) x 1.01 = 0.202
    out = capsys.readouterr().out
    assert "target: the reference's median final x 1.01 = 0.202" in out
    # seed 1: the reference's 0.15 at CPU 4.0, the arm's 0.20 at 1.0: 4x; seed 2's reference ends at 0.30
    assert ("uniform  : final - reference -0.025 [-0.1, +0.05], CPU / reference's 0.50 [0.50, 0.50], "
            "speed-up to the target 4.00 [4.00, 4.00] on 1 of 2 (median with misses as 0: 2.00)") in out
    # the loss's paired final ratio: 0.15 / 0.10 and 0.20 / 0.30
    assert "final / reference's 1.083 [0.667, 1.500], lower on 1 of 2" in out
    # adaptive against the uniform arm of the same file, in optimizer steps: target median(0.15, 0.20) x 1.01
    # = 0.17675. Uniform seed 1 (0.20 at step 10, 0.15 at 20) reaches it at step 20, seed 2 (0.25, 0.20) never;
    # adaptive seed 1 is set to 0.17 at step 10
    both = tmp_path / "both.json"
    both.write_text(json.dumps({"runs": [mse("uniform", 1, 0.15, 2.0, 5.0), mse("uniform", 2, 0.20, 3.0, 6.0),
                                         mse("adaptive", 1, 0.12, 9.0, 5.0), mse("adaptive", 2, 0.18, 3.0, 6.0)]}))
    both_runs = json.loads(both.read_text())["runs"]
    both_runs[2]["curve"][1] = (10, 1.0, 5, 0.17, 4.5)  # adaptive seed 1 is below the target at step 10
    both.write_text(json.dumps({"runs": both_runs}))
    script.main(str(both), str(both), "uniform", "steps")
    out = capsys.readouterr().out
    assert "reference: the uniform arm; speed-up in steps" in out
    assert "target: the reference's median final x 1.01 = 0.1767" in out
    # seed 1: uniform at step 20, adaptive at step 10: 2x; seed 2: uniform ends at 0.20 > target: a miss
    assert ("adaptive : final - reference -0.025 [-0.03, -0.02], CPU / reference's 1.00 [1.00, 1.00], "
            "speed-up to the target 2.00 [2.00, 2.00] on 1 of 2 (median with misses as 0: 1.00), "
            "final / reference's 0.850 [0.800, 0.900], lower on 2 of 2") in out
    assert "; train:" not in out  # these hand-made runs have no train metric
    for r, train in zip(both_runs, (0.10, 0.20, 0.05, 0.30)):
        r["final_train"] = train
    both.write_text(json.dumps({"runs": both_runs}))
    script.main(str(both), str(both), "uniform", "steps")
    # adaptive / uniform on the training set: 0.05 / 0.10 and 0.30 / 0.20
    assert "lower on 2 of 2; train: final / reference's 1.000 [0.500, 1.500], lower on 1 of 2" in \
        capsys.readouterr().out
    with pytest.raises(SystemExit, match="no runs of arm 'shallow'"):
        script.main(str(both), str(both), "shallow")


def test_recorded_command_reruns_the_same_run(tmp_path):
    """The command a result file records parses back (no '--command grow') to the same options, with the
    growth times written in full (0.3333333, not 0.333333)."""
    import shlex
    from adaptive_depth.experiments.cli import build_parser
    out = tmp_path / "c.json"
    argv = ["grow", "--tasks", "teacher", "--arms", "full", "uniform", "--seeds", "100", "--steps", "3",
            "--eval-every", "3", "--at", "0.3333333", "--lt", "8", "--lr", "0.01", "--json", str(out)]
    assert cli_main(argv) == 0
    command = json.loads(out.read_text())["meta"]["command"]
    assert "--command" not in command and "--at 0.3333333 " in command
    words = shlex.split(command)
    assert words[0] == "adaptive-depth"
    parser = build_parser()
    again, first = vars(parser.parse_args(words[1:])), vars(parser.parse_args(argv))
    for args in (again, first):
        args.pop("_run")
    assert again == first


def test_mirror_arm_reverses_the_adaptive_allocation(tmp_path):
    """The control arm ``mirror`` grows with adaptive refinement's measured allocation reversed: after one growth
    (same model and batches until then) its steps are the adaptive arm's in reverse, uneven, summing to T."""
    out = tmp_path / "m.json"
    assert cli_main(["grow", "--tasks", "teacher", "--arms", "adaptive", "mirror", "uniform", "--seeds", "100",
                     "--steps", "4", "--eval-every", "2", "--at", "0.75", "--depth", "16", "--lt", "8",
                     "--json", str(out)]) == 0
    adaptive, mirror, uniform = json.loads(out.read_text())["runs"]
    a, m = adaptive["steps_profile"][0], mirror["steps_profile"][0]
    assert len(a) == len(m) == 16 and max(a) > min(a) and a != a[::-1]
    assert m == pytest.approx(a[::-1], rel=1e-12) and sum(m) == pytest.approx(1.0, rel=1e-6)  # float32 steps
    assert uniform["steps_profile"][0] == pytest.approx([1 / 16] * 16)
    assert mirror["start_depth"] == adaptive["start_depth"] == 8


def test_shuffled_arm_places_the_adaptive_pieces_at_random(tmp_path):
    """The control arm ``shuffled`` grows with adaptive refinement's measured pieces in a random order: after one
    growth (same model and batches until then) its steps are a permutation of the adaptive arm's, not their order,
    and the same seed draws the same order."""
    out = tmp_path / "s.json"
    args = ["grow", "--tasks", "teacher", "--arms", "adaptive", "shuffled", "shuffled", "--seeds", "100",
            "--steps", "4", "--eval-every", "2", "--at", "0.75", "--depth", "16", "--lt", "8", "--json", str(out)]
    assert cli_main(args) == 0
    adaptive, shuffled, again = json.loads(out.read_text())["runs"]
    a, s = adaptive["steps_profile"][0], shuffled["steps_profile"][0]
    assert len(s) == 16 and sorted(s) == pytest.approx(sorted(a), rel=1e-12) and s != pytest.approx(a)
    assert sum(s) == pytest.approx(1.0, rel=1e-6) and again["steps_profile"] == shuffled["steps_profile"]
    assert shuffled["start_depth"] == 8


def test_family_task_draws_from_the_split_of_its_seed(tmp_path):
    """``--tasks family``: seed S is task S of tasks.py's family (its data; grow's LeakyMLP settings), a seed in
    neither split is refused before any run, naming both ranges; the default tasks stay the three benchmarks."""
    from adaptive_depth.experiments.tasks import draw
    t = get_task("family", 1003)
    _, ref = draw(1003, "heldout")
    assert t.name == "family" and torch.equal(t.x_train, ref.x_train) and torch.equal(t.y_test, ref.y_test)
    assert growth.make_model(t, 2, 8, lt=4.0).effective_depth == 4.0
    assert growth.family_split(5) == "tuning" and growth.family_split(1999) == "heldout"
    out = tmp_path / "f.json"
    assert cli_main(["grow", "--tasks", "family", "--arms", "full", "adaptive", "--seeds", "1000", "--steps", "4",
                     "--eval-every", "2", "--at", "0.5", "--lt", "8", "--json", str(out)]) == 0
    full, adaptive = json.loads(out.read_text())["runs"]
    assert full["task"] == "family" and full["lt"] == adaptive["lt"] == 8.0 and math.isfinite(full["final"])
    with pytest.raises(ValueError, match=r"tuning seeds 0-99 or held-out seeds 1000-1999.*got 100"):
        cli_main(["grow", "--tasks", "teacher", "family", "--arms", "full", "--seeds", "1000", "100", "--steps", "2",
                  "--json", str(tmp_path / "bad.json")])
    assert not (tmp_path / "bad.json").exists()
    from adaptive_depth.experiments.cli import build_parser
    assert build_parser().parse_args(["grow"]).tasks == ["mnist1d", "digits", "teacher"]


def test_metric_on_train_and_test_by_hand():
    """``_metric``: accuracy or MSE in eval mode, on the split asked for; the training flag is restored."""
    for name in ("teacher", "digits"):
        task = get_task(name, 100)
        torch.manual_seed(0)
        model = growth.make_model(task, 2, 8)
        model.train()
        with torch.no_grad():
            model.eval()
            pred_tr, pred_te = model(task.x_train), model(task.x_test)
            model.train()
        for split, pred, y in (("train", pred_tr, task.y_train), ("test", pred_te, task.y_test)):
            if task.loss == "ce":
                want = (pred.argmax(1) == y).double().mean().item()
            else:  # the teachers' loss: squared error summed over outputs, averaged over examples
                want = ((pred.double() - y.double()) ** 2).sum(1).mean().item()
            got = growth._metric(model, task, split)
            assert got == pytest.approx(want, rel=1e-5) and model.training


def test_noise_adds_label_noise_to_the_teacher_only(tmp_path):
    """``--noise``: the teacher's targets get N(0, noise^2) per output (the same inputs and teacher); other tasks
    and bad values are refused before any run, naming noise."""
    clean, noisy = get_task("teacher", 100), get_task("teacher", 100, 0.1)
    assert torch.equal(clean.x_train, noisy.x_train)
    diff = (noisy.y_train - clean.y_train).double()
    assert 0.09 < float(diff.std()) < 0.11 and abs(float(diff.mean())) < 0.01
    for bad, tasks in (("-0.1", ["teacher"]), ("nan", ["teacher"]), ("0.1", ["teacher", "digits"])):
        with pytest.raises(ValueError, match="noise"):
            cli_main(["grow", "--tasks"] + tasks + ["--arms", "full", "--seeds", "100", "--steps", "2",
                                                    "--noise", bad, "--json", str(tmp_path / "bad.json")])
        assert not (tmp_path / "bad.json").exists()
    with pytest.raises(ValueError, match="--noise applies to held-out runs only"):
        cli_main(["grow", "--tune", "--tasks", "teacher", "--noise", "0.1", "--json", str(tmp_path / "bad.json")])
    out = tmp_path / "n.json"
    assert cli_main(["grow", "--tasks", "teacher", "--arms", "full", "--seeds", "100", "--steps", "2",
                     "--eval-every", "2", "--noise", "0.1", "--json", str(out)]) == 0
    assert "--noise 0.1" in json.loads(out.read_text())["meta"]["command"]


def test_teacher_dims_choose_the_teachers_layer_sizes(tmp_path):
    """``--teacher-dims``: the teacher's maps (default 30 -> 3 -> 30, the data of every earlier run); a hidden layer
    after the bottleneck gives full-rank outputs; bad values and other tasks are refused before any run."""
    default = get_task("teacher", 100)
    assert torch.equal(default.y_train, teacher((30, 3, 30), n_train=1000, n_test=1000, seed=100).y_train)
    assert torch.equal(default.y_train, get_task("teacher", 100, dims=[30, 3, 30]).y_train)
    wide = get_task("teacher", 100, dims=[16, 3, 64, 24])
    assert wide.name == "teacher" and wide.x_train.shape == (1000, 16) and wide.y_train.shape == (1000, 24)
    sv = torch.linalg.svdvals(default.y_train.double() - default.y_train.double().mean(0))
    assert int((sv > 1e-6 * sv[0]).sum()) == 3  # ReLU on the 3 bottleneck units, then a linear map: rank 3
    sv = torch.linalg.svdvals(wide.y_train.double() - wide.y_train.double().mean(0))
    assert int((sv > 1e-6 * sv[0]).sum()) == 24
    for bad in (30, "30 3 30", [30], [30, 0, 30], [30, 2.5, 30], [30, True, 30]):
        with pytest.raises(ValueError, match="teacher_dims"):
            get_task("teacher", 100, dims=bad)
    for bad, tasks in ((["0", "3"], ["teacher"]), (["30"], ["teacher"]), (["30", "3", "30"], ["digits"])):
        with pytest.raises(ValueError, match="teacher_dims"):
            cli_main(["grow", "--tasks"] + tasks + ["--arms", "full", "--seeds", "100", "--steps", "2",
                                                    "--teacher-dims"] + bad + ["--json", str(tmp_path / "bad.json")])
        assert not (tmp_path / "bad.json").exists()
    with pytest.raises(ValueError, match="--teacher-dims applies to held-out runs only"):
        cli_main(["grow", "--tune", "--tasks", "teacher", "--teacher-dims", "8", "2", "8",
                  "--json", str(tmp_path / "bad.json")])
    out = tmp_path / "d.json"
    assert cli_main(["grow", "--tasks", "teacher", "--arms", "full", "--seeds", "100", "--steps", "2",
                     "--eval-every", "2", "--teacher-dims", "8", "2", "16", "8", "--json", str(out)]) == 0
    assert "--teacher-dims 8 2 16 8" in json.loads(out.read_text())["meta"]["command"]


def _script(name):
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so a script's worker processes can pickle its functions
    spec.loader.exec_module(module)
    return module


def test_growth_monitors_script_runs_every_monitor_on_tuning_seeds_only(tmp_path):
    """benchmarks/growth_monitors.py (Growth 8): each monitor grows the teacher's net to 16 blocks through
    ``refine_plan(distances=...)`` and ``refine(pieces=...)``; the 'distance' monitor is ``how="adaptive"`` itself;
    held-out seeds are refused."""
    mon = _script("growth_monitors")
    out = tmp_path / "m.json"
    mon.main(["--seeds", "0", "--steps", "6", "--dims", "8", "2", "8", "--json", str(out)])
    got = json.loads(out.read_text())
    assert set(got["ratios"]) == set(mon.MONITORS)
    for r in got["runs"]:
        if r["arm"] != "uniform":
            assert len(r["steps"]) == 16 and sum(r["steps"]) == pytest.approx(16)
    task = get_task("teacher", 0, dims=[8, 2, 8])
    settings = dict(growth.SETTINGS_LONG["teacher"], depth=16, steps=6)
    common = dict(at=(1 / 3, 2 / 3), eval_every=6, settings=settings, lt=8.0)
    lib = train_one(task, "adaptive", 0, **common)
    mine = train_one(task, "adaptive", 0, split=mon.splitter("distance"), **common)
    assert mine["steps_profile"] == lib["steps_profile"] and mine["final"] == lib["final"]
    with pytest.raises(ValueError, match="split"):
        train_one(task, "uniform", 0, split=mon.splitter("distance"), **common)
    with pytest.raises(SystemExit, match="tuning seeds"):
        mon.main(["--seeds", "100", "--steps", "6"])


def test_growth_monitors_chosen_from_runs_the_tuning_runs_best_arm_with_its_settings_on_held_out_seeds(tmp_path):
    """--chosen-from (Growth 13): the arm with the lowest median ratio in a tuning run, grown with that run's
    monitor, --when, --init, --lt and --dims, is the same run as that arm run directly; a held-out run cannot be
    the source."""
    mon = _script("growth_monitors")
    tune = tmp_path / "t.json"
    mon.main(["--seeds", "0", "1", "--steps", "6", "--dims", "8", "2", "8", "--monitors", "distance", "kernel",
              "--when", "last", "--init", "zero", "--lt", "4", "--json", str(tune)])
    ratios = json.loads(tune.read_text())["ratios"]
    best = min(ratios, key=lambda a: sorted(ratios[a])[0] + sorted(ratios[a])[1])  # the median of two
    held = tmp_path / "h.json"
    mon.main(["--seeds", "100", "--steps", "6", "--chosen-from", str(tune), "--json", str(held)])
    got = json.loads(held.read_text())
    assert list(got["ratios"]) == [best] and got["args"]["dims"] == [8, 2, 8] and got["args"]["lt"] == 4.0
    task = get_task("teacher", 100, dims=[8, 2, 8])
    settings = dict(growth.SETTINGS_LONG["teacher"], depth=16, lr=0.01, steps=6)
    direct = train_one(task, "adaptive", 100, at=(1 / 3, 2 / 3), hold=2 / 3, eval_every=6, settings=settings,
                       lt=4.0, init="zero", split=mon.splitter(best.split("@")[0], 0.0, "last"))
    assert [r["final"] for r in got["runs"] if r["arm"] == best] == [direct["final"]]
    other = tmp_path / "o.json"  # the arm applied to another teacher
    mon.main(["--seeds", "100", "--steps", "6", "--chosen-from", str(tune), "--dims", "6", "2", "6", "--json",
              str(other)])
    assert json.loads(other.read_text())["args"]["dims"] == [6, 2, 6]
    with pytest.raises(SystemExit, match="chosen-from"):
        mon.main(["--seeds", "101", "--steps", "6", "--chosen-from", str(held)])
    with pytest.raises(SystemExit, match="drop --when"):  # not silently replaced by the tuning run's
        mon.main(["--seeds", "101", "--steps", "6", "--chosen-from", str(tune), "--when", "first"])


def test_splitgrad_monitor_is_the_gradient_gap_between_the_halves_of_each_split_block():
    """'splitgrad' (Growth 9) against a twin built by hand: every block copied into two blocks with
    half its step (the constructor and ``set_steps``, not ``refine``), float64; the monitor of block l is the norm
    of the difference of the loss's gradients with respect to the two copies' weights."""
    mon = _script("growth_monitors")
    for depth, width, seed in [(3, 8, 0), (4, 6, 1)]:
        torch.manual_seed(seed)
        kw = dict(effective_depth=6.0, scheme="exponential", dtype=torch.float64)
        model = LeakyMLP(5, 4, width=width, depth=depth, **kw)
        with torch.no_grad():
            r = torch.rand(depth, dtype=torch.float64) + 0.5
            model.net.steps.set_steps(r / r.sum())
            for p in model.net.blocks.parameters():
                p.add_(torch.randn_like(p))
        x, y = torch.randn(17, 5, dtype=torch.float64), torch.randn(17, 4, dtype=torch.float64)
        twin = LeakyMLP(5, 4, width=width, depth=2 * depth, **kw)
        with torch.no_grad():
            twin.input.load_state_dict(model.input.state_dict())
            twin.output.load_state_dict(model.output.state_dict())
            for l, blk in enumerate(model.net.blocks):
                twin.net.blocks[2 * l].load_state_dict(blk.state_dict())
                twin.net.blocks[2 * l + 1].load_state_dict(blk.state_dict())
            rho = model.net.steps.current().detach()
            twin.net.steps.set_steps(rho.repeat_interleave(2) / 2)
        (twin(x) - y).pow(2).sum(1).mean().backward()
        blocks = twin.net.blocks
        want = [sum(float((a.grad - b.grad).pow(2).sum()) for a, b in
                    zip(blocks[2 * l].parameters(), blocks[2 * l + 1].parameters())) ** 0.5 for l in range(depth)]
        got = mon.monitor("splitgrad", model, None, x, y)
        assert got.tolist() == pytest.approx(want, rel=1e-6)  # the steps are stored in float32
        assert min(want) > 0  # the halves do differ under a nonzero leak
        assert all(p.grad is None for p in model.parameters())  # the model's own gradients are untouched


def test_growth_monitors_floor_runs_from_the_monitor_to_uniform_doubling():
    """``--floor``: equidistribute ``monitor / mean + floor``; 0 is the monitor's own plan, a large floor uniform
    doubling; a negative or non-finite floor is refused before any run. ``--when``: the monitor at the first
    growth only (from the start depth) or the last only, uniform doubling at the other."""
    mon = _script("growth_monitors")
    torch.manual_seed(0)
    model = LeakyMLP(6, 6, width=8, depth=6, effective_depth=8.0, scheme="exponential")
    x, y = torch.randn(32, 6), torch.randn(32, 6)
    plain = refine_plan(model, how="adaptive", inputs=x)["pieces"]
    assert plain != [[2] * 6]  # otherwise the floor could not change anything
    assert mon.splitter("distance", 0.0)(model, None, x, y) == plain
    assert mon.splitter("distance", 100.0)(model, None, x, y) == [[2] * 6]
    assert mon.splitter("distance", when="first", start_depth=6)(model, None, x, y) == plain
    assert mon.splitter("distance", when="last", start_depth=6)(model, None, x, y) == [[2] * 6]
    assert mon.splitter("distance", when="last", start_depth=3)(model, None, x, y) == plain
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(SystemExit, match="--floor"):
            mon.main(["--seeds", "0", "--steps", "6", "--floor", bad])


def test_kernel_monitor_is_the_displacement_in_the_papers_kernel_metric():
    """'kernel' (issue 9's speed in the kernel metric) against float64 maths written out: the representations
    stepped by hand (``x_{l+1} = e^{-rho Lt} x + (1 - e^{-rho Lt})/Lt (W relu(x) + beta)``), ``K = S S^T`` with
    ``S = [relu(A_l), 1]``, ``g = 1e-3 ||K||_op``, and ``sqrt(Tr[D^T (K + g I)^{-1} D])`` by a dense solve; batches
    smaller and larger than the width (the two branches of the ridge solve)."""
    mon = _script("growth_monitors")
    for depth, width, n, lt, seed in [(3, 8, 5, 6.0, 0), (4, 6, 23, 2.0, 1), (2, 5, 40, 12.0, 2)]:
        torch.manual_seed(seed)
        model = LeakyMLP(5, 4, width=width, depth=depth, effective_depth=lt, scheme="exponential",
                         dtype=torch.float64)
        with torch.no_grad():
            r = torch.rand(depth, dtype=torch.float64) + 0.5
            model.net.steps.set_steps(r / r.sum())
        x = torch.randn(n, 5, dtype=torch.float64)
        rho = model.net.steps.current().detach().double()
        h = x @ model.input.weight.detach().T + model.input.bias.detach()
        want = []
        for l, blk in enumerate(model.net.blocks):
            lin = blk.block.linear
            a = math.exp(-float(rho[l]) * lt)
            nxt = a * h + (1 - a) / lt * (torch.relu(h) @ lin.weight.detach().T + lin.bias.detach())
            s = torch.cat([torch.relu(h), torch.ones(n, 1, dtype=torch.float64)], 1)
            k = s @ s.T
            g = 1e-3 * float(torch.linalg.eigvalsh(k).max())
            d = nxt - h
            want.append(math.sqrt(float((d * torch.linalg.solve(k + g * torch.eye(n, dtype=torch.float64), d)).sum())))
            h = nxt
        got = mon.monitor("kernel", model, None, x, None)
        assert got.tolist() == pytest.approx(want, rel=1e-6)
        assert max(want) > min(want)  # the blocks differ, so a plan can follow them


def _same_nested(a, b):
    """Tensors equal bit for bit, and everything around them equal, through dicts, lists and tuples."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_nested(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_nested(u, v) for u, v in zip(a, b))
    return a == b


@pytest.mark.parametrize("init", ["copy", "zero"])
def test_probe_selector_keeps_the_plan_whose_trial_copy_trains_lower_and_leaves_the_run_untouched(init):
    """``--probe K`` (Growth 10): at each growth the selector grows two copies (uniform doubling, the monitor's
    plan), trains each K steps and keeps the plan with the lower training loss. Checked against probes written
    out by hand on copies; the model and optimizer it is handed are unchanged by the trial, and a run that replays
    the chosen plans through a plain split is the selector's run bit for bit (the probes change neither the model,
    the optimizer nor the run's data order). ``init``: the probes' copies grow as the run does."""
    mon = _script("growth_monitors")
    task = get_task("teacher", 0, dims=[8, 2, 8])
    torch.manual_seed(0)
    model = LeakyMLP(8, 8, width=8, depth=4, effective_depth=8.0, scheme="exponential")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = task.x_train[:32], task.y_train[:32]
    task.loss_fn(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    before = copy.deepcopy((model.state_dict(), opt.state_dict()))
    sel = mon.selector("kernel", task, 4, start_depth=4, seed=3, batch=16, init=init)
    pieces = sel(model, opt, x, y)
    plans = [refine_plan(model, how="uniform")["pieces"], mon.splitter("kernel")(model, opt, x, y)]
    assert plans[0] != plans[1]
    gen = torch.Generator().manual_seed(3 + 777)
    batches = [torch.randint(task.x_train.shape[0], (16,), generator=gen) for _ in range(4)]
    want = []
    for plan in plans:
        m = copy.deepcopy(model)
        o = torch.optim.AdamW(m.parameters(), lr=1e-2)
        o.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict keeps the very tensors it is given
        refine(m, o, pieces=plan, init=init)
        for i in batches:
            task.loss_fn(m(task.x_train[i]), task.y_train[i]).backward()
            o.step()
            o.zero_grad(set_to_none=True)
        with torch.no_grad():
            want.append(float(task.loss_fn(m(task.x_train), task.y_train)))
    assert sel.losses == [want] and sel.chosen == [int(want[1] < want[0])]
    assert pieces == plans[sel.chosen[0]]
    assert _same_nested((model.state_dict(), opt.state_dict()), before)
    settings = dict(growth.SETTINGS_LONG["teacher"], depth=16, steps=9, batch=32)
    common = dict(at=(1 / 3, 2 / 3), eval_every=9, settings=settings, lt=8.0, init=init)
    sel = mon.selector("kernel", task, 2, start_depth=4, seed=0, batch=32, init=init)
    run = train_one(task, "adaptive", 0, split=sel, **common)
    assert len(sel.chosen) == 2
    replayed = iter(list(sel.chosen))
    plain = mon.splitter("kernel")

    def replay(m, o, xb, yb):
        k = next(replayed)
        return refine_plan(m, how="uniform")["pieces"] if k == 0 else plain(m, o, xb, yb)
    again = train_one(task, "adaptive", 0, split=replay, **common)
    assert again["final"] == run["final"] and again["steps_profile"] == run["steps_profile"]
    with pytest.raises(SystemExit, match="--probe"):
        mon.main(["--seeds", "0", "--steps", "6", "--probe", "-1"])


def test_growth_jump_script_measures_both_inits_on_tuning_seeds_only():
    """benchmarks/growth_jump.py (Growth 12): after / before test MSE at each growth, per init and seed. With the
    training steps frozen, a zero split's ratio is 1 (it is exact) and a copy split's is not."""
    jump = _script("growth_jump")
    assert growth.growth_steps((1 / 3, 2 / 3), 9) == [3, 6] and growth.growth_steps((0.01,), 9) == [1]
    out = jump.main(["--lts", "8", "--seeds", "0", "--steps", "9"])
    assert set(out) == {(8.0, "copy"), (8.0, "zero")}
    assert all(len(r) == 1 and len(r[0]) == 2 and all(math.isfinite(v) and v > 0 for v in r[0])
               for r in out.values())
    # the training steps frozen (lr 1e-30): what is left is the refinement alone
    frozen = {init: jump.jump(8.0, init, 0, steps=9, lr=1e-30) for init in ("copy", "zero")}
    assert all(abs(v - 1) < 1e-6 for v in frozen["zero"]), frozen
    assert all(abs(v - 1) > 1e-3 for v in frozen["copy"]), frozen  # small here: the net is untrained
    with pytest.raises(SystemExit, match="tuning seeds"):
        jump.main(["--seeds", "100", "--steps", "9"])
    with pytest.raises(SystemExit, match="--lts"):
        jump.main(["--lts", "0", "--steps", "9"])


def test_growth_oracle_tries_every_split_of_a_growth_and_reports_the_tuning_choice_on_other_seeds(tmp_path):
    """benchmarks/growth_oracle.py (Growth 13): each split of 4 blocks into 8 at the first growth, uniform doubling
    at the second. The patterns are every composition (checked against a brute-force enumeration); the (2, 2, 2, 2)
    run is the uniform arm bit for bit; a pattern's final mesh puts 2 p_l blocks of step rho_l / (2 p_l) in block
    l's interval, and the same mesh made at the second growth (--growth second) is another run; --chosen-from takes
    its pattern from a tuning run of the same growth only."""
    orc = _script("growth_oracle")
    brute = sorted(p for p in itertools.product(range(1, 9), repeat=4) if sum(p) == 8)
    assert orc.patterns() == brute and len(brute) == 35 and orc.UNIFORM in brute
    assert orc.patterns(3, 5) == sorted(p for p in itertools.product(range(1, 6), repeat=3) if sum(p) == 5)
    task = growth.get_task("teacher", 0)
    s = dict(growth.SETTINGS_LONG["teacher"], depth=16, lr=0.01, steps=9)
    ref = growth.train_one(task, "uniform", 0, at=(1 / 3, 2 / 3), hold=2 / 3, eval_every=9, settings=s, lt=8.0,
                           init="zero")
    uni = orc.run_pattern(task, 0, orc.UNIFORM, lt=8.0, steps=9)
    assert uni["final"] == ref["final"] and uni["final_train"] == ref["final_train"]
    pat = (4, 1, 1, 2)
    r = orc.run_pattern(task, 0, pat, lt=8.0, steps=9)
    assert r["depths"] == [16] and r["final"] != ref["final"]
    want = [0.25 / (2 * p) for p in pat for _ in range(2 * p)]  # T = 1 over 4 start blocks
    assert r["steps"] == pytest.approx(want, rel=1e-6, abs=0)
    late = orc.run_pattern(task, 0, pat, lt=8.0, steps=9, growth_no="second")  # the same mesh, made later
    assert late["steps"] == pytest.approx(want, rel=1e-6, abs=0) and late["final"] not in (r["final"], ref["final"])
    assert orc.run_pattern(task, 0, orc.UNIFORM, lt=8.0, steps=9, growth_no="second")["final"] == ref["final"]
    tune = orc.main(["--seeds", "0", "--steps", "9", "--json", str(tmp_path / "t.json")])
    assert len(tune["ratios"]) == 34 and tuple(tune["best"]) in brute and "per_seed_best" not in tune
    best = min(tune["ratios"], key=lambda k: tune["ratios"][k][0])
    assert best == str(tuple(tune["best"]))
    held = orc.main(["--seeds", "100", "--steps", "9", "--chosen-from", str(tmp_path / "t.json"), "--jobs", "2"])
    assert sorted({tuple(x["pattern"]) for x in held["runs"]}) == sorted({orc.UNIFORM, tuple(tune["best"])})
    alone = orc.run_pattern(growth.get_task("teacher", 100), 100, tuple(tune["best"]), lt=8.0, steps=9)
    assert [x["final"] for x in held["runs"] if x["pattern"] == tune["best"]] == [alone["final"]]  # --jobs 2 = alone
    bound = orc.main(["--seeds", "100", "--steps", "9"])  # every split on a held-out seed: a bound, not a choice
    assert "best" not in bound and bound["per_seed_best"] == [min(v[0] for v in bound["ratios"].values())]
    with open(tmp_path / "h.json", "w") as fh:
        json.dump({"args": {"seeds": [100]}, "best": [2, 2, 2, 2]}, fh)
    with pytest.raises(SystemExit, match="tuning run"):
        orc.main(["--seeds", "101", "--steps", "9", "--chosen-from", str(tmp_path / "h.json")])
    with pytest.raises(SystemExit, match="--rewarm 0, not the --rewarm 5"):
        orc.main(["--seeds", "100", "--steps", "9", "--rewarm", "5", "--chosen-from", str(tmp_path / "t.json")])
    with pytest.raises(SystemExit, match="--growth second"):
        orc.main(["--seeds", "100", "--steps", "9", "--growth", "second", "--chosen-from", str(tmp_path / "t.json")])
    with pytest.raises(SystemExit, match="--dims"):
        orc.main(["--task", "digits", "--dims", "8", "3", "8", "--steps", "9"])
    with pytest.raises(SystemExit, match="--jobs"):
        orc.main(["--seeds", "0", "--steps", "9", "--jobs", "0"])
    few = orc.main(["--seeds", "0", "--steps", "9", "--patterns", "4,1,1,2", "--rewarm", "2"])  # only these, rewarmed
    assert [tuple(x["pattern"]) for x in few["runs"]] == [orc.UNIFORM, pat]
    warm = growth.train_one(task, "uniform", 0, at=(1 / 3, 2 / 3), hold=2 / 3, eval_every=9, settings=s, lt=8.0,
                            init="zero", rewarm=2)
    assert few["runs"][0]["final"] == warm["final"] != ref["final"]
    for bad in (["--patterns", "4,1,1"], ["--patterns", "4,1,1,2", "--chosen-from", str(tmp_path / "t.json")],
                ["--rewarm", "-1"]):
        with pytest.raises(SystemExit, match="--patterns|--rewarm"):
            orc.main(["--seeds", "0", "--steps", "9"] + bad)
