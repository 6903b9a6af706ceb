"""adaptive-depth: Leaky ResNets with learned per-layer step sizes (Jacot & Kaiser).

    x_{l+1} = x_l + rho_l (f_l(x_l) - Lt x_l),   rho_l > 0,   sum_l rho_l = T

Public surface: ``leaky_update`` (the update), ``LeakyResidual`` / ``LeakyResNet`` / ``LeakyMLP`` (containers),
``AdaptiveSteps`` (the optimizer plugin), ``step_sizes(model)`` (the steps of every group in a model),
``rules`` (pure step-size rules), ``StepSizes`` (one group's steps and constraints), ``wrap`` / ``unwrap``
(torchvision and timm ResNets, exact at Lt = 0), ``EffectiveDepthScheduler`` (raise Lt over training),
``diagnose`` (the paper's per-layer diagnostics).
"""
from . import rules
from .diagnostics import Diagnostics, cost_of_identity, diagnose, effective_rank, hamiltonian, singular_values
from .ops import leaky_update, step_coefficients, triton_available
from .optim import AdaptiveSteps
from .residual import LeakyMLP, LeakyResidual, LeakyResNet, MLPBranch
from .schedule import EffectiveDepthScheduler
from .steps import StepSizes, step_groups, step_sizes
from .wrap import register_adapter, unwrap, wrap  # noqa: F811 - the function, not the submodule

__version__ = "0.1.0"

__all__ = [
    "leaky_update", "step_coefficients", "triton_available", "LeakyResidual", "LeakyResNet", "LeakyMLP",
    "MLPBranch", "AdaptiveSteps", "StepSizes", "step_groups", "step_sizes", "rules", "__version__",
    "wrap", "unwrap", "register_adapter", "EffectiveDepthScheduler", "diagnose", "Diagnostics", "cost_of_identity", "hamiltonian", "effective_rank", "singular_values",
]
