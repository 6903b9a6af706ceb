"""adaptive-depth: Leaky ResNets with learned per-layer step sizes (Jacot & Kaiser).

    x_{l+1} = x_l + rho_l (f_l(x_l) - Lt x_l),   rho_l > 0,   sum_l rho_l = T

The public surface: ``leaky_update`` (the update), ``LeakyResidual`` / ``LeakyResNet`` / ``LeakyMLP``
(containers), ``AdaptiveSteps`` (the optimizer plugin), ``step_sizes(model)`` (the steps of every group in a
model), ``wrap`` / ``unwrap`` (torchvision and timm ResNets, exact at Lt = 0), ``EffectiveDepthScheduler``
(raise Lt over training), ``refine`` / ``coarsen`` / ``DepthScheduler`` (grow or shrink the depth during training),
``diagnose`` (the paper's per-layer diagnostics) and ``rules`` (the step-size rules).
Everything else lives in its module (``adaptive_depth.steps.StepSizes``, ``adaptive_depth.wrap.register_adapter``,
...); the names that used to be exported here still resolve, lazily. The experiments (demo, benchmarks, the
paper's figures) are in ``adaptive_depth.experiments``, which the library never imports.
"""
from . import _moved, rules
from .depth import DepthScheduler, coarsen, refine
from .diagnostics import diagnose
from .ops import leaky_update
from .optim import AdaptiveSteps
from .residual import LeakyMLP, LeakyResidual, LeakyResNet
from .schedule import EffectiveDepthScheduler
from .steps import step_sizes
from .wrap import unwrap, wrap  # noqa: F811 - the functions, not the submodule

__version__ = "0.1.0"

__all__ = [
    "leaky_update", "LeakyResidual", "LeakyResNet", "LeakyMLP", "AdaptiveSteps", "step_sizes", "wrap",
    "unwrap", "EffectiveDepthScheduler", "diagnose", "rules", "refine", "coarsen", "DepthScheduler", "__version__",
]

# names exported here before, now reached through their modules (kept working: users import them)
_ALIASES = {
    "step_coefficients": "ops", "triton_available": "ops", "MLPBranch": "residual", "StepSizes": "steps",
    "step_groups": "steps", "register_adapter": "wrap", "Diagnostics": "diagnostics",
    "cost_of_identity": "diagnostics", "hamiltonian": "diagnostics", "effective_rank": "diagnostics",
    "singular_values": "diagnostics",
}


def __getattr__(name: str):
    if name in _ALIASES:
        import importlib
        return getattr(importlib.import_module(f".{_ALIASES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_moved.install()
