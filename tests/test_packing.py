"""Packing (tfx.data.packing): several samples a row, attention kept inside each sample.

Exactness is checked on a tiny float64 model: the summed loss and every gradient of a packed
batch equal those of the same samples one per row (CPU, SDPA)."""

import dataclasses

import pytest
import torch

from tfx.config.load import load_config
from tfx.data.bucketing import first_fit_decreasing
from tfx.data.collate import collate
from tfx.data.decode import SkipCounter
from tfx.data.packing import collate_packed
from tfx.data.pipeline import read_eval_samples
from tfx.data.tokenizer import IGNORE, load_tokenizer
from tfx.model.loss import supervised_count
from tfx.model.varlen import NAME, packed_attention, varlen_kwargs
from tfx.model.vlm import ImageTokenIds, TokenFlexVLM

from conftest import tiny_config_yaml


def test_first_fit_decreasing_fills_rows_within_the_cap():
    lengths = [70, 20, 50, 30, 10, 60, 40]
    rows = first_fit_decreasing(lengths, 100)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 100 for row in rows)
    assert len(rows) == 3  # 280 tokens: the fewest rows of 100 that can hold them
    assert first_fit_decreasing([150, 10], 100) == [[0], [1]]  # too long: a row of its own


@pytest.fixture(scope="module")
def setup(synth_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pack")
    path = tmp / "run.yaml"
    path.write_text(tiny_config_yaml(synth_dir, tmp / "run"))
    cfg = load_config(path)
    tok = load_tokenizer(cfg.data.tokenizer)
    samples = read_eval_samples(cfg.data.eval, cfg, tok, SkipCounter(10, False))
    # a mix of lengths, with two text-only samples (their image dropped)
    picked = samples[:3] + samples[-3:]
    for k in (1, 4):
        s = picked[k]
        at = s.ids.index(tok.image_id)
        picked[k] = dataclasses.replace(s, images=0, ids=s.ids[:at] + s.ids[at + 1:],
                                        labels=s.labels[:at] + s.labels[at + 1:])
    return cfg, tok, picked


def test_packed_rows_keep_samples_whole_and_labels_inside(setup):
    _, tok, samples = setup
    n = 16
    b = collate_packed(samples, n, tok, row_tokens=10_000)
    assert b["input_ids"].shape[0] == 1  # all in one row
    assert sorted(b["keys"]) == sorted(s.key for s in samples)
    starts = (b["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == len(samples)  # no padding tail in a single full row
    assert all(b["labels"][0, s] == IGNORE for s in starts)  # nothing predicts across
    assert int((b["input_ids"] == tok.img_ctx_id).sum()) == n * int(b["has_image"].sum())
    assert b["real_tokens"] == sum(b["sample_lengths"]) and b["padded_tokens"] == 0
    unpacked = collate(samples, n, tok)
    assert supervised_count(b["labels"]) == supervised_count(unpacked["labels"])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_unpacked_float64(setup, attn):
    """`sdpa` trains as `sdpa_varlen` (each sample's own attention); `eager` through the exact
    block-diagonal mask."""
    cfg, tok, samples = setup
    torch.manual_seed(0)
    model = TokenFlexVLM(cfg.model, tok.vocab_size,
                         ImageTokenIds(tok.img_start_id, tok.img_ctx_id, tok.img_end_id),
                         attn_implementation=attn).double()
    assert model.llm.config._attn_implementation == {"sdpa": NAME, "eager": "eager"}[attn]
    params = [p for p in model.parameters() if p.requires_grad]
    n = 16
    longest = max(s.total_len(n) for s in samples)
    packed = collate_packed(samples, n, tok, row_tokens=2 * longest)
    assert packed["input_ids"].shape[0] < len(samples)  # rows really hold several samples
    assert packed["padded_tokens"] > 0  # and one has a padding tail

    def loss_and_grads(b, **extra):
        loss = model(b["input_ids"], b["pixel_values"].double(), n, b["attention_mask"],
                     b["labels"], **extra)
        return loss, torch.autograd.grad(loss, params, allow_unused=True)

    unpacked = collate(samples, n, tok)
    loss_u, grads_u = loss_and_grads(unpacked)
    loss_p, grads_p = loss_and_grads(packed, position_ids=packed["position_ids"],
                                     has_image=packed["has_image"])
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-9, atol=0)
    compared = 0
    for gp, gu in zip(grads_p, grads_u):
        if gu is None:
            assert gp is None
            continue
        torch.testing.assert_close(gp, gu, rtol=1e-7, atol=1e-10)
        compared += 1
    assert compared == len(params)
    # without the block mask the samples see each other: the check above has teeth
    # (a random model's loss moves by ~3e-4 of itself, far above the 1e-9 asked above)
    with torch.no_grad():
        leaked = model(packed["input_ids"], packed["pixel_values"].double(), n,
                       packed["attention_mask"], packed["labels"], has_image=packed["has_image"])
    assert abs(float(leaked - loss_u.detach())) > 1e-5 * abs(float(loss_u.detach()))


def test_varlen_kwargs_mark_every_sample_and_padding_tail():
    pos_RT = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3],  # samples of 3, 2, 4
                           [0, 1, 2, 3, 4, 5, 0, 1, 2]])  # 6, then a padding tail of 3
    kw = varlen_kwargs(pos_RT)
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 5, 9, 15, 18]
    assert kw["cu_seq_lens_q"].dtype == torch.int32 and kw["cu_seq_lens_k"] is kw["cu_seq_lens_q"]
    assert kw["max_length_q"] == kw["max_length_k"] == 6


