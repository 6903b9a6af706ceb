"""The real-task protocol (issue 9 item 5): data as published, validation carved from train, fair lr choice,
the models of each arm, and the tables."""
import dataclasses
import json
import math
import statistics

import pytest
import torch

from adaptive_depth.experiments import realdata as rd
from adaptive_depth.experiments.cli import main
from adaptive_depth.residual import balanced_gain

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_mnist1d_is_the_package_default_dataset():
    from mnist1d.data import get_dataset_args, make_dataset
    x, y, x_test, y_test = rd.load("mnist1d-conv")
    assert x.shape == (4000, 40) and x_test.shape == (1000, 40) and set(y.tolist()) == set(range(10))
    raw = make_dataset(get_dataset_args())  # the package's defaults, nothing changed
    want = torch.as_tensor(raw["x"], dtype=torch.float32)
    want = (want - want.mean(0)) / want.std(0)
    assert torch.allclose(x, want, atol=1e-4) and torch.equal(y, torch.as_tensor(raw["y"]))
    assert torch.equal(y_test, torch.as_tensor(raw["y_test"]))


def test_digits_split_is_fixed_stratified_and_scaled():
    x, y, x_test, y_test = rd.load("digits-conv")
    assert x.shape == (1347, 1, 8, 8) and x_test.shape == (450, 1, 8, 8)
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    assert set(y_test.tolist()) == set(range(10))
    again = rd.load("digits-conv")
    assert torch.equal(again[0], x) and torch.equal(again[3], y_test)


def test_validation_is_carved_from_train_and_never_touches_test():
    x, y, x_test, _ = rd.load("digits-conv")
    split = rd._split("digits-conv", rd.RealConfig(task="digits-conv", seed=0, validation=True, val=300))
    assert len(split.y_train) == 1347 - 300 and len(split.y_eval) == 300
    rows = lambda t: {tuple(r.flatten().tolist()) for r in t}  # noqa: E731
    assert rows(split.x_eval) <= rows(x)  # every validation example is a train example
    assert len(rows(split.x_eval) | rows(split.x_train)) == len(rows(x))
    other = rd._split("digits-conv", rd.RealConfig(task="digits-conv", seed=1, validation=True, val=300))
    assert not torch.equal(other.y_eval, split.y_eval)
    report = rd._split("digits-conv", rd.RealConfig(task="digits-conv", seed=100))
    assert torch.equal(report.x_eval, x_test) and len(report.y_train) == 1347


def test_augment_shifts_each_signal_with_zero_fill():
    gen = torch.Generator().manual_seed(3)
    x = torch.arange(1.0, 41.0).repeat(6, 1)
    out = rd._augment(x, gen)
    shifts = torch.randint(-4, 5, (6,), generator=torch.Generator().manual_seed(3))
    for row, s in zip(out, shifts.tolist()):
        want = [x[0, i - s].item() if 0 <= i - s < 40 else 0.0 for i in range(40)]
        assert row.tolist() == want
    img = torch.randn(3, 1, 8, 8)
    assert rd._augment(img, gen) is img  # images are left alone


@pytest.mark.parametrize("task", sorted(rd.TASKS))
def test_each_arm_holds_the_block_fixed_and_sets_lt(task):
    x, y, _, _ = rd.load(task)
    spec = rd.TASKS[task]
    for arm in ("plain", "uniform", "adaptive"):
        model = rd.build_model(rd.RealConfig(task=task, arm=arm), x.shape[1:], 10)
        lt = 0.0 if arm == "plain" else spec["lt"]
        assert model.net.effective_depth == lt and model.net.depth == spec["depth"]
        assert lt >= spec["depth"] / 2 or arm == "plain"
        if task != "mnist1d-mlp":
            assert all(b.branch_norm and float(b.gain.detach()) == balanced_gain(lt) for b in model.net.blocks)
        assert model(x[:3]).shape == (3, 10)
    if task != "mnist1d-mlp":
        raw = rd.build_model(rd.RealConfig(task=task, arm="raw-uniform"), x.shape[1:], 10)
        assert all(b.gain is None and not b.branch_norm for b in raw.net.blocks)


