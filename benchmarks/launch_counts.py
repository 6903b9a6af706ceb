"""Device launches of one training step (forward + backward, learned steps) of small models on the Triton
path, counted on a CPU under TRITON_INTERPRET=1 with the launch counter of ``tests/test_ops.py`` (aten ops that
compute, plus Triton launches). Counts, not timings: they do not depend on the machine.

    python benchmarks/launch_counts.py        # from the repository root
"""
import collections
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
torch.set_num_threads(1)
from torch import nn
from tests.test_ops import _Launches
from triton.runtime.interpreter import InterpretedFunction
from adaptive_depth import LeakyResNet, LeakyMLP, wrap
mode = _Launches()
InterpretedFunction.run = mode.counting(InterpretedFunction.run)

def count(name, model, x):
    for m in model.modules():
        if hasattr(m, "make_learnable_") and hasattr(m, "rho"):
            m.make_learnable_(True)
    model.train()
    y = model(x)  # warm-up (first-call paths)
    y.square().mean().backward()
    model.zero_grad(set_to_none=True)
    mode.take()  # the warm-up's Triton launches (recorded outside the mode)
    with mode:
        y = model(x)
    fwd = mode.take()
    with mode:
        y.square().mean().backward()
    bwd = mode.take()
    print(f"{name}: forward {len(fwd)}, backward {len(bwd)}, total {len(fwd) + len(bwd)}")
    return fwd, bwd

torch.manual_seed(0)
for scheme in ("euler", "exponential"):
    blocks = [nn.Sequential(nn.Linear(32, 32), nn.Tanh()) for _ in range(8)]
    count(f"LeakyResNet 8 x (Linear+Tanh), {scheme}", LeakyResNet(blocks, effective_depth=0.5, scheme=scheme,
          activation="relu", backend="triton"), torch.randn(16, 32))
    count(f"LeakyMLP depth 8 width 32, {scheme}", LeakyMLP(16, 16, width=32, depth=8, effective_depth=0.5, scheme=scheme,
          backend="triton"), torch.randn(16, 16))
import torchvision
m = wrap(torchvision.models.resnet18(num_classes=10), effective_depth=0.0, backend="triton")
fwd, bwd = count("wrap(resnet18), 8 blocks, euler", m, torch.randn(2, 3, 32, 32))
print("  update-related in backward:", collections.Counter(n for n in bwd if "triton" in n or n in ("select_backward", "addcmul", "neg", "mul", "add", "_to_copy", "new_zeros")))