def test_flash_attention_gets_the_varlen_arguments_of_packed_rows(setup):
    """transformers' flash-attn path infers packing from position_ids only for one row: with
    several rows it would attend across samples. The boundaries are passed explicitly."""
    from transformers import Qwen2Config

    cfg = Qwen2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64)
    pos_RT = torch.tensor([[0, 1, 0, 1], [0, 1, 2, 0]])
    embeds = torch.zeros(2, 4, 32)
    for impl in ("flash_attention_2", NAME):
        cfg._attn_implementation = impl
        assert packed_attention(cfg, embeds, pos_RT)["cu_seq_lens_q"].tolist() == [0, 2, 4, 7, 8]
    # sdpa_varlen: no T x T mask is built; an attention that read the empty one would fail
    mask = packed_attention(cfg, embeds, pos_RT)["attention_mask"]
    assert mask.shape == (2, 1, 0, 0)
    q = torch.zeros(2, 2, 4, 8)
    with pytest.raises(RuntimeError):
        torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    cfg._attn_implementation = "eager"
    mask = packed_attention(cfg, embeds, pos_RT)["attention_mask"]
    assert mask.shape == (2, 1, 4, 4) and float(mask[0, 0, 2, 1]) < -1e30  # across: masked


def test_sdpa_varlen_refuses_a_sample_that_crosses_rows():
    from tfx.model.varlen import sdpa_varlen_forward

    q = torch.zeros(2, 1, 4, 8)
    cu = torch.tensor([0, 6, 8], dtype=torch.int32)  # a 6-token sample in rows of 4
    with pytest.raises(ValueError, match="crosses rows"):
        sdpa_varlen_forward(torch.nn.Module(), q, q, q, None, cu_seq_lens_q=cu)


def stream_config(synth, tmp_path, **data):
    import yaml

    from tfx.config.load import build
    from tfx.config.schema import RunConfig

    raw = yaml.safe_load(tiny_config_yaml(synth, tmp_path / "out"))
    raw["data"].update(data)
    return build(RunConfig, raw, "").validate()


def test_packed_stream_restores_exactly_with_workers(synth_dir, mixed_len_dir, tmp_path):
    """Keys consumed by (13 batches, save, restore, 17) == (30 batches), packing and tiles on
    (2 x 2 + thumbnail per image), 2 loader workers, token-budget batches."""
    import json

    from tfx.data.pipeline import TrainStream

    tok = load_tokenizer(synth_dir / "tokenizer.model")
    cfg = stream_config(synth_dir, tmp_path, train=str(mixed_len_dir), packing=True,
                        token_budget=1200, bucket_batches=4, num_workers=2,
                        tiles={"max": 4})
    straight = TrainStream(cfg, tok, rank=0, world=1)
    batches = [straight.next_batch(16) for _ in range(30)]
    keys = [b["keys"] for b in batches]
    assert all(int(b["has_image"].sum()) == 5 * len(b["keys"]) for b in batches)  # 5 per image
    first = TrainStream(cfg, tok, rank=0, world=1)
    for _ in range(13):
        first.next_batch(16)
    resumed = TrainStream(cfg, tok, rank=0, world=1)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [resumed.next_batch(16)["keys"] for _ in range(17)] == keys[13:]


