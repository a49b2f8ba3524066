"""GPU tier (`pytest -m gpu`, run by `make device-check`): a bf16 training step on the GPU
through the real CLI, with sdpa attention when flash-attn is not installed, and packed rows'
attention (flash-attn varlen, or `sdpa_varlen`) against each sample alone."""

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
        "flash_attention_2" if is_flash_attn_2_available() else "sdpa_varlen")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(0 < r["loss"] < 20 and r["grad_norm"] > 0 for r in rows)
    assert all(r["peak_mem_mb"] > 0 for r in rows)
    ev = run_tfx("eval", str(run), "--counts", "4,16", "--out", str(tmp_path / "ev"))
    assert ev.returncode == 0, ev.stderr[-3000:]
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["device"] == "cuda" and report["dtype"] == "bf16"


def packed_vs_alone(attn: str, device: str, dtype: torch.dtype) -> float:
    """Max |logit difference| between samples packed two rows deep (the LLM's packed-row path,
    `tfx.model.varlen.packed_attention`) and the same samples run one at a time."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tfx.model import varlen

    varlen.register()
    cfg = Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      use_cache=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM._from_config(cfg, attn_implementation=attn).to(device, dtype).eval()
    rows = [[37, 5, 61, 17], [60, 33, 1, 26]]  # the last sample of each row: its padding tail
    T = sum(rows[0])
    ids = torch.randint(1, cfg.vocab_size, (2, T), device=device)
    pos = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in rows]).to(device)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        packed = model(inputs_embeds=embeds, position_ids=pos,
                       **varlen.packed_attention(model.config, embeds, pos)).logits
        worst = 0.0
        for r, row in enumerate(rows):
            at = 0
            for n in row:
                alone = model(input_ids=ids[r:r + 1, at:at + n]).logits[0]
                worst = max(worst, (packed[r, at:at + n] - alone).abs().max().item())
                at += n
    return worst


def test_packed_rows_attend_within_each_sample_on_the_gpu():
    """transformers' flash-attn path infers packing from position_ids for one row only; with
    two rows it would attend across samples (differences of ~1, not ~1e-2)."""
    from transformers.utils import is_flash_attn_2_available

    attn = "flash_attention_2" if is_flash_attn_2_available() else "sdpa_varlen"
    assert packed_vs_alone(attn, "cuda", torch.bfloat16) < 0.05
