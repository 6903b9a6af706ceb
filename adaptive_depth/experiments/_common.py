"""Helpers the experiment commands share: seed spreads and the command line a result file records."""
from __future__ import annotations

import statistics
from typing import Dict, List, Optional, Sequence

__all__ = ["spread", "command_argv"]


def spread(values: Sequence[Optional[float]]) -> Dict:
    """Median, min and max over seeds of the values that exist; ``missing`` counts the ``None`` (e.g. a run
    that never reached a target)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0, "missing": len(values)}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals),
            "missing": len(values) - len(vals)}


def command_argv(args) -> List[str]:
    """The flags that reproduce a parsed subcommand: every set option, as the parser reads it back (the
    subcommand's own name and private ``_`` entries left out; numbers written in full, not rounded)."""
    out = []
    for k, v in vars(args).items():
        if k.startswith("_") or k == "command" or v is None or v is False:
            continue
        flag = "--" + ("json" if k == "json_out" else k.replace("_", "-"))
        if v is True:
            out.append(flag)
        elif isinstance(v, (list, tuple)):
            out += [flag] + [str(x) for x in v]
        else:
            out += [flag, str(v)]
    return out
