"""Plain, wrapped and wrapped + AdaptiveSteps resnet18 on the CPU, three-way: single training steps with the
order rotated every step, process CPU time, ratios to plain (total, median of paired 10-step blocks, median
step). A cross-check of ``bench_wrap.py``'s two-way pairing; asserts nothing.

    python benchmarks/wrap_three_way.py [steps=300]
"""
import statistics
import sys
import time

import torch

from _timing import block_sums
from bench_wrap import EVERY, Trainer


def main(steps: int = 300) -> None:
    torch.set_num_threads(1)
    trainers = {k: Trainer(k) for k in ("plain", "wrapped", "adaptive")}
    for t in trainers.values():  # warm-up: allocator, oneDNN primitives, the first adaptations
        t.block(), t.block()
    names = list(trainers)
    cpu = {k: [] for k in names}
    for i in range(steps):
        for k in names[i % 3:] + names[:i % 3]:
            t0 = time.process_time()
            trainers[k].step()
            cpu[k].append(time.process_time() - t0)
    blocks = {k: block_sums(v, EVERY) for k, v in cpu.items()}
    print(f"plain: {1e3 * statistics.median(cpu['plain']):.1f} ms/step (CPU time, median)")
    for k in ("wrapped", "adaptive"):
        paired = statistics.median(a / b for a, b in zip(blocks[k], blocks["plain"]))
        print(f"{k}: total {sum(cpu[k]) / sum(cpu['plain']):.4f}x plain, median paired block {paired:.4f}x, "
              f"median step {statistics.median(cpu[k]) / statistics.median(cpu['plain']):.4f}x")
    print(f"adaptive / wrapped (total): {sum(cpu['adaptive']) / sum(cpu['wrapped']):.4f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
