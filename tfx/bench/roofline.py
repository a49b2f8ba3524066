"""The projector's roofline per stage at the paper's shapes: bytes, FLOPs and time floors.

`tfx bench roofline [--gpu h100|h200]` prints, for SigLIP-so400m (27 x 27 x 1152) -> Qwen2-7B
(D 3584, hidden 3456) at B = 64 and N = 64 / 144 / 256 in bf16, every stage of the fused
forward and backward, its floor max(FLOPs / peak, bytes / bandwidth), and the two prologue
fusions the kernel issue asks about (pooling and LayerNorm folded into the gate/up GEMM's A-tile
loads) with what they would save and cost. Compulsory DRAM traffic only: a tile re-read from
L2 is not counted as DRAM bytes, and the prologue rows count the extra on-chip work instead.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

# Measured ceilings (dense bf16 GEMM 8192^3, device-to-device copy), shared/notes and KINDS.md
GPUS = {"h100": {"name": "H100 SXM", "tflops": 798.0, "tbs": 3.0, "fp32_tflops": 67.0},
        "h200": {"name": "H200", "tflops": 788.0, "tbs": 4.3, "fp32_tflops": 67.0}}
BF16 = 2


@dataclass(frozen=True)
class Shape:
    B: int = 64
    side: int = 27
    n: int = 16
    C: int = 1152
    Hd: int = 3456
    D: int = 3584

    @property
    def M(self) -> int:
        return self.B * self.n * self.n


def bins(size: int, n: int) -> list[int]:
    """Window lengths of PyTorch's adaptive pool (the kernels' formula, tfx_kernels.pool)."""
    return [((i + 1) * size + n - 1) // n - (i * size) // n for i in range(n)]


def stages(s: Shape) -> list[tuple[str, float, float]]:
    """(stage, FLOPs, DRAM bytes) of the fused projector, forward then backward."""
    M, C, Hd, D = s.M, s.C, s.Hd, s.D
    X, P, A = s.B * s.side ** 2 * C * BF16, M * C * BF16, M * Hd * BF16
    w_gu, w_d, Y = 2 * Hd * C * BF16, D * Hd * BF16, M * D * BF16
    return [
        ("fwd pool + LayerNorm (one kernel)", 0.0, X + 2 * P),
        ("fwd gate/up GEMM + SwiGLU epilogue", 2 * M * C * 2 * Hd, P + w_gu + 3 * A),
        ("fwd down GEMM (cuBLAS)", 2 * M * Hd * D, A + w_d + Y),
        ("bwd dgrad GEMM + SwiGLU-bwd epilogue", 2 * M * D * Hd, Y + w_d + 5 * A),
        ("bwd dW_down = dY^T H", 2 * M * D * Hd, Y + A + w_d),
        ("bwd LayerNorm recompute", 0.0, 2 * P),
        ("bwd U recompute GEMM (cuBLAS; not with recompute_up=False)", 2 * M * C * Hd,
         P + w_gu // 2 + A),
        ("bwd dW_gate/up = dGU^T Z", 2 * M * 2 * Hd * C, 2 * A + P + w_gu),
        ("bwd dZ = dGU W_gate/up", 2 * M * 2 * Hd * C, 2 * A + w_gu + P),
        ("bwd LayerNorm backward", 0.0, 3 * P),
        ("bwd unpool (dP -> dX)", 0.0, P + X),
    ]


def floor_us(flops: float, nbytes: float, gpu: dict) -> float:
    return max(flops / (gpu["tflops"] * 1e12), nbytes / (gpu["tbs"] * 1e12)) * 1e6


def prologue(s: Shape, gpu: dict, bn: int = 64) -> list[tuple[str, float, float]]:
    """(what, saved µs, added µs) for the two A-tile prologue fusions of the gate/up GEMM.

    Each of the Hd/BN column-tile programs of a row block rebuilds the same A tile, so work
    done while loading A is repeated Hd/BN times."""
    M, C, Hd = s.M, s.C, s.Hd
    P = M * C * BF16
    tiles = Hd / bn
    rows = bins(s.side, s.n)
    issued = max(rows) ** 2  # a constexpr-unrolled masked window loop issues the largest one
    bw = gpu["tbs"] * 1e12
    # pooling (and LayerNorm) on load: no Z write and read; P is still written once for the
    # backward, X is still read once. Paid with `issued` adds per A element per column tile.
    saved_pool = 2 * P / bw * 1e6
    added_pool = issued * M * C * tiles / (gpu["fp32_tflops"] * 1e12) * 1e6
    # LayerNorm on load: no Z write and read (2P), paid with 3 ops per A element per tile
    saved_ln = 2 * P / bw * 1e6
    added_ln = 3 * M * C * tiles / (gpu["fp32_tflops"] * 1e12) * 1e6
    return [(f"pool on A-tile load ({issued} taps x {tiles:.0f} column tiles)", saved_pool,
             added_pool),
            (f"LayerNorm on A-tile load (3 ops x {tiles:.0f} column tiles)", saved_ln, added_ln)]


def table(gpu_key: str = "h100", counts=(64, 144, 256), B: int = 64) -> str:
    gpu = GPUS[gpu_key]
    out = [f"Roofline on {gpu['name']} (measured ceilings {gpu['tflops']:.0f} TFLOP/s bf16, "
           f"{gpu['tbs']} TB/s), SigLIP 27x27x1152 -> D 3584, hidden 3456, B {B}, bf16.", "",
           "| stage | " + " | ".join(f"N={c}: GFLOP / MB / floor µs" for c in counts) + " |",
           "|---|" + "---|" * len(counts)]
    shapes = [Shape(B=B, n=int(round(c ** 0.5))) for c in counts]
    rows = [stages(s) for s in shapes]
    totals = [0.0] * len(counts)
    for i, (name, _, _) in enumerate(rows[0]):
        cells = []
        for j, s in enumerate(shapes):
            _, flops, nbytes = rows[j][i]
            t = floor_us(flops, nbytes, gpu)
            totals[j] += t
            cells.append(f"{flops / 1e9:.1f} / {nbytes / 2**20:.0f} / {t:.1f}")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out.append("| **total floor fwd+bwd** | " + " | ".join(f"**{t:.0f} µs**" for t in totals)
               + " |")
    out += ["", "Prologue fusions into the gate/up GEMM (saved vs added time, µs; the added "
            f"work runs on CUDA cores at {gpu['fp32_tflops']:.0f} TFLOP/s fp32):", "",
            "| fusion | " + " | ".join(f"N={c}: saved / added" for c in counts) + " |",
            "|---|" + "---|" * len(counts)]
    pro = [prologue(s, gpu) for s in shapes]
    for i, (name, _, _) in enumerate(pro[-1]):
        out.append(f"| {name.split(' (')[0]} | " + " | ".join(
            f"{p[i][1]:.1f} / {p[i][2]:.1f}" for p in pro) + " |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="tfx bench roofline")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)
    print(table(args.gpu, B=args.batch))
