"""Run a test file as two gloo ranks under ``torch.distributed.run`` and read the JSON report its rank 0 writes."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_two_ranks(script: str, out: Path, *, timeout: int) -> dict:
    """``python -m torch.distributed.run --nproc_per_node=2 script out`` from the repository root (one thread
    per rank, in a process group of its own so that a hang is killed whole); the report rank 0 wrote to ``out``.
    Skips where gloo is missing; fails with the ranks' output on a non-zero exit or after ``timeout`` seconds
    (a collective mismatch hangs)."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(script).resolve()), str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s (a collective mismatch hangs):\n" + stderr[-6000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-6000:]
    return json.loads(Path(out).read_text())


def shut_down() -> None:
    """A rank's last step: free what still holds the process group (drop the worker's DDP objects first), wait
    for the other rank, then destroy the group. Tearing gloo down while a DistributedDataParallel reducer is still
    alive at interpreter exit can abort the rank ("terminate called without an active exception")."""
    import gc
    import torch.distributed as dist
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()

