"""Shared test setup.

Without a GPU, the Triton kernels run on CPU tensors under Triton's interpreter, which is read when a
kernel is decorated: switch it on here, before any test module imports ``kernels``.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
