"""A family of teacher tasks with a known bottleneck rank, split by seed into tuning and held-out tasks.

Task ``seed`` draws everything from one generator: input and output dimensions, the bottleneck rank
``k*`` (1..6), the teacher's nonlinearity and hidden width, the label noise, the sample sizes, and the
student's width, depth and batch size. The teacher is

    x ~ N(0, I_d_in),   z = P x  (P: k* x d_in, orthonormal rows),   y = M phi(U z + c)   (+ noise)

so y depends on x only through the k*-dimensional z: a network that represents z in its middle layers
has found the bottleneck. Outputs are standardised per coordinate on the training points; the loss is
the squared error summed over outputs, averaged over examples (as the other teachers in ``data``).

The split is by seed: ``TUNING_SEEDS`` (0-99) and ``HELDOUT_SEEDS`` (1000-1999). ``draw(seed, split)``
refuses a seed outside its split, so tuning code, which asks for ``split="tuning"``, cannot draw a
held-out task by mistake; choose defaults on the first, report the second.

    spec, task = draw(3, "tuning")        # FamilySpec (what was drawn), FamilyTask (tensors)
    draw(1000, "tuning")                  # ValueError: seed 1000 is not a tuning seed (0-99)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .data import Task

__all__ = ["TUNING_SEEDS", "HELDOUT_SEEDS", "SPLITS", "NONLINEARITIES", "FamilySpec", "FamilyTask",
           "spec_for", "teacher_function", "make_task", "draw", "split_seeds", "check_split"]

TUNING_SEEDS = range(0, 100)
HELDOUT_SEEDS = range(1000, 2000)
SPLITS: Dict[str, range] = {"tuning": TUNING_SEEDS, "heldout": HELDOUT_SEEDS}
NONLINEARITIES = {"tanh": torch.tanh, "relu": torch.relu, "sin": torch.sin,
                  "softplus": torch.nn.functional.softplus}

# the ranges each draw picks from (uniformly); sized for a CPU (a run of 1000 steps in a few seconds)
_CHOICES = {
    "in_dim": (8, 12, 16, 20, 24, 32), "out_dim": (8, 12, 16, 20, 24, 32), "rank": (1, 2, 3, 4, 5, 6),
    "nonlinearity": tuple(NONLINEARITIES), "noise": (0.0, 0.05, 0.1), "n_train": (500, 750, 1000),
    "width": (32, 48, 64), "depth": (8, 10, 12), "batch_size": (None, 128),
}
N_VAL, N_TEST = 250, 500


@dataclass(frozen=True)
class FamilySpec:
    """What task ``seed`` drew: the teacher and the student's architecture and batch size."""

    seed: int
    split: str
    in_dim: int
    out_dim: int
    rank: int
    hidden: int
    nonlinearity: str
    gain: float
    noise: float
    n_train: int
    n_val: int
    n_test: int
    width: int
    depth: int
    batch_size: Optional[int]

    def to_dict(self) -> Dict:
        return asdict(self)

    @property
    def name(self) -> str:
        return (f"family{self.seed}:{self.in_dim}-{self.rank}-{self.out_dim}:{self.nonlinearity}"
                f":w{self.width}d{self.depth}")


@dataclass
class FamilyTask(Task):
    """A ``Task`` with a validation split (for learning-rate and model selection), its bottleneck rank, and the
    test labels before the label noise (``y_test_clean``: the loss on them is the excess test loss)."""

    x_val: Optional[Tensor] = None
    y_val: Optional[Tensor] = None
    rank: int = 0
    y_test_clean: Optional[Tensor] = None


def check_split(seed: int, split: str) -> None:
    """Raise a ``ValueError`` unless ``seed`` belongs to ``split`` ("tuning" 0-99 or "heldout" 1000-1999)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed not in SPLITS[split]:
        r = SPLITS[split]
        raise ValueError(f"seed {seed!r} is not a {split} seed ({r.start}-{r.stop - 1}); tuning code must "
                         f"only draw tuning tasks, and held-out tasks are for reporting")


def split_seeds(split: str, n: int, start: int = 0) -> List[int]:
    """The ``n`` seeds of ``split`` from its ``start``-th on."""
    check_split(SPLITS[split].start if split in SPLITS else -1, split)
    r = SPLITS[split]
    if not 1 <= n <= len(r) - start:
        raise ValueError(f"n must be in [1, {len(r) - start}] for split {split!r} from {start}, got {n}")
    return list(r[start:start + n])


def _pick(gen: torch.Generator, options: Tuple):
    return options[int(torch.randint(len(options), (1,), generator=gen))]


def spec_for(seed: int, split: str) -> FamilySpec:
    """The task drawn by ``seed`` (checked against ``split``); the same seed always gives the same spec."""
    check_split(seed, split)
    gen = torch.Generator().manual_seed(7919 * seed + 17)
    c = {k: _pick(gen, v) for k, v in _CHOICES.items()}
    rank = min(c["rank"], c["in_dim"])
    hidden = max(4 * rank, c["out_dim"])
    gain = float(0.5 + 1.5 * torch.rand((), generator=gen))
    return FamilySpec(seed=seed, split=split, in_dim=c["in_dim"], out_dim=c["out_dim"], rank=rank,
                      hidden=hidden, nonlinearity=c["nonlinearity"], gain=gain, noise=c["noise"],
                      n_train=c["n_train"], n_val=N_VAL, n_test=N_TEST, width=c["width"], depth=c["depth"],
                      batch_size=c["batch_size"])


def teacher_function(spec: FamilySpec):
    """``(f, q, gen)``: the teacher ``f(x) = M phi(U q^T x + c)`` in float64 before standardisation and noise,
    its k* input directions ``q`` (orthonormal columns), and the generator, positioned to draw the data."""
    check_split(spec.seed, spec.split)
    gen = torch.Generator().manual_seed(104729 * spec.seed + 3)
    f64 = dict(generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(spec.in_dim, spec.rank, **f64))  # orthonormal columns
    u = spec.gain * torch.randn(spec.hidden, spec.rank, **f64)
    c = 0.5 * torch.randn(spec.hidden, **f64)
    m = torch.randn(spec.out_dim, spec.hidden, **f64) / math.sqrt(spec.hidden)
    phi = NONLINEARITIES[spec.nonlinearity]
    return (lambda x: phi((x @ q) @ u.T + c) @ m.T), q, gen


def make_task(spec: FamilySpec) -> FamilyTask:
    """The tensors of ``spec``'s teacher (float32; generated in float64 from the spec's seed)."""
    f, _, gen = teacher_function(spec)
    n = spec.n_train + spec.n_val + spec.n_test
    x = torch.randn(n, spec.in_dim, generator=gen, dtype=torch.float64)
    y = f(x)
    train = slice(0, spec.n_train)
    clean = (y - y[train].mean(0)) / y[train].std(0).clamp(min=1e-12)
    y = clean + spec.noise * torch.randn(y.shape, generator=gen, dtype=torch.float64) if spec.noise > 0 else clean
    x, y = x.float(), y.float()
    val, test = slice(spec.n_train, spec.n_train + spec.n_val), slice(spec.n_train + spec.n_val, n)
    return FamilyTask(spec.name, x[train], y[train], x[test], y[test], "mse", x_val=x[val], y_val=y[val],
                      rank=spec.rank, y_test_clean=clean[test].float())


def draw(seed: int, split: str) -> Tuple[FamilySpec, FamilyTask]:
    """``(spec, task)`` for task ``seed`` of ``split``; a seed outside the split raises a ``ValueError``."""
    spec = spec_for(seed, split)
    return spec, make_task(spec)
