"""Adaptive average pooling of a (B, H*W, C) patch grid to (B, n*n, C), and its backward.

Bins follow PyTorch's adaptive_avg_pool2d: start = floor(i*H/n), end = ceil((i+1)*H/n); they
overlap when n does not divide H. Forward: one program per (output token, channel block) sums
its window in fp32 (the largest window is a constexpr computed on the host). Backward is a
gather ("unpool"): one program per (input patch, channel block) sums dP/count over the <= 2x2
bins that contain it, so it needs no atomics and is deterministic.
`pool_ln` is the forward the projector uses: one program per output token pools its whole
channel row and applies the LayerNorm in the same pass (statistics of the rounded pooled row,
as `F.layer_norm` on the pooled tensor computes them), writing the pooled P (kept for backward)
and the normalised Z (the gate/up GEMM's input): P is never read back.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

POISON = os.environ.get("TFX_KERNEL_POISON") == "1"  # tests: fill outputs with NaN first


def new_output(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    dtype = dtype or like.dtype
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def bin_range(i, size, n):
    """PyTorch's adaptive-pool bin i of n over `size`: [floor(i*size/n), ceil((i+1)*size/n)).
    Swapping `size` and `n` gives the bins that contain input row i."""
    return (i * size) // n, ((i + 1) * size + n - 1) // n


_bin = triton.jit(bin_range)  # the same formula inside the kernels


def max_window(size: int, n: int) -> int:
    return max(hi - lo for lo, hi in (bin_range(i, size, n) for i in range(n)))


def max_bins_per_input(size: int, n: int) -> int:
    """Most output bins one input row lies in."""
    return max(hi - lo for lo, hi in (bin_range(r, n, size) for r in range(size)))


@triton.jit
def _bin_mean(x_ptr, pid, H, W, n, C, offs_c, mask_c, KH: tl.constexpr, KW: tl.constexpr,
              BLOCK_C: tl.constexpr):
    """fp32 mean of output bin `pid` (= b * n*n + i*n + j) over channels `offs_c` of the
    (B, H, W, C) grid: at most KH x KW inputs, masked to the bin's true extent."""
    b = pid // (n * n)
    ij = pid % (n * n)
    r0, r1 = _bin(ij // n, H, n)
    c0, c1 = _bin(ij % n, W, n)
    zero = offs_c * 0  # broadcast scalars into the mask (interpreter-safe)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    base = x_ptr + b * H * W * C
    for dr in tl.static_range(KH):
        for dc in tl.static_range(KW):
            r = r0 + dr
            c = c0 + dc
            ok = mask_c & ((zero + r) < r1) & ((zero + c) < c1)
            acc += tl.load(base + (r * W + c) * C + offs_c, mask=ok, other=0.0).to(tl.float32)
    return acc / ((r1 - r0) * (c1 - c0)).to(tl.float32)


@triton.jit
def _pool_fwd_kernel(x_ptr, out_ptr, H, W, n, C,
                     KH: tl.constexpr, KW: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # b * n*n + i*n + j
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mean = _bin_mean(x_ptr, pid, H, W, n, C, offs_c, mask_c, KH, KW, BLOCK_C)
    tl.store(out_ptr + pid * C + offs_c, mean.to(out_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def _pool_ln_kernel(x_ptr, lnw_ptr, lnb_ptr, p_ptr, z_ptr, H, W, n, C, eps,
                    KH: tl.constexpr, KW: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # b * n*n + i*n + j; BLOCK_C covers all C channels
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    p = _bin_mean(x_ptr, pid, H, W, n, C, offs_c, mask_c, KH, KW, BLOCK_C)
    p = p.to(p_ptr.dtype.element_ty)
    tl.store(p_ptr + pid * C + offs_c, p, mask=mask_c)
    pf = tl.where(mask_c, p.to(tl.float32), 0.0)  # LayerNorm sees the stored (rounded) P
    mean = tl.sum(pf, axis=0) / C
    d = tl.where(mask_c, pf - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / C + eps)
    w = tl.load(lnw_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    bias = tl.load(lnb_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    tl.store(z_ptr + pid * C + offs_c, (d * rstd * w + bias).to(z_ptr.dtype.element_ty),
             mask=mask_c)


@triton.jit
def _unpool_kernel(dp_ptr, dx_ptr, H, W, n, C,
                   KI: tl.constexpr, KJ: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # b * H*W + r*W + c
    b = pid // (H * W)
    rc = pid % (H * W)
    r = rc // W
    c = rc % W
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    zero = offs_c * 0
    i0, i1 = _bin(r, n, H)  # the bins that contain input row r: the same formula, inverted
    j0, j1 = _bin(c, n, W)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    base = dp_ptr + b * n * n * C
    for di in tl.static_range(KI):
        for dj in tl.static_range(KJ):
            i = i0 + di
            j = j0 + dj
            ok = mask_c & ((zero + i) < i1) & ((zero + j) < j1)
            i_lo, i_hi = _bin(i, H, n)
            j_lo, j_hi = _bin(j, W, n)
            rows = i_hi - i_lo
            cols = j_hi - j_lo
            g = tl.load(base + (i * n + j) * C + offs_c, mask=ok, other=0.0).to(tl.float32)
            acc += g / (rows * cols).to(tl.float32)
    tl.store(dx_ptr + pid * C + offs_c, acc.to(dx_ptr.dtype.element_ty), mask=mask_c)


def _block_c(C: int) -> int:
    # The interpreter pays per program: one wide block. On a GPU, 128-256 channels per program.
    if _interpreting():
        return triton.next_power_of_2(C)
    return min(256, triton.next_power_of_2(C))


def pool(x_BTC: torch.Tensor, grid_hw: tuple[int, int], n: int) -> torch.Tensor:
    B, T, C = x_BTC.shape
    H, W = grid_hw
    if T != H * W or not 1 <= n <= min(H, W):
        raise ValueError(f"cannot pool {T} tokens on a {H}x{W} grid to {n}x{n}")
    x = x_BTC.contiguous()
    out = new_output((B, n * n, C), x)
    bc = _block_c(C)
    _pool_fwd_kernel[(B * n * n, triton.cdiv(C, bc))](
        x, out, H, W, n, C, KH=max_window(H, n), KW=max_window(W, n), BLOCK_C=bc)
    return out


def ln_warps(C: int) -> int:
    """Warps for `pool_ln`'s one-row programs: 16 channels per thread (2048 -> 4 warps)."""
    if _interpreting():
        return 1
    return max(1, min(16, triton.next_power_of_2(C) // (16 * 32)))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def pool_ln(x_BTC: torch.Tensor, grid_hw: tuple[int, int], n: int, ln_w: torch.Tensor,
            ln_b: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (P, LayerNorm(P)), both (B, n*n, C) in x's dtype, from one pass over x."""
    B, T, C = x_BTC.shape
    H, W = grid_hw
    if T != H * W or not 1 <= n <= min(H, W):
        raise ValueError(f"cannot pool {T} tokens on a {H}x{W} grid to {n}x{n}")
    x = x_BTC.contiguous()
    p = new_output((B, n * n, C), x)
    z = new_output((B, n * n, C), x)
    _pool_ln_kernel[(B * n * n,)](
        x, ln_w.contiguous(), ln_b.contiguous(), p, z, H, W, n, C, float(eps),
        KH=max_window(H, n), KW=max_window(W, n), BLOCK_C=triton.next_power_of_2(C),
        num_warps=ln_warps(C))
    return p, z


def unpool(dp_BNC: torch.Tensor, grid_hw: tuple[int, int], n: int) -> torch.Tensor:
    B, N, C = dp_BNC.shape
    H, W = grid_hw
    dp = dp_BNC.contiguous()
    dx = new_output((B, H * W, C), dp)
    bc = _block_c(C)
    _unpool_kernel[(B * H * W, triton.cdiv(C, bc))](
        dp, dx, H, W, n, C, KI=max_bins_per_input(H, n), KJ=max_bins_per_input(W, n),
        BLOCK_C=bc)
    return dx
