"""`tfx bench kernel` end to end on the CPU: eager, torch.compile and the fused kernel (in the
Triton interpreter) side by side, as a printed table, a CSV and a PNG. Timings are not checked:
speed is measured by the benchmark, not asserted in tests."""

import csv

from conftest import run_tfx


def test_bench_kernel_prints_three_providers_side_by_side(tmp_path):
    out = tmp_path / "bench"
    proc = run_tfx("bench", "kernel", "--small", "--reps", "1", "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader((out / "projector.csv").open()))
    for mode in ("fwd", "bwd", "fwd+bwd"):
        providers = {r["provider"] for r in rows if r["mode"] == mode}
        assert providers == {"eager", "compile", "fused", "fused-store-u"}
    assert all(float(r["median_ms"]) > 0 for r in rows)
    fused = {(r["N"], r["mode"]): float(r["saved_mb"]) for r in rows if r["provider"] == "fused"}
    eager = {(r["N"], r["mode"]): float(r["saved_mb"]) for r in rows if r["provider"] == "eager"}
    assert all(fused[k] < eager[k] for k in fused)  # recompute, not store: fewer saved bytes
    assert "| tiny | 2 | 16 | fwd+bwd | compile |" in proc.stdout
    assert (out / "projector.png").stat().st_size > 0
