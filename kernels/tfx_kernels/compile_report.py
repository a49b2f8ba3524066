"""Compile every Triton kernel for Hopper (sm_90a) at every launch configuration the code can
choose on a GPU, without a GPU: registers, spill bytes, shared memory, wgmma.

Triton compiles to PTX and a cubin for any target on any machine; the `ptxas -v` shipped in
the triton wheel reports registers and spills of the PTX, and its `cuobjdump` shows whether
the cubin's GEMMs run on Hopper's warpgroup MMA (HGMMA). Run as a module in a process without
TRITON_INTERPRET (the interpreter replaces the kernels' JIT functions):
    python -m tfx_kernels.compile_report [--json PATH]
`tfx bench kernel --compile-report` does that; exit status 1 when any case spills or fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_report: unset TRITON_INTERPRET (it replaces the JIT functions)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tfx_kernels import swiglu  # noqa: E402
from tfx_kernels.pool import (  # noqa: E402
    _pool_fwd_kernel,
    _pool_ln_kernel,
    _unpool_kernel,
    ln_warps,
    max_bins_per_input,
    max_window,
)

TARGET = GPUTarget("cuda", 90, 32)
DTYPE = "bf16"  # the training dtype on a GPU
PAPER_GRIDS = [(27, 1152), (24, 1024)]  # SigLIP-so400m 384 px, CLIP-L 336 px: (side, C)
PAPER_NS = [8, 12, 16]
POOL_WARPS, POOL_STAGES = 4, 3  # Triton's defaults: the pool kernels launch without options


def _desc(*block):
    return f"tensordesc<{DTYPE}[{','.join(map(str, block))}]>"


def gemm_cases():
    """(kernel name, jit fn, signature, constexprs, warps, stages) per autotune config."""
    p = f"*{DTYPE}"
    for c in swiglu.GATEUP_CONFIGS:
        BM, BN, BK = c["BM"], c["BN"], c["BK"]
        sig = {"z_desc": _desc(BM, BK), "wg_desc": _desc(BN, BK), "wu_desc": _desc(BN, BK),
               "b_ptr": p, "g_desc": _desc(BM, BN), "u_desc": _desc(BM, BN),
               "h_desc": _desc(BM, BN), "M": "i32", "K": "i32", "HD": "i32"}
        yield "gateup_swiglu", swiglu._gateup_swiglu_kernel, sig, c
    for c in swiglu.DGRAD_CONFIGS:
        BM, BN, BK = c["BM"], c["BN"], c["BK"]
        sig = {"dy_desc": _desc(BM, BK), "wd_desc": _desc(BK, BN),
               **{k: _desc(BM, BN) for k in ("g_desc", "u_desc", "dg_desc", "du_desc",
                                             "h_desc")},
               "M": "i32", "D": "i32", "HD": "i32"}
        yield "dgrad_swiglu", swiglu._dgrad_swiglu_kernel, sig, c


def pool_cases():
    """The pool kernels at the paper's grids and counts (their window sizes are constexprs)."""
    p = f"*{DTYPE}"
    seen = set()
    for side, C in PAPER_GRIDS:
        for n in PAPER_NS:
            kh, ki, bc = max_window(side, n), max_bins_per_input(side, n), \
                min(256, triton.next_power_of_2(C))
            full = triton.next_power_of_2(C)
            cases = [
                ("pool_fwd", _pool_fwd_kernel,
                 {"x_ptr": p, "out_ptr": p, "H": "i32", "W": "i32", "n": "i32", "C": "i32"},
                 {"KH": kh, "KW": kh, "BLOCK_C": bc}, POOL_WARPS),
                ("pool_ln", _pool_ln_kernel,
                 {"x_ptr": p, "lnw_ptr": p, "lnb_ptr": p, "p_ptr": p, "z_ptr": p, "H": "i32",
                  "W": "i32", "n": "i32", "C": "i32", "eps": "fp32"},
                 {"KH": kh, "KW": kh, "BLOCK_C": full}, ln_warps(C)),
                ("unpool", _unpool_kernel,
                 {"dp_ptr": p, "dx_ptr": p, "H": "i32", "W": "i32", "n": "i32", "C": "i32"},
                 {"KI": ki, "KJ": ki, "BLOCK_C": bc}, POOL_WARPS)]
            for name, fn, sig, cx, warps in cases:
                key = (name, tuple(sorted(cx.items())))
                if key not in seen:
                    seen.add(key)
                    yield name, fn, sig, {**cx, "num_warps": warps, "num_stages": POOL_STAGES}


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_one(fn, sig: dict, config: dict) -> dict:
    meta = {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}
    constexprs = {k: v for k, v in config.items() if k not in meta}
    if "DOT_FP32" in fn.arg_names:
        constexprs["DOT_FP32"] = False
    sig = {**sig, **{k: "constexpr" for k in constexprs}}
    kernel = triton.compile(ASTSource(fn, sig, constexprs=constexprs), target=TARGET,
                            options=meta)
    with tempfile.TemporaryDirectory() as d:
        ptx, cubin = Path(d) / "k.ptx", Path(d) / "k.cubin"
        ptx.write_text(kernel.asm["ptx"])
        cubin.write_bytes(kernel.asm["cubin"])
        out = subprocess.run([_tool("ptxas"), "-v", "--gpu-name=sm_90a", str(ptx), "-o",
                              str(Path(d) / "v.cubin")], capture_output=True, text=True)
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", str(cubin)],
                              capture_output=True, text=True).stdout
    log = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if out.returncode != 0 or regs is None or spills is None:
        raise RuntimeError(f"ptxas failed: {log.strip()[-400:]}")
    return {"registers": int(regs.group(1)), "spill_stores": int(spills.group(1)),
            "spill_loads": int(spills.group(2)), "shared_bytes": kernel.metadata.shared,
            "wgmma": "HGMMA" in sass}


def report() -> list[dict]:
    rows = []
    for kind, cases in (("gemm", gemm_cases()), ("pool", pool_cases())):
        for name, fn, sig, config in cases:
            row = {"kernel": name, "kind": kind, "config": config}
            try:
                row.update(compile_one(fn, sig, config))
                row["ok"] = row["spill_stores"] == 0 and row["spill_loads"] == 0 and \
                    (kind != "gemm" or row["wgmma"])
            except Exception as e:  # a compile failure is a finding, not a crash of the report
                row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                           ok=False)
            rows.append(row)
    return rows


def config_text(config: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items())


def print_table(rows: list[dict]) -> None:
    print(f"sm_90a (Hopper), {DTYPE}, triton {triton.__version__}; wgmma: HGMMA in the SASS")
    print("| kernel | launch config | registers | spill st/ld B | shared B | wgmma | ok |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['kernel']} | {config_text(r['config'])} | compile failed: "
                  f"{r['error']} | | | | no |")
            continue
        wgmma = ("yes" if r["wgmma"] else "NO") if r["kind"] == "gemm" else "-"
        print(f"| {r['kernel']} | {config_text(r['config'])} | {r['registers']} | "
              f"{r['spill_stores']}/{r['spill_loads']} | {r['shared_bytes']} | {wgmma} | "
              f"{'yes' if r['ok'] else 'NO'} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tfx_kernels.compile_report")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    rows = report()
    print_table(rows)
    bad = [r for r in rows if not r["ok"]]
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "target": "sm_90a",
                                               "dtype": DTYPE, "rows": rows}, indent=1))
    print(f"{len(rows)} kernel configurations; {len(bad)} failed (a spill, a GEMM without "
          "wgmma, or a compile error)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
