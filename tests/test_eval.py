"""Eval at several N against an independent per-sample computation: batched, with one tower
pass per batch for all N, the per-sample verdicts equal those of each sample run alone through
the plain full-logits forward, on references built so that about half the samples are right."""

import torch

from tfx.config.load import load_config
from tfx.data.collate import TextSample, collate
from tfx.data.decode import SkipCounter
from tfx.data.pipeline import read_eval_samples
from tfx.data.tokenizer import IGNORE, load_tokenizer
from tfx.eval.runner import accuracies, sample_hits
from tfx.model.vlm import ImageTokenIds, TokenFlexVLM

from conftest import tiny_config_yaml


def tiny_model_and_samples(synth_dir, tmp_path):
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(tiny_config_yaml(synth_dir, tmp_path / "run"))
    cfg = load_config(cfg_path)
    tok = load_tokenizer(cfg.data.tokenizer)
    torch.manual_seed(0)
    model = TokenFlexVLM(cfg.model, tok.vocab_size,
                         ImageTokenIds(tok.img_start_id, tok.img_ctx_id, tok.img_end_id)).eval()
    with torch.no_grad():  # loud visual tokens: the answers depend on the image
        model.projector.down.weight.mul_(40.0)
    samples = read_eval_samples(cfg.data.eval, cfg, tok, SkipCounter(10, False))
    assert len(samples) == 64
    return model, samples, tok


@torch.no_grad()
def alone(model, sample, n, tok):
    """Teacher-forced greedy tokens at the answer positions of one sample, batch of 1, through
    `forward` without labels (full logits: no shared tower pass, no answer-only head)."""
    b = collate([sample], n, tok)
    logits = model(b["input_ids"], b["pixel_values"], n, b["attention_mask"])[0]
    labels = b["labels"][0]
    pos = (labels[1:] != IGNORE).nonzero().flatten()  # position t predicts token t + 1
    return logits[pos].argmax(-1), labels[pos + 1]


def with_answer(sample, answer_ids):
    prompt = [i for i, lab in zip(sample.ids, sample.labels) if lab == IGNORE]
    return TextSample(key=sample.key, pixels=sample.pixels, images=1,
                      ids=prompt + answer_ids, labels=[IGNORE] * len(prompt) + answer_ids,
                      meta=sample.meta, family=sample.family)


def test_batched_verdicts_equal_each_sample_alone(synth_dir, tmp_path):
    model, samples, tok = tiny_model_and_samples(synth_dir, tmp_path)
    n = 16
    mixed = []
    for i, s in enumerate(samples):  # even samples: reference = the model's own greedy answer
        if i % 2 == 0:
            for _ in range(3):  # greedy is a fixed point after as many rounds as answer tokens
                got, _ = alone(model, s, n, tok)
                s = with_answer(s, got.tolist())
        mixed.append(s)
    expected = {}
    for s in mixed:
        got, want = alone(model, s, n, tok)
        expected[s.key] = bool((got == want).all())
    assert sum(expected.values()) >= 24 and sum(not v for v in expected.values()) >= 24
    hits = sample_hits(model, mixed, [4, n], tok, batch_size=16)
    assert hits[n] == expected  # every sample's verdict, not just the rate
    for s in mixed[:8]:  # the other N of the shared tower pass, checked alone too
        got, want = alone(model, s, 4, tok)
        assert hits[4][s.key] == bool((got == want).all())


def test_tower_runs_once_per_batch_for_all_counts(synth_dir, tmp_path):
    model, samples, tok = tiny_model_and_samples(synth_dir, tmp_path)
    calls = []
    model.vision.register_forward_hook(lambda *_: calls.append(1))
    together = accuracies(model, samples, [4, 16, 36], tok, batch_size=16)
    assert len(calls) == 4  # 64 samples in 4 batches: one tower pass each, for all 3 counts
    assert all(r["n"] == 64 and 0 <= r["all"] <= 1 for r in together.values())
