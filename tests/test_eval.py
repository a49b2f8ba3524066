"""Eval at several N: the tower runs once per batch, and the result is the same as evaluating
each N on its own."""

import torch

from conftest import tiny_config_yaml
from tfx.config.load import load_config
from tfx.data.collate import collate
from tfx.data.tokenizer import load_tokenizer
from tfx.eval.runner import accuracies, eval_samples
from tfx.model.vlm import ImageTokenIds, TokenFlexVLM


def tiny_model_and_samples(synth_dir, tmp_path):
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(tiny_config_yaml(synth_dir, tmp_path / "run"))
    cfg = load_config(cfg_path)
    tok = load_tokenizer(cfg.data.tokenizer)
    torch.manual_seed(0)
    model = TokenFlexVLM(cfg.model, tok.vocab_size,
                         ImageTokenIds(tok.img_start_id, tok.img_ctx_id, tok.img_end_id)).eval()
    samples, skipped = eval_samples(cfg, tok, None)
    assert skipped == 0 and len(samples) == 64
    return model, samples, tok


def test_shared_tower_pass_gives_the_same_logits(synth_dir, tmp_path):
    model, samples, tok = tiny_model_and_samples(synth_dir, tmp_path)
    batch = collate(samples[:8], 16, tok)
    args = (batch["input_ids"], batch["pixel_values"], 16, batch["attention_mask"],
            batch["labels"])
    with torch.no_grad():
        alone, targets, _ = model.answer_logits(*args)
        shared, targets2, _ = model.answer_logits(*args, model.vision(batch["pixel_values"]))
    assert torch.equal(targets, targets2)
    torch.testing.assert_close(shared, alone, rtol=0, atol=0)


def test_accuracies_at_several_counts_equal_each_count_alone(synth_dir, tmp_path):
    model, samples, tok = tiny_model_and_samples(synth_dir, tmp_path)
    calls = []
    model.vision.register_forward_hook(lambda *_: calls.append(1))
    together = accuracies(model, samples, [4, 16, 36], tok, batch_size=16)
    assert len(calls) == 4  # 64 samples in 4 batches: one tower pass each, for all 3 counts
    for c in (4, 16, 36):
        assert together[c] == accuracies(model, samples, [c], tok, batch_size=16)[c]
    assert all(r["n"] == 64 and 0 <= r["all"] <= 1 for r in together.values())
