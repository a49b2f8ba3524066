"""The model's multi-count forward (tokens.mode all): one tower pass, one projector + LLM pass
per count, and the gradient of the averaged loss equals the average of the per-count
gradients computed separately (float64)."""

import torch

from tfx.config.load import load_config
from tfx.data.collate import collate
from tfx.data.decode import SkipCounter
from tfx.data.pipeline import read_eval_samples
from tfx.data.tokenizer import load_tokenizer
from tfx.model.loss import supervised_count
from tfx.model.vlm import ImageTokenIds, TokenFlexVLM

from conftest import tiny_config_yaml


def test_all_counts_gradient_is_the_average_of_each_count(synth_dir, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(tiny_config_yaml(synth_dir, tmp_path / "run"))
    cfg = load_config(path)
    tok = load_tokenizer(cfg.data.tokenizer)
    torch.manual_seed(0)
    model = TokenFlexVLM(cfg.model, tok.vocab_size,
                         ImageTokenIds(tok.img_start_id, tok.img_ctx_id, tok.img_end_id)).double()
    samples = read_eval_samples(cfg.data.eval, cfg, tok, SkipCounter(10, False))[:5]
    counts = (4, 16, 36)
    batches = [collate(samples, n, tok) for n in counts]
    count = supervised_count(batches[0]["labels"])
    assert all(supervised_count(b["labels"]) == count for b in batches)  # text is the same
    pixels = batches[0]["pixel_values"].double()
    calls = []
    model.vision.register_forward_hook(lambda *_: calls.append(1))
    sums = model(tuple(b["input_ids"] for b in batches), pixels, counts,
                 tuple(b["attention_mask"] for b in batches), tuple(b["labels"] for b in batches))
    assert sums.shape == (3,) and len(calls) == 1  # one tower pass for the three counts
    params = [p for p in model.parameters()]
    together = torch.autograd.grad(sums.sum() / (len(counts) * count), params,
                                   allow_unused=True)
    alone = []
    for n, b in zip(counts, batches):
        loss = model(b["input_ids"], pixels, n, b["attention_mask"], b["labels"]) / count
        assert torch.allclose(loss * count, sums[counts.index(n)], rtol=1e-12)
        alone.append(torch.autograd.grad(loss, params, allow_unused=True))
    for i, g in enumerate(together):
        parts = [a[i] for a in alone]
        if g is None:
            assert all(p is None for p in parts)
            continue
        # equal to 1e-6, not 1e-12: HF attention rounds its softmax through fp32, and the
        # combined loss scales each branch's gradient before that rounding, not after
        torch.testing.assert_close(g, sum(parts) / len(parts), rtol=1e-6, atol=1e-9)
