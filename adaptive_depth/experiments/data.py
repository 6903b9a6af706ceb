"""Embedded tasks, generated from a seed: no downloads.

``teacher``: a random teacher network with a low-dimensional bottleneck (the paper's setting), e.g.
dims ``(30, 3, 30)``: x ~ N(0, I_30), f*(x) = W_2 relu(W_1 x) with W_1 of rank 3, outputs scaled to unit
variance. ``kind="resnet"`` makes every map a small random residual net (the paper's Fig. 2 teacher).
``mnist1d``: the MNIST-1D classification set (40-dim signals, 10 classes), generated offline by the
``mnist1d`` package (``pip install mnist1d``, part of the ``dev`` extra).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["Task", "teacher", "mnist1d", "get_task", "TASKS"]


@dataclass
class Task:
    """A supervised task: train and test tensors and the loss that goes with them."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    loss: str  # "mse" (sum over outputs, mean over examples) or "ce" (cross-entropy)

    @property
    def in_dim(self) -> int:
        return self.x_train.shape[1]

    @property
    def out_dim(self) -> int:
        return int(self.y_train.max()) + 1 if self.loss == "ce" else self.y_train.shape[1]

    def loss_fn(self, pred: Tensor, target: Tensor) -> Tensor:
        if self.loss == "ce":
            return torch.nn.functional.cross_entropy(pred, target)
        return (pred - target).pow(2).sum(1).mean()

    def error(self, pred: Tensor, target: Tensor) -> float:
        """Test error: misclassification rate ("ce") or the loss itself ("mse")."""
        if self.loss == "ce":
            return float((pred.argmax(1) != target).float().mean())
        return float(self.loss_fn(pred, target))


def _random_map(d_in: int, d_out: int, kind: str, gen: torch.Generator):
    w = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) / math.sqrt(d_in)
    if kind == "mlp":
        return lambda x: x @ w.T
    if kind == "resnet":
        u = torch.randn(4 * d_in, d_in, generator=gen, dtype=torch.float64) / math.sqrt(d_in)
        v = torch.randn(d_in, 4 * d_in, generator=gen, dtype=torch.float64) / math.sqrt(4 * d_in)
        return lambda x: (x + torch.relu(x @ u.T) @ v.T) @ w.T
    raise ValueError(f"kind must be 'mlp' or 'resnet', got {kind!r}")


def teacher(dims: Sequence[int] = (30, 3, 30), *, n_train: int = 1000, n_test: int = 1000, seed: int = 0,
            kind: str = "mlp", noise: float = 0.0) -> Task:
    """A random teacher ``dims[0] -> ... -> dims[-1]``; ReLU between maps, the narrowest dim is the
    bottleneck rank k*. Inputs are N(0, I); outputs are scaled to unit variance per coordinate."""
    dims = [int(d) for d in dims]
    if len(dims) < 2 or min(dims) < 1:
        raise ValueError(f"dims must list at least two positive sizes, got {dims}")
    for name, n in (("n_train", n_train), ("n_test", n_test)):
        if n < 1:
            raise ValueError(f"{name} must be >= 1, got {n}")
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    gen = torch.Generator().manual_seed(seed)
    maps = [_random_map(a, b, kind, gen) for a, b in zip(dims[:-1], dims[1:])]
    x = torch.randn(n_train + n_test, dims[0], generator=gen, dtype=torch.float64)
    h = x
    for i, m in enumerate(maps):
        h = m(h if i == 0 else torch.relu(h))
    y = h / h[:n_train].std(0, keepdim=True).clamp(min=1e-12)
    if noise > 0:
        y = y + noise * torch.randn(y.shape, generator=gen, dtype=torch.float64)
    x, y = x.float(), y.float()
    name = f"teacher{'-'.join(map(str, dims))}" + ("-resnet" if kind == "resnet" else "")
    return Task(name, x[:n_train], y[:n_train], x[n_train:], y[n_train:], "mse")


def mnist1d(*, n_train: int = 4000, n_test: int = 1000, seed: int = 42) -> Task:
    """MNIST-1D (Greydanus 2020), generated locally from its templates (no download)."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:
        raise ImportError("data='mnist1d' needs the mnist1d package: pip install mnist1d "
                          "(or pip install 'adaptive-depth[dev]')") from err
    args = get_dataset_args()
    args.num_samples = n_train + n_test
    args.train_split = n_train / (n_train + n_test)
    args.seed = seed
    data = make_dataset(args)
    to = lambda a, dt: torch.as_tensor(a, dtype=dt)  # noqa: E731
    x_train, x_test = to(data["x"], torch.float32), to(data["x_test"], torch.float32)
    mean, std = x_train.mean(0, keepdim=True), x_train.std(0, keepdim=True).clamp(min=1e-6)
    return Task("mnist1d", (x_train - mean) / std, to(data["y"], torch.long), (x_test - mean) / std,
                to(data["y_test"], torch.long), "ce")


TASKS = ("teacher", "teacher-resnet", "mnist1d")


def get_task(name: str, *, seed: int = 0, n_train: int = 1000, n_test: int = 1000) -> Task:
    """A task by name: ``teacher`` (30 -> 3 -> 30), ``teacher-resnet`` (30 -> 6 -> 3 -> 30, random ResNet
    maps) or ``mnist1d``."""
    if name == "teacher":
        return teacher((30, 3, 30), n_train=n_train, n_test=n_test, seed=seed)
    if name == "teacher-resnet":
        return teacher((30, 6, 3, 30), n_train=n_train, n_test=n_test, seed=seed, kind="resnet")
    if name == "mnist1d":
        return mnist1d(n_train=max(n_train, 1000), n_test=n_test, seed=seed)
    raise ValueError(f"data must be one of {TASKS}, got {name!r}")