def test_train_one_records_a_curve_and_adapts_the_steps():
    cfg = rd.RealConfig(task="digits-conv", arm="adaptive", steps=20, eval_every=10, validation=True)
    out = rd.train_one(cfg)
    assert [c[0] for c in out["curve"]] == [10, 20] and 0 <= out["train_acc"] <= 1
    assert out["eval_acc"] == out["curve"][-1][2]
    steps = torch.tensor(out["final_steps"])
    assert abs(float(steps.sum()) - 1) < 1e-4 and float(steps.max() - steps.min()) > 1e-3
    uni = rd.train_one(dataclasses.replace(cfg, arm="uniform"))
    assert max(uni["final_steps"]) - min(uni["final_steps"]) < 1e-6


def test_bad_task_and_arm_are_clear_errors():
    with pytest.raises(ValueError, match="task must be one of"):
        rd.load("cifar")
    with pytest.raises(ValueError, match="arm must be one of"):
        rd.train_one(rd.RealConfig(task="digits-conv", arm="fancy", steps=1))


def _fake(arm, seed, acc, lr=1e-3, reached=None, train=1.0):
    return dict(config=dict(arm=arm, seed=seed, lr=lr), eval_acc=acc, train_acc=train, reached_step=reached,
                reached_seconds=None if reached is None else reached / 10, seconds=5.0)


def test_lr_choice_uses_the_mean_validation_accuracy_over_tuning_seeds():
    runs = [_fake("plain", 0, 0.9, 1e-3), _fake("plain", 1, 0.5, 1e-3),
            _fake("plain", 0, 0.8, 3e-3), _fake("plain", 1, 0.8, 3e-3),
            _fake("uniform", 0, float("nan"), 1e-3), _fake("uniform", 1, 0.2, 3e-3), _fake("uniform", 0, 0.2, 3e-3)]
    assert rd._best_lr(runs, "plain", [1e-3, 3e-3]) == 3e-3  # mean 0.8 beats mean 0.7
    assert rd._best_lr(runs, "uniform", [1e-3, 3e-3]) == 3e-3  # a diverged run scores 0


def test_summary_and_markdown_report_medians_ranges_and_paired_differences():
    accs = {"plain": [0.90, 0.92, 0.91, 0.95, 0.93], "adaptive": [0.91, 0.94, 0.90, 0.96, 0.95]}
    report = [_fake(arm, 100 + i, a, reached=100 * (i + 1) if a >= 0.92 else None, train=a + 0.04 * (arm == "plain"))
              for arm, values in accs.items() for i, a in enumerate(values)]
    result = dict(task="mnist1d-conv", spec=rd.TASKS["mnist1d-conv"], lrs=[1e-3], steps=None,
                  chosen_lr={"plain": 1e-3, "adaptive": 1e-3}, report=report)
    rows = {r["arm"]: r for r in rd.summarise(result)}
    assert rows["plain"]["test"] == dict(median=0.92, min=0.90, max=0.95)
    assert rows["plain"]["reached"] == "3/5" and rows["plain"]["steps_to_target"]["median"] == 400
    md = rd.to_markdown(result, "cmd")
    diffs = [a - b for a, b in zip(accs["adaptive"], accs["plain"])]
    assert f"{100 * statistics.median(diffs):+.1f}" in md and "| plain | 0.001 | 92.0 [90.0, 95.0]" in md
    low, mid, high = (100 * (f(diffs) - 0.04) for f in (min, statistics.median, max))  # plain trains 4 points higher
    train = f"{mid:+.1f} [{low:+.1f}, {high:+.1f}]"
    assert f"- adaptive minus plain, train accuracy paired by seed (points): median {train}" in md


def test_cli_runs_the_protocol_and_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["realdata", "--task", "digits-conv", "--steps", "4", "--lrs", "0.003", "0.01",
                 "--tune-seeds", "0", "--report-seeds", "100", "--arms", "plain", "adaptive",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["chosen_lr"]) == {"plain", "adaptive"} and len(data["tuning"]) == 4
    assert [r["config"]["seed"] for r in data["report"]] == [100, 100]
    assert all(r["config"]["validation"] for r in data["tuning"])
    assert not any(r["config"]["validation"] for r in data["report"])
    assert (tmp_path / "r.md").read_text().startswith("# digits-conv")
    with pytest.raises(ValueError, match="must not overlap"):
        main(["realdata", "--task", "digits-conv", "--steps", "2", "--tune-seeds", "0", "--report-seeds", "0"])


