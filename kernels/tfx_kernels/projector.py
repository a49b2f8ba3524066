"""The fused projector as one autograd.Function: pool+LayerNorm -> gate/up+SwiGLU -> down.

Forward: one kernel pools the grid and normalises each pooled row (`pool_ln`), one GEMM
computes gate and up with the SwiGLU in its epilogue, cuBLAS does the down projection.
Saved for backward: the pooled input P (B, N, C) and the gate pre-activation G. Recomputed
there: LayerNorm from P (PyTorch), U by one cuBLAS GEMM from Z (`recompute_up=False` saves U
instead), the hidden product H in the dgrad epilogue; the patch grid X is not kept (only its
shape). The down projection and the weight gradients are cuBLAS GEMMs. Pooling to `adaptive`
bins only; `interp` stays on PyTorch. Why pooling and LayerNorm are not folded into the GEMM's
A-tile loads: docs/benchmarks.md (roofline).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tfx_kernels.pool import pool_ln, unpool
from tfx_kernels.swiglu import dgrad_swiglu, gateup_swiglu


class FusedProjectorFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BTC, grid_hw, n, ln_w, ln_b, eps, w_gu, b_gu, w_d, b_d, recompute_up):
        B, _, C = x_BTC.shape
        p_BNC, z_BNC = pool_ln(x_BTC, grid_hw, n, ln_w, ln_b, eps)
        z = z_BNC.reshape(-1, C)
        g, u, h = gateup_swiglu(z, w_gu.to(z.dtype), b_gu.to(z.dtype))
        y = torch.addmm(b_d.to(h.dtype), h, w_d.to(h.dtype).t())
        ctx.save_for_backward(p_BNC, g, None if recompute_up else u, ln_w, ln_b, w_gu, b_gu,
                              w_d)
        ctx.grid_hw, ctx.n, ctx.eps = grid_hw, n, eps
        return y.reshape(B, n * n, -1)

    @staticmethod
    def backward(ctx, dy_BND):
        p_BNC, g, u, ln_w, ln_b, w_gu, b_gu, w_d = ctx.saved_tensors
        B, N, C = p_BNC.shape
        HD = g.shape[1]
        dy = dy_BND.reshape(-1, dy_BND.shape[-1]).to(g.dtype).contiguous()
        with torch.enable_grad():
            p = p_BNC.detach().requires_grad_(ctx.needs_input_grad[0])
            lw = ln_w.detach().requires_grad_(True)
            lb = ln_b.detach().requires_grad_(True)
            z = F.layer_norm(p, (C,), lw, lb, ctx.eps).reshape(-1, C)
        if u is None:  # U = Z @ W_u^T + b_u again: one (M, C) x (C, Hd) GEMM instead of storing U
            u = torch.addmm(b_gu[HD:].to(g.dtype), z.detach(), w_gu[HD:].to(g.dtype).t())
        dgu, h = dgrad_swiglu(dy, w_d.to(g.dtype), g, u)
        del u
        d_wd = (dy.t() @ h).to(w_d.dtype)
        d_bd = dy.sum(0).to(w_d.dtype)
        d_wgu = (dgu.t() @ z.detach()).to(w_gu.dtype)
        d_bgu = dgu.sum(0).to(w_gu.dtype)
        with torch.enable_grad():
            dz = dgu @ w_gu.to(dgu.dtype)
            inputs = (p, lw, lb) if ctx.needs_input_grad[0] else (lw, lb)
            grads = torch.autograd.grad(z, inputs, dz)
        if ctx.needs_input_grad[0]:
            dp, d_lw, d_lb = grads
            dx = unpool(dp, ctx.grid_hw, ctx.n)
        else:
            (d_lw, d_lb), dx = grads, None
        return dx, None, None, d_lw, d_lb, None, d_wgu, d_bgu, d_wd, d_bd, None


def fused_projector(x_BTC, grid_hw, n, ln_w, ln_b, eps, w_gu, b_gu, w_d, b_d,
                    recompute_up: bool = True):
    """`recompute_up`: keep only G of the pre-activations for the backward and recompute U
    there (one extra GEMM, half the forward's gate/up GEMM: 6.5 % of the projector's fwd+bwd
    FLOPs at the paper's shape; 0.29x eager's saved activations instead of 0.50x)."""
    return FusedProjectorFn.apply(x_BTC, tuple(grid_hw), int(n), ln_w, ln_b, float(eps), w_gu,
                                  b_gu, w_d, b_d, bool(recompute_up))
