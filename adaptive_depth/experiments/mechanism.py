"""What the steps and Lt change in a ``LeakyMLP``: an exact reparametrisation (issue 9, the mechanism).

A ``LeakyMLP`` block is ``x_{l+1} = a_l x_l + b_l (W_l relu(x_l) + beta_l)`` with ``(a_l, b_l)`` from the steps
(exponential: ``a = exp(-rho Lt)``, ``b = (1 - a) / Lt``; euler: ``a = 1 - rho Lt``, ``b = rho``). relu is
positively homogeneous, so in the rescaled coordinates ``y_l = s_l x_l``, ``s_l = prod_{k<l} 1 / a_k``:

    y_{l+1} = y_l + c_l (W_l relu(y_l) + s_l beta_l),     c_l = b_l / a_l,     x_L = y_L / s_L.

That is a *plain* ResNet (Lt = 0) with steps ``c_l`` (exponential: ``(exp(rho_l Lt) - 1) / Lt``), the same
branch weights, biases ``s_l beta_l`` and the read-out scaled by ``1 / s_L`` (= ``exp(-T Lt)``). So the
functions a ``LeakyMLP`` can compute do not depend on the steps or on Lt at all: what they change is the
parametrisation, through

- the init: ``V_l = c_l W_l`` (the plain net's effective branch) starts at ``c_l`` times the leaky init;
- the optimizer: Adam is invariant to a fixed rescaling of a tensor's gradient, so Adam on ``W_l`` is Adam on
  ``V_l`` with learning rate ``c_l * lr`` (and on the plain biases ``s_l beta_l`` at ``s_l * lr``): the steps
  set each layer's init scale *and* its lr by the same factor ``c_l`` (relative update rate ``lr / |W_l|``,
  independent of the step). Under SGD the lr of ``V_l`` is ``c_l^2 * lr``: the relative rate then grows
  with ``c_l``;
- the penalty ``(lambda / Lt) rho_l |W_l|^2 = (lambda / Lt) (rho_l / c_l^2) |V_l|^2``: a per-layer weight;
- a change of the steps during training at fixed ``W``, which changes ``V = c W``: the function jumps.

``plain_equivalent(model)`` builds that plain ResNet; ``tests/test_mechanism.py`` checks the identity in
float64 for both schemes. What this predicts for adaptive steps is in ``docs/science.md`` (section 6).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..residual import LeakyMLP

__all__ = ["plain_equivalent", "rescaled_coefficients"]


def rescaled_coefficients(model: LeakyMLP):
    """``(c, s, out_scale)`` of ``model``'s stack, float64: the plain steps ``c_l = b_l / a_l``, the bias
    scales ``s_l = prod_{k<l} 1 / a_k`` and the read-out scale ``prod_k a_k``."""
    if not isinstance(model, LeakyMLP):
        raise TypeError(f"model must be a LeakyMLP (its branch W relu(x) + beta is what makes the identity exact), "
                        f"got {type(model).__name__}")
    with torch.no_grad():
        a, b = (t.detach().double().cpu() for t in model.net.steps.coefficients())
    if not bool((a > 0).all()):
        raise ValueError("every a_l = 1 - rho_l Lt must be > 0 (euler with rho_l Lt >= 1 has no rescaling)")
    s = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1.0 / a, 0)[:-1]])
    return b / a, s, float(torch.prod(a))


def plain_equivalent(model: LeakyMLP) -> LeakyMLP:
    """A plain ``LeakyMLP`` (Lt = 0, steps ``c_l``) that computes exactly ``model``'s function (see the module
    docstring); it has ``model``'s dtype and device, and ``model`` is left unchanged."""
    c, s, out_scale = rescaled_coefficients(model)
    p = next(model.parameters())
    width = model.input.out_features
    plain = LeakyMLP(model.input.in_features, model.output.out_features, width, model.depth,
                     effective_depth=0.0, total_time=float(c.sum()), steps=c, scheme="euler",
                     min_step=float(c.min()) / 2, max_step=float(c.sum()), init="default",
                     device=p.device, dtype=p.dtype)
    with torch.no_grad():
        plain.input.load_state_dict(model.input.state_dict())
        for l, (mine, theirs) in enumerate(zip(plain.blocks, model.blocks)):
            mine.block.linear.weight.copy_(theirs.block.linear.weight)
            if theirs.block.linear.bias is not None:
                mine.block.linear.bias.copy_(theirs.block.linear.bias * _as(s[l], p))
        plain.output.weight.copy_(model.output.weight * _as(out_scale, p))
        if model.output.bias is not None:
            plain.output.bias.copy_(model.output.bias)
    return plain


def _as(v, like: Tensor) -> Tensor:
    return torch.as_tensor(float(v), dtype=like.dtype, device=like.device)
