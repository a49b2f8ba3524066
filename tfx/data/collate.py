"""Collate: a same-N list of tokenised samples -> padded tensors for one micro-batch.

Data flow position: bucketing -> **collate** -> vision / projector(N) / LLM. The image marker of
each sample becomes `<img>` + N x `<IMG_CONTEXT>` + `</img>`; rows are right-padded only to the
longest row of the batch. Shape legend: B batch, T sequence, S image side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tfx.data.decode import normalise
from tfx.data.tokenizer import IGNORE


@dataclass
class TextSample:
    key: str
    pixels: torch.Tensor  # (3, S, S) uint8, resized; collate normalises
    has_image: bool
    ids: list[int]  # one image marker id where the image goes (none for text-only samples)
    labels: list[int]  # IGNORE where no loss
    meta: dict
    family: str = "siglip"  # vision family: which pixel mean/std collate applies

    @property
    def text_len(self) -> int:
        return len(self.ids)

    def total_len(self, n_visual: int) -> int:
        """Exact row length at N visual tokens: the marker becomes N + 2 ids."""
        return len(self.ids) + (n_visual + 1 if self.has_image else 0)


def expand_image(sample: TextSample, n_visual: int, tok) -> tuple[list[int], list[int]]:
    if not sample.has_image:
        return sample.ids, sample.labels
    at = sample.ids.index(tok.image_id)
    block = [tok.img_start_id] + [tok.img_ctx_id] * n_visual + [tok.img_end_id]
    ids = sample.ids[:at] + block + sample.ids[at + 1:]
    labels = sample.labels[:at] + [IGNORE] * len(block) + sample.labels[at + 1:]
    return ids, labels


def collate(samples: list[TextSample], n_visual: int, tok) -> dict:
    rows = [expand_image(s, n_visual, tok) for s in samples]
    T = max(len(ids) for ids, _ in rows)
    B = len(rows)
    input_ids_BT = torch.full((B, T), tok.pad_id, dtype=torch.long)
    labels_BT = torch.full((B, T), IGNORE, dtype=torch.long)
    mask_BT = torch.zeros((B, T), dtype=torch.long)
    for b, (ids, labels) in enumerate(rows):
        input_ids_BT[b, :len(ids)] = torch.tensor(ids)
        labels_BT[b, :len(labels)] = torch.tensor(labels)
        mask_BT[b, :len(ids)] = 1
    real = int(mask_BT.sum())
    return {
        "input_ids": input_ids_BT,
        "attention_mask": mask_BT,
        "labels": labels_BT,
        "pixel_values": normalise(torch.stack([s.pixels for s in samples]), samples[0].family),
        "has_image": torch.tensor([s.has_image for s in samples]),
        "images": sum(s.has_image for s in samples),  # images the LLM gets N tokens of
        "n_visual": n_visual,
        "keys": [s.key for s in samples],
        "meta": [s.meta for s in samples],
        "real_tokens": real,
        "padded_tokens": B * T - real,
    }