def test_packing_cuts_padding_below_bucketing_on_the_same_stream(synth_dir, mixed_len_dir,
                                                                tmp_path):
    from tfx.data.pipeline import TrainStream

    tok = load_tokenizer(synth_dir / "tokenizer.model")
    train, budget = str(mixed_len_dir), 600

    def padding(**data):
        stream = TrainStream(stream_config(synth_dir, tmp_path, train=train, bucket_batches=8,
                                           token_budget=budget, **data), tok, rank=0, world=1)
        real = padded = 0
        for _ in range(40):
            b = stream.next_batch(36)
            assert b["real_tokens"] <= budget
            real, padded = real + b["real_tokens"], padded + b["padded_tokens"]
        return padded / (real + padded)

    bucketed, packed = padding(), padding(packing=True, pack_tokens=300)
    print(f"\npadding: bucketed {bucketed:.2%}, bucketed + packed {packed:.2%}")
    assert packed < bucketed


def test_packing_config_errors(synth_dir, tmp_path):
    from tfx.errors import ConfigError

    with pytest.raises(ConfigError, match="data.pack_tokens: 40 cannot hold"):
        stream_config(synth_dir, tmp_path, packing=True, pack_tokens=40)
    with pytest.raises(ConfigError, match="tokens.mode=all"):
        import yaml

        from tfx.config.load import build
        from tfx.config.schema import RunConfig

        raw = yaml.safe_load(tiny_config_yaml(synth_dir, tmp_path / "out"))
        raw["data"]["packing"] = True
        raw["tokens"].update(mode="all", probs=None)
        build(RunConfig, raw, "").validate()


def test_balanced_rows_keep_the_row_count_and_even_out_lengths():
    from tfx.data.packing import balanced_rows

    lengths = [90, 80, 70, 60, 50, 40, 30, 20, 10, 10]  # 460 tokens
    loose = first_fit_decreasing(lengths, 300)
    tight = balanced_rows(lengths, 300)
    assert len(tight) == len(loose) == 2
    row_sums = sorted(sum(lengths[i] for i in row) for row in tight)
    assert row_sums == [230, 230]  # against 300 + 160 before


def test_packed_training_on_two_ranks_under_zero3(synth_dir, mixed_len_dir, tmp_path):
    """The real loop: `tfx train --nproc 2`, ZeRO-3, packed rows of different counts per rank
    and step; every step logs its padding, and the loss falls."""
    import json

    import yaml

    from conftest import run_tfx, set_train

    raw = yaml.safe_load(tiny_config_yaml(synth_dir, tmp_path / "run"))
    raw["data"].update(train=str(mixed_len_dir), packing=True, token_budget=600,
                       pack_tokens=300, bucket_batches=4)
    set_train(raw, max_steps=12, save_every=0, log_every=1)
    raw.setdefault("logging", {})["trace_samples"] = True
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    result = run_tfx("train", str(tmp_path / "run.yaml"), "--nproc", "2", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert len(rows) == 12 and all(r["padding_frac"] < 0.1 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    for r in (0, 1):  # what each rank fed the model: rows holding several images at N
        trace = [json.loads(line) for line in (tmp_path / "run" / "trace" /
                                               f"rank{r}.jsonl").open()]
        n_at = {m["step"] - 1: m["n_visual"] for m in rows}  # metrics count steps from 1
        cells = [(c, n_at[t["step"]]) for t in trace for c in t["context_tokens"]]
        assert all(c % n == 0 for c, n in cells)
        assert max(c // n for c, n in cells) >= 3
