"""``adaptive-depth paper fig1|fig2``: the experiments of Jacot & Kaiser, reproduced on a CPU.

fig1  teacher 30 -> 3 -> 30, width 100, L = 20, equidistant steps, Lt swept: -(2/Lt) H (median, min and max
      over the layers) should approach the bottleneck rank k* = 3 from below as Lt grows, and min_p COI(A_p)
      from above; spectra of the representations and weights at one Lt.
fig2  teacher 30 -> 6 -> 3 -> 30 made of random ResNets, Lt = 3, L swept: test error of equidistant,
      irregular, paper-adaptive, guarded-adaptive and learned steps over seeds; step profiles at L = 18.

Cost (both figures): ``C + lambda/(2 Lt) sum rho_l ||W_l||^2`` with ``lambda = lam / Lt`` (``--lam``).

Training. The paper: Adam, then SGD at a smaller rate. The Hamiltonian picture holds at critical points of
the cost, so here the runs go further: Adam (``--steps``; the step-size rules adapt during this phase), then
full-batch L-BFGS with a strong-Wolfe line search (``--lbfgs-steps``) on the same cost with the steps frozen
(an adaptation changes the function between iterations, which spoils L-BFGS's curvature pairs), in float64
for fig1. ``converge`` stops early once every block's stationarity
``|W_l - Lt (b_l/rho_l) B_l s(A_{l-1})^T| / |W_l|`` (0 at a critical point; read off the gradient) is below
``--tol``. ``--sgd-steps`` still gives the paper's SGD phase between the two.

Default ``--lam 0.1`` (100 x the paper's 1e-3): at the paper's lambda the cost is too ill-conditioned for any
of these optimisers to reach a critical point in a CPU budget (the weight decay's curvature lambda rho_l / Lt
is ~1e-7 against O(1) for the data); see ``benchmarks/results/paper/README.md`` for the measurements. Pass
``--lam 0.001`` for the paper's value.

``--io fixed`` (default) is the paper's network: ``A_0 = X`` (zero-padded to the width) and the output is
the first ``d_out`` coordinates of ``A_1``, nothing trained outside the leaky blocks. ``--io free`` is the
library's ``LeakyMLP`` with trained, unregularised input and output layers; there ``A -> c A`` with the
output layer divided by c leaves the data cost unchanged, so at a critical point ``Tr[B_0 A_0^T] = 0``
and ``H = (Lt/2) ||B_0 s(A_0)^T||^2 >= 0``: -(2/Lt) H cannot approach k* > 0 (see the README of the results).

Writes ``figN.json``, ``figN.md`` (the tables) and PNGs to ``--out``; ``--quick`` is a smoke run of seconds.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .data import Task, get_task, teacher
from ..diagnostics import _finite, diagnose
from ..steps import over_lt
from .train import RunConfig, _evaluate, build_model, format_table, run as train_run

__all__ = ["add_arguments", "run", "paper_model", "converge", "fig1", "fig2"]

FIG1_LTS = (0.5, 1.0, 2.0, 4.0, 8.0, 12.0, 16.0)
FIG2_DEPTHS = (6, 12, 18)
FIG2_RULES = ("uniform", "irregular", "paper", "equal_distance", "learned")
K_STAR = 3
DTYPES = {"float32": torch.float32, "float64": torch.float64}

# full budgets and the --quick ones (Adam steps, SGD steps, L-BFGS iterations, width, depth, n_train / n_test,
# lambda * Lt, stationarity target, L-BFGS precision and memory, ...)
DEFAULTS = {
    "fig1": dict(steps=1000, sgd_steps=0, lbfgs_steps=3000, width=100, depth=20, n=1000, lts=FIG1_LTS,
                 spectra_lt=12.0, lam=0.1, tol=0.05, dtype="float64", history=100),
    "fig2": dict(steps=600, sgd_steps=0, lbfgs_steps=800, width=100, depth=None, n=1000, depths=FIG2_DEPTHS,
                 seeds=5, profile_depth=18, lam=0.1, tol=0.0, dtype="float32", history=20),
}
QUICK = {
    "fig1": dict(steps=150, sgd_steps=0, lbfgs_steps=100, width=40, depth=8, n=200, lts=(1.0, 6.0),
                 spectra_lt=6.0, lam=0.1, tol=0.05, dtype="float64", history=20),
    "fig2": dict(steps=100, sgd_steps=0, lbfgs_steps=50, width=40, depth=None, n=200, depths=(4, 6), seeds=2,
                 profile_depth=6, lam=0.1, tol=0.0, dtype="float32", history=20),
}
_OVERRIDES = ("steps", "sgd_steps", "lbfgs_steps", "width", "depth", "n", "lts", "spectra_lt", "depths", "seeds",
              "profile_depth", "lam", "tol", "dtype", "history")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("figure", choices=("fig1", "fig2"), help="which figure of the paper")
    p.add_argument("--quick", action="store_true", help="a small smoke run (seconds)")
    p.add_argument("--lts", type=float, nargs="+", default=None, help="fig1: effective depths Lt to sweep")
    p.add_argument("--spectra-lt", type=float, default=None, help="fig1: the Lt whose per-layer plot is written")
    p.add_argument("--depths", type=int, nargs="+", default=None, help="fig2: numbers of blocks L to sweep")
    p.add_argument("--rules", nargs="+", default=list(FIG2_RULES),
                   choices=list(FIG2_RULES) + ["weight_norm"], help="fig2: step-size schemes")
    p.add_argument("--seeds", type=int, default=None, help="fig2: model seeds 0..N-1 per (L, rule)")
    p.add_argument("--profile-depth", type=int, default=None, help="fig2: L whose step profiles are plotted")
    p.add_argument("--lt", type=float, default=3.0, help="fig2: effective depth Lt")
    p.add_argument("--depth", type=int, default=None, help="fig1: number of blocks L (default 20)")
    p.add_argument("--width", type=int, default=None, help="width w of the representation (default 100)")
    p.add_argument("--steps", type=int, default=None, help="Adam steps (the rules adapt the steps here)")
    p.add_argument("--sgd-steps", type=int, default=None, help="SGD steps after Adam (the paper's second phase)")
    p.add_argument("--lbfgs-steps", type=int, default=None,
                   help="full-batch L-BFGS iterations after Adam / SGD, steps frozen (0: none)")
    p.add_argument("--tol", type=float, default=None,
                   help="stop L-BFGS once every block's stationarity is below this (0: run all iterations)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="precision of the L-BFGS phase")
    p.add_argument("--history", type=int, default=None, help="L-BFGS memory (curvature pairs kept)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--sgd-lr", type=float, default=1e-3, help="SGD learning rate (the paper: smaller than Adam's phase)")
    p.add_argument("--lam", type=float, default=None,
                   help="lambda * Lt of the parameter-norm cost (default 0.1; the paper: 1e-3, i.e. lambda = 1e-3/Lt)")
    p.add_argument("--scheme", choices=("euler", "exponential"), default="euler", help="the paper: euler")
    p.add_argument("--io", choices=("fixed", "free"), default="fixed",
                   help="fixed: the paper's A_0 = X, output = first coordinates of A_1; free: trained "
                        "input / output layers (the library's LeakyMLP)")
    p.add_argument("--n", type=int, default=None, help="train and test points each (default 1000)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest on a shared machine: 2 threads were 20x slower here)")
    p.add_argument("--out", default=os.path.join("out", "paper"), help="folder for tables, JSON and plots")
    p.add_argument("--no-progress", action="store_true", help="no per-run lines")


def run(args) -> int:
    settings = dict(QUICK[args.figure] if args.quick else DEFAULTS[args.figure])
    for key in _OVERRIDES:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    _check(args, settings)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    result = fig1(args, settings) if args.figure == "fig1" else fig2(args, settings)
    result["meta"] = _meta(args, settings, time.time() - start)
    path = os.path.join(args.out, f"{args.figure}.json")
    with open(path, "w") as fh:
        json.dump(_finite(result), fh, indent=1)
    print(f"wrote {path} ({time.time() - start:.0f} s)")
    return 0


def _check(args, s: Dict) -> None:
    for key, low in (("steps", 0), ("sgd_steps", 0), ("lbfgs_steps", 0), ("width", 1), ("n", 1), ("history", 1)):
        if s[key] is None or s[key] < low:
            raise ValueError(f"--{key.replace('_', '-')} must be >= {low}, got {s[key]}")
    if s["steps"] + s["sgd_steps"] + s["lbfgs_steps"] < 1:
        raise ValueError("--steps, --sgd-steps and --lbfgs-steps must not all be 0")
    if args.figure == "fig1" and (not s["lts"] or min(s["lts"]) <= 0):
        raise ValueError(f"--lts must list effective depths > 0, got {s['lts']}")
    if args.figure == "fig2":
        if not s["depths"] or min(s["depths"]) < 1:
            raise ValueError(f"--depths must list numbers of blocks >= 1, got {s['depths']}")
        if s["seeds"] < 1:
            raise ValueError(f"--seeds must be >= 1, got {s['seeds']}")
    if not s["lam"] > 0:
        raise ValueError(f"--lam must be > 0, got {s['lam']}")
    if not s["tol"] >= 0:
        raise ValueError(f"--tol must be >= 0, got {s['tol']}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")


# ---------------------------------------------------------------------------------------- the model
def paper_model(config: RunConfig, task: Task, io: str = "fixed") -> torch.nn.Module:
    """``train.build_model`` (a LeakyMLP with the config's steps); ``io="fixed"`` replaces its input and output
    layers by the paper's fixed maps: zero-padding ``x -> (x, 0)`` and the first ``d_out`` coordinates."""
    model = build_model(config, task)
    if io == "free":
        return model
    if io != "fixed":
        raise ValueError(f"io must be 'fixed' or 'free', got {io!r}")
    if config.width < max(task.in_dim, task.out_dim):
        raise ValueError(f"width must be >= the input and output dimensions ({task.in_dim}, {task.out_dim}) "
                         f"with io='fixed' (zero padding), got {config.width}")
    with torch.no_grad():
        for lin in (model.input, model.output):
            lin.weight.zero_()
            lin.weight.fill_diagonal_(1.0)
            lin.bias.zero_()
            lin.requires_grad_(False)
    return model


def _train(config: RunConfig, task: Task, io: str, label: str, progress: bool):
    t0 = time.time()
    result = train_run(config, task, keep_model=True, model=paper_model(config, task, io))
    if progress:
        print(f"  {label}: after Adam/SGD train {result.train_loss:.4g}  test {result.test_loss:.4g}  "
              f"({time.time() - t0:.0f} s, {1e3 * result.seconds_per_step:.0f} ms/step)", flush=True)
    return result


def _config(args, s: Dict, **kw) -> RunConfig:
    total = s["steps"] + s["sgd_steps"]
    lt = kw["effective_depth"]
    kw["weight_decay"] = over_lt(s["lam"], lt)
    return RunConfig(width=s["width"], scheme=args.scheme, steps=s["steps"], sgd_steps=s["sgd_steps"], lr=args.lr,
                     sgd_lr=args.sgd_lr, n_train=s["n"], n_test=s["n"], data_seed=args.data_seed,
                     eval_every=max(1, total // 10), **kw)


# ------------------------------------------------------------------------------------ convergence
def converge(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lam: float, *, max_iter: int,
             tol: float = 0.0, dtype: torch.dtype = torch.float64, history_size: int = 100, chunk: Optional[int] = None,
             loss: Optional[Callable] = None, evaluate: Optional[Callable[[torch.nn.Module], Dict]] = None,
             label: Optional[str] = None) -> Dict:
    """Full-batch L-BFGS (strong-Wolfe line search) on ``C + lambda/(2 Lt) sum_l rho_l ||W_l||^2`` (``lambda/2``
    at Lt = 0) over the branch parameters of a LeakyMLP / LeakyResNet, with the step sizes frozen; the model
    is converted to ``dtype`` in place (and stays so).

    Every ``chunk`` iterations (default ``max_iter / 10`` within [10, 50]; and at the end) it records the cost, the gradient norm and the per-block
    stationarity ``|g_l| / (lambda rho_l / Lt |W_l|) = |W_l - Lt (b_l/rho_l) B_l s(A_{l-1})^T| / |W_l|`` (the
    field ``diagnose`` reports, read off the gradient ``g_l`` of block l), plus ``evaluate(model)`` if given;
    it stops when the largest stationarity is below ``tol`` (``tol = 0``: never), after ``max_iter``
    iterations, or when an L-BFGS call makes no progress. Returns a summary with the history."""
    from ..steps import ParameterNormCost, step_groups
    loss = loss or (lambda pred, target: (pred - target).pow(2).sum(1).mean())
    groups = step_groups(model)
    if not groups:
        raise ValueError("model has no step sizes (a LeakyMLP or LeakyResNet is needed)")
    model.to(dtype)
    x, y = x.to(dtype), (y.to(dtype) if y.is_floating_point() else y)
    for g in groups:
        g.recording = False
        g.rho.requires_grad_(False)
    norm_cost = ParameterNormCost(groups, lam)  # its coefficients: (lambda / Lt) rho_l per block
    blocks = [ps for layers in norm_cost.params for ps in layers if ps]
    coefs = [c for layers, cs in zip(norm_cost.params, norm_cost.coefficients()) for ps, c in zip(layers, cs) if ps]
    params = [p for ps in blocks for p in ps if p.requires_grad]

    def cost():
        reg = norm_cost()
        data = loss(model(x), y)
        return data + reg, data

    def closure():
        opt.zero_grad()
        c, _ = cost()
        c.backward()
        return c

    def measure(it: int, evals: int) -> Dict:
        opt.zero_grad()
        c, data = cost()
        c.backward()
        stat, grad_sq = [], 0.0
        for ps, coef in zip(blocks, coefs):
            g2 = sum(float(p.grad.double().square().sum()) for p in ps if p.grad is not None)
            w2 = sum(float(p.detach().double().square().sum()) for p in ps)
            grad_sq += g2
            stat.append(math.sqrt(g2) / (coef * math.sqrt(w2)) if w2 > 0 else math.inf)
        stat.sort()
        rec = {"iteration": it, "evaluations": evals, "cost": float(c.detach()), "data_cost": float(data.detach()),
               "grad_norm": math.sqrt(grad_sq),
               "stationarity_max": stat[-1], "stationarity_median": stat[len(stat) // 2],
               "seconds": time.time() - t0}
        if evaluate is not None:
            rec.update(evaluate(model))
        return rec

    chunk = chunk or max(10, min(50, max_iter // 10))
    t0 = time.time()
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=chunk, max_eval=2 * chunk, tolerance_grad=0.0,
                            tolerance_change=0.0, history_size=history_size, line_search_fn="strong_wolfe")
    history = [measure(0, 0)]
    stop = "max_iter"
    while history[-1]["iteration"] < max_iter:
        if tol > 0 and history[-1]["stationarity_max"] < tol:
            stop = "tol"
            break
        opt.param_groups[0]["max_iter"] = min(chunk, max_iter - history[-1]["iteration"])
        opt.param_groups[0]["max_eval"] = 2 * opt.param_groups[0]["max_iter"]
        opt.step(closure)
        state = opt.state[params[0]]
        rec = measure(int(state["n_iter"]), int(state["func_evals"]))
        stalled = rec["iteration"] <= history[-1]["iteration"] or not rec["cost"] < history[-1]["cost"]
        history.append(rec)
        if not math.isfinite(rec["cost"]):
            raise FloatingPointError(f"L-BFGS diverged (cost {rec['cost']})")
        if stalled:
            stop = "stalled"
            break
    else:
        if tol > 0 and history[-1]["stationarity_max"] < tol:
            stop = "tol"
    model.zero_grad(set_to_none=True)
    last = history[-1]
    before = [h for h in history if h["iteration"] <= 0.75 * last["iteration"]][-1]  # history[0] qualifies
    drop = (before["cost"] - last["cost"]) / abs(before["cost"]) if before["cost"] else 0.0
    summary = {k: last[k] for k in ("iteration", "evaluations", "cost", "data_cost", "grad_norm",
                                    "stationarity_max", "stationarity_median", "seconds")}
    summary.update(stop=stop, converged=bool(tol > 0 and last["stationarity_max"] < tol), tol=tol,
                   cost_drop_last_quarter=drop, dtype=str(dtype).replace("torch.", ""), history=history)
    if label is not None:
        print(f"  {label}: L-BFGS {last['iteration']} it ({last['evaluations']} evals, {stop}) cost "
              f"{last['cost']:.6g} data {last['data_cost']:.4g} |grad| {last['grad_norm']:.2e} stationarity max "
              f"{last['stationarity_max']:.3g} median {last['stationarity_median']:.3g}"
              + "".join(f" {k} {last[k]:.4g}" for k in last if k not in summary) + f" ({last['seconds']:.0f} s)",
              flush=True)
    return summary


def _losses(model: torch.nn.Module, task: Task) -> Dict:
    train_loss, test_loss, _, _ = _evaluate(model, task)
    return {"train_loss": train_loss, "test_loss": test_loss}


# --------------------------------------------------------------------------------------------- fig1
def fig1(args, s: Dict) -> Dict:
    task = teacher((30, K_STAR, 30), n_train=s["n"], n_test=s["n"], seed=args.data_seed)
    print(f"fig1: {task.name}, width {s['width']}, L={s['depth']}, io={args.io}, {args.scheme}, lambda = "
          f"{s['lam']:g}/Lt, {s['steps']} Adam + {s['sgd_steps']} SGD steps + up to {s['lbfgs_steps']} L-BFGS "
          f"iterations ({s['dtype']}, stationarity target {s['tol']:g}), Lt in {list(s['lts'])}", flush=True)
    rows, runs = [], []
    progress = not args.no_progress
    for lt in s["lts"]:
        t0 = time.time()
        config = _config(args, s, data="teacher", depth=s["depth"], effective_depth=lt, rule="uniform")
        result = _train(config, task, args.io, f"Lt={lt:g}", progress)
        conv = None
        if s["lbfgs_steps"]:
            conv = converge(result.model, task.x_train, task.y_train, config.decay(), max_iter=s["lbfgs_steps"],
                            tol=s["tol"], dtype=DTYPES[s["dtype"]], history_size=s["history"],
                            label=f"Lt={lt:g}" if progress else None)
        losses = _losses(result.model, task)
        diag = diagnose(result.model, task.x_train, task.y_train, lam=config.decay())
        b, bs = diag.bottleneck("hamiltonian"), diag.bottleneck("hamiltonian_step")
        h = [-2.0 / lt * v for v in diag.column("hamiltonian")]
        mid = h[len(h) // 4: len(h) - len(h) // 4]
        stat = sorted(v for v in diag.column("stationarity")[1:] if v is not None)
        rows.append({"Lt": lt, "-2H/Lt median": b["h_median"], "-2H/Lt min": b["h_min"], "-2H/Lt max": b["h_max"],
                     "mid-half spread": (max(mid) - min(mid)) / abs(statistics.median(mid)),
                     "step-pair median": bs["h_median"], "min COI": b["coi_min"], "min COI_g": b["coi_stable_min"],
                     "min rank": min(diag.column("rank_threshold_centered")),
                     "stationarity": b.get("stationarity_max"), "stationarity median": stat[len(stat) // 2],
                     "grad norm": conv["grad_norm"] if conv else None,
                     "L-BFGS its": conv["iteration"] if conv else 0,
                     "train loss": losses["train_loss"], "train loss / lambda": losses["train_loss"] / config.decay(),
                     "test loss": losses["test_loss"], "seconds": time.time() - t0})
        runs.append({"run": _run_dict(result, conv, losses), "diagnostics": diag.to_dict()})
        if progress:
            r = rows[-1]
            print(f"  Lt={lt:g}: -2H/Lt median {r['-2H/Lt median']:.4g} [{r['-2H/Lt min']:.4g}, {r['-2H/Lt max']:.4g}]"
                  f"  min COI_g {r['min COI_g']:.4g}  stationarity {r['stationarity']:.3g}  test {r['test loss']:.4g}"
                  f"  ({r['seconds']:.0f} s)", flush=True)
        if lt == s["spectra_lt"]:
            path = diag.plot(os.path.join(args.out, f"fig1_layers_Lt{lt:g}.png"),
                             title=f"fig1 layers at Lt={lt:g} ({args.io} io, L={s['depth']}, w={s['width']}, "
                                   f"lambda={s['lam']:g}/Lt)")
            print(f"  wrote {path}")
    columns = [c for c in rows[0] if c != "min COI"]
    table = format_table(rows, columns)
    print(table)
    _write_table(args.out, "fig1", table,
                 f"k* = {K_STAR}; lambda = {s['lam']:g}/Lt. -2H/Lt over the layers l = 0..L with H = H(A_l, B_l); "
                 "mid-half spread: (max - min) / |median| of -2H/Lt over the middle half of the layers; "
                 "'step-pair' uses H(A_{l-1}, B_l); min COI_g: smallest stabilised COI (g0 = 1e-3) over the layers; "
                 "min rank: smallest centred threshold rank (1e-2) over the layers; stationarity: max (and median) "
                 "over blocks of |W_l - Lt B_l s(A_{l-1})^T| / |W_l| (0 at a critical point, where H is conserved); "
                 "grad norm: of the regularised cost at the end; seconds: Adam + L-BFGS + diagnostics.")
    _plot_fig1(args.out, rows, runs, args.io, s["lam"])
    return {"figure": "fig1", "rows": rows, "runs": runs}


def _plot_fig1(out: str, rows: List[Dict], runs: List[Dict], io: str, lam: float) -> None:
    """(a) -(2/Lt) H over Lt (symlog: linear within +-10); (b) the smallest COI and rank over the layers;
    (c) -(2/Lt) H along depth for every Lt; (d) the L-BFGS convergence: largest stationarity over the blocks."""
    plt = _pyplot()
    lts = [r["Lt"] for r in rows]
    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    a = ax[0, 0]
    a.fill_between(lts, [r["-2H/Lt min"] for r in rows], [r["-2H/Lt max"] for r in rows], alpha=0.25,
                   label="-(2/Lt) H(A_l, B_l): min..max over layers")
    a.plot(lts, [r["-2H/Lt median"] for r in rows], "o-", label="-(2/Lt) H(A_l, B_l): median over layers")
    a.plot(lts, [r["step-pair median"] for r in rows], "s--", label="-(2/Lt) H(A_{l-1}, B_l): median")
    a.plot(lts, [r["min COI_g"] for r in rows], "^--", label="min COI (g0=1e-3)")
    a.axhline(K_STAR, color="k", ls=":", label=f"k* = {K_STAR}")
    a.set_yscale("symlog", linthresh=10)
    a.set_xlabel("effective depth Lt")
    a.set_title(f"fig1: -(2/Lt) H ({io} io, lambda={lam:g}/Lt; symlog)")
    a.legend(fontsize=8)
    a = ax[0, 1]
    a.plot(lts, [r["min COI_g"] for r in rows], "^-", label="min over layers of COI (g0=1e-3)")
    a.plot(lts, [r["min rank"] for r in rows], "x--", label="min over layers of rank (centred, 1e-2)")
    a.axhline(K_STAR, color="k", ls=":", label=f"k* = {K_STAR}")
    a.set_yscale("log"), a.set_xlabel("effective depth Lt"), a.set_title("bottleneck: COI and rank")
    a.legend(fontsize=8)
    a = ax[1, 0]
    for r in runs:
        d = r["diagnostics"]
        lt = d["effective_depth"]
        p = [layer["depth"] for layer in d["layers"]]
        a.plot(p, [-2 / lt * layer["hamiltonian"] for layer in d["layers"]], ".-", label=f"Lt={lt:g}")
    a.axhline(K_STAR, color="k", ls=":")
    a.set_yscale("symlog", linthresh=10)
    a.set_xlabel("depth p"), a.set_ylabel("-(2/Lt) H(A_p, B_p)"), a.set_title("Hamiltonian along depth (symlog)")
    a.legend(fontsize=8)
    a = ax[1, 1]
    for r in runs:
        conv = r["run"].get("lbfgs")
        if conv:
            it = [h["iteration"] for h in conv["history"]]
            line, = a.semilogy(it, [h["stationarity_max"] for h in conv["history"]], "-",
                               label=f"Lt={r['diagnostics']['effective_depth']:g}")
            a.semilogy(it, [h["stationarity_median"] for h in conv["history"]], ":", color=line.get_color())
    a.set_xlabel("L-BFGS iteration"), a.set_ylabel("stationarity |W - Lt B s^T| / |W|")
    a.set_title("convergence: max (solid) and median (dotted) over blocks"), a.legend(fontsize=8)
    _save(fig, os.path.join(out, "fig1.png"))


# --------------------------------------------------------------------------------------------- fig2
def fig2(args, s: Dict) -> Dict:
    task = get_task("teacher-resnet", seed=args.data_seed, n_train=s["n"], n_test=s["n"])
    seeds = list(range(s["seeds"]))
    print(f"fig2: {task.name}, width {s['width']}, Lt={args.lt:g}, io={args.io}, {args.scheme}, lambda = "
          f"{s['lam']:g}/Lt, {s['steps']} Adam (rules adapt) + {s['sgd_steps']} SGD steps + {s['lbfgs_steps']} "
          f"L-BFGS iterations (steps frozen, {s['dtype']}), L in {list(s['depths'])}, rules {args.rules}, "
          f"seeds {seeds}", flush=True)
    runs = []
    progress = not args.no_progress

    def evaluate(model):
        return {"test_loss": _losses(model, task)["test_loss"]}

    for depth in s["depths"]:
        for rule in args.rules:
            for seed in seeds:
                label = f"L={depth} {rule} seed {seed}"
                config = _config(args, s, data="teacher-resnet", depth=depth, effective_depth=args.lt, rule=rule,
                                 seed=seed)
                result = _train(config, task, args.io, label, progress)
                conv = None
                if s["lbfgs_steps"]:
                    conv = converge(result.model, task.x_train, task.y_train, config.decay(),
                                    max_iter=s["lbfgs_steps"], tol=s["tol"], dtype=DTYPES[s["dtype"]],
                                    history_size=s["history"], evaluate=evaluate, label=label if progress else None)
                runs.append(_run_dict(result, conv, _losses(result.model, task)))
    rows = _fig2_rows(runs, s["depths"], args.rules)
    table = format_table(rows, list(rows[0]))
    print(table)
    _write_table(args.out, "fig2", table, f"test error = test MSE (predicting 0 scores 30); lambda = {s['lam']:g}/Lt; "
                 f"median [min, max] over {len(seeds)} seeds; 'vs uniform' = median over seeds of the ratio to the "
                 "uniform run with the same seed; 'wins' = seeds where the rule beats uniform; 'cost drop' = "
                 "relative decrease of the regularised cost over the last quarter of the L-BFGS iterations "
                 "(median over seeds); 'grad norm': of the regularised cost at the end (median).")
    _plot_fig2(args.out, runs, rows, s["depths"], args.rules, s["profile_depth"], s["steps"] + s["sgd_steps"])
    return {"figure": "fig2", "rows": rows, "runs": runs}


def _fig2_rows(runs: List[Dict], depths: Sequence[int], rules: Sequence[str]) -> List[Dict]:
    rows = []
    for depth in depths:
        base = {r["seed"]: r["test_loss"] for r in runs if r["depth"] == depth and r["rule"] == "uniform"}
        for rule in rules:
            mine = [r for r in runs if r["depth"] == depth and r["rule"] == rule]
            err = [r["test_loss"] for r in mine]
            ratios = [r["test_loss"] / base[r["seed"]] for r in mine if r["seed"] in base]
            conv = [r["lbfgs"] for r in mine if r.get("lbfgs")]
            rows.append({"L": depth, "rule": rule, "test error (median)": statistics.median(err),
                         "min": min(err), "max": max(err),
                         "train loss (median)": statistics.median(r["train_loss"] for r in mine),
                         "vs uniform": statistics.median(ratios) if ratios and rule != "uniform" else None,
                         "wins": f"{sum(q < 1 for q in ratios)}/{len(ratios)}" if ratios and rule != "uniform" else None,
                         "cost drop": statistics.median(c["cost_drop_last_quarter"] for c in conv) if conv else None,
                         "grad norm": statistics.median(c["grad_norm"] for c in conv) if conv else None})
    return rows


def _plot_fig2(out, runs, rows, depths, rules, profile_depth, first_phase) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(1, 3, figsize=(18, 4.8))
    a = ax[0]
    for i, rule in enumerate(rules):
        mine = [r for r in rows if r["rule"] == rule]
        x = [r["L"] + 0.12 * (i - len(rules) / 2) for r in mine]
        med = [r["test error (median)"] for r in mine]
        a.errorbar(x, med, yerr=[[m - r["min"] for m, r in zip(med, mine)], [r["max"] - m for m, r in zip(med, mine)]],
                   fmt="o-", capsize=3, label=rule)
    a.set_xlabel("number of blocks L"), a.set_ylabel("test error (MSE), median and min..max over seeds")
    a.set_title("fig2: test error against L"), a.legend(fontsize=8)
    a = ax[1]
    for rule in rules:
        profiles = [r["final_steps"] for r in runs if r["depth"] == profile_depth and r["rule"] == rule]
        if profiles:
            t = torch.tensor(profiles, dtype=torch.float64)
            a.plot(range(1, t.shape[1] + 1), t.median(0).values.tolist(), "o-", ms=3, label=rule)
    a.set_xlabel("block l"), a.set_ylabel("step size rho_l (median over seeds)")
    a.set_title(f"step profiles at L={profile_depth}"), a.legend(fontsize=8)
    a = ax[2]
    for i, rule in enumerate(rules):
        mine = [r for r in runs if r["depth"] == profile_depth and r["rule"] == rule]
        if not mine:
            continue
        steps, train, test = _median_curve(mine)
        a.semilogy(steps, train, "-", color=f"C{i}", label=f"{rule} train")
        a.semilogy(steps, test, "--", color=f"C{i}", label=f"{rule} test")
    a.axvline(first_phase, color="k", ls=":", lw=1)
    a.set_xlabel("Adam steps, then L-BFGS iterations (after the dotted line)"), a.set_ylabel("MSE (median over seeds)")
    a.set_title(f"training curves at L={profile_depth}"), a.legend(fontsize=7, ncol=2)
    _save(fig, os.path.join(out, "fig2.png"))


def _median_curve(runs: List[Dict]):
    """(step, median train loss, median test loss) over runs sharing one schedule: the Adam / SGD phase's
    evaluations, then the L-BFGS phase's, offset by the first phase's length."""
    curves = []
    for r in runs:
        h = r["history"]
        pts = list(zip(h["step"], h["train_loss"], h["test_loss"]))
        conv = r.get("lbfgs")
        if conv:
            offset = h["step"][-1]
            pts += [(offset + c["iteration"], c["data_cost"], c.get("test_loss", math.nan)) for c in conv["history"][1:]]
        curves.append(pts)
    n = min(len(c) for c in curves)
    steps = [curves[0][i][0] for i in range(n)]
    med = lambda j: [statistics.median(c[i][j] for c in curves) for i in range(n)]  # noqa: E731
    return steps, med(1), med(2)


# ------------------------------------------------------------------------------------------ helpers
def _run_dict(result, conv: Optional[Dict] = None, losses: Optional[Dict] = None) -> Dict:
    """One run: ``history`` is the Adam / SGD phase, ``lbfgs`` the L-BFGS phase (``converge``'s summary);
    ``train_loss`` / ``test_loss`` are the final ones (after both)."""
    c = result.config
    losses = losses or {"train_loss": result.train_loss, "test_loss": result.test_loss}
    return {"depth": c.depth, "effective_depth": c.effective_depth, "rule": c.rule, "seed": c.seed,
            "train_loss": losses["train_loss"], "test_loss": losses["test_loss"], "final_steps": result.final_steps,
            "seconds_per_step": result.seconds_per_step, "history": result.history, "lbfgs": conv,
            "config": dataclasses.asdict(c)}


def _write_table(out: str, name: str, table: str, note: str) -> None:
    with open(os.path.join(out, f"{name}.md"), "w") as fh:
        fh.write(f"{table}\n\n{note}\n")


def _meta(args, s: Dict, seconds: float) -> Dict:
    return {"command": "adaptive-depth paper " + args.figure + (" --quick" if args.quick else ""),
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()},
            "args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "seconds": seconds,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "commit": _commit()}


def _commit() -> str:
    """The git commit of the checkout (and '+changes' when the tree differs), or '' outside git."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + ("+changes" if head and dirty else "")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    print(f"  wrote {path}")
