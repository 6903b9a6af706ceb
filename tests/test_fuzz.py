"""Fuzz ``leaky_update`` against the update written out plainly in float64: 1000 generated cases per path
(the torch path; the Triton path, on CPU under ``TRITON_INTERPRET=1``), over dtypes, shapes, layouts
(contiguous, channels_last, transposed, strided), both schemes, both activations, fixed and learned
steps, with and without statistics, and Lt from 0 to 1e3. Forward, statistics and every gradient are
checked with error bounds derived per element from the dtype (not one loose tolerance for all).

Seeded (``random.Random``): a failure names its case, which reruns alone with ``_run_case(path, seed)``."""
import math
import random

import pytest
import torch

from adaptive_depth import leaky_update, ops

CASES_PER_PATH = 1000
CHUNKS = 10  # one test per chunk of consecutive seeds
EPS = {torch.float64: 2.2e-16, torch.float32: 6.0e-8}  # unit roundoff of the math dtype
ROUND = {torch.float64: 0.0, torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
K = 8.0  # a few roundings per result
# Triton's interpreter converts fp32 to bf16 by truncation (toward zero), a GPU rounds to nearest
ROUND_INTERPRETED = {**ROUND, torch.bfloat16: 2.0 ** -7}


def _triton_ready():
    try:
        import adaptive_depth_kernels
    except ImportError:
        return False
    return ops.triton_available() and (torch.cuda.is_available() or adaptive_depth_kernels._common.interpreting())


def _interpreting():
    import os
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


PATHS = [pytest.param("torch"),
         pytest.param("triton", marks=pytest.mark.skipif(not _triton_ready(), reason="the kernels need a GPU "
                                                                                  "or TRITON_INTERPRET=1"))]


# ---------------------------------------------------------------------------------- generation
def _case(path, seed):
    rng = random.Random(seed)
    dtypes = [torch.float32, torch.bfloat16, torch.float16] + ([torch.float64] if path == "torch" else [])
    dtype = rng.choice(dtypes)
    ndim = rng.choice([1, 2, 2, 3, 4, 4])
    shape = tuple(rng.randint(1, 7) for _ in range(ndim))
    layouts = ["contiguous", "strided"] + (["transposed"] if ndim >= 2 else []) + \
        (["channels_last"] * 2 if ndim == 4 else [])
    scheme = rng.choice(["euler", "exponential"])
    lt = 0.0 if rng.random() < 0.15 else 10.0 ** rng.uniform(-3, 3)
    rho = 10.0 ** rng.uniform(-3, 0.5)
    if scheme == "euler" and rho * lt >= 0.999:
        rho = rng.uniform(0.01, 0.999) / lt
    return dict(seed=seed, dtype=dtype, shape=shape, x_layout=rng.choice(layouts), f_layout=rng.choice(layouts),
                scheme=scheme, relu=rng.random() < 0.5, lt=lt, rho=rho, learned=rng.random() < 0.6,
                stats=rng.random() < 0.5, scale=10.0 ** rng.uniform(-2, 2))


def _laid_out(values, layout):
    if layout == "channels_last":
        return values.to(memory_format=torch.channels_last)
    if layout == "transposed":
        return values.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided":  # every other element of a wider buffer: not dense
        wide = torch.zeros(*values.shape[:-1], 2 * values.shape[-1], dtype=values.dtype)
        wide[..., ::2] = values
        return wide[..., ::2]
    return values


def _tensor(case, gen, layout, scale):
    values = (torch.randn(case["shape"], generator=gen, dtype=torch.float64) * scale).to(case["dtype"])
    return _laid_out(values, layout)


# ---------------------------------------------------------------- the float64 maths, written out
def _coefficients(rho, lt, scheme):
    """a, b, d a / d rho, d b / d rho and the condition of a (its absolute error per unit roundoff)."""
    if scheme == "euler":
        return 1.0 - rho * lt, rho, -lt, 1.0, 1.0 + rho * lt
    z = rho * lt
    a = math.exp(-z)
    b = -math.expm1(-z) / lt if lt > 0 else rho
    return a, b, -lt * a, a, (1.0 + z) * a


def _run_case(path, seed):
    """Run one case; returns a list of failure messages (empty when it passes)."""
    case = _case(path, seed)
    dtype = case["dtype"]
    gen = torch.Generator().manual_seed(seed)
    x = _tensor(case, gen, case["x_layout"], case["scale"]).requires_grad_()
    f = _tensor(case, gen, case["f_layout"], case["scale"] * 10.0 ** random.Random(seed + 1).uniform(-1, 1))
    f.requires_grad_()
    g = _tensor(case, gen, "contiguous", 1.0)
    wide = dtype == torch.float64
    coef_dtype = torch.float64 if wide else torch.float32
    math_eps = EPS[torch.float64 if wide else torch.float32]
    rounding = ROUND_INTERPRETED if path == "triton" and _interpreting() else ROUND
    # the library rounds rho and Lt to the coefficients' dtype: the reference starts from the same values
    rho = float(torch.tensor(case["rho"], dtype=coef_dtype))
    lt = float(torch.tensor(case["lt"], dtype=coef_dtype))
    rho_arg = torch.tensor(rho, dtype=coef_dtype, requires_grad=True) if case["learned"] else case["rho"]
    y, s = leaky_update(x, f, rho_arg, case["lt"], scheme=case["scheme"], activation="relu" if case["relu"] else None,
                        return_stats=True, backend=path) if case["stats"] else \
        (leaky_update(x, f, rho_arg, case["lt"], scheme=case["scheme"], activation="relu" if case["relu"] else None,
                      backend=path), None)
    inputs = (x, f, rho_arg) if case["learned"] else (x, f)
    grads = torch.autograd.grad(y, inputs, g)

    X, F, G = (t.detach().double() for t in (x, f, g))
    a, b, da, db, cond_a = _coefficients(rho, lt, case["scheme"])
    pre = a * X + b * F
    mask = (pre > 0) if case["relu"] else torch.ones_like(pre, dtype=torch.bool)
    y_ref = torch.where(mask, pre, 0.0)
    # per element: the math's roundings (coefficients included), then one rounding to the output dtype
    # absolute floors: the math dtype's underflow (products of the inputs' size) and the output dtype's
    # subnormal spacing
    tiny = torch.finfo(coef_dtype).tiny * 4 * (1.0 + X.abs() + F.abs() + G.abs()) ** 2
    floor = tiny + _subnormal_step(dtype)
    tol_pre = K * math_eps * (cond_a * X.abs() + abs(b) * F.abs() + pre.abs()) + tiny
    tol_y = tol_pre + rounding[y.dtype] * y_ref.abs() + _subnormal_step(y.dtype)
    failures = []

    def check(name, got, want, tol):
        err = (got.detach().double() - want).abs()
        bad = ~(err <= tol)
        if bad.any():
            i = int(bad.reshape(-1).nonzero()[0])
            failures.append(f"{name}: {int(bad.sum())} of {bad.numel()} elements off, e.g. got "
                            f"{got.reshape(-1)[i].item():.6g} want {want.reshape(-1)[i].item():.6g} "
                            f"(tol {tol.reshape(-1)[i].item():.3g})")

    assert y.shape == x.shape and y.dtype == dtype
    check("y", y, y_ref, tol_y)
    if s is not None:
        want = torch.stack([((F - lt * X) ** 2).sum(), (X ** 2).sum()])
        tol = 1e-5 * want.abs() + 1e-30
        check("stats", s, want, tol)
    # elements whose ReLU mask the roundings may flip: left out of dx, df, bounded in d rho
    sure = ~mask | (pre.abs() > tol_pre) if case["relu"] else torch.ones_like(mask)
    gm = torch.where(mask, G, 0.0)
    dx_ref, df_ref = a * gm, b * gm
    check("dx", torch.where(sure, grads[0].double(), dx_ref), dx_ref,
          K * math_eps * cond_a * G.abs() + rounding[dtype] * dx_ref.abs() + floor)
    check("df", torch.where(sure, grads[1].double(), df_ref), df_ref,
          K * math_eps * abs(b) * G.abs() + rounding[dtype] * df_ref.abs() + floor)
    if case["learned"]:
        terms = G.abs() * (abs(da) * X.abs() + abs(db) * F.abs())
        want = (gm * (da * X + db * F)).sum()
        n = X.numel()
        tol = K * math_eps * (n + 1 + rho * lt) * terms.sum() + terms[~sure].sum() + tiny.sum()
        check("drho", grads[2], want, tol)
    return [f"{path} seed {seed} {case}: {msg}" for msg in failures]


def _subnormal_step(dtype):
    info = torch.finfo(dtype)
    return info.tiny * info.eps


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_fuzz_against_float64(path, chunk, torch_one_thread):
    per_chunk = CASES_PER_PATH // CHUNKS
    seeds = range(chunk * per_chunk, (chunk + 1) * per_chunk)
    failures = [msg for seed in seeds for msg in _run_case(path, seed)]
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:10])


def test_the_generator_covers_what_it_claims():
    """The 1000 cases per path span every dtype, layout, scheme, activation, Lt decade and statistics on/off."""
    cases = [_case("torch", seed) for seed in range(CASES_PER_PATH)]
    assert {c["dtype"] for c in cases} == {torch.float64, torch.float32, torch.bfloat16, torch.float16}
    assert {c["x_layout"] for c in cases} == {"contiguous", "strided", "transposed", "channels_last"}
    assert {(c["scheme"], c["relu"], c["learned"], c["stats"]) for c in cases} == \
        {(s, r, learned, st) for s in ("euler", "exponential") for r in (False, True) for learned in (False, True)
         for st in (False, True)}
    decades = {math.floor(math.log10(c["lt"])) for c in cases if c["lt"] > 0}
    assert decades >= set(range(-3, 3)) and any(c["lt"] == 0.0 for c in cases)
    assert max(c["lt"] for c in cases) > 500 and max(c["rho"] * c["lt"] for c in cases) > 100
