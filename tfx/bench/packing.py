"""`tfx bench data`, part 3: real tokens per second of one forward + backward, packed vs bucketed
vs padded, on the same samples with the same model.

The samples have the skewed length mix of part 1 (`LENGTH_MIX`, text only: packing acts on the
LLM). The model is a small Qwen2 (SDPA, fp32) built from a config. Arrangements of the same
samples: `padded` (batches of 8 in stream order, padded to their longest), `bucketed` (sorted
by length, then batches of 8), `alone` (one sample a batch: no padding, no batching),
`packed-mask` and `packed-varlen` (rows of `row_tokens` filled first-fit decreasing and evened
out, attention kept inside each sample from restarting position ids: `tfx.data.packing`,
`tfx.model.varlen`). The padding-free ceiling is the padded arrangement's rate counting its pad
tokens as real: what a batch of that shape would give with no padding at all.
"""

from __future__ import annotations

import time

import torch

from tfx.bench.data import length_stream
from tfx.data.bucketing import first_fit_decreasing
from tfx.data.packing import balanced_rows

BATCH = 8


def tiny_lm(vocab: int = 2048):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab, hidden_size=256, intermediate_size=704,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=4096, use_cache=False)
    torch.manual_seed(0)
    return Qwen2ForCausalLM._from_config(cfg, attn_implementation="sdpa").float()


def padded_batch(lengths: list[int], vocab: int) -> dict:
    T = max(lengths)
    ids = torch.zeros((len(lengths), T), dtype=torch.long)
    mask = torch.zeros_like(ids)
    g = torch.Generator().manual_seed(sum(lengths))
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(1, vocab, (n,), generator=g)
        mask[b, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "real": sum(lengths), "total": ids.numel()}


def packed_batch(lengths: list[int], row_tokens: int, vocab: int) -> dict:
    rows = balanced_rows(lengths, row_tokens)
    T = max(sum(lengths[i] for i in row) for row in rows)
    ids = torch.zeros((len(rows), T), dtype=torch.long)
    pos = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    g = torch.Generator().manual_seed(sum(lengths))
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = lengths[i]
            ids[r, at:at + n] = torch.randint(1, vocab, (n,), generator=g)
            labels[r, at + 1:at + n] = ids[r, at + 1:at + n]
            pos[r, at:at + n] = torch.arange(n)
            at += n
        pos[r, at:] = torch.arange(T - at)
    return {"input_ids": ids, "position_ids": pos, "labels": labels, "real": sum(lengths),
            "total": ids.numel()}


def fwd_bwd_seconds(model, batches: list[dict]) -> float:
    """Seconds of one forward + backward over every batch."""
    from tfx.model.varlen import packed_attention

    t0 = time.perf_counter()
    for b in batches:
        kwargs = {"input_ids": b["input_ids"], "labels": b["labels"]}
        if "position_ids" in b:
            embeds = model.get_input_embeddings()(b["input_ids"])
            kwargs = {"inputs_embeds": embeds, "labels": b["labels"],
                      "position_ids": b["position_ids"],
                      **packed_attention(model.config, embeds, b["position_ids"])}
        else:
            kwargs["attention_mask"] = b["attention_mask"]
        model(**kwargs).loss.backward()
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return seconds


def packing_table(samples: int, reps: int, row_tokens: int = 1536) -> list[dict]:
    """One row per arrangement. The packed rows run twice: `packed-mask`, attention through
    the exact T x T block-diagonal mask (plain `sdpa`), and `packed-varlen`, per sample
    (`sdpa_varlen`, what training uses). The arrangements take turns (`reps` rounds after a
    warm-up round) and each keeps its fastest round, so a burst of load on a shared machine
    does not land on one arrangement alone."""
    from tfx.model import varlen

    varlen.register()
    stream = length_stream(1)
    lengths = [next(stream).text_len for _ in range(samples)]
    model = tiny_lm()
    vocab = model.config.vocab_size
    chunks = lambda ls: [ls[i:i + BATCH] for i in range(0, len(ls), BATCH)]  # noqa: E731
    # rows of the whole set: the packer sees what one step's token budget holds
    packed = [packed_batch([lengths[i] for i in group], row_tokens, vocab)
              for group in _row_groups(lengths, row_tokens)]
    arrangements = {  # name: (batches, the LLM's attention)
        "padded": ([padded_batch(c, vocab) for c in chunks(lengths)], "sdpa"),
        "bucketed": ([padded_batch(c, vocab) for c in chunks(sorted(lengths))], "sdpa"),
        "alone": ([padded_batch([n], vocab) for n in lengths], "sdpa"),  # no padding at all
        "packed-mask": (packed, "sdpa"),
        "packed-varlen": (packed, varlen.NAME),
    }
    best = {name: float("inf") for name in arrangements}
    for round_ in range(reps + 1):  # round 0 warms up and is dropped
        for name, (batches, attn) in arrangements.items():
            model.set_attn_implementation(attn)
            seconds = fwd_bwd_seconds(model, batches)
            if round_:
                best[name] = min(best[name], seconds)
    rows, rates = [], {}
    for name, (batches, _) in arrangements.items():
        seconds = best[name]
        real = sum(b["real"] for b in batches)
        total = sum(b["total"] for b in batches)
        rates[name] = real / seconds
        rows.append({"arrangement": name, "rows": sum(b["input_ids"].shape[0] for b in batches),
                     "padding_pct": round(100 * (1 - real / total), 2),
                     "seconds": round(seconds, 3), "real_tokens_per_s": round(real / seconds),
                     "vs_padded": None, "of_ceiling_pct": None})
        if name == "padded":
            rates["ceiling"] = total / seconds
    for r in rows:
        r["vs_padded"] = round(rates[r["arrangement"]] / rates["padded"], 2)
        r["of_ceiling_pct"] = round(100 * rates[r["arrangement"]] / rates["ceiling"], 1)
    return rows


def _row_groups(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """Indices in groups of BATCH packed rows (a step's micro-batch of rows)."""
    rows = first_fit_decreasing(lengths, row_tokens)
    return [[i for row in rows[k:k + BATCH] for i in row] for k in range(0, len(rows), BATCH)]
