"""A guard on the bottleneck recipe's finishing phase (``docs/science.md`` 3f): tried, and lost held out.

The finish (the penalty off) fits the data inside the low-rank structure the penalised phase found; the guard
was meant to stop it before it adds directions to the middle representation. Held out it met the goal on fewer
tasks than the unguarded finish (3 of 8 against 4 of 8 on fresh tasks 1008-1015): the rank a finish adds is often
the k* + 1-th that the goal allows, and the guard then stops the fit at its start. It stays here, off by default
(``RunConfig.finish_guard = 0``), for the runs that measured it and to watch the rank through a finish
(``slack`` large: it never trips, and ``history`` is the trajectory).
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor, nn

from .._validate import check_int, check_range
from ..recipes import middle_rank

__all__ = ["RankGuard"]


class RankGuard:
    """Ends a finishing phase on the last weights that held the middle rank of its start.

    The finish (the penalty off) fits the data inside the low-rank structure the penalised phase found, but a
    long one also adds directions to the middle representation. The guard takes the middle rank when it is made
    as the reference; ``step()``, called after every optimizer step, measures the rank on ``x`` (the training
    inputs: no held-out data decides anything) every ``every`` calls and keeps a copy of the weights at each check
    that holds it (rank <= reference + ``slack``). It returns True once a check finds the rank above that, and
    ``restore()`` ends the phase on the last weights that held it::

        guard = RankGuard(model, x_train, every=100)
        for _ in range(finish_steps):
            ...                      # forward, backward, opt.step()
            if guard.step():
                break
        guard.restore()

    ``history`` lists ``(calls, middle rank)`` for every check (the first at 0 calls: the reference).
    """

    def __init__(self, model: nn.Module, x: Tensor, *, every: int = 100, threshold: float = 0.1, slack: int = 0):
        every = check_int(every, "every", 1)
        threshold = check_range(threshold, "threshold", 0.0, 1.0, left_open=True, right_open=True)
        slack = check_int(slack, "slack", 0)
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a Tensor of inputs, got {type(x).__name__}")
        self.model, self.x, self.every, self.threshold = model, x, every, threshold
        self.calls = 0
        self.reference = self._rank()  # also checks that model is a LeakyMLP
        self.limit = self.reference + slack
        self.history = [(0, self.reference)]
        self.tripped = False
        self._kept = self._snapshot()

    def _rank(self) -> int:
        training = self.model.training
        self.model.eval()
        try:
            return middle_rank(self.model, self.x, self.threshold)
        finally:
            self.model.train(training)

    def _snapshot(self) -> Dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def step(self) -> bool:
        """Count one optimizer step; on every ``every``-th, check the rank. True once it rose above the limit
        (later calls keep returning True and measure nothing)."""
        if self.tripped:
            return True
        self.calls += 1
        if self.calls % self.every:
            return False
        rank = self._rank()
        self.history.append((self.calls, rank))
        if rank > self.limit:
            self.tripped = True
        else:
            self._kept = self._snapshot()
        return self.tripped

    @property
    def kept_at(self) -> int:
        """The number of calls at the last check that held the rank (the weights ``restore()`` loads)."""
        return max(c for c, r in self.history if r <= self.limit)

    def restore(self) -> nn.Module:
        """End the phase: unless tripped, check the current weights once more (the steps since the last check)
        and keep them if they hold the rank; otherwise load the last copy that held it. Returns the model."""
        if not self.tripped and self.history[-1][0] != self.calls:
            rank = self._rank()
            self.history.append((self.calls, rank))
            if rank <= self.limit:
                return self.model
            self.tripped = True
        if self.tripped:
            with torch.no_grad():
                self.model.load_state_dict(self._kept)
        return self.model
