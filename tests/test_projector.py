"""Projector: pooling bins equal PyTorch's adaptive pooling; one set of weights serves every N."""

import math

import pytest
import torch
import torch.nn.functional as F

from tfx.model.projector import TokenAdaptiveProjector, pool_grid


def pool_by_bins(x_BTC, side, n):
    """Independent reference: the bin formulas written out, in float64."""
    B, _, C = x_BTC.shape
    grid = x_BTC.double().reshape(B, side, side, C)
    out = torch.empty(B, n, n, C, dtype=torch.float64)
    for i in range(n):
        r0, r1 = (i * side) // n, math.ceil((i + 1) * side / n)
        for j in range(n):
            c0, c1 = (j * side) // n, math.ceil((j + 1) * side / n)
            out[:, i, j] = grid[:, r0:r1, c0:c1].mean(dim=(1, 2))
    return out.reshape(B, n * n, C)


@pytest.mark.parametrize("side, n", [(27, 8), (27, 12), (27, 16), (24, 16), (7, 3), (9, 9), (5, 1)])
def test_adaptive_pool_matches_pytorch_and_bins(side, n):
    x = torch.randn(2, side * side, 5)
    got = pool_grid(x, (side, side), n, "adaptive")
    ref = F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(2, 5, side, side), n)
    torch.testing.assert_close(got, ref.flatten(2).transpose(1, 2))
    torch.testing.assert_close(got.double(), pool_by_bins(x, side, n), rtol=1e-6, atol=1e-6)


def interp_by_hand(x_BTC, side, n):
    """Independent reference of `interp`: resize side -> k*n with k = ceil(side / n) by
    bilinear interpolation with aligned corners (output i samples input i*(side-1)/(k*n-1)),
    written out in float64, then the mean of each k x k block."""
    B, _, C = x_BTC.shape
    k = math.ceil(side / n)
    m = k * n
    grid = x_BTC.double().reshape(B, side, side, C)

    def weights(size_in, size_out):
        w = torch.zeros(size_out, size_in, dtype=torch.float64)
        for i in range(size_out):
            pos = i * (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
            lo = min(int(math.floor(pos)), size_in - 1)
            hi = min(lo + 1, size_in - 1)
            w[i, lo] += 1 - (pos - lo)
            w[i, hi] += pos - lo
        return w

    wr = weights(side, m)
    resized = torch.einsum("ir,brcx,jc->bijx", wr, grid, wr)
    return resized.reshape(B, n, k, n, k, C).mean(dim=(2, 4)).reshape(B, n * n, C)


@pytest.mark.parametrize("side, n", [(27, 8), (27, 12), (27, 16), (7, 3), (9, 4)])
def test_interp_pool_is_aligned_corners_bilinear_then_ceil_blocks(side, n):
    x = torch.randn(2, side * side, 5)
    got = pool_grid(x, (side, side), n, "interp").double()
    want = interp_by_hand(x, side, n)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the reference is sharp enough to tell the variants a wrong implementation would use
    B, C = 2, 5
    x_BCHW = x.transpose(1, 2).reshape(B, C, side, side)
    for k, align in ((math.ceil(side / n), False), (max(1, side // n), True)):
        if (k, align) == (math.ceil(side / n), True):
            continue
        resized = F.interpolate(x_BCHW, size=(k * n, k * n), mode="bilinear",
                                align_corners=align)
        wrong = F.avg_pool2d(resized, k).flatten(2).transpose(1, 2).double()
        assert (wrong - want).abs().max() > 1e-3, (k, align)


def test_interp_pool_shapes_and_identity():
    x = torch.randn(1, 16 * 16, 3)
    assert pool_grid(x, (16, 16), 6, "interp").shape == (1, 36, 3)
    # n dividing the side needs no resize: plain average pooling, same as adaptive
    torch.testing.assert_close(pool_grid(x, (16, 16), 4, "interp"),
                               pool_grid(x, (16, 16), 4, "adaptive"))


@pytest.mark.parametrize("pool", ["adaptive", "interp"])
def test_one_projector_serves_every_count(pool):
    torch.manual_seed(0)
    proj = TokenAdaptiveProjector(12, 20, hidden_ratio=3.0, pool=pool, kernel="torch")
    x = torch.randn(3, 27 * 27, 12)
    params_before = {k: v.clone() for k, v in proj.state_dict().items()}
    for n in range(1, 28):
        y = proj(x, (27, 27), n)
        assert y.shape == (3, n * n, 20)
        assert torch.isfinite(y).all()
    assert all(torch.equal(v, proj.state_dict()[k]) for k, v in params_before.items())
    assert sum(p.numel() for p in proj.parameters()) == (2 * 12 + 12 * 72 + 72 + 36 * 20 + 20)


def test_projector_param_count_matches_paper():
    """The method notes: about 20.4M parameters at C=1152, D=3584, hidden 3C."""
    proj = TokenAdaptiveProjector(1152, 3584, hidden_ratio=3.0)
    total = sum(p.numel() for p in proj.parameters())
    assert 20.3e6 < total < 20.5e6


def test_fourier_position_starts_at_zero_and_marks_places_alike_at_every_n():
    torch.manual_seed(0)
    plain = TokenAdaptiveProjector(12, 20, hidden_ratio=1.0, kernel="torch")
    placed = TokenAdaptiveProjector(12, 20, hidden_ratio=1.0, kernel="torch", position="fourier")
    placed.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 36, 12)
    torch.testing.assert_close(placed(x, (6, 6), 3), plain(x, (6, 6), 3))  # zero at the start
    torch.nn.init.normal_(placed.pos.weight)
    offsets = {n: placed(x, (6, 6), n) - plain(x, (6, 6), n) for n in (1, 3, 5)}
    # the same offset for every image, and the image centre's token gets the same at n = 1, 3, 5
    torch.testing.assert_close(offsets[3][0], offsets[3][1])
    torch.testing.assert_close(offsets[3][0, 4], offsets[1][0, 0])
    torch.testing.assert_close(offsets[5][0, 12], offsets[1][0, 0])
    # and different places get different offsets
    assert (offsets[3][0, 0] - offsets[3][0, 8]).abs().max() > 0.1
    assert sum(p.numel() for p in placed.parameters()) == \
        sum(p.numel() for p in plain.parameters()) + 32 * 20


def test_unknown_position_is_refused():
    with pytest.raises(ValueError, match="position 'learned'"):
        TokenAdaptiveProjector(12, 20, position="learned")
