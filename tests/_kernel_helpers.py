"""What the kernel tests of every op share (``test_leaky_update.py``, ``test_leaky_linear.py``): the devices,
the tolerances, inputs with exact zeros, the float64 comparisons, and the fixture that hands out every
buffer a kernel writes NaN-filled (an element left unwritten fails).

CPU tensors run under ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py`` when there is no GPU); the same
tests run on CUDA when a GPU is present. A test module imports ``poisoned`` to make it autouse there."""
import pytest
import torch

pytest.importorskip("triton")

from adaptive_depth import ops  # noqa: E402

ops._kernels()  # a checkout used without installing it (the GPU machine): loads kernels/ by path
from adaptive_depth_kernels import _common  # noqa: E402

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not _common.interpreting(), reason="CPU tensors need TRITON_INTERPRET=1, which tests/conftest.py "
                                           "sets only when no GPU is present")),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# an elementwise result in fp32 maths, rounded once to its dtype (about 2 ulps)
RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Every buffer the kernels write (outputs and partial sums) starts as NaN."""
    real = _common.empty

    def nan_filled(*args, **kwargs):
        return real(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(_common, "empty", nan_filled)


def kernel_device():
    """The one device a test without a ``device`` parameter runs on: the CPU under the interpreter, else
    CUDA (skipped when there is neither)."""
    device = "cpu" if _common.interpreting() else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or a CUDA GPU")
    return device


def free_cuda_bytes():
    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0


def randn(shape, dtype, device, seed):
    """Normal values with every 5th element exactly 0 (in the same places for every tensor of a shape, so
    the ReLU masks meet their edge cases: relu'(0) = 0, and a x + b f = 0)."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=gen, dtype=torch.float64)
    t.view(-1)[::5] = 0.0
    return t.to(device=device, dtype=dtype)


def scalar(value, device, dtype=torch.float32, grad=False):
    return torch.tensor(value, dtype=dtype, device=device, requires_grad=grad)


def f64(t):
    return t.detach().to("cpu", torch.float64)


def assert_elementwise(actual, expected, dtype):
    """``actual`` (any dtype) against float64 ``expected``, for a result rounded once to ``dtype``."""
    assert actual.shape == expected.shape
    torch.testing.assert_close(f64(actual), expected, rtol=RTOL[dtype], atol=1e-6, equal_nan=False)


def assert_sum(actual, expected, terms, rtol=1e-6):
    """A sum accumulated in fp32: error bounded by a few ulps of ``sum |terms|``."""
    assert actual.shape == expected.shape and actual.dtype in (torch.float32, torch.float64)
    bound = rtol * f64(terms).abs().sum().item() + 1e-12
    torch.testing.assert_close(f64(actual), expected, rtol=0.0, atol=bound, equal_nan=False)


def bitwise_equal(u, v):
    return u.shape == v.shape and u.dtype == v.dtype and \
        torch.equal(u.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))
