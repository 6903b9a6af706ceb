"""Static checks of the kernels for an H100/H200 (sm_90), on a CPU: the only performance signal CI has
without a GPU. ``benchmarks/static_sm90.py`` compiles the kernel variants ahead of time for
``GPUTarget("cuda", 90, 32)`` (Triton needs no GPU for that) and reads ``ptxas -v`` and the PTX; these tests
assert what the review of issue 13 checked by hand:

- the unmasked body of every flat kernel uses 128-bit vector loads and stores, for an element count that
  is not a multiple of 16 (the scalar accesses left are the masked tail's and the coefficients');
- no elementwise kernel spills registers, and none needs so many that fewer than 4 programs of 256
  threads fit on an SM (the persistent grid's occupancy);
- no shipped GEMM config spills in the heaviest variant it serves (bias, ReLU, and the statistics for
  all but the large 16-bit tiles, which _prune keeps for the variants without them).

One compile per variant, in one subprocess for the module (without ``TRITON_INTERPRET``); Triton's own
cache makes a rerun fast."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
FLAT = ("leaky_fwd", "leaky_bwd", "leaky_linear_bwd", "linear_param_grads")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    """The rows of ``static_sm90.py --mode test``: one per compiled variant."""
    import triton
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton install bundles no ptxas")
    out = tmp_path_factory.mktemp("static") / "static_sm90.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "static_sm90.py"), "--mode", "test",
                           "--json", str(out)], env=env, cwd=str(ROOT), capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())["rows"]


def _rows(figures, kernel):
    rows = [r for r in figures if r["kernel"] == kernel]
    assert rows, f"no variant of {kernel} compiled"
    return rows


@pytest.mark.parametrize("kernel", FLAT)
def test_flat_kernels_use_vector_accesses_for_any_length(figures, kernel):
    for r in _rows(figures, kernel):
        assert r["expected_ld_v4"] > 0 and r["expected_st_v4"] > 0
        assert r["ld_v4"] >= r["expected_ld_v4"], r
        assert r["st_v4"] >= r["expected_st_v4"], r


@pytest.mark.parametrize("kernel", FLAT + ("sum_partials",))
def test_elementwise_kernels_do_not_spill(figures, kernel):
    for r in _rows(figures, kernel):
        assert (r["spill_stores"], r["spill_loads"], r["stack"]) == (0, 0, 0), r
        if kernel in FLAT:  # 4 programs of 8 warps on an SM's 64K registers
            assert r["registers"] * 32 * r["num_warps"] * 4 <= 65536, r


def test_no_shipped_gemm_config_spills(figures):
    import importlib
    sys.path.insert(0, str(ROOT))
    from adaptive_depth import ops
    ops._kernels()
    linear = importlib.import_module("adaptive_depth_kernels.leaky_linear")
    rows = _rows(figures, "leaky_linear_fwd")
    shipped = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps) for c in linear.CONFIGS}
    compiled = {(r["variant"]["BLOCK_M"], r["variant"]["BLOCK_N"], r["variant"]["BLOCK_K"], r["num_warps"])
                for r in rows}
    assert compiled == shipped  # every shipped config was compiled (16-bit and TF32 kinds)
    assert {r["dtype"] for r in rows} == {"fp32", "bf16", "fp16"}
    serves_stats = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps)
                    for c in linear.CONFIGS if linear.serves_stats(c)}
    for r in rows:  # each in the heaviest variant it serves
        key = (r["variant"]["BLOCK_M"], r["variant"]["BLOCK_N"], r["variant"]["BLOCK_K"], r["num_warps"])
        assert r["variant"]["STATS"] == (key in serves_stats), r
        assert r["variant"]["HAS_BIAS"] and r["variant"]["RELU"]
        assert (r["spill_stores"], r["spill_loads"]) == (0, 0), r
