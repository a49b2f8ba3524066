"""Token-adaptive projector: patch grid -> n x n pooled tokens -> LayerNorm -> SwiGLU -> Linear.

Data flow position: vision -> **projector(N)** -> splice into LLM embeddings. One set of weights
serves every N = n*n. Pooling modes: `adaptive` (PyTorch adaptive_avg_pool2d bins: start =
floor(i*H/n), end = ceil((i+1)*H/n), overlapping when n does not divide H) and `interp` (the
TokenFLEX team's: bilinear resize to a multiple of n, align_corners=True, then uniform pooling).
`kernel`: `torch` here, or the fused Triton kernel (`tfx_kernels`, optional) for `adaptive`
pooling; `auto` takes it on CUDA when installed. `position="fourier"` adds a learned linear
map of each token's centre (row, column) on [0, 1] (sin/cos at `FREQUENCIES` frequencies) to
its output: the same weights at every n, so a token at the same place in the image gets the
same offset whatever N is; the map starts at zero (the projector starts as without it). Only
torch is needed otherwise: `tfx convert` copies this file into exported models. Shape legend:
B batch, T=H*W patches, C vision width, N tokens, D LLM width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _fused_kernel():
    """The Triton projector, or None. Imported on first use only (it pulls in triton); exported
    models run without it."""
    try:
        from tfx_kernels import fused_projector
    except ImportError:
        return None
    return fused_projector


FREQUENCIES = 8  # sin and cos of pi * k * coordinate, k = 1..8, for the row and the column
POSITIONS = ("none", "fourier")


def token_centres(n: int, device=None) -> torch.Tensor:
    """(n*n, 2) (row, column) centres on [0, 1] of the n x n pooled tokens, row-major: the order
    the image block holds them in."""
    c = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n
    rows, cols = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=1)


def fourier_features(n: int, device=None) -> torch.Tensor:
    """(n*n, 4 * FREQUENCIES) sin and cos of each token centre's row and column."""
    k = torch.arange(1, FREQUENCIES + 1, device=device, dtype=torch.float32) * math.pi
    angles = (token_centres(n, device)[:, :, None] * k).flatten(1)  # (N, 2F)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def pool_grid(x_BTC: torch.Tensor, grid_hw: tuple[int, int], n: int, mode: str) -> torch.Tensor:
    """(B, H*W, C) -> (B, n*n, C)."""
    B, T, C = x_BTC.shape
    H, W = grid_hw
    if T != H * W:
        raise ValueError(f"{T} patch tokens do not form a {H}x{W} grid")
    x_BCHW = x_BTC.transpose(1, 2).reshape(B, C, H, W)
    if mode == "adaptive":
        pooled = F.adaptive_avg_pool2d(x_BCHW, n)
    elif mode == "interp":
        k = max(1, math.ceil(max(H, W) / n))
        if (H, W) != (k * n, k * n):
            x_BCHW = F.interpolate(x_BCHW, size=(k * n, k * n), mode="bilinear",
                                   align_corners=True)
        pooled = F.avg_pool2d(x_BCHW, k)
    else:
        raise ValueError(f"unknown pool mode {mode!r}")
    return pooled.flatten(2).transpose(1, 2)


class TokenAdaptiveProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, *, hidden_ratio: float = 3.0,
                 hidden: int | None = None, pool: str = "adaptive", kernel: str = "auto",
                 position: str = "none", eps: float = 1e-5):
        super().__init__()
        if position not in POSITIONS:
            raise ValueError(f"projector position {position!r}: one of {', '.join(POSITIONS)}")
        hidden = hidden or int(round(in_dim * hidden_ratio))
        self.pool, self.kernel, self.hidden = pool, kernel, hidden
        self.norm = nn.LayerNorm(in_dim, eps=eps)
        self.gate_up = nn.Linear(in_dim, 2 * hidden)  # rows [0, hidden) gate, [hidden, 2h) up
        self.down = nn.Linear(hidden, out_dim)
        self.position = position
        if position == "fourier":
            self.pos = nn.Linear(4 * FREQUENCIES, out_dim, bias=False)
            nn.init.zeros_(self.pos.weight)

    def use_triton(self, x: torch.Tensor) -> bool:
        if self.kernel == "torch" or self.pool != "adaptive":
            return False
        if self.kernel == "triton":
            return True
        return x.is_cuda and _fused_kernel() is not None

    def forward(self, x_BTC: torch.Tensor, grid_hw: tuple[int, int], n: int) -> torch.Tensor:
        return self.place(self.content(x_BTC, grid_hw, n), n)

    def place(self, y_BND: torch.Tensor, n: int) -> torch.Tensor:
        """The position offsets added to the projected tokens (nothing for position none)."""
        if self.position == "none":
            return y_BND
        return y_BND + self.pos(fourier_features(n, y_BND.device).to(y_BND.dtype))

    def content(self, x_BTC: torch.Tensor, grid_hw: tuple[int, int], n: int) -> torch.Tensor:
        """Pool -> LayerNorm -> SwiGLU -> Linear: the fused kernel or the torch reference."""
        if self.use_triton(x_BTC):
            fused_projector = _fused_kernel()
            if fused_projector is None:
                raise ImportError("projector.kernel=triton needs tfx_kernels (pip install tfx-vlm)")
            return fused_projector(x_BTC, grid_hw, n, self.norm.weight, self.norm.bias,
                                   self.norm.eps, self.gate_up.weight, self.gate_up.bias,
                                   self.down.weight, self.down.bias)
        return self.reference(x_BTC, grid_hw, n)

    def reference(self, x_BTC: torch.Tensor, grid_hw: tuple[int, int], n: int) -> torch.Tensor:
        z_BNC = self.norm(pool_grid(x_BTC, grid_hw, n, self.pool))
        gate, up = self.gate_up(z_BNC).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)
