"""Projector microbenchmark: eager PyTorch, torch.compile, Liger-Kernel's SwiGLU with cuBLAS
GEMMs (when `liger-kernel` is installed) and the fused Triton kernel (`fused`: U recomputed in
the backward; `fused-store-u`: U kept), in one run.

Modes fwd, bwd, fwd+bwd; median/p20/p80 time, TFLOP/s, percent of the GEMM floor (GPU only),
and the bytes saved for backward (measured with saved_tensors_hooks, parameters excluded).
Writes a table to stdout, CSV and PNG to --out. On a CPU the fused kernel runs in the Triton
interpreter: shapes shrink (--small) and timings say nothing about GPU speed.
Usage: tfx bench kernel [--small] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import time
from functools import partial
from pathlib import Path

import torch

PAPER_SHAPES = [  # (encoder, B, side, n, C, Hd, D)
    *[("siglip", b, 27, n, 1152, 3456, 3584) for b in (16, 64) for n in (8, 12, 16)],
    *[("clip-l", b, 24, n, 1024, 3072, 4096) for b in (16, 64) for n in (8, 12, 16)],
]
SMALL_SHAPES = [("tiny", 2, 9, n, 32, 96, 48) for n in (3, 4)]
H100_BF16_TFLOPS = 798.0  # measured dense bf16 GEMM ceiling (shared/notes/anchors-kernels.md)


def gemm_flops(M, C, Hd, D, mode):
    fwd = 2 * M * C * 2 * Hd + 2 * M * Hd * D
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[mode]


def make_inputs(B, side, C, Hd, D, device, dtype):
    x = torch.randn(B, side * side, C, device=device, dtype=dtype, requires_grad=True)
    ps = [torch.ones(C), torch.zeros(C), torch.randn(2 * Hd, C) * C ** -0.5,
          torch.zeros(2 * Hd), torch.randn(D, Hd) * Hd ** -0.5, torch.zeros(D)]
    return x, [p.to(device, dtype).requires_grad_() for p in ps]


def liger_projector(x_BTC, grid_hw, n, ln_w, ln_b, eps, w_gu, b_gu, w_d, b_d):
    """The peer: PyTorch pooling and LayerNorm, cuBLAS gate and up GEMMs, Liger's Triton
    SiLU-mul (as its LigerSwiGLUMLP does), cuBLAS down GEMM."""
    import torch.nn.functional as F
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    B, T, C = x_BTC.shape
    H, W = grid_hw
    p = F.adaptive_avg_pool2d(x_BTC.transpose(1, 2).reshape(B, C, H, W), n)
    z = F.layer_norm(p.flatten(2).transpose(1, 2), (C,), ln_w, ln_b, eps)
    hd = w_gu.shape[0] // 2
    h = LigerSiLUMulFunction.apply(F.linear(z, w_gu[:hd], b_gu[:hd]),
                                   F.linear(z, w_gu[hd:], b_gu[hd:]))
    return F.linear(h, w_d, b_d)


OPTIONAL = ("compile", "liger")  # a provider that cannot run here is left out, with the reason


def providers(use_compile: bool):
    from tfx_kernels import fused_projector, reference_projector

    out = {"eager": reference_projector}
    if use_compile:  # on a CPU, inductor builds C++ with the system compiler
        out["compile"] = torch.compile(reference_projector, dynamic=False)
    try:
        import liger_kernel  # noqa: F401

        out["liger"] = liger_projector
    except ImportError:
        print("liger-kernel not installed: its row is left out (pip install liger-kernel)")
    out["fused"] = fused_projector  # recomputes U in the backward (saves P and G)
    out["fused-store-u"] = partial(fused_projector, recompute_up=False)  # saves P, G and U
    return out


def saved_bytes(fn, x, params, side, n):
    param_ptrs = {p.data_ptr() for p in params}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in param_ptrs and t.data_ptr() != x.data_ptr():
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x, (side, side), n, params[0], params[1], 1e-5, *params[2:])
    return total


def time_it(call, device, reps):
    for _ in range(min(3, reps)):  # warm-up: compile, autotune, caches
        call()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) > 2 else [min(times)] * 9
    return statistics.median(times), q[1], q[7]


def bench_case(fn, shape, mode, device, dtype, reps):
    _, B, side, n, C, Hd, D = shape
    x, params = make_inputs(B, side, C, Hd, D, device, dtype)
    args = (x, (side, side), n, params[0], params[1], 1e-5, *params[2:])
    y = fn(*args)
    dy = torch.randn_like(y)
    if mode == "fwd":
        call = lambda: fn(*args)  # noqa: E731
    elif mode == "bwd":
        def call():
            torch.autograd.grad(y, [x, *params], dy, retain_graph=True)
    else:
        def call():
            torch.autograd.grad(fn(*args), [x, *params], dy)
    return time_it(call, device, reps), saved_bytes(fn, x, params, side, n)


def git_sha():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(small: bool, out: Path, reps: int, use_compile: bool = True,
        encoders: set[str] | None = None, batches: set[int] | None = None,
        counts: set[int] | None = None) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" and not small else torch.float32
    shapes = SMALL_SHAPES if small or device == "cpu" else PAPER_SHAPES
    shapes = [s for s in shapes if small or ((not encoders or s[0] in encoders)
                                             and (not batches or s[1] in batches)
                                             and (not counts or s[3] ** 2 in counts))]
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    import triton

    rows, skipped = [], set()
    for shape in shapes:
        enc, B, side, n, C, Hd, D = shape
        M = B * n * n
        for mode in ("fwd", "bwd", "fwd+bwd"):
            base = {}
            for prov, fn in providers(use_compile).items():
                try:
                    (med, p20, p80), saved = bench_case(fn, shape, mode, device, dtype, reps)
                except Exception as e:  # e.g. no C++ compiler for inductor: say so, go on
                    if prov not in OPTIONAL:
                        raise
                    if (prov, mode) not in skipped:
                        print(f"{prov} failed, row left out: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}")
                    skipped.add((prov, mode))
                    continue
                tflops = gemm_flops(M, C, Hd, D, mode) / (med * 1e-3) / 1e12
                base[prov] = med
                rows.append({
                    "encoder": enc, "B": B, "grid": side, "n": n, "N": n * n, "C": C, "Hd": Hd,
                    "D": D, "mode": mode, "provider": prov, "median_ms": round(med, 4),
                    "p20_ms": round(p20, 4), "p80_ms": round(p80, 4),
                    "tflops": round(tflops, 3),
                    "pct_floor": round(100 * tflops / H100_BF16_TFLOPS, 1) if device == "cuda"
                    else None,
                    "saved_mb": round(saved / 2**20, 3),
                    "speedup_vs_eager": round(base["eager"] / med, 3),
                    "device": name, "dtype": str(dtype).removeprefix("torch."),
                    "torch": torch.__version__, "triton": triton.__version__, "git": git_sha(),
                    "interpreter": os.environ.get("TRITON_INTERPRET") == "1"})
    out.mkdir(parents=True, exist_ok=True)
    with (out / "projector.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print_table(rows)
    plot(rows, out / "projector.png")
    print(f"wrote {out / 'projector.csv'} and {out / 'projector.png'}")
    return rows


def print_table(rows):
    cols = ["encoder", "B", "N", "mode", "provider", "median_ms", "p20_ms", "p80_ms", "tflops",
            "pct_floor", "saved_mb", "speedup_vs_eager"]
    print(f"device: {rows[0]['device']} ({rows[0]['dtype']}, interpreter="
          f"{rows[0]['interpreter']})")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


def plot(rows, path):
    try:
        import matplotlib
    except ImportError:  # a GPU machine without it: the CSV is the result
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    full = [r for r in rows if r["mode"] == "fwd+bwd"]
    labels = sorted({f"{r['encoder']} B{r['B']} N{r['N']}" for r in full})
    for prov in sorted({r["provider"] for r in full}):
        ys = {f"{r['encoder']} B{r['B']} N{r['N']}": r for r in full if r["provider"] == prov}
        axes[0].plot(labels, [ys[k]["median_ms"] for k in labels], marker="o", label=prov)
        axes[1].plot(labels, [ys[k]["saved_mb"] for k in labels], marker="o", label=prov)
    axes[0].set_ylabel("fwd+bwd median ms")
    axes[1].set_ylabel("MB saved for backward")
    for ax in axes:
        ax.tick_params(axis="x", rotation=45)
        ax.legend()
    fig.suptitle(f"projector on {rows[0]['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="tfx bench kernel")
    p.add_argument("--small", action="store_true", help="tiny shapes (always on a CPU)")
    p.add_argument("--out", default="bench_out/kernel")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    p.add_argument("--encoders", default="", help="comma list of paper shapes: siglip, clip-l")
    p.add_argument("--batches", default="", help="comma list of batch sizes, e.g. 64")
    p.add_argument("--counts", default="", help="comma list of N, e.g. 64,256")
    args = p.parse_args(argv)
    run(args.small, Path(args.out), args.reps, use_compile=not args.no_compile,
        encoders=set(filter(None, args.encoders.split(","))),
        batches={int(b) for b in args.batches.split(",") if b},
        counts={int(c) for c in args.counts.split(",") if c})


if __name__ == "__main__":
    main()
