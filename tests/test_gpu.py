"""GPU tier (`pytest -m gpu`, run by `make device-check`): a bf16 training step on the GPU
through the real CLI, with sdpa attention when flash-attn is not installed."""

import json

import pytest
import torch

from conftest import run_tfx, tiny_run_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_training_steps_on_the_gpu(synth_dir, tmp_path):
    from transformers.utils import is_flash_attn_2_available

    cfg, run = tiny_run_config(synth_dir, tmp_path, max_steps=3, save_every=3)
    result = run_tfx("train", str(cfg), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    runtime = json.loads((run / "run.json").read_text())["runtime"]
    assert runtime["dtype"] == "bf16" and runtime["device"] != "cpu"
    assert runtime["projector_kernel"] == "triton"  # kernel: auto on CUDA
    assert runtime["attn_implementation"] == (
        "flash_attention_2" if is_flash_attn_2_available() else "sdpa")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(0 < r["loss"] < 20 and r["grad_norm"] > 0 for r in rows)
    assert all(r["peak_mem_mb"] > 0 for r in rows)
    ev = run_tfx("eval", str(run), "--counts", "4,16", "--out", str(tmp_path / "ev"))
    assert ev.returncode == 0, ev.stderr[-3000:]
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["device"] == "cuda" and report["dtype"] == "bf16"
