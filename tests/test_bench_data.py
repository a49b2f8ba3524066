"""`tfx bench data` end to end: both tables, CSVs and the plot. Figures are measured, not
asserted, except that bucketing beats random batching on the same stream and packing pads
less than padded batches."""

import csv

from conftest import run_tfx


def test_bench_data_prints_padding_and_loader_tables(tmp_path):
    out = tmp_path / "bench"
    proc = run_tfx("bench", "data", "--out", str(out), "--steps", "60", "--samples", "48",
                   "--workers", "0,2", "--pack-samples", "24", "--pack-reps", "1",
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pad = list(csv.DictReader((out / "padding.csv").open()))
    for n in ("64", "144", "256"):
        rows = {(r["batching"], r["bucket_batches"]): float(r["padding_pct"])
                for r in pad if r["N"] == n}
        assert rows[("bucketed", "128")] < rows[("bucketed", "16")] < rows[("random", "1")]
    load = list(csv.DictReader((out / "loader.csv").open()))
    assert [r["workers"] for r in load] == ["1", "1", "0", "2"]
    assert all(float(r["samples_per_s"]) > 0 for r in load)
    assert "| 64 | random | 1 |" in proc.stdout and (out / "data.png").stat().st_size > 0
    pack = {r["arrangement"]: r for r in csv.DictReader((out / "packing.csv").open())}
    assert set(pack) == {"padded", "bucketed", "alone", "packed-mask", "packed-varlen"}
    for name in ("packed-mask", "packed-varlen"):
        assert float(pack[name]["padding_pct"]) < float(pack["padded"]["padding_pct"])
    assert all(float(r["real_tokens_per_s"]) > 0 for r in pack.values())
