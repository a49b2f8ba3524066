"""PyTorch reference of the projector, used by the tests (in float64) and the benchmarks (eager)."""

from __future__ import annotations

import torch.nn.functional as F


def reference_projector(x_BTC, grid_hw, n, ln_w, ln_b, eps, w_gu, b_gu, w_d, b_d):
    B, T, C = x_BTC.shape
    H, W = grid_hw
    p = F.adaptive_avg_pool2d(x_BTC.transpose(1, 2).reshape(B, C, H, W), n)
    z = F.layer_norm(p.flatten(2).transpose(1, 2), (C,), ln_w, ln_b, eps)
    g, u = F.linear(z, w_gu, b_gu).chunk(2, dim=-1)
    return F.linear(F.silu(g) * u, w_d, b_d)
