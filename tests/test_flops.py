"""The FLOPs formula behind MFU (and `tfx plan`) against torch's FlopCounterMode on a real
forward + backward of the tiny VLM, at two N, with everything trained and in stage align."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tfx.config.load import load_config
from tfx.data.collate import collate
from tfx.data.decode import SkipCounter
from tfx.data.pipeline import read_eval_samples
from tfx.data.tokenizer import load_tokenizer
from tfx.model.loss import supervised_count
from tfx.model.vlm import ImageTokenIds, TokenFlexVLM
from tfx.train.flops import FlopModel, peak_tflops

from conftest import tiny_config_yaml


@pytest.mark.parametrize("trainable", [("vision", "projector", "llm"), ("projector",)])
@pytest.mark.parametrize("n", [4, 36])
def test_step_flops_match_flop_counter(synth_dir, tmp_path, trainable, n):
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(tiny_config_yaml(synth_dir, tmp_path / "run"))
    cfg = load_config(cfg_path)
    tok = load_tokenizer(cfg.data.tokenizer)
    torch.manual_seed(0)
    # eager attention: on a CPU, FlopCounterMode does not count the sdpa kernel, but it does
    # count eager's matmuls; the formula is the same for both
    model = TokenFlexVLM(cfg.model, tok.vocab_size,
                         ImageTokenIds(tok.img_start_id, tok.img_ctx_id, tok.img_end_id),
                         attn_implementation="eager")
    model.set_trainable(trainable)
    samples = read_eval_samples(cfg.data.eval, cfg, tok, SkipCounter(10, False))
    same = [s for s in samples if s.text_len == samples[0].text_len][:6]  # no padding
    batch = collate(same, n, tok)
    with FlopCounterMode(display=False) as counter:
        loss = model(batch["input_ids"], batch["pixel_values"], n, batch["attention_mask"],
                     batch["labels"])
        loss.backward()
    measured = counter.get_total_flops()
    formula = FlopModel.of(model, trainable).batch_flops(batch, n,
                                                         supervised_count(batch["labels"]))
    assert formula == pytest.approx(measured, rel=0.05), (formula / measured)


def test_peak_is_configured_or_from_the_device_table():
    assert peak_tflops(123.0, bf16=False) == 123.0
    if not torch.cuda.is_available():
        assert peak_tflops(None, bf16=True) is None  # a CPU without logging.peak_tflops