def test_a_log_resumes_and_tabulates_without_retraining(tmp_path):
    log = str(tmp_path / "runs.jsonl")
    kwargs = dict(lrs=[3e-3], tune_seeds=[0], report_seeds=[100, 101], steps=3, log=log)
    first = rd.run_protocol("digits-conv", ["plain"], **kwargs)
    lines = open(log).read().splitlines()
    assert len(lines) == 3
    again = rd.run_protocol("digits-conv", ["plain"], **kwargs)  # everything is in the log: nothing retrains
    assert open(log).read().splitlines() == lines
    assert again["report"] == json.loads(json.dumps(first["report"]))
    open(log, "w").write("\n".join(lines[:2]) + "\n")  # the last report run is missing
    partial = rd.run_protocol("digits-conv", ["plain"], logged_only=True, **kwargs)
    assert [r["config"]["seed"] for r in partial["report"]] == [100] and len(open(log).readlines()) == 2
    assert rd.summarise(partial)[0]["seeds"] == 1


def _first_adamw_step_reference(g0: float, grad: float, lr: float, wd: float, k: float) -> float:
    """AdamW's first step on s = g / k (s0 = g0 / k, ds = k dg), written back in g, in float64: the bias-corrected
    m / sqrt(v) of one step is grad / (|grad| + eps)."""
    s0, grad_s, eps = g0 / k, k * grad, 1e-8
    s1 = s0 * (1 - lr * wd) - lr * grad_s / (abs(grad_s) + eps)
    return k * s1


def test_rescaled_gain_is_adamw_on_the_gain_over_lt():
    x, y, _, _ = rd.load("digits-conv")
    cfg = rd.RealConfig(task="digits-conv", arm="uniform", lr=1e-2, weight_decay=0.1, rescaled_gain=True)
    model = rd.build_model(cfg, x.shape[1:], 10)
    groups = rd._param_groups(model, cfg)
    k = balanced_gain(rd.TASKS["digits-conv"]["lt"])
    assert k == 6.0 and len(groups) == 2 and groups[1]["lr"] == cfg.lr * k
    gains = [b.gain for b in model.net.blocks]
    assert {id(p) for p in groups[1]["params"]} == {id(g) for g in gains}
    assert len(groups[0]["params"]) + len(gains) == len(list(model.parameters()))
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    torch.nn.functional.cross_entropy(model(x[:64]), y[:64]).backward()
    before = [(float(g.detach()), float(g.grad)) for g in gains]
    stem_before, stem_grad = model.stem.weight.detach().clone().double(), model.stem.weight.grad.clone().double()
    opt.step()
    for g, (g0, grad) in zip(gains, before):
        assert abs(float(g.detach()) - _first_adamw_step_reference(g0, grad, cfg.lr, cfg.weight_decay, k)) < 1e-5
    # every other weight: plain AdamW at the base lr and weight decay
    want = stem_before * (1 - cfg.lr * cfg.weight_decay) - cfg.lr * stem_grad / (stem_grad.abs() + 1e-8)
    assert torch.allclose(model.stem.weight.detach().double(), want, atol=1e-6)


def test_rescaled_gain_without_gains_is_a_clear_error():
    x, _, _, _ = rd.load("digits-conv")
    cfg = rd.RealConfig(task="digits-conv", arm="raw-uniform", rescaled_gain=True)
    with pytest.raises(ValueError, match="rescaled_gain needs branch gains"):
        rd._param_groups(rd.build_model(cfg, x.shape[1:], 10), cfg)


def test_lt_warmup_raises_lt_linearly_to_the_target():
    x, _, _, _ = rd.load("digits-conv")
    cfg = rd.RealConfig(task="digits-conv", arm="adaptive", steps=10, lt_warmup=0.5)
    model = rd.build_model(cfg, x.shape[1:], 10)
    ramp = rd._lt_ramp(model, cfg)
    seen = [float(model.net.effective_depth)]
    for _ in range(7):
        ramp.step()
        seen.append(float(model.net.effective_depth))
    assert seen == pytest.approx([6.0 * min(1.0, t / 5) for t in range(8)])
    assert rd._lt_ramp(model, dataclasses.replace(cfg, lt_warmup=0.0)) is None
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="lt_warmup must be a fraction"):
            rd.train_one(dataclasses.replace(cfg, lt_warmup=bad))


