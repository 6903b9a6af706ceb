"""Per-layer diagnostics of a Leaky ResNet: the quantities the paper (Jacot & Kaiser) plots.

Layout: a representation is ``a`` of shape (N, w), one row per example (the paper writes ``A = a^T``,
one column per example). With ``s(z) = (relu(z), 1)`` the feature matrix is ``S = [relu(a), 1]`` of shape
(N, w + 1), the paper's kernel is ``K = s(A)^T s(A) = S S^T`` (N x N) and its feature Gram is
``s(A) s(A)^T = S^T S`` ((w + 1) x (w + 1)).

    cost of identity  COI(A)   = ||A s(A)^+||_F^2 = Tr[a^T K^+ a]      the least-squares, min-norm solve
                                                                         S X = a (no pseudo-inverse formed)
    stabilised        COI_g(A) = Tr[a^T (K + g I)^{-1} a],  g = g0 ||K||_op     (a ridge solve)
    lower bound       COI(A)  >= ||A P||_*^2 / ||s(A)||_F^2                P: projection on the rows of s(A)
    momentum          B_l      = -(1/lambda) dC/dA_l                       (autograd, C = data cost)
    Hamiltonian       H        = (Lt/2) ||B s(A)^T||_F^2 - Lt Tr[B A^T]
    energies          kinetic  = (1/(2 Lt)) ||dA/dp||_K^2,  potential = -(Lt/2) COI(A)

At a critical point of the training cost ``C + lambda/(2 Lt) sum rho_l ||W_l||^2`` the branch weights are
``W_l = Lt (b_l / rho_l) B_l s(A_{l-1})^T`` (``b_l = rho_l`` under euler), H is constant along depth up to
the discretisation, H = kinetic + potential, and ``-(2/Lt) H <= min_p COI(A_p)``.

``diagnose(model, x, y)`` collects all of it per layer into a ``Diagnostics`` (a list of ``LayerRecord``),
which prints as a table, saves as JSON and plots to PNG.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ._validate import check_positive
from .steps import over_lt

__all__ = ["singular_values", "effective_rank", "features", "cost_of_identity", "coi_lower_bound",
           "nuclear_ratio", "hamiltonian", "energies", "LayerRecord", "Diagnostics", "diagnose"]


# ------------------------------------------------------------------------------------------- spectra
def singular_values(a: Tensor, *, centered: bool = False) -> Tensor:
    """Singular values of a batch of representations ``a`` (N, w), in float64, descending."""
    a = a.detach().double()
    if centered:
        a = a - a.mean(0, keepdim=True)
    return torch.linalg.svdvals(a)


def effective_rank(a: Tensor, *, method: str = "entropy", centered: bool = False,
                   threshold: float = 1e-2) -> float:
    """Effective rank of ``a`` (N, w).

    ``entropy``: ``exp(H(p))`` with ``p = s / sum(s)`` over the singular values (Roy & Vetterli);
    ``threshold``: the number of singular values above ``threshold * s_max``.
    """
    s = singular_values(a, centered=centered)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0.0
    if method == "threshold":
        return float((s > threshold * s[0]).sum())
    if method == "entropy":
        p = s / s.sum()
        p = p[p > 0]
        return float(torch.exp(-(p * p.log()).sum()))
    raise ValueError(f"method must be 'entropy' or 'threshold', got {method!r}")


# ---------------------------------------------------------------------------------- cost of identity
def _matrix(a: Tensor, name: str) -> Tensor:
    if not isinstance(a, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, w), got {type(a).__name__}")
    if a.dim() != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty matrix of shape (N examples, w features), "
                         f"got shape {tuple(a.shape)}")
    a = a.detach().to("cpu", torch.float64)
    if not torch.isfinite(a).all():
        raise ValueError(f"{name} must be finite")
    return a


def _gamma(gamma: float) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma must be a finite number >= 0 (0: the exact cost), got {gamma!r}")
    return float(gamma)


def features(a: Tensor, *, bias: bool = True) -> Tensor:
    """``S = [relu(a), 1]`` (N, w + 1), the rows-per-example form of the paper's ``s(A)``; without
    ``bias``, ``relu(a)``. Float64 on the CPU."""
    a = _matrix(a, "a")
    r = torch.relu(a)
    return torch.cat([r, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1) if bias else r


def _least_squares(s: Tensor, m: Tensor, rcond: Optional[float]) -> Tensor:
    """Min-norm least-squares ``X = S^+ m`` by LAPACK gelsd (an SVD-based solve; no pseudo-inverse formed)."""
    return torch.linalg.lstsq(s, m, rcond=rcond, driver="gelsd").solution


def _kernel_norm(m: Tensor, s: Tensor, gamma: float, rcond: Optional[float]) -> float:
    """``Tr[m^T (S S^T)^+ m]`` (gamma = 0) or ``Tr[m^T (S S^T + g I)^{-1} m]`` with ``g = gamma ||S||_op^2``."""
    if gamma == 0.0:
        return float(_least_squares(s, m, rcond).square().sum())
    n, p = s.shape
    g = gamma * float(torch.linalg.matrix_norm(s, ord=2)) ** 2
    if g == 0.0:  # S = 0: K + gI = 0 as well; nothing is representable
        return math.inf if bool((m != 0).any()) else 0.0
    if n <= p:  # the N x N system directly
        chol = torch.linalg.cholesky(s @ s.T + g * torch.eye(n, dtype=s.dtype))
        return float((m * torch.cholesky_solve(m, chol)).sum())
    # the (w+1) x (w+1) ridge system: g Tr[m^T (S S^T + g I)^{-1} m] = min_X ||S X - m||^2 + g ||X||^2,
    # a sum of non-negative terms (no cancellation)
    chol = torch.linalg.cholesky(s.T @ s + g * torch.eye(p, dtype=s.dtype))
    x = torch.cholesky_solve(s.T @ m, chol)
    return float((s @ x - m).square().sum()) / g + float(x.square().sum())


def cost_of_identity(a: Tensor, *, bias: bool = True, gamma: float = 0.0, rcond: Optional[float] = None) -> float:
    """Cost of Identity of a representation ``a`` (N, w): the squared norm of the smallest ``W`` with
    ``W s(A) = A`` (in the least-squares sense when no ``W`` is exact).

    ``gamma = 0``: ``||A s(A)^+||_F^2 = Tr[a^T K^+ a]``, computed as ``||X||_F^2`` for the min-norm
    least-squares solution of ``S X = a`` (LAPACK gelsd; singular values below ``rcond * s_max`` count as
    zero, default: machine precision times max(N, w + 1)). Exact, but discontinuous where ``S`` is nearly
    rank-deficient. ``gamma > 0``: the stabilised ``||A||^2_{K + g I} = Tr[a^T (K + g I)^{-1} a]`` with
    ``g = gamma ||K||_op``, by a Cholesky solve on the smaller of ``K`` and the feature Gram.

    Known answers: for ``a >= 0`` and ``bias=False``, ``COI = rank(a)``.

    Example:
        >>> cost_of_identity(torch.rand(50, 3) @ torch.rand(3, 10), bias=False)   # ~ 3.0
    """
    return _kernel_norm(_matrix(a, "a"), features(a, bias=bias), _gamma(gamma), rcond)


def coi_lower_bound(a: Tensor, *, bias: bool = True, rcond: Optional[float] = None) -> float:
    """A guaranteed lower bound ``||A P||_*^2 / ||s(A)||_F^2 <= COI(A)`` (P projects on the row space of
    ``s(A)``, so ``A P = W* s(A)`` for the least-squares ``W*``; nuclear-Frobenius Hoelder). For ``a >= 0``
    without bias it is ``||A||_*^2 / ||A||_F^2``, see ``nuclear_ratio``."""
    a = _matrix(a, "a")
    s = features(a, bias=bias)
    fro = float(s.square().sum())
    if fro == 0.0:
        return 0.0
    fitted = s @ _least_squares(s, a, rcond)
    return float(torch.linalg.matrix_norm(fitted, ord="nuc")) ** 2 / fro


def nuclear_ratio(a: Tensor, *, centered: bool = False) -> float:
    """``||A||_*^2 / ||A||_F^2`` (between 1 and rank A): the paper's cheap proxy for COI. It bounds COI from
    below for non-negative ``A`` without bias, not in general: with the bias row, ``A = c 1^T`` has
    ratio 1 and ``COI = c^2 / (1 + c^2)``."""
    s = singular_values(_matrix(a, "a"), centered=centered)
    fro = float(s.square().sum())
    return float(s.sum()) ** 2 / fro if fro > 0 else 0.0


# ------------------------------------------------------------------------------------ Hamiltonian
def _lt(effective_depth) -> float:
    if isinstance(effective_depth, Tensor):
        effective_depth = float(effective_depth)
    if isinstance(effective_depth, bool) or not isinstance(effective_depth, (int, float)) or \
            not math.isfinite(effective_depth) or effective_depth < 0:
        raise ValueError(f"effective_depth must be a finite number >= 0, got {effective_depth!r}")
    return float(effective_depth)


def hamiltonian(a: Tensor, b: Tensor, effective_depth: float, *, bias: bool = True) -> float:
    """``H = (Lt/2) ||B s(A)^T||_F^2 - Lt Tr[B A^T]`` for a representation ``a`` and its momentum ``b``
    (both (N, w), rows = examples; ``B s(A)^T = b^T S``)."""
    a, b = _matrix(a, "a"), _matrix(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    lt = _lt(effective_depth)
    bs = b.T @ features(a, bias=bias)
    return 0.5 * lt * float(bs.square().sum()) - lt * float((b * a).sum())


def energies(a: Tensor, velocity: Tensor, effective_depth: float, *, bias: bool = True, gamma: float = 0.0,
             rcond: Optional[float] = None):
    """``(kinetic, potential) = ((1/(2 Lt)) ||V||_K^2, -(Lt/2) ||A||_K^2)`` with ``K = s(A)^T s(A)`` (its
    pseudo-inverse through a least-squares solve at ``gamma = 0``, ``K + g I`` with ``g = gamma ||K||_op``
    otherwise). ``velocity`` is ``dA/dp = W s(A) - Lt A`` (N, w). Needs ``Lt > 0``."""
    a, v = _matrix(a, "a"), _matrix(velocity, "velocity")
    if a.shape != v.shape:
        raise ValueError(f"a and velocity must have the same shape, got {tuple(a.shape)} and {tuple(v.shape)}")
    lt = _lt(effective_depth)
    if lt == 0:
        raise ValueError("effective_depth must be > 0 for the energies (the kinetic term is 1/(2 Lt) ||V||_K^2)")
    gamma = _gamma(gamma)
    s = features(a, bias=bias)
    both = _kernel_norm_pair(a, v, s, gamma, rcond)
    return both[1] / (2 * lt), -0.5 * lt * both[0]


def _kernel_norm_pair(a: Tensor, v: Tensor, s: Tensor, gamma: float, rcond: Optional[float]):
    k = a.shape[1]
    total = torch.cat([a, v], 1)
    if gamma == 0.0:
        x = _least_squares(s, total, rcond).square()
        return float(x[:, :k].sum()), float(x[:, k:].sum())
    return _kernel_norm(a, s, gamma, rcond), _kernel_norm(v, s, gamma, rcond)


# -------------------------------------------------------------------------------------- the report
@dataclass
class LayerRecord:
    """One representation ``A_l`` (l = 0: the input of block 1; l = L: the output of the last block) and
    the block ``l`` that produced it (block fields are ``None`` at l = 0).

    Block fields: ``step`` rho_l; ``velocity_norm`` ``||f_l(A_{l-1}) - Lt A_{l-1}||_F``; ``distance``
    ``||A_l - A_{l-1}||_F / ||A_{l-1}||_F``; ``speed`` = distance / rho_l (the paper's c_l);
    ``kinetic`` ``(1/(2 Lt)) ||V_l||^2_{K(A_{l-1})}`` and ``kinetic_stable`` (with ``K + g I``) of that
    velocity; ``energy`` = kinetic + potential of ``A_{l-1}`` (and ``energy_stable``); ``hamiltonian_step``
    ``H(A_{l-1}, B_l)``, the pair the discrete optimality condition ``W_l = Lt (b_l/rho_l) B_l s(A_{l-1})^T``
    links (at a critical point with ``A_{l-1}`` in the row space of ``s(A_{l-1})`` it equals ``energy``
    exactly under euler); ``weight_sv`` the singular values of ``[W_l | b_l]``; ``stationarity``
    ``||W_l - Lt (b_l/rho_l) B_l s(A_{l-1})^T||_F / ||W_l||_F``, 0 at a critical point of the training cost
    (where H is conserved): how far from one the model is.
    Representation fields: ranks, COI (exact, stabilised, lower bound, nuclear ratio), ``potential``
    ``-(Lt/2) COI`` and ``potential_stable``, ``momentum_norm`` ``||B_l||_F``, ``hamiltonian``
    ``H(A_l, B_l)`` and ``rep_sv`` the singular values of ``A_l`` (uncentred).
    """

    layer: int
    depth: float
    norm: float
    rank_entropy: float
    rank_entropy_centered: float
    rank_threshold: float
    rank_threshold_centered: float
    coi: float
    coi_stable: float
    coi_lower: float
    nuclear_ratio: float
    potential: Optional[float]
    potential_stable: Optional[float]
    momentum_norm: float
    hamiltonian: float
    hamiltonian_step: Optional[float] = None
    step: Optional[float] = None
    velocity_norm: Optional[float] = None
    distance: Optional[float] = None
    speed: Optional[float] = None
    kinetic: Optional[float] = None
    kinetic_stable: Optional[float] = None
    energy: Optional[float] = None
    energy_stable: Optional[float] = None
    stationarity: Optional[float] = None
    rep_sv: List[float] = field(default_factory=list)
    weight_sv: Optional[List[float]] = None


#: columns of the default table
TABLE_COLUMNS = ("layer", "depth", "step", "speed", "velocity_norm", "rank_entropy_centered", "rank_threshold",
                 "coi", "coi_stable", "coi_lower", "hamiltonian", "hamiltonian_step", "energy", "energy_stable",
                 "stationarity")


@dataclass
class Diagnostics:
    """Per-layer records of one model on one batch, plus the settings they were computed with.

    ``-(2/Lt) H``: ``bottleneck()``; ``table()`` / ``str()``; ``to_dict()`` / ``save_json(path)``;
    ``plot(path)`` writes a PNG (rank / COI / H over depth, step profile, spectra).
    """

    layers: List[LayerRecord]
    effective_depth: float
    lam: float
    gamma: float
    scheme: str
    data_cost: float
    branch_form: bool
    notes: List[str] = field(default_factory=list)

    def column(self, name: str) -> List[Optional[float]]:
        if name not in {f.name for f in dataclasses.fields(LayerRecord)}:
            raise ValueError(f"name must be a LayerRecord field, got {name!r}")
        return [getattr(r, name) for r in self.layers]

    def bottleneck(self, key: str = "hamiltonian") -> Dict[str, float]:
        """``-(2/Lt) H`` over the layers (``key``: ``hamiltonian`` or ``hamiltonian_step``): median, min,
        max; and the smallest COI (exact and stabilised). The paper: both tend to k* as Lt grows, H from
        below and COI from above."""
        lt = self.effective_depth
        values = [-2.0 / lt * h for h in self.column(key) if h is not None] if lt > 0 else []
        out = {"coi_min": min(self.column("coi")), "coi_stable_min": min(self.column("coi_stable"))}
        stationarity = [v for v in self.column("stationarity") if v is not None]
        if stationarity:
            out["stationarity_max"] = max(stationarity)
        if values:
            t = torch.tensor(values, dtype=torch.float64)
            out.update(h_median=float(t.median()), h_min=float(t.min()), h_max=float(t.max()))
        return out

    def table(self, columns: Sequence[str] = TABLE_COLUMNS) -> str:
        return format_table([dataclasses.asdict(r) for r in self.layers], list(columns))

    def __str__(self) -> str:
        head = (f"Lt={self.effective_depth:g}  lambda={self.lam:g}  gamma={self.gamma:g}  scheme={self.scheme}  "
                f"data cost={self.data_cost:.4g}  paper branch form W s(A): {self.branch_form}")
        return "\n".join([head, *self.notes, self.table()])

    def to_dict(self) -> dict:
        return {"effective_depth": self.effective_depth, "lam": self.lam, "gamma": self.gamma,
                "scheme": self.scheme, "data_cost": self.data_cost, "branch_form": self.branch_form,
                "notes": list(self.notes), "summary": self.bottleneck(),
                "layers": [dataclasses.asdict(r) for r in self.layers]}

    @classmethod
    def from_dict(cls, data: dict) -> "Diagnostics":
        """The inverse of ``to_dict`` (e.g. to re-plot a saved JSON)."""
        names = {f.name for f in dataclasses.fields(LayerRecord)}
        layers = [LayerRecord(**{k: (float(v) if isinstance(v, str) else v) for k, v in layer.items() if k in names})
                  for layer in data["layers"]]
        return cls(layers, data["effective_depth"], data["lam"], data["gamma"], data["scheme"], data["data_cost"],
                   data["branch_form"], list(data.get("notes", [])))

    def save_json(self, path: str) -> str:
        with open(path, "w") as fh:
            json.dump(_finite(self.to_dict()), fh, indent=1)
        return path

    def plot(self, path: str, *, title: Optional[str] = None, top: int = 8) -> str:
        """Write a PNG: rank and COI over depth, -(2/Lt) H over depth, the step profile, the top singular
        values of the representations and of the weights over depth (needs matplotlib)."""
        from .experiments.plots import plot_diagnostics
        return plot_diagnostics(self, path, title=title, top=top)


def _finite(obj):
    """JSON without NaN / Infinity (strict parsers reject them): non-finite floats become strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------ diagnose
def _mse(pred: Tensor, target: Tensor) -> Tensor:
    return (pred - target).pow(2).sum(1).mean()


def _parts(model: nn.Module, head: Optional[Callable]):
    """``(stem, stack, head)`` of a supported model: a LeakyMLP, or a LeakyResNet (stem = identity)."""
    from .residual import LeakyMLP, LeakyResNet
    if isinstance(model, LeakyMLP):
        if head is not None:
            raise ValueError("head must be None for a LeakyMLP (its output layer is the head)")
        return model.input, model.net, model.output
    if isinstance(model, LeakyResNet):
        return nn.Identity(), model, (head if head is not None else nn.Identity())
    raise TypeError(f"model must be a LeakyMLP or a LeakyResNet, got {type(model).__name__}")


def _branch_weight(block: nn.Module) -> Optional[Tensor]:
    """``[W | b]`` of a branch of the paper's form ``W s(A)`` (an ``MLPBranch``), else None."""
    from .residual import MLPBranch
    if isinstance(block, MLPBranch):
        lin = block.linear
        bias = lin.bias if lin.bias is not None else torch.zeros(lin.weight.shape[0], dtype=lin.weight.dtype)
        return torch.cat([lin.weight, bias[:, None]], 1).detach()
    return None


def diagnose(model: nn.Module, x: Tensor, y: Tensor, *, lam: Optional[float] = None,
             loss: Optional[Callable[[Tensor, Tensor], Tensor]] = None, head: Optional[Callable] = None,
             gamma: float = 1e-3, threshold: float = 1e-2, rcond: Optional[float] = None,
             dtype: torch.dtype = torch.float64) -> Diagnostics:
    """Per-layer diagnostics of ``model`` on the batch ``(x, y)``.

    Supported: a ``LeakyMLP`` (every field), and a ``LeakyResNet``: with ``MLPBranch`` blocks (the paper's
    ``W s(A)``) every field; with other branches the representation fields, the momentum and H as formulas of
    ``(A, B)`` (``s(A) = (relu(A), 1)`` is still used, so COI / H lose their meaning as the cost of the
    branch: ``branch_form`` is False and a note says so) and no weight spectra. For a ``LeakyResNet`` the
    prediction is ``head(model(x))`` (``head`` defaults to the identity).

    Args:
        model: the network (it is copied to ``dtype``; the original is untouched).
        x, y: a batch of inputs and targets.
        lam: lambda of the cost ``C + lambda/(2 Lt) sum rho_l ||W_l||^2``; default the paper's ``1e-3 / Lt``
            (``1e-3`` at Lt = 0), as ``train.RunConfig.decay()``.
        loss: the data cost ``C(pred, y)``; default ``(1/N) ||pred - y||_F^2`` (the paper's, and the MSE of
            ``data.Task``).
        gamma: ``g0`` of the stabilised COI / energies (``g = g0 ||K||_op``), > 0.
        threshold: relative singular-value threshold of ``rank_threshold``.
        rcond: cut-off of the exact least-squares solves (see ``cost_of_identity``).
        dtype: precision of the forward / backward pass used for the momenta.
    """
    stem, stack, out = _parts(model, head)
    gamma = _gamma(gamma)
    if gamma == 0:
        raise ValueError("gamma must be > 0 in diagnose (the stabilised fields need it); cost_of_identity "
                         "gives the exact value at gamma=0")
    lt = float(stack.steps.effective_depth)
    if lam is None:
        lam = over_lt(1e-3, lt)
    lam = check_positive(lam, "lam")
    if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.shape[0] != y.shape[0]:
        raise ValueError("x and y must be tensors with the same number of examples (dim 0)")
    loss = loss or _mse
    copies = copy.deepcopy(nn.ModuleList([m for m in (stem, stack, out) if isinstance(m, nn.Module)]))
    copies = copies.to("cpu", dtype).eval()
    stem_c, stack_c = copies[0], copies[1]
    out_c = copies[2] if isinstance(out, nn.Module) else out
    branches = [blk.block for blk in stack_c.blocks]
    weights = [_branch_weight(b) for b in branches]
    branch_form = all(w is not None for w in weights) and all(blk.activation is None for blk in stack_c.blocks)
    notes = []
    if not branch_form:
        notes.append("note: some branches are not W s(A) (or apply an activation after the update): COI, H "
                     "and the energies use s(A) = (relu(A), 1) as formulas and are not the branch's cost")
    rho = stack_c.steps.current().detach().double()
    a_coef, b_coef = stack_c.steps.coefficients()

    xx, yy = x.detach().to("cpu", dtype), y.detach().to("cpu")
    yy = yy.to(dtype) if yy.is_floating_point() else yy
    reps, velocities = [], []
    with torch.enable_grad():
        h = stem_c(xx).detach().requires_grad_(True)
        reps.append(h)
        for blk, branch, a_l, b_l in zip(stack_c.blocks, branches, a_coef.unbind(), b_coef.unbind()):
            f = branch(h)
            velocities.append((f - lt * h).detach())
            h, _ = blk.step(h, a_l.detach(), b_l.detach(), False)
            reps.append(h)
        cost = loss(out_c(h), yy)
        grads = torch.autograd.grad(cost, reps)
    reps = [r.detach() for r in reps]
    moms = [-g.detach() / lam for g in grads]

    records = []
    depth = 0.0
    for l, (rep, mom) in enumerate(zip(reps, moms)):
        s = features(rep)
        coi = _kernel_norm(rep, s, 0.0, rcond)
        coi_g = _kernel_norm(rep, s, gamma, rcond)
        rec = LayerRecord(
            layer=l, depth=depth, norm=float(rep.norm()),
            rank_entropy=effective_rank(rep), rank_entropy_centered=effective_rank(rep, centered=True),
            rank_threshold=effective_rank(rep, method="threshold", threshold=threshold),
            rank_threshold_centered=effective_rank(rep, method="threshold", centered=True, threshold=threshold),
            coi=coi, coi_stable=coi_g, coi_lower=coi_lower_bound(rep, rcond=rcond),
            nuclear_ratio=nuclear_ratio(rep),
            potential=-0.5 * lt * coi if lt > 0 else None, potential_stable=-0.5 * lt * coi_g if lt > 0 else None,
            momentum_norm=float(mom.norm()), hamiltonian=hamiltonian(rep, mom, lt),
            rep_sv=singular_values(rep).tolist())
        if l > 0:
            prev, vel = reps[l - 1], velocities[l - 1]
            step = float(rho[l - 1])
            depth += step
            rec.depth = depth
            rec.step = step
            rec.velocity_norm = float(vel.norm())
            prev_norm = float(prev.norm())
            rec.distance = float((rep - prev).norm()) / prev_norm if prev_norm > 0 else math.inf
            rec.speed = rec.distance / step
            rec.hamiltonian_step = hamiltonian(prev, mom, lt)
            if lt > 0:
                ks = features(prev)
                rec.kinetic = _kernel_norm(vel, ks, 0.0, rcond) / (2 * lt)
                rec.kinetic_stable = _kernel_norm(vel, ks, gamma, rcond) / (2 * lt)
                rec.energy = rec.kinetic + records[l - 1].potential
                rec.energy_stable = rec.kinetic_stable + records[l - 1].potential_stable
            w = weights[l - 1]
            if w is not None:
                w = w.double()
                rec.weight_sv = torch.linalg.svdvals(w).tolist()
                if lt > 0:
                    optimal = lt * float(b_coef[l - 1]) / step * (mom.T @ features(prev))
                    rec.stationarity = float((w - optimal).norm() / w.norm().clamp(min=1e-300))
        records.append(rec)
    return Diagnostics(records, lt, float(lam), gamma, stack_c.steps.scheme, float(cost.detach()), branch_form,
                       notes)


def format_table(rows: Sequence[Dict], columns: Sequence[str]) -> str:
    """A plain-text table (GitHub-markdown compatible)."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)
    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    line = lambda cells: "| " + " | ".join(s.ljust(w) for s, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(b) for b in body])
