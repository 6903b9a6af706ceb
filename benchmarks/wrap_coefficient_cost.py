"""Per-call cost of the coefficients a wrapped block computes at every call (no cache: a cache keyed on version
counters missed ``.data`` writes), against an eval forward of resnet18 (batch 16, 3x32x32, no_grad, one
thread), interleaved, medians of 9 rounds. Nothing is asserted.

    PYTHONPATH=. python benchmarks/wrap_coefficient_cost.py
"""
import time, statistics, torch, torchvision
torch.set_num_threads(1)
from adaptive_depth.wrap import wrap
for scheme, lt in (("euler", 0.5), ("exponential", 2.0)):
    m = wrap(torchvision.models.resnet18(num_classes=10), effective_depth=lt, scheme=scheme).eval()
    g = m.leaky_steps["layer1"]
    x = torch.randn(16, 3, 32, 32)
    def coef():
        a, b = g.coefficients(); a[0]; b[0]
    def fwd():
        with torch.no_grad(): m(x)
    cs, fs = [], []
    for _ in range(9):
        t = time.perf_counter()
        for _ in range(500): coef()
        cs.append((time.perf_counter() - t) / 500)
        t = time.perf_counter()
        for _ in range(3): fwd()
        fs.append((time.perf_counter() - t) / 3)
    c, f = statistics.median(cs), statistics.median(fs)
    print(f"{scheme}: coefficients {c*1e6:.1f} us/block call (range {min(cs)*1e6:.1f}-{max(cs)*1e6:.1f}); "
          f"eval forward {f*1e3:.1f} ms; 8 blocks = {8*c/f*100:.2f}% of the forward")