def test_large_lt_options_are_no_ops_for_the_plain_arm_and_reuse_its_runs(tmp_path):
    cfg = rd.RealConfig(task="digits-conv", arm="plain", steps=6, eval_every=3, validation=True)
    with_options = dataclasses.replace(cfg, rescaled_gain=True, lt_warmup=0.5)
    assert with_options.canonical() == cfg
    a, b = rd.train_one(cfg), rd.train_one(with_options)
    assert a["train_acc"] == b["train_acc"] and [c[2] for c in a["curve"]] == [c[2] for c in b["curve"]]
    uniform = dataclasses.replace(with_options, arm="uniform")
    assert uniform.canonical() is uniform
    log = str(tmp_path / "runs.jsonl")
    kwargs = dict(lrs=[3e-3], tune_seeds=[0], report_seeds=[100], steps=2, log=log)
    rd.run_protocol("digits-conv", ["plain"], **kwargs)
    lines = open(log).read().splitlines()
    out = rd.run_protocol("digits-conv", ["plain", "uniform"], rescaled_gain=True, lt_warmup=0.5, **kwargs)
    new = open(log).read().splitlines()
    assert new[:len(lines)] == lines and len(new) == len(lines) + 2  # only the uniform arm trained
    assert all(json.loads(line)["config"]["rescaled_gain"] for line in new[len(lines):])
    assert out["rescaled_gain"] and "branch gains trained as g / Lt" in rd.to_markdown(out, "cmd")


def test_a_log_written_before_a_config_field_existed_is_still_reused(tmp_path):
    log = tmp_path / "runs.jsonl"
    kwargs = dict(lrs=[3e-3], tune_seeds=[0], report_seeds=[100], steps=2, log=str(log))
    rd.run_protocol("digits-conv", ["plain"], **kwargs)
    old = []
    for line in log.read_text().splitlines():  # as an older version wrote them: without the newer fields
        r = json.loads(line)
        del r["config"]["rescaled_gain"], r["config"]["lt_warmup"]
        old.append(json.dumps(r))
    log.write_text("\n".join(old) + "\n")
    rd.run_protocol("digits-conv", ["plain"], **kwargs)
    assert log.read_text().splitlines() == old


