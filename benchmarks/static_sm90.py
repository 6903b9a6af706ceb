"""Static sm_90 figures of every kernel variant, on a machine without a GPU.

Triton compiles ahead of time for ``GPUTarget("cuda", 90, 32)`` (an H100/H200) without a device; its
bundled ``ptxas -v`` reports registers and spills, and ``cuobjdump -res-usage`` the resources of the cubin
Triton itself produced. For each variant this records: registers, spill stores/loads (bytes), stack and
shared memory, and the global memory accesses in the PTX by width (``v4`` = 128-bit vector accesses,
``scalar`` = one element each). The element count is left unspecialised (as for a count that is not a
multiple of 16) and the pointers 16-byte aligned (as for torch's allocations), so the 128-bit accesses
counted are those of the unmasked body.

    python benchmarks/static_sm90.py                  # results/static_sm90_<date>_triton<version>.{json,md}
    python benchmarks/static_sm90.py --mode test --json FILE   # the static tests' variants, JSON only
    python benchmarks/static_sm90.py --mode quick     # one variant per kernel and dtype

Runs with ``TRITON_INTERPRET`` unset (it is removed here), from the source tree (``PYTHONPATH=$PWD``).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, never interpret
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from adaptive_depth import ops  # noqa: E402

KERNELS = ops._kernels()  # installed, or the kernels/ folder of this checkout
if KERNELS is None:
    raise SystemExit("the Triton kernels do not import here")
# the modules (the package's attributes of these names are the functions)
common = importlib.import_module("adaptive_depth_kernels._common")
linear = importlib.import_module("adaptive_depth_kernels.leaky_linear")
update = importlib.import_module("adaptive_depth_kernels.leaky_update")

TARGET = GPUTarget("cuda", 90, 32)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2}
# the coefficient and partial-sum pointers: fp32 (a, b may also be fp64: one scalar load either way)
SCALARS = {"A": "fp32", "B": "fp32", "LT": "fp32", "PARTIAL": "fp32", "OUT": "fp32", "CS": "fp32"}
INTEGERS = {"N", "M", "D", "P", "L", "INDEX", "SLOTS", "M_BUCKET"}  # the other upper-case arguments are pointers


def _signature(fn, dtype: str, consts: Dict, ones=()) -> tuple:
    """Triton's signature and attributes for ``fn``: tensors of ``dtype`` (16-byte aligned), scalars
    fp32, integers i32 without divisibility (``ones``: integers equal to 1, which Triton specialises)."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in ones:
            sig[name] = "constexpr"
            consts[name] = 1
        elif name.isupper() and name not in INTEGERS:  # a pointer
            sig[name] = "*" + SCALARS.get(name, dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name.startswith("stride") or name == "D":  # widths and row strides: multiples of 16
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _access_counts(ptx: str) -> Dict[str, int]:
    """Global loads and stores in the PTX, by vector width."""
    counts = {}
    for op in ("ld", "st"):
        found = re.findall(rf"\b{op}\.global(?:\.[A-Za-z0-9_:]+)*?(\.v[248])?\.[bfu](?:8|16|32|64)\b", ptx)
        counts[f"{op}_v4"] = sum(1 for v in found if v == ".v4")
        counts[f"{op}_v2"] = sum(1 for v in found if v == ".v2")
        counts[f"{op}_scalar"] = sum(1 for v in found if v == "")
    return counts


def _ptxas(ptx: str) -> Dict[str, int]:
    """Registers and spills as ``ptxas -v`` reports them for sm_90a."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        done = subprocess.run([str(BIN / "ptxas"), "-v", "--gpu-name=sm_90a", str(src), "-o",
                               str(Path(tmp) / "k.cubin")], capture_output=True, text=True, check=True)
    log = done.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return {"registers": int(regs.group(1)), "spill_stores": int(spills.group(1)),
            "spill_loads": int(spills.group(2)), "stack": int(stack.group(1))}


def _res_usage(cubin: bytes) -> Dict[str, int]:
    """``cuobjdump -res-usage`` of the cubin Triton built (REG, STACK, SHARED, LOCAL)."""
    tool = BIN / "cuobjdump"
    if not tool.exists():
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True).stdout
    found = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {f"cubin_{k.lower()}": int(v) for k, v in found.items()}


def compile_variant(fn, dtype: str, consts: Dict, num_warps: int, num_stages: int = 3, ones=()) -> Dict:
    consts = dict(consts)
    sig, attrs = _signature(fn, dtype, consts, ones)
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    kernel = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = kernel.asm["ptx"]
    out = {**_ptxas(ptx), **_res_usage(kernel.asm["cubin"]), **_access_counts(ptx),
           "shared_bytes": int(getattr(kernel.metadata, "shared", 0))}
    return out


def expected_v4(dtype: str, block: int, num_warps: int, tensors: int) -> int:
    """128-bit accesses of ``tensors`` unmasked streams of ``block`` elements over ``num_warps`` warps:
    each thread moves ``block / (32 num_warps)`` elements, 16 bytes per access."""
    return tensors * block // (32 * num_warps) * ITEMSIZE[dtype] // 16


MODES = ("full", "test", "quick")


def variants(mode: str = "full") -> List[Dict]:
    """The kernel variants to compile. ``full``: every variant the launchers can ask for (elementwise),
    every shipped GEMM config of every dtype with and without statistics. ``test``: per kernel and dtype
    the variant with every flag on (the most registers), and every shipped GEMM config of every dtype
    with the heaviest epilogue (fp16 and bf16 differ: 64x128 with 4 warps spilled in fp16 only).
    ``quick``: as test, with one GEMM config per dtype."""
    out = []
    quick = mode != "full"
    flags = [True] if quick else [False, True]
    block, warps = update.BLOCK, update.NUM_WARPS
    for dt in ("fp32", "bf16", "fp16"):
        for relu in flags:
            for stats in flags:
                out.append(dict(kernel="leaky_fwd", fn=update._leaky_fwd_kernel, dtype=dt, warps=warps,
                                consts={"BLOCK": block, "RELU": relu, "STATS": stats, "TAIL": update.TAIL},
                                loads=2, stores=1))
        needs = [(True, True, True, True)] if quick else \
            [(True, True, True, True), (True, False, False, True), (False, True, True, False),
             (True, True, False, False)]
        for relu in flags:
            for nx, nf, na, nb in needs:
                loads = 1 + (relu or na) + (relu or nb)
                out.append(dict(kernel="leaky_bwd", fn=update._leaky_bwd_kernel, dtype=dt, warps=warps,
                                consts={"BLOCK": block, "RELU": relu, "NEED_X": nx, "NEED_F": nf,
                                        "NEED_A": na, "NEED_B": nb, "TAIL": update.TAIL}, loads=loads, stores=nx + nf))
        # (NEED_X, NEED_R, NEED_A, MASK) as the launcher asks: with the output ReLU a masking pass (G, relu(x),
        # <G, x>) and a dx pass after the GEMM; without it one pass
        linear_needs = [(False, True, True, True), (True, True, True, False)] if quick else \
            [(False, True, True, True), (False, False, True, True), (False, True, False, True),
             (True, False, False, False), (True, True, True, False), (True, False, True, False),
             (False, True, True, False)]
        for nx, nr, na, mask in linear_needs:
            out.append(dict(kernel="leaky_linear_bwd", fn=linear._leaky_linear_bwd_kernel, dtype=dt,
                            warps=warps, consts={"BLOCK": block, "MASK": mask, "NEED_X": nx, "NEED_R": nr,
                                                 "NEED_A": na, "TAIL": update.TAIL},
                            loads=1 + (nx or na or mask) + mask + nx, stores=nx + nr + mask))
        # the parameters' gradients: (NEED_W, NEED_BIAS, NEED_B) with a bias
        for nw, nbias, nb in ([(True, True, True)] if quick else [(True, True, True), (True, False, False),
                                                                   (True, True, False), (True, False, True)]):
            out.append(dict(kernel="linear_param_grads", fn=linear._linear_param_grads_kernel, dtype=dt,
                            warps=warps, consts={"BLOCK": block, "HAS_BIAS": True, "NEED_W": nw,
                                                 "NEED_BIAS": nbias, "NEED_B": nb, "TAIL": update.TAIL},
                            loads=1 + nb, stores=nw))
        # the GEMM: every shipped config of the dtype's kind, with the heaviest epilogue it serves (bias,
        # ReLU, statistics where it serves them) and without statistics; fp32 as TF32 (full fp32 takes the
        # cuBLAS path)
        block_k = 32 if dt == "fp32" else 64
        shipped = [c for c in linear.CONFIGS if c.kwargs["BLOCK_K"] == block_k]
        if mode == "quick":
            shipped = shipped[:1]
        for config in shipped:
            for stats in [s for s in flags if linear.serves_stats(config) or not s] or [False]:
                out.append(dict(kernel="leaky_linear_fwd", fn=linear._leaky_linear_fwd_kernel, dtype=dt,
                                warps=config.num_warps, stages=config.num_stages, ones=("stride_wk",),
                                consts={"HAS_BIAS": True, "RELU": True, "STATS": stats, "PRECISION": "tf32",
                                        "DOT_FP32": False, **config.kwargs}))
    for block in sorted({16, 1024, common.SUM_BLOCK}):
        out.append(dict(kernel="sum_partials", fn=common._sum_partials_kernel, dtype="fp32",
                        warps=4 if block <= 1024 else 8, consts={"BLOCK": block}))
    return out


def run(mode: str) -> Dict:
    rows = []
    for v in variants(mode):
        figures = compile_variant(v["fn"], v["dtype"], v["consts"], v["warps"], v.get("stages", 3),
                                  v.get("ones", ()))
        row = {"kernel": v["kernel"], "dtype": v["dtype"], "num_warps": v["warps"],
               "variant": {k: val for k, val in v["consts"].items()
                           if k not in ("BLOCK", "TAIL") or v["kernel"] == "sum_partials"},
               **figures}
        if "loads" in v:  # a flat kernel: the 128-bit accesses its unmasked body must have
            row["expected_ld_v4"] = expected_v4(v["dtype"], v["consts"]["BLOCK"], v["warps"], v["loads"])
            row["expected_st_v4"] = expected_v4(v["dtype"], v["consts"]["BLOCK"], v["warps"], v["stores"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"meta": {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                     "triton": triton.__version__, "target": "cuda sm_90 (ptxas --gpu-name=sm_90a)",
                     "mode": mode}, "rows": rows}


def markdown(result: Dict) -> str:
    meta = result["meta"]
    cols = ["kernel", "dtype", "variant", "num_warps", "registers", "spill_stores", "spill_loads", "stack",
            "shared_bytes", "ld_v4", "st_v4", "ld_scalar", "st_scalar", "expected_ld_v4", "expected_st_v4"]
    lines = [f"# Static sm_90 figures of the kernels ({meta['date']}, triton {meta['triton']})", "",
             "Compiled ahead of time for `GPUTarget(\"cuda\", 90, 32)` on a CPU-only machine by "
             "`python benchmarks/static_sm90.py`. Registers and spills from the bundled `ptxas -v`; accesses "
             "counted in the PTX (`v4` = 128-bit); `expected_*_v4`: what the unmasked body of a flat kernel "
             "needs, for an element count that is not a multiple of 16 (the scalar accesses are the masked "
             "tail block's).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        variant = ", ".join(f"{k}={v}" for k, v in r["variant"].items())
        lines.append("| " + " | ".join(variant if c == "variant" else str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                        help="folder for static_sm90_<date>_triton<version>.{json,md}")
    parser.add_argument("--json", help="write only this JSON file")
    parser.add_argument("--mode", choices=MODES, default="full", help="which variants (see variants())")
    args = parser.parse_args(argv)
    result = run(args.mode)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        return
    stem = f"static_sm90_{result['meta']['date'][:10]}_triton{triton.__version__}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown(result))
    print(f"wrote {out / stem}.{{json,md}}")


if __name__ == "__main__":
    main()
