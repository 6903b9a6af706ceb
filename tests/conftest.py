"""Shared test setup.

Without a GPU, the Triton kernels run on CPU tensors under Triton's interpreter, which is read when a
kernel is decorated: switch it on here, before any test module imports ``kernels``.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402  (appended with the fixture below)


@pytest.fixture(scope="module")
def torch_one_thread():
    """One intra-op thread for a module: on a shared two-core machine two OpenMP threads that wait for each
    other make small convolutions an order of magnitude slower (use: ``pytestmark = usefixtures(...)``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
