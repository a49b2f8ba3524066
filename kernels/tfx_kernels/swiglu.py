"""Gate/up GEMM with the SwiGLU in its epilogue, and the dgrad GEMM with the SwiGLU backward.

Forward  (M = tokens, K = C, Hd = hidden): GU = Z @ W_gu^T + b_gu, written as G and U (M, Hd
         each), and H = silu(G) * U (M, Hd). One program computes a (BM, BN) tile of both G and U
         (two fp32 accumulators over one pass of Z), so Z is read once for both.
Backward: dH = dY @ W_d (M, Hd) tile-by-tile; the epilogue reads G, U and writes
         [dG | dU] and recomputes H (never stored between forward and backward).

Every tile moves through tensor descriptors (TMA on Hopper): no pointer tensors and no masks
in the kernels, which is what kept the earlier pointer-arithmetic version at 255 registers with
2 KB of spills per thread; out-of-range rows and columns read as zero and are not written.
A descriptor needs 16-byte strides, so K, Hd and D must be multiples of `align(dtype)` (8 in
bf16); other shapes are zero-padded on the host (a copy: correct, not fast). The launch
configurations are in `GATEUP_CONFIGS` / `DGRAD_CONFIGS`, each checked spill-free for sm_90a by
`tfx bench kernel --compile-report`, and `triton.autotune` picks among them per shape.
`DOT_FP32` upcasts the dot operands: required under TRITON_INTERPRET=1, whose bf16 tl.dot is
wrong (triton-lang/triton#11584); on a GPU the operands stay in their dtype for tensor cores.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from tfx_kernels.pool import new_output

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _config(BM, BN, BK, warps, stages):
    return {"BM": BM, "BN": BN, "BK": BK, "num_warps": warps, "num_stages": stages}


# GPU launch configurations (sm_90a, bf16): each must compile without spills (CI checks).
GATEUP_CONFIGS = [_config(128, 64, 64, 8, 3), _config(128, 64, 64, 8, 4),
                  _config(64, 128, 64, 4, 4)]
DGRAD_CONFIGS = [_config(128, 64, 64, 8, 3), _config(128, 64, 64, 8, 4)]
# The interpreter pays per program and per op: one config of mid-sized tiles.
INTERPRET_CONFIG = _config(32, 32, 32, 1, 1)


def align(dtype: torch.dtype) -> int:
    """The multiple K, Hd and D must be of for 16-byte descriptor strides."""
    return 16 // torch.empty((), dtype=dtype).element_size()


@triton.jit
def _silu_parts(g):
    sig = 1.0 / (1.0 + tl.exp(-g))
    return g * sig, sig


@triton.jit
def _gateup_swiglu_kernel(z_desc, wg_desc, wu_desc, b_ptr, g_desc, u_desc, h_desc, M, K, HD,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                          DOT_FP32: tl.constexpr):
    om = tl.program_id(0) * BM
    on = tl.program_id(1) * BN
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        z = z_desc.load([om, k0])
        wg = wg_desc.load([on, k0])
        wu = wu_desc.load([on, k0])
        if DOT_FP32:
            z, wg, wu = z.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
        acc_g = tl.dot(z, wg.T, acc_g)
        acc_u = tl.dot(z, wu.T, acc_u)
    cols = on + tl.arange(0, BN)
    keep = cols < HD
    g = acc_g + tl.load(b_ptr + cols, mask=keep, other=0.0).to(tl.float32)[None, :]
    u = acc_u + tl.load(b_ptr + HD + cols, mask=keep, other=0.0).to(tl.float32)[None, :]
    # round G and U to the storage dtype first, so forward and backward see the same values
    g = g.to(g_desc.dtype)
    u = u.to(u_desc.dtype)
    s, _ = _silu_parts(g.to(tl.float32))
    g_desc.store([om, on], g)
    u_desc.store([om, on], u)
    h_desc.store([om, on], (s * u.to(tl.float32)).to(h_desc.dtype))


@triton.jit
def _dgrad_swiglu_kernel(dy_desc, wd_desc, g_desc, u_desc, dg_desc, du_desc, h_desc, M, D, HD,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         DOT_FP32: tl.constexpr):
    om = tl.program_id(0) * BM
    on = tl.program_id(1) * BN
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):  # dH = dY (M, D) @ W_d (D, HD)
        dy = dy_desc.load([om, k0])
        wd = wd_desc.load([k0, on])
        if DOT_FP32:
            dy, wd = dy.to(tl.float32), wd.to(tl.float32)
        acc = tl.dot(dy, wd, acc)
    g = g_desc.load([om, on]).to(tl.float32)
    u = u_desc.load([om, on]).to(tl.float32)
    s, sig = _silu_parts(g)
    dg_desc.store([om, on], (acc * u * sig * (1.0 + g * (1.0 - sig))).to(dg_desc.dtype))
    du_desc.store([om, on], (acc * s).to(du_desc.dtype))
    h_desc.store([om, on], (s * u).to(h_desc.dtype))


def _gateup_blocks(nargs):
    BM, BN, BK = nargs["BM"], nargs["BN"], nargs["BK"]
    nargs["z_desc"].block_shape = [BM, BK]
    for name in ("wg_desc", "wu_desc"):
        nargs[name].block_shape = [BN, BK]
    for name in ("g_desc", "u_desc", "h_desc"):
        nargs[name].block_shape = [BM, BN]


def _dgrad_blocks(nargs):
    BM, BN, BK = nargs["BM"], nargs["BN"], nargs["BK"]
    nargs["dy_desc"].block_shape = [BM, BK]
    nargs["wd_desc"].block_shape = [BK, BN]
    for name in ("g_desc", "u_desc", "dg_desc", "du_desc", "h_desc"):
        nargs[name].block_shape = [BM, BN]


def _tuned(kernel, configs, hook, key):
    configs = [INTERPRET_CONFIG] if INTERPRET else configs
    return triton.autotune(
        [triton.Config({k: c[k] for k in ("BM", "BN", "BK")}, num_warps=c["num_warps"],
                       num_stages=c["num_stages"], pre_hook=hook) for c in configs],
        key=key)(kernel)


_gateup = _tuned(_gateup_swiglu_kernel, GATEUP_CONFIGS, _gateup_blocks, ["M", "K", "HD"])
_dgrad = _tuned(_dgrad_swiglu_kernel, DGRAD_CONFIGS, _dgrad_blocks, ["M", "D", "HD"])


def _desc(t: torch.Tensor) -> TensorDescriptor:
    return TensorDescriptor.from_tensor(t, [1, 1])  # block shape set per config (pre_hook)


def _pad_to(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if t.shape[dim] == size:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [0, size - t.shape[dim]]
    return F.pad(t, pad)


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def gateup_swiglu(z_MK: torch.Tensor, w_gu: torch.Tensor, b_gu: torch.Tensor):
    """-> (G, U, H), each (M, Hd) in z's dtype and its own tensor (so G can be kept for the
    backward without U)."""
    M, K = z_MK.shape
    HD = w_gu.shape[0] // 2
    a = align(z_MK.dtype)
    Kp, HDp = _round_up(K, a), _round_up(HD, a)
    if (Kp, HDp) != (K, HD):  # unaligned: run the padded problem, keep the real part
        wg, wu = w_gu.chunk(2)
        w = torch.cat([_pad_to(_pad_to(wg, 0, HDp), 1, Kp), _pad_to(_pad_to(wu, 0, HDp), 1, Kp)])
        bg, bu = b_gu.chunk(2)
        out = gateup_swiglu(_pad_to(z_MK, 1, Kp), w, torch.cat([_pad_to(bg, 0, HDp),
                                                                _pad_to(bu, 0, HDp)]))
        return tuple(t[:, :HD].contiguous() for t in out)
    z, w, b = z_MK.contiguous(), w_gu.contiguous(), b_gu.contiguous()
    g, u, h = (new_output((M, HD), z) for _ in range(3))
    _gateup[lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(HD, meta["BN"]))](
        _desc(z), _desc(w[:HD]), _desc(w[HD:]), b, _desc(g), _desc(u), _desc(h), M, K, HD,
        DOT_FP32=INTERPRET)
    return g, u, h


def dgrad_swiglu(dy_MD: torch.Tensor, w_d: torch.Tensor, g: torch.Tensor, u: torch.Tensor):
    """-> (dGU (M, 2*Hd), H recomputed (M, Hd))."""
    M, D = dy_MD.shape
    HD = w_d.shape[1]
    a = align(g.dtype)
    Dp, HDp = _round_up(D, a), _round_up(HD, a)
    if (Dp, HDp) != (D, HD):
        dgu, h = dgrad_swiglu(_pad_to(dy_MD, 1, Dp), _pad_to(_pad_to(w_d, 0, Dp), 1, HDp),
                              _pad_to(g, 1, HDp), _pad_to(u, 1, HDp))
        return torch.cat([dgu[:, :HD], dgu[:, HDp:HDp + HD]], 1), h[:, :HD].contiguous()
    dy, wd, g, u = dy_MD.contiguous(), w_d.contiguous(), g.contiguous(), u.contiguous()
    dgu = new_output((M, 2 * HD), g)
    h = new_output((M, HD), g)
    _dgrad[lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(HD, meta["BN"]))](
        _desc(dy), _desc(wd), _desc(g), _desc(u), _desc(dgu[:, :HD]), _desc(dgu[:, HD:]),
        _desc(h), M, D, HD, DOT_FP32=INTERPRET)
    return dgu, h
