"""Loss normalisation through the real loop: 2 ranks x 2 micro-batches with unequal supervised
token counts; the logged loss and gradient norm equal a recomputation of the mean over every
supervised token of the step (all ranks, all micro-batches) in one process. With LR 0 the
step-1 checkpoint still holds the initial weights, so the recomputation starts from them."""

import json

import pytest
import torch
import yaml

from tfx.config.load import load_config
from tfx.data.collate import collate
from tfx.data.decode import SkipCounter
from tfx.data.pipeline import read_eval_samples
from tfx.data.schedule import TokenSchedule
from tfx.model.loss import supervised_count
from tfx.train.load import load_model

from conftest import run_tfx, set_train, tiny_config_yaml

pytestmark = pytest.mark.multiproc


def test_loss_is_normalised_over_every_supervised_token_of_the_step(synth_dir, mixed_len_dir,
                                                                     tmp_path):
    raw = yaml.safe_load(tiny_config_yaml(synth_dir, tmp_path / "run"))
    raw["data"].update(train=str(mixed_len_dir), micro_batch_size=2, bucket_batches=1)
    set_train(raw, max_steps=1, save_every=1, grad_accum=2, lr=0.0, llm_lr=0.0,
                        vision_lr=0.0)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    result = run_tfx("train", str(cfg_path), "--nproc", "2", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])

    loaded = load_model(tmp_path / "run")  # = the initial weights (LR 0)
    model, cfg, tok = loaded.model.train(), loaded.cfg, loaded.tok
    by_key = {s.key: s for s in read_eval_samples(str(mixed_len_dir), cfg, tok,
                                                  SkipCounter(10, False))}
    n = TokenSchedule(load_config(cfg_path).tokens).n_at(0)
    total, counts = 0.0, []
    for r in (0, 1):
        trace = json.loads((tmp_path / "run" / "trace" / f"rank{r}.jsonl").read_text())
        for keys in trace["micro_batches"]:
            b = collate([by_key[k] for k in keys], n, tok)
            total = total + model(b["input_ids"], b["pixel_values"], n, b["attention_mask"],
                                  b["labels"])
            counts.append(supervised_count(b["labels"]))
    assert len(counts) == 4 and len(set(counts)) > 1  # unequal micro-batches
    loss = total / sum(counts)
    loss.backward()
    grad_norm = torch.cat([p.grad.flatten() for p in model.parameters()
                           if p.grad is not None]).norm().item()
    assert row["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert row["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)


def test_all_counts_mode_keeps_the_normalisation_and_accumulation_right(synth_dir,
                                                                         mixed_len_dir,
                                                                         tmp_path):
    """tokens.mode all with grad_accum 2 on 2 ranks: one backward per micro-batch of the loss
    averaged over the counts; the logged loss, per-N losses and gradient norm equal a
    recomputation of the mean over counts of each count's global token mean."""
    raw = yaml.safe_load(tiny_config_yaml(synth_dir, tmp_path / "run"))
    raw["data"].update(train=str(mixed_len_dir), micro_batch_size=2, bucket_batches=1)
    raw["tokens"].update(mode="all")
    set_train(raw, max_steps=1, save_every=1, grad_accum=2, lr=0.0, llm_lr=0.0, vision_lr=0.0)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    result = run_tfx("train", str(cfg_path), "--nproc", "2", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    loaded = load_model(tmp_path / "run")
    model, cfg, tok = loaded.model.train(), loaded.cfg, loaded.tok
    by_key = {s.key: s for s in read_eval_samples(str(mixed_len_dir), cfg, tok,
                                                  SkipCounter(10, False))}
    counts = (4, 16, 36)
    per_n, total_count = {n: 0.0 for n in counts}, 0
    for r in (0, 1):
        trace = json.loads((tmp_path / "run" / "trace" / f"rank{r}.jsonl").read_text())
        for keys in trace["micro_batches"][::len(counts)]:  # one entry per count: take one
            samples = [by_key[k] for k in keys]
            for n in counts:
                b = collate(samples, n, tok)
                per_n[n] = per_n[n] + model(b["input_ids"], b["pixel_values"], n,
                                            b["attention_mask"], b["labels"])
            total_count += supervised_count(collate(samples, 4, tok)["labels"])
    loss = sum(per_n.values()) / (len(counts) * total_count)
    loss.backward()
    grad_norm = torch.cat([p.grad.flatten() for p in model.parameters()
                           if p.grad is not None]).norm().item()
    assert row["n_visual"] == [4, 16, 36]
    assert row["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert row["loss_by_n"] == pytest.approx({str(n): (v / total_count).item()
                                              for n, v in per_n.items()}, rel=1e-5)
    assert row["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
