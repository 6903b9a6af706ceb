"""``torch.library.opcheck`` on every registered op (``adaptive_depth::*``) and its backward op: the schema,
the autograd registration, the fake (meta) implementation against the real op on every layout, and
AOTAutograd. CPU tensors run the kernels under ``TRITON_INTERPRET=1`` (tests/conftest.py), with small
shapes. The fake has to promise exactly the real op's strides: Inductor plans its buffers from it."""
import pytest
import torch

pytest.importorskip("triton")

from adaptive_depth_kernels import _common  # noqa: E402

if torch.cuda.is_available():
    DEVICE = "cuda"
elif _common.interpreting():
    DEVICE = "cpu"
else:
    pytest.skip("the kernels need a GPU, or TRITON_INTERPRET=1 for CPU tensors", allow_module_level=True)

OPS = torch.ops.adaptive_depth
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# the cheap checks on every combination; AOTAutograd (a compile each) on a subset below
CHEAP = ("test_schema", "test_autograd_registration", "test_faketensor")
ALL = CHEAP + ("test_aot_dispatch_dynamic",)


@pytest.fixture(autouse=True)
def fixed_tiles(monkeypatch):
    monkeypatch.setenv("ADAPTIVE_DEPTH_AUTOTUNE", "0")


def _tensor(shape, layout, dtype, gen):
    """A tensor of ``shape`` in one of the layouts a caller hands the op."""
    if layout == "contiguous":
        t = torch.randn(shape, generator=gen)
    elif layout == "channels_last":
        t = torch.randn(shape, generator=gen).to(memory_format=torch.channels_last)
    elif layout == "transposed":  # the last two dimensions swapped: dense, but neither order
        t = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen).transpose(-1, -2)
    elif layout == "strided":  # every other element: not dense (the kernels copy it once)
        t = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen)[..., ::2]
    else:
        raise ValueError(layout)
    assert tuple(t.shape) == tuple(shape)
    return t.to(device=DEVICE, dtype=dtype)


def _scalar(value, grad):
    return torch.tensor(value, device=DEVICE, requires_grad=grad)


SHAPE = (2, 3, 4, 5)
LAYOUTS = [("contiguous", "contiguous"), ("channels_last", "channels_last"), ("transposed", "transposed"),
           ("channels_last", "contiguous"), ("transposed", "strided")]  # (x's layout, f's layout)


