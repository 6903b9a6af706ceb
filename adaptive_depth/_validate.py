"""Argument checks shared by the optimizer plugin, the scheduler and the step groups.

Each check raises a ``ValueError`` that names the argument, the allowed range and the value received, and
returns the value in canonical form; none of them changes any state, so callers check everything first.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

__all__ = ["check_choice", "check_int", "check_positive", "check_range", "check_step_range", "CheckpointError"]


class CheckpointError(ValueError, RuntimeError):
    """A checkpoint (``state_dict``) that cannot be loaded: nothing was changed.

    A ``ValueError`` (a bad value) and a ``RuntimeError`` (what ``nn.Module.load_state_dict`` raises for a
    checkpoint that does not fit), so code that catches either keeps working."""


def check_choice(value, name: str, allowed: Sequence[str]) -> str:
    """``value`` if it is one of ``allowed`` (a name: a scheme, a shape, an arm)."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def check_int(value, name: str, low: int) -> int:
    """``value`` as an ``int >= low`` (bools are rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def check_positive(value, name: str) -> float:
    """``value`` as a finite float > 0 (bools are rejected): a learning rate, a scale."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_range(value, name: str, low: float, high: float, *, left_open: bool = False,
                right_open: bool = False) -> float:
    """``value`` as a finite float in the interval from ``low`` to ``high`` (open ends as asked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    ok_low = value > low if left_open else value >= low
    ok_high = value < high if right_open else value <= high
    if not (ok_low and ok_high):
        interval = f"{'(' if left_open else '['}{low:g}, {high:g}{')' if right_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return float(value)


def check_step_range(step_range: Sequence[float]) -> Tuple[float, float]:
    """``(low, high)`` in units of the uniform step ``T/L``, with ``0 < low <= 1 <= high``."""
    try:
        low, high = (float(v) for v in step_range)
    except (TypeError, ValueError):
        raise ValueError(f"step_range must be a pair (low, high), got {step_range!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= 1 <= high):
        raise ValueError(f"step_range must satisfy 0 < low <= 1 <= high (units of the uniform step T/L), "
                         f"got {step_range!r}")
    return low, high
