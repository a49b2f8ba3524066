"""Triton projector kernels against a float64 PyTorch reference.

Runs on the CPU through TRITON_INTERPRET=1 (set in conftest before any kernel import) at small
shapes, and on a GPU at real shapes when one is present. Outputs are NaN-poisoned before every
launch (TFX_KERNEL_POISON=1), so an element the kernel forgets to write fails the test.
"""

import os

os.environ["TFX_KERNEL_POISON"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tfx_kernels import fused_projector, pool, pool_ln, reference_projector, unpool  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def ref_pool(x, side, n):
    B, _, C = x.shape
    return F.adaptive_avg_pool2d(x.double().transpose(1, 2).reshape(B, C, side, side),
                                 n).flatten(2).transpose(1, 2)


@pytest.mark.parametrize("side, n", [(27, 8), (24, 16), (7, 3), (5, 5), (6, 1)])
def test_pool_forward_and_unpool_match_pytorch(side, n):
    torch.manual_seed(side * 100 + n)
    x = torch.randn(1, side * side, 19, device=DEVICE, dtype=torch.float64, requires_grad=True)
    got = pool(x.detach().float(), (side, side), n)
    ref = ref_pool(x, side, n)
    assert not got.isnan().any()
    assert rel_err(got, ref) < 1e-6
    dp = torch.randn_like(ref)
    (dx_ref,) = torch.autograd.grad(ref, x, dp)
    dx = unpool(dp.float(), (side, side), n)
    assert not dx.isnan().any()
    assert rel_err(dx, dx_ref) < 1e-6


@pytest.mark.parametrize("side, n, C", [(14, 8, 19), (7, 3, 33), (6, 6, 8), (5, 1, 40)])
def test_pool_ln_matches_pool_then_layer_norm(side, n, C):
    """One pass gives P and LayerNorm(P). Inputs with a large mean and a spread-out scale: a
    kernel that skips the centring, uses the unbiased variance or forgets the affine fails."""
    torch.manual_seed(side + n + C)
    x = (3.0 + 2.0 * torch.randn(2, side * side, C, device=DEVICE, dtype=torch.float64))
    w = 1.0 + 0.5 * torch.randn(C, device=DEVICE, dtype=torch.float64)
    b = 0.3 * torch.randn(C, device=DEVICE, dtype=torch.float64)
    p_ref = ref_pool(x, side, n)
    z_ref = F.layer_norm(p_ref, (C,), w, b, 1e-5)
    p, z = pool_ln(x.float(), (side, side), n, w.float(), b.float(), 1e-5)
    assert not (p.isnan().any() or z.isnan().any())
    assert rel_err(p, p_ref) < 1e-6 and rel_err(z, z_ref) < 1e-5
    # half precision: the statistics are those of the stored (rounded) P, as in eager
    ph, zh = pool_ln(x.half(), (side, side), n, w.half(), b.half(), 1e-5)
    torch.testing.assert_close(ph, p_ref.half(), rtol=1e-3, atol=1e-3)
    want = F.layer_norm(ph.float(), (C,), w.half().float(), b.half().float(), 1e-5)
    torch.testing.assert_close(zh.float(), want, rtol=2e-3, atol=2e-3)


def make_params(C, Hd, D):
    g = torch.Generator().manual_seed(C * Hd + D)
    shapes = [(C,), (C,), (2 * Hd, C), (2 * Hd,), (D, Hd), (D,)]
    base = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    scale = [0.1, 0.1, C ** -0.5, 0.1, Hd ** -0.5, 0.1]
    return [(b + s * torch.randn(sh, generator=g, dtype=torch.float64)).to(DEVICE)
            .requires_grad_() for sh, b, s in zip(shapes, base, scale)]


CASES = [(2, 9, 4, 24, 40, 20), (1, 7, 3, 16, 33, 12), (3, 6, 6, 8, 24, 17), (1, 27, 8, 12, 36, 10)]


@pytest.mark.parametrize("B, side, n, C, Hd, D", CASES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
@pytest.mark.parametrize("recompute_up", [True, False], ids=["recompute-U", "store-U"])
def test_fused_projector_forward_and_all_gradients(B, side, n, C, Hd, D, dtype, tol,
                                                   recompute_up):
    torch.manual_seed(B + side + n)
    x = torch.randn(B, side * side, C, dtype=torch.float64, device=DEVICE, requires_grad=True)
    params = make_params(C, Hd, D)
    ln_w, ln_b, w_gu, b_gu, w_d, b_d = params
    ref = reference_projector(x, (side, side), n, ln_w, ln_b, 1e-5, w_gu, b_gu, w_d, b_d)
    dy = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, [x, *params], dy)

    xk = x.detach().to(dtype).requires_grad_()
    pk = [p.detach().to(dtype).requires_grad_() for p in params]
    y = fused_projector(xk, (side, side), n, pk[0], pk[1], 1e-5, *pk[2:],
                        recompute_up=recompute_up)
    assert y.shape == (B, n * n, D) and not y.isnan().any()
    assert rel_err(y, ref) < tol
    grads = torch.autograd.grad(y, [xk, *pk], dy.to(dtype))
    names = ["x", "ln_w", "ln_b", "w_gu", "b_gu", "w_d", "b_d"]
    for name, got, want in zip(names, grads, ref_grads):
        assert not got.isnan().any(), name
        assert rel_err(got, want) < tol * 3, (name, rel_err(got, want))


def saved_activation_bytes(fn, x, params) -> int:
    """Bytes autograd keeps for the backward, parameters and the input grid excluded."""
    skip = {p.data_ptr() for p in params} | {x.data_ptr()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in skip:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x, (9, 9), 4, params[0], params[1], 1e-5, *params[2:])
    return total


def test_fused_projector_keeps_only_the_pooled_input_and_g():
    """P (B, N, C) and G (B*N, Hd) and nothing else; with U stored, U too. Eager keeps also
    the LayerNorm output, U, SiLU(G) and H."""
    from functools import partial

    B, N, C, Hd, D = 2, 16, 16, 24, 8
    x = torch.randn(B, 81, C, device=DEVICE, requires_grad=True)
    params = [p.detach().float().requires_grad_() for p in make_params(C, Hd, D)]
    fused = saved_activation_bytes(fused_projector, x, params)
    stored = saved_activation_bytes(partial(fused_projector, recompute_up=False), x, params)
    eager = saved_activation_bytes(reference_projector, x, params)
    assert fused == 4 * B * N * (C + Hd)
    assert stored == 4 * B * N * (C + 2 * Hd)
    assert eager >= 4 * B * N * (2 * C + 4 * Hd)


def test_backward_is_deterministic_and_skips_dx_for_frozen_input():
    x = torch.randn(2, 81, 16, device=DEVICE)
    params = [p.detach().float().requires_grad_() for p in make_params(16, 24, 8)]
    y = fused_projector(x, (9, 9), 4, params[0], params[1], 1e-5, *params[2:])
    dy = torch.randn_like(y)
    g1 = torch.autograd.grad(y, params, dy, retain_graph=True)
    g2 = torch.autograd.grad(y, params, dy)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    xg = x.clone().requires_grad_()
    y = fused_projector(xg, (9, 9), 4, params[0], params[1], 1e-5, *params[2:])
    d1 = torch.autograd.grad(y, xg, dy, retain_graph=True)[0]
    d2 = torch.autograd.grad(y, xg, dy)[0]
    assert torch.equal(d1, d2)


def test_projector_module_dispatch():
    from tfx.model.projector import TokenAdaptiveProjector

    torch.manual_seed(0)
    proj = TokenAdaptiveProjector(16, 12, hidden_ratio=2.0, kernel="triton").to(DEVICE)
    assert proj.use_triton(torch.zeros(1, device=DEVICE))
    assert not TokenAdaptiveProjector(16, 12, kernel="auto").use_triton(torch.zeros(1))
    assert not TokenAdaptiveProjector(16, 12, kernel="triton", pool="interp").use_triton(
        torch.zeros(1))
    x = torch.randn(2, 49, 16, device=DEVICE)
    torch.testing.assert_close(proj(x, (7, 7), 3), proj.reference(x, (7, 7), 3),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA: real shapes and bf16 run only on a GPU")
@pytest.mark.parametrize("n", [8, 12, 16])
def test_bf16_paper_shape_forward_and_every_gradient_on_gpu(n):
    """SigLIP-so400m grid (27 x 27 x 1152) -> D 3584, hidden 3456, in bf16, against float64:
    the fused path may be no further off than eager bf16 is (x1.5, floor 1e-2)."""
    B, side, C, Hd, D = 16, 27, 1152, 3456, 3584
    torch.manual_seed(n)
    x = torch.randn(B, side * side, C, device="cuda", dtype=torch.float64, requires_grad=True)
    params = make_params(C, Hd, D)
    ref = reference_projector(x, (side, side), n, params[0], params[1], 1e-5, *params[2:])
    dy = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, [x, *params], dy)
    results = {}
    for name, fn in (("eager", reference_projector), ("fused", fused_projector)):
        xb = x.detach().bfloat16().requires_grad_()
        pb = [p.detach().bfloat16().requires_grad_() for p in params]
        y = fn(xb, (side, side), n, pb[0], pb[1], 1e-5, *pb[2:])
        results[name] = [y, *torch.autograd.grad(y, [xb, *pb], dy.bfloat16())]
    names = ["y", "x", "ln_w", "ln_b", "w_gu", "b_gu", "w_d", "b_d"]
    for i, name in enumerate(names):
        want = ref if i == 0 else ref_grads[i - 1]
        eager, fused = (rel_err(results[k][i], want) for k in ("eager", "fused"))
        assert not results["fused"][i].isnan().any(), name
        assert fused < max(1e-2, 1.5 * eager + 1e-3), (name, fused, eager)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_auto_kernel_chooses_triton_on_cuda():
    from tfx.model.projector import TokenAdaptiveProjector

    proj = TokenAdaptiveProjector(64, 32, kernel="auto").cuda()
    assert proj.use_triton(torch.zeros(1, device="cuda"))


@pytest.mark.multiproc
def test_triton_projector_trains_like_pytorch_under_zero3(synth_dir, tmp_path):
    """`kernel: triton` on 2 ranks under ZeRO-3 (interpreter on a CPU): the partitioned
    projector weights reach the kernel, and the losses equal the PyTorch path's."""
    import json

    from conftest import run_tfx, tiny_run_config

    losses = {}
    for kernel in ("triton", "torch"):
        cfg, run = tiny_run_config(synth_dir, tmp_path, kernel, max_steps=1, save_every=0,
                                   save_at_end=False)
        result = run_tfx("train", str(cfg), f"model.projector.kernel={kernel}", "--nproc", "2",
                         timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads((run / "run.json").read_text())["runtime"]["projector_kernel"] == \
            kernel
        losses[kernel] = [json.loads(x)["loss"] for x in
                          (run / "metrics.jsonl").read_text().splitlines()]
    assert losses["triton"] == pytest.approx(losses["torch"], rel=1e-5)


def test_compile_report_sm90_has_no_spills_and_gemms_use_wgmma(tmp_path):
    """Every launch configuration the GPU path can pick (each autotune config, the pool
    kernels at the paper's grids) compiles for sm_90a without a GPU: no spills, and the GEMMs'
    SASS uses Hopper's warpgroup MMA. The pointer-arithmetic GEMMs this replaced spilled
    2-2.5 KB per thread at their only config."""
    import json

    from tfx_kernels.swiglu import DGRAD_CONFIGS, GATEUP_CONFIGS

    from conftest import run_tfx

    out = tmp_path / "report.json"
    result = run_tfx("bench", "kernel", "--compile-report", "--json", str(out), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert all("error" not in r for r in rows), [r for r in rows if "error" in r]
    for name, configs in (("gateup_swiglu", GATEUP_CONFIGS), ("dgrad_swiglu", DGRAD_CONFIGS)):
        got = [r for r in rows if r["kernel"] == name]
        assert [r["config"] for r in got] == configs
        assert all(r["wgmma"] for r in got), name
    assert {r["kernel"] for r in rows} >= {"pool_fwd", "pool_ln", "unpool"}
    assert all(r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in rows)
    assert all(r["registers"] <= 255 and r["shared_bytes"] <= 227 * 1024 for r in rows)
