"""Packing: a same-N micro-batch of samples -> rows that each hold several whole samples.

Data flow position: bucketing -> **packing** (instead of `collate`) -> vision / projector(N) /
LLM. Samples are placed first-fit decreasing by their exact length at the step's N into as few
rows of at most `row_tokens` tokens as that takes, with the row length then tightened until the
rows are nearly equal; rows are right-padded to the longest row. Attention stays inside each
sample through `position_ids` that restart at 0 at every sample start (and at the padding tail,
a segment of its own): the model turns them into varlen offsets, so SDPA (`sdpa_varlen`) and
flash-attn run each sample's attention alone, or into the exact block-diagonal causal mask for
eager attention (`tfx.model.varlen`). The first label of each
sample is IGNORE, so no position predicts across a boundary. Images keep the order in which
their placeholders appear (row by row, left to right), which is the order `splice_visual` fills.
Shape legend: R rows, T sequence.
"""

from __future__ import annotations

import torch

from tfx.data.bucketing import first_fit_decreasing
from tfx.data.collate import TextSample, expand_image, pixel_fields
from tfx.data.tokenizer import IGNORE


def balanced_rows(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """As few rows as first-fit decreasing needs at `row_tokens`, then the shortest row length
    that still packs into that many rows (a binary search): rows come out nearly equal, so
    padding them to the longest is cheap."""
    rows = first_fit_decreasing(lengths, row_tokens)
    low = max(max(lengths), -(-sum(lengths) // len(rows)))
    high = max(row_tokens, max(lengths))
    while low < high:
        mid = (low + high) // 2
        if len(first_fit_decreasing(lengths, mid)) <= len(rows):
            high = mid
        else:
            low = mid + 1
    tight = first_fit_decreasing(lengths, low)
    return tight if len(tight) <= len(rows) else rows


def collate_packed(samples: list[TextSample], n_visual: int, tok, row_tokens: int) -> dict:
    """The keys of `collate`'s batch, plus `position_ids` (R, T) and `sample_lengths` (the
    exact length of each sample, in row order). `attention_mask` marks real tokens (1) against
    the padding tail (0); the model builds the block-diagonal mask from `position_ids`."""
    expanded = [expand_image(s, n_visual, tok) for s in samples]
    rows = balanced_rows([len(ids) for ids, _ in expanded], row_tokens)
    T = max(sum(len(expanded[i][0]) for i in row) for row in rows)
    R = len(rows)
    input_ids_RT = torch.full((R, T), tok.pad_id, dtype=torch.long)
    labels_RT = torch.full((R, T), IGNORE, dtype=torch.long)
    mask_RT = torch.zeros((R, T), dtype=torch.long)
    position_ids_RT = torch.zeros((R, T), dtype=torch.long)
    order, lengths = [], []
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            ids, labels = expanded[i]
            span = slice(at, at + len(ids))
            input_ids_RT[r, span] = torch.tensor(ids)
            labels_RT[r, span] = torch.tensor([IGNORE] + labels[1:])  # nothing crosses in
            position_ids_RT[r, span] = torch.arange(len(ids))
            mask_RT[r, span] = 1
            at += len(ids)
            order.append(i)
            lengths.append(len(ids))
        position_ids_RT[r, at:] = torch.arange(T - at)  # the padding tail: its own segment
    placed = [samples[i] for i in order]
    real = int(mask_RT.sum())
    return {
        "input_ids": input_ids_RT,
        "attention_mask": mask_RT,
        "position_ids": position_ids_RT,
        "labels": labels_RT,
        **pixel_fields(placed),
        "n_visual": n_visual,
        "keys": [s.key for s in placed],
        "meta": [s.meta for s in placed],
        "sample_lengths": lengths,
        "real_tokens": real,
        "padded_tokens": R * T - real,
    }