def _update_args(xl, fl, dtype, grad, relu, stats, seed=0, f_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    x = _tensor(SHAPE, xl, dtype, gen).requires_grad_(grad)
    f = _tensor(SHAPE, fl, f_dtype or dtype, gen).requires_grad_(grad)
    return (x, f, _scalar(0.7, grad), _scalar(0.2, grad), _scalar(1.5, False), relu, stats)


def _opcheck(op, args, utils):
    result = torch.library.opcheck(op, args, test_utils=utils)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("xl,fl", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("relu,stats", [(False, False), (True, True), (True, False), (False, True)])
def test_leaky_update_op(xl, fl, dtype, grad, relu, stats):
    _opcheck(OPS.leaky_update.default, _update_args(xl, fl, DTYPES[dtype], grad, relu, stats), CHEAP)


@pytest.mark.parametrize("xl,fl", LAYOUTS[:3])
@pytest.mark.parametrize("relu,stats", [(False, True), (True, False)])
def test_leaky_update_op_aot(xl, fl, relu, stats):
    _opcheck(OPS.leaky_update.default, _update_args(xl, fl, torch.float32, True, relu, stats), ALL)


def test_leaky_update_op_mixed_dtypes():
    """bf16 x with an fp32 f (y is fp32), the gradients in each input's dtype."""
    args = _update_args("channels_last", "channels_last", torch.bfloat16, True, True, True, f_dtype=torch.float32)
    _opcheck(OPS.leaky_update.default, args, ALL)


# g's layout is the third entry: the incoming gradient need not be laid out like x (Inductor's often is not)
BACKWARD_LAYOUTS = [("contiguous", "contiguous", "contiguous"), ("channels_last", "channels_last", "contiguous"),
                    ("channels_last", "channels_last", "channels_last"), ("transposed", "transposed", "contiguous"),
                    ("contiguous", "transposed", "channels_last"), ("strided", "channels_last", "transposed")]
NEEDS = [[True, True, True, True], [True, True, False, False], [False, True, False, True]]


@pytest.mark.parametrize("xl,fl,gl", BACKWARD_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("need", NEEDS, ids=["all", "xf", "fb"])
def test_leaky_update_backward_op(xl, fl, gl, dtype, relu, need):
    gen = torch.Generator().manual_seed(1)
    dt = DTYPES[dtype]
    g, x, f = (_tensor(SHAPE, layout, dt, gen) for layout in (gl, xl, fl))
    args = (g, x, f, _scalar(0.7, False), _scalar(0.2, False), relu, need)
    utils = ALL if (dtype == "fp32" and need == NEEDS[0]) else CHEAP
    _opcheck(OPS.leaky_update_backward.default, args, utils)


# ---------------------------------------------------------------------------------- leaky linear
D = 8


def _linear_args(x_layout, w_layout, dtype, grad, bias, relu, stats, seed=2):
    gen = torch.Generator().manual_seed(seed)
    shape = (2, 3, D) if x_layout == "contiguous3d" else (5, D)
    layout = "contiguous" if x_layout == "contiguous3d" else x_layout
    x = _tensor(shape, layout, dtype, gen).requires_grad_(grad)
    weight = (_tensor((D, D), w_layout, dtype, gen) / 3).detach().requires_grad_(grad)
    b = _tensor((D,), "contiguous", dtype, gen).requires_grad_(grad) if bias else None
    return (x, weight, b, _scalar(0.6, grad), _scalar(0.3, grad), _scalar(1.0, False), relu, stats)


LINEAR_LAYOUTS = [("contiguous", "contiguous"), ("contiguous3d", "contiguous"), ("transposed", "contiguous"),
                  ("contiguous", "transposed"), ("strided", "transposed")]  # (x, weight)


@pytest.mark.parametrize("xl,wl", LINEAR_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("bias,relu,stats", [(True, True, True), (False, False, False), (True, False, True)])
def test_leaky_linear_op(xl, wl, dtype, grad, bias, relu, stats):
    args = _linear_args(xl, wl, DTYPES[dtype], grad, bias, relu, stats)
    utils = ALL if (dtype == "fp32" and grad and xl in ("contiguous", "transposed")) else CHEAP
    _opcheck(OPS.leaky_linear.default, args, utils)


@pytest.mark.parametrize("xl,wl", LINEAR_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu,bias", [(True, True), (False, False)])
@pytest.mark.parametrize("need", [[True] * 5, [True, False, False, True, False], [False, True, True, False, True]],
                         ids=["all", "xa", "wbb"])
def test_leaky_linear_backward_op(xl, wl, dtype, relu, bias, need):
    x, weight, b, a, bb, lt, _, _ = _linear_args(xl, wl, DTYPES[dtype], False, bias, relu, False)
    y, _ = OPS.leaky_linear.default(x, weight, b, a, bb, lt, relu, False)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y)
    args = (g, x, weight, b, a, bb, y if relu else None, relu, need)
    utils = ALL if (dtype == "fp32" and need[0] and xl != "strided") else CHEAP
    _opcheck(OPS.leaky_linear_backward.default, args, utils)


def test_every_registered_op_is_checked():
    """The ops this file checks are all the ops the kernels register (a new op must be added here)."""
    import adaptive_depth_kernels  # noqa: F401  (registers them)
    registered = {name for name in dir(OPS) if not name.startswith("_") and
                  isinstance(getattr(OPS, name), torch._ops.OpOverloadPacket)}
    checked = {"leaky_update", "leaky_update_backward", "leaky_linear", "leaky_linear_backward"}
    assert registered == checked, registered ^ checked
    assert not hasattr(torch.ops, "adaptive_depth_kernels") or not any(
        isinstance(getattr(torch.ops.adaptive_depth_kernels, n), torch._ops.OpOverloadPacket)
        for n in dir(torch.ops.adaptive_depth_kernels) if not n.startswith("_")), "one op namespace only"

