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

__all__ = ["plain_equivalent", "preserve_function_", "rescaled_coefficients"]


def rescaled_coefficients(model: LeakyMLP):
    """``(c, s, out_scale)`` of ``model``'s stack, float64: the plain steps ``c_l = b_l / a_l``, the bias
    scales ``s_l = prod_{k<l} 1 / a_k`` and the read-out scale ``prod_k a_k``."""
    if not isinstance(model, LeakyMLP):
        raise TypeError(f"model must be a LeakyMLP (its branch W relu(x) + beta is what makes the identity exact), "
                        f"got {type(model).__name__}")
    with torch.no_grad():
        return _rescaled(model.net.steps.coefficients())


def _rescaled(coefficients):
    """``(c, s, out_scale)`` from a group's ``(a, b)``, float64 (see ``rescaled_coefficients``)."""
    a, b = (t.detach().double().cpu() for t in coefficients)
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


@torch.no_grad()
def preserve_function_(model: LeakyMLP, old_coefficients, optimizer=None) -> None:
    """After ``model``'s steps changed from ``old_coefficients`` (``(a, b)`` of ``steps.coefficients()`` taken
    before the change) to its current ones, rescale its branch weights, biases and read-out so that it computes
    the function it computed before (the moving-mesh idea of issue 9 item 4: the grid moves, the function
    stays; only the parametrisation, i.e. each layer's effective learning rate ``c_l * lr``, changes).

    ``W_l <- W_l c_l / c'_l``, ``beta_l <- beta_l c_l s_l / (c'_l s'_l)``, read-out ``<- * prod a / prod a'``.
    ``optimizer``: its per-parameter state in gradient units (Adam's ``exp_avg``, SGD's ``momentum_buffer``)
    is divided by the parameter's factor and the squared state (``exp_avg_sq``) by its square, so the
    normalised update stays what it was."""
    c_new, s_new, out_new = rescaled_coefficients(model)
    c_old, s_old, out_old = _rescaled(old_coefficients)
    pairs = []
    for l, blk in enumerate(model.blocks):
        lin = blk.block.linear
        pairs.append((lin.weight, float(c_old[l] / c_new[l])))
        if lin.bias is not None:
            pairs.append((lin.bias, float(c_old[l] * s_old[l] / (c_new[l] * s_new[l]))))
    pairs.append((model.output.weight, out_old / out_new))
    state = getattr(optimizer, "state", {}) if optimizer is not None else {}
    for p, k in pairs:
        p.mul_(k)
        for name, value in state.get(p, {}).items():
            if name in ("exp_avg", "momentum_buffer") and torch.is_tensor(value):
                value.div_(k)
            elif name in ("exp_avg_sq", "max_exp_avg_sq") and torch.is_tensor(value):
                value.div_(k * k)
