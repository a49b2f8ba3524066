"""Gate/up GEMM with the SwiGLU in its epilogue, and the dgrad GEMM with the SwiGLU backward.

Forward  (M = tokens, K = C, Hd = hidden): GU = Z @ W_gu^T + b_gu, written as [G | U] (M, 2*Hd),
         and H = silu(G) * U (M, Hd). One program computes a (BM, BN) tile of both G and U
         (two fp32 accumulators over one pass of Z), so Z is read once for both.
Backward: dH = dY @ W_d (M, Hd) tile-by-tile; the epilogue reads G, U and writes
         [dG | dU] and recomputes H (never stored between forward and backward).
`DOT_FP32` upcasts the dot operands: required under TRITON_INTERPRET=1, whose bf16 tl.dot is
wrong (triton-lang/triton#11584); on a GPU the operands stay in their dtype for tensor cores.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from tfx_kernels.pool import new_output

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _silu_parts(g):
    sig = 1.0 / (1.0 + tl.exp(-g))
    return g * sig, sig


@triton.jit
def _gateup_swiglu_kernel(z_ptr, w_ptr, b_ptr, gu_ptr, h_ptr, M, K, HD,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                          DOT_FP32: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_m = offs_m < M
    mask_n = offs_n < HD
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < K
        z = tl.load(z_ptr + offs_m[:, None] * K + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wg = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None],
                     mask=mask_n[None, :] & mask_k[:, None], other=0.0)
        wu = tl.load(w_ptr + (offs_n[None, :] + HD) * K + offs_k[:, None],
                     mask=mask_n[None, :] & mask_k[:, None], other=0.0)
        if DOT_FP32:
            z, wg, wu = z.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
        acc_g += tl.dot(z, wg)
        acc_u += tl.dot(z, wu)
    g = acc_g + tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    u = acc_u + tl.load(b_ptr + HD + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    # round G and U to the storage dtype first, so forward and backward see the same values
    g = g.to(gu_ptr.dtype.element_ty).to(tl.float32)
    u = u.to(gu_ptr.dtype.element_ty).to(tl.float32)
    s, _ = _silu_parts(g)
    mask = mask_m[:, None] & mask_n[None, :]
    row = offs_m[:, None] * (2 * HD)
    tl.store(gu_ptr + row + offs_n[None, :], g.to(gu_ptr.dtype.element_ty), mask=mask)
    tl.store(gu_ptr + row + HD + offs_n[None, :], u.to(gu_ptr.dtype.element_ty), mask=mask)
    tl.store(h_ptr + offs_m[:, None] * HD + offs_n[None, :], (s * u).to(h_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _dgrad_swiglu_kernel(dy_ptr, wd_ptr, gu_ptr, dgu_ptr, h_ptr, M, D, HD,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         DOT_FP32: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_m = offs_m < M
    mask_n = offs_n < HD
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):  # dH = dY (M, D) @ W_d (D, HD)
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < D
        dy = tl.load(dy_ptr + offs_m[:, None] * D + offs_k[None, :],
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wd = tl.load(wd_ptr + offs_k[:, None] * HD + offs_n[None, :],
                     mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if DOT_FP32:
            dy, wd = dy.to(tl.float32), wd.to(tl.float32)
        acc += tl.dot(dy, wd)
    mask = mask_m[:, None] & mask_n[None, :]
    row = offs_m[:, None] * (2 * HD)
    g = tl.load(gu_ptr + row + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row + HD + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    s, sig = _silu_parts(g)
    du = acc * s
    dg = acc * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(dgu_ptr + row + offs_n[None, :], dg.to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(dgu_ptr + row + HD + offs_n[None, :], du.to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(h_ptr + offs_m[:, None] * HD + offs_n[None, :], (s * u).to(h_ptr.dtype.element_ty),
             mask=mask)


def _tiles(M: int, N: int) -> tuple[int, int, int]:
    if INTERPRET:  # few, large programs: the interpreter's cost is per program and per op
        return (min(64, max(16, triton.next_power_of_2(M))),
                min(64, max(16, triton.next_power_of_2(N))), 32)
    return 128, 128, 64


def gateup_swiglu(z_MK: torch.Tensor, w_gu: torch.Tensor, b_gu: torch.Tensor):
    """-> (GU (M, 2*Hd), H (M, Hd)) in z's dtype."""
    M, K = z_MK.shape
    HD = w_gu.shape[0] // 2
    z, w, b = z_MK.contiguous(), w_gu.contiguous(), b_gu.contiguous()
    gu = new_output((M, 2 * HD), z)
    h = new_output((M, HD), z)
    BM, BN, BK = _tiles(M, HD)
    _gateup_swiglu_kernel[(triton.cdiv(M, BM), triton.cdiv(HD, BN))](
        z, w, b, gu, h, M, K, HD, BM=BM, BN=BN, BK=BK,
        DOT_FP32=INTERPRET, num_warps=8 if not INTERPRET else 1)
    return gu, h


def dgrad_swiglu(dy_MD: torch.Tensor, w_d: torch.Tensor, gu: torch.Tensor):
    """-> (dGU (M, 2*Hd), H recomputed (M, Hd))."""
    M, D = dy_MD.shape
    HD = w_d.shape[1]
    dy, wd = dy_MD.contiguous(), w_d.contiguous()
    dgu = new_output((M, 2 * HD), gu)
    h = new_output((M, HD), gu)
    BM, BN, BK = _tiles(M, HD)
    _dgrad_swiglu_kernel[(triton.cdiv(M, BM), triton.cdiv(HD, BN))](
        dy, wd, gu, dgu, h, M, D, HD, BM=BM, BN=BN, BK=BK,
        DOT_FP32=INTERPRET, num_warps=8 if not INTERPRET else 1)
    return dgu, h