def test_cli_passes_the_large_lt_options_and_writes_them_in_the_command(tmp_path):
    out = tmp_path / "r.json"
    assert main(["realdata", "--task", "digits-conv", "--steps", "2", "--lrs", "0.003", "--tune-seeds", "0",
                 "--report-seeds", "100", "--arms", "uniform", "--rescaled-gain", "--lt-warmup", "0.5",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert all(r["config"]["rescaled_gain"] and r["config"]["lt_warmup"] == 0.5 for r in data["report"])
    assert "--rescaled-gain --lt-warmup 0.5" in data["command"] and "True" not in data["command"]
    assert "over the first 50% of the steps" in (tmp_path / "r.md").read_text()


def test_markdown_shows_the_lr_search_with_the_choice_and_missing_lrs():
    tuning = [_fake("plain", 0, 0.90, 1e-3), _fake("plain", 1, 0.80, 1e-3), _fake("plain", 0, 0.96, 3e-3),
              _fake("plain", 1, 0.94, 3e-3), _fake("uniform", 0, 0.70, 1e-3), _fake("uniform", 0, float("nan"), 3e-3)]
    result = dict(task="mnist1d-conv", spec=rd.TASKS["mnist1d-conv"], lrs=[1e-3, 3e-3, 1e-2], steps=None,
                  tune_seeds=[0, 1], chosen_lr={"plain": 3e-3, "uniform": 1e-3}, tuning=tuning, report=[])
    table = rd.summarise_tuning(result)
    assert table["plain"][1e-3] == dict(mean=pytest.approx(0.85), runs=2)
    assert table["uniform"][3e-3]["mean"] == 0.0 and 1e-2 not in table["plain"]
    md = rd.to_markdown(result, "cmd")
    assert "| plain | 85.0 | **95.0** | - |" in md
    assert "| uniform | **70.0 (1 runs)** | 0.0 (1 runs) | - |" in md


def test_cli_tune_only_trains_no_report_run(tmp_path):
    out = tmp_path / "r.json"
    assert main(["realdata", "--task", "digits-conv", "--steps", "2", "--lrs", "0.003", "0.01", "--tune-seeds", "0",
                 "--arms", "plain", "--tune-only", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert len(data["tuning"]) == 2 and data["report"] == [] and "--tune-only" in data["command"]
    md = (tmp_path / "r.md").read_text()
    assert "the lr search alone" in md and "| plain |" in md and "test acc %" not in md


def test_lt_sets_the_large_lt_arms_only_and_keeps_the_plain_runs_reusable(tmp_path):
    cfg = rd.RealConfig(task="digits-conv", arm="uniform", lt=2.5)
    assert cfg.effective_depth() == 2.5 and dataclasses.replace(cfg, lt=None).effective_depth() == 6.0
    plain = dataclasses.replace(cfg, arm="plain")
    assert plain.effective_depth() == 0.0 and plain.canonical() == rd.RealConfig(task="digits-conv", arm="plain")
    model = rd.build_model(cfg, (1, 8, 8), 10)
    assert model.net.effective_depth == 2.5
    assert all(float(b.gain.detach()) == balanced_gain(2.5) for b in model.net.blocks)
    log = str(tmp_path / "runs.jsonl")
    kwargs = dict(lrs=[3e-3], tune_seeds=[0], report_seeds=[100], steps=2, log=log)
    rd.run_protocol("digits-conv", ["plain", "uniform"], **kwargs)
    before = open(log).read().splitlines()
    out = rd.run_protocol("digits-conv", ["plain", "uniform"], lt=2.5, **kwargs)
    after = open(log).read().splitlines()
    assert after[:len(before)] == before and len(after) == len(before) + 2  # the uniform arm only, at Lt = 2.5
    assert all(json.loads(line)["config"]["lt"] == 2.5 for line in after[len(before):])
    assert out["lt"] == 2.5 and "large Lt = 2.5" in rd.to_markdown(out, "cmd")
    for bad in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="lt .* must be a finite number > 0"):
            rd.run_protocol("digits-conv", ["uniform"], lt=bad, **kwargs)


def test_identity_builds_the_cancelled_leak_and_trains_r_at_lr_over_lt(tmp_path):
    x, y, _, _ = rd.load("digits-conv")
    cfg = rd.RealConfig(task="digits-conv", arm="uniform", lr=1e-2, identity=True, steps=4, eval_every=2,
                        validation=True)
    model = rd.build_model(cfg, x.shape[1:], 10)
    blocks = model.net.blocks
    assert all(float(b.identity.detach()) == 1.0 and float(b.gain.detach()) == 1.0 and b.branch_norm
               for b in blocks)
    groups = rd._param_groups(model, cfg)
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(cfg.lr / 6.0)
    assert {id(p) for p in groups[1]["params"]} == {id(b.identity) for b in blocks}
    assert len(groups[0]["params"]) + len(blocks) == len(list(model.parameters()))
    # the r group moves by ~lr / Lt in the first AdamW step (sign step of size lr / Lt, plus the decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    torch.nn.functional.cross_entropy(model(x[:64]), y[:64]).backward()
    grads = [float(b.identity.grad) for b in blocks]
    opt.step()
    lr_r = cfg.lr / 6.0
    for b, g in zip(blocks, grads):
        assert float(b.identity.detach()) == pytest.approx((1 - lr_r * cfg.weight_decay) - lr_r * g / (abs(g) + 1e-8),
                                                           abs=1e-6)
    run = rd.train_one(cfg)
    assert len(run["final_identity"]) == len(blocks) and run["final_identity"] != [1.0] * len(blocks)
    # the plain arm ignores it (Lt = 0) and reuses its runs; the MLP task refuses it
    plain = dataclasses.replace(cfg, arm="plain")
    assert plain.canonical() == dataclasses.replace(plain, identity=False)
    assert "final_identity" not in rd.train_one(plain.canonical())
    with pytest.raises(ValueError, match="identity applies to the conv tasks"):
        rd.run_protocol("mnist1d-mlp", ["uniform"], identity=True, lrs=[1e-3], tune_seeds=[0], report_seeds=[])
    with pytest.raises(TypeError, match="identity must be True or False"):
        rd.run_protocol("digits-conv", ["uniform"], identity=1, lrs=[1e-3], tune_seeds=[0], report_seeds=[])
    # identity_scale: the coefficients at scale x lr / Lt; the plain arm resets it; refused without identity
    scaled = dataclasses.replace(cfg, identity_scale=4.0)
    assert rd._param_groups(rd.build_model(scaled, x.shape[1:], 10), scaled)[1]["lr"] == pytest.approx(4 * cfg.lr / 6)
    assert dataclasses.replace(scaled, arm="plain").canonical() == plain.canonical()
    for bad, kw in ((4.0, {}), (0.0, dict(identity=True)), (math.inf, dict(identity=True)),
                    (True, dict(identity=True))):
        with pytest.raises(ValueError, match="identity_scale"):
            rd.run_protocol("digits-conv", ["uniform"], identity_scale=bad, lrs=[1e-3], tune_seeds=[0],
                            report_seeds=[], **kw)
