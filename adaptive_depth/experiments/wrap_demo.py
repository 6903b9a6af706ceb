"""``adaptive-depth wrap-demo``: wrap a torchvision resnet18 and train it, uniform against adaptive steps.

The task is embedded (no downloads): 32x32 colour images of 8 procedurally drawn classes (disk, ring,
square, cross, horizontal / vertical / diagonal stripes, checkerboard) with random position, size,
frequency, phase, colours and pixel noise, made from ``--data-seed``. The runs share the model seed, the
data and the batch order: the wrapped model with fixed uniform steps, the wrapped model under
``AdaptiveSteps`` (``--rule``), and with ``--plain`` the unwrapped torchvision model. Prints a table of
final train/test loss and accuracy, time per step and the step sizes per stage.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from .._validate import check_positive

CLASSES = ("disk", "ring", "square", "cross", "h-stripes", "v-stripes", "diagonal", "checker")
ARMS = ("plain", "uniform", "adaptive")  # the unwrapped resnet18; wrapped with uniform steps; with AdaptiveSteps


# ------------------------------------------------------------------------------------------- data
def _masks(kind: str, n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """(n, size, size) masks in {0, 1} of one class."""
    def u(lo, hi):
        return (lo + (hi - lo) * torch.rand(n, 1, 1, generator=gen))
    axis = torch.linspace(-1, 1, size)
    y, x = axis.view(1, size, 1), axis.view(1, 1, size)
    cx, cy, r = u(-0.35, 0.35), u(-0.35, 0.35), u(0.3, 0.6)
    freq, phase = u(2.0, 5.0), u(0.0, 2 * math.pi)
    dx, dy = x - cx, y - cy
    if kind == "disk":
        m = dx.square() + dy.square() < r.square()
    elif kind == "ring":
        m = ((dx.square() + dy.square()).sqrt() - r).abs() < 0.1 + 0.1 * r
    elif kind == "square":
        m = torch.maximum(dx.abs(), dy.abs()) < 0.8 * r
    elif kind == "cross":
        w = 0.1 + 0.1 * r
        m = ((dx.abs() < w) & (dy.abs() < r)) | ((dy.abs() < w) & (dx.abs() < r))
    elif kind == "h-stripes":
        m = torch.sin(math.pi * freq * y + phase) > 0
    elif kind == "v-stripes":
        m = torch.sin(math.pi * freq * x + phase) > 0
    elif kind == "diagonal":
        sign = torch.where(torch.rand(n, 1, 1, generator=gen) < 0.5, -1.0, 1.0)
        m = torch.sin(math.pi * freq * (x + sign * y) / math.sqrt(2) + phase) > 0
    else:  # checker
        m = torch.sin(math.pi * freq * x + phase) * torch.sin(math.pi * freq * y + 2 * phase) > 0
    return m.expand(n, size, size).float()


def shapes(n: int, *, seed: int = 0, size: int = 32, noise: float = 0.25) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (n, 3, size, size) and labels in ``range(8)`` (balanced, shuffled), from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(CLASSES)
    labels = labels[torch.randperm(n, generator=gen)]
    images = torch.empty(n, 3, size, size)
    for c, kind in enumerate(CLASSES):
        idx = (labels == c).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        mask = _masks(kind, idx.numel(), size, gen).unsqueeze(1)
        bg = torch.rand(idx.numel(), 3, 1, 1, generator=gen)
        fg = (bg + torch.where(torch.rand(idx.numel(), 3, 1, 1, generator=gen) < 0.5, -0.5, 0.5)).clamp(0, 1)
        images[idx] = bg + (fg - bg) * mask
    images += noise * torch.randn(images.shape, generator=gen)
    return (images - 0.5) / 0.3, labels


# --------------------------------------------------------------------------------------- training
def _evaluate(model, x, y, batch: int = 250) -> Tuple[float, float]:
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = model(x[i:i + batch])
            loss += F.cross_entropy(out, y[i:i + batch], reduction="sum").item()
            correct += (out.argmax(1) == y[i:i + batch]).sum().item()
    model.train()
    return loss / len(x), correct / len(x)


def train_one(config: str, args, data) -> Dict:
    """One run: ``config`` is ``"plain"``, ``"uniform"`` or ``"adaptive"``."""
    import torchvision
    from ..optim import AdaptiveSteps
    from ..schedule import EffectiveDepthScheduler
    from ..steps import step_groups
    from ..wrap import wrap

    x_train, y_train, x_test, y_test = data
    torch.manual_seed(args.seed)
    model = torchvision.models.resnet18(num_classes=len(CLASSES))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = None
    if config != "plain":
        init = args.init
        wrap(model, effective_depth=0.0 if args.ramp else args.lt, scheme=args.scheme,
             branch_identity=init == "identity")
        if init == "balanced":
            from ..residual import balance_branches_
            balance_branches_(model)
        elif init == "identity":  # r at lr / Lt (docs/large_lt.md)
            from ..recipes import identity_param_groups
            opt = torch.optim.AdamW(identity_param_groups(model, lr=args.lr), lr=args.lr,
                                    weight_decay=args.weight_decay)
        if config == "adaptive":
            opt = AdaptiveSteps(opt, model, rule=args.rule, every=args.every)
        if args.ramp:
            sched = EffectiveDepthScheduler(model, target=args.lt, total_steps=args.ramp)
    order = torch.Generator().manual_seed(args.seed + 1)
    model.train()
    start = time.perf_counter()
    for _ in range(args.steps):
        idx = torch.randint(0, len(x_train), (args.batch_size,), generator=order)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    ms = 1e3 * (time.perf_counter() - start) / args.steps
    train_loss, train_acc = _evaluate(model, x_train, y_train)
    test_loss, test_acc = _evaluate(model, x_test, y_test)
    steps = {name: [round(v, 3) for v in g.rho.detach().double().tolist()]
             for name, g in zip(getattr(model, "leaky_steps", {}), step_groups(model))}
    return {"config": config, "train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss,
            "test_acc": test_acc, "ms_per_step": ms, "steps": steps}


def format_table(rows) -> str:
    head = (f"{'run':<10} {'train loss':>10} {'train acc':>9} {'test loss':>9} {'test acc':>8} {'ms/step':>8}  "
            f"steps per stage")
    lines = [head, "-" * len(head)]
    for r in rows:
        steps = "  ".join(f"{k}:[{', '.join(f'{v:.2f}' for v in s)}]" for k, s in r["steps"].items()) or "-"
        lines.append(f"{r['config']:<10} {r['train_loss']:>10.4f} {r['train_acc']:>9.3f} {r['test_loss']:>9.4f} "
                     f"{r['test_acc']:>8.3f} {r['ms_per_step']:>8.1f}  {steps}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="AdamW weight decay")
    p.add_argument("--lt", "--effective-depth", dest="lt", type=float, default=0.5,
                   help="effective depth Lt of every stage (euler with unit steps needs Lt < 1)")
    p.add_argument("--scheme", choices=["euler", "exponential"], default="euler")
    p.add_argument("--rule", default="equal_distance", choices=["equal_distance", "paper", "weight_norm", "learned"],
                   help="the adaptive rule compared against uniform steps")
    p.add_argument("--every", type=int, default=10, help="adapt the steps every N optimizer steps")
    p.add_argument("--ramp", type=int, default=0,
                   help="raise Lt from 0 to --lt over this many steps (EffectiveDepthScheduler); 0: start at --lt")
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="model and batch-order seed")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest on a small shared machine; raise it on an idle one)")
    p.add_argument("--plain", action="store_true", help="also train the unwrapped torchvision model (a third run)")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=None,
                   help="the runs to make, in this order (default: uniform adaptive, after plain with --plain); "
                        "e.g. --arms plain for one arm of an lr search")
    p.add_argument("--init", choices=["none", "balanced", "identity"], default="none",
                   help="large Lt (docs/large_lt.md): 'balanced' scales each branch's last norm by max(1, Lt) "
                        "(balance_branches_), 'identity' wraps with branch_identity=True (r at lr / Lt)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def _check(args) -> None:
    for name in ("steps", "batch_size", "every", "train_size", "test_size", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.ramp < 0:
        raise ValueError(f"--ramp must be >= 0, got {args.ramp}")
    if args.init == "identity" and (args.ramp or args.lt <= 0):
        raise ValueError("--init identity needs --lt > 0 and no --ramp (its r trains at lr / Lt)")
    check_positive(args.lr, "--lr")


def arms(args) -> Tuple[str, ...]:
    """The runs to make: ``--arms`` in its order (plain first if ``--plain`` adds it), else uniform and adaptive."""
    chosen = tuple(dict.fromkeys(args.arms)) if args.arms else ("uniform", "adaptive")
    return (("plain",) if args.plain and "plain" not in chosen else ()) + chosen


def run(args) -> int:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        print("wrap-demo needs torchvision: pip install torchvision")
        return 1
    try:
        _check(args)
    except ValueError as err:
        print(f"wrap-demo: {err}")
        return 2
    torch.set_num_threads(args.threads)
    x_train, y_train = shapes(args.train_size, seed=args.data_seed)
    x_test, y_test = shapes(args.test_size, seed=args.data_seed + 10_000)
    data = (x_train, y_train, x_test, y_test)
    print(f"shapes task: {len(CLASSES)} classes ({', '.join(CLASSES)}), 32x32, {args.train_size} train / "
          f"{args.test_size} test; torchvision resnet18, {args.steps} AdamW steps of {args.batch_size}, "
          f"Lt={args.lt:g} ({args.scheme}{f', ramped over {args.ramp} steps' if args.ramp else ''}, "
          f"init {args.init}), "
          f"adaptive rule {args.rule!r} every {args.every} steps, {args.threads} thread(s)")
    rows = []
    for config in arms(args):
        rows.append(train_one(config, args, data))
        print(f"  {config}: done ({rows[-1]['ms_per_step']:.0f} ms/step)", flush=True)
    print()
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "runs": rows},
                      fh, indent=2)
    return 0
