"""Collate: a same-N list of tokenised samples -> padded tensors for one micro-batch.

Data flow position: bucketing -> **collate** -> vision / projector(N) / LLM. Each image marker
of a sample becomes its image block (`tfx.model.image_block`); rows are right-padded only to the
longest row of the batch. Shape legend: B batch, T sequence, S image side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tfx.data.decode import normalise
from tfx.data.tokenizer import IGNORE
from tfx.model.image_block import block_ids, expand_markers


@dataclass
class TextSample:
    key: str
    pixels: torch.Tensor  # (I, 3, S, S) uint8, resized; a text-only sample: one zero image
    images: int  # real images (0: text-only), each with one marker in `ids`, in order
    ids: list[int]  # one image marker id where each image goes
    labels: list[int]  # IGNORE where no loss
    meta: dict
    family: str = "siglip"  # vision family: which pixel mean/std collate applies

    @property
    def has_image(self) -> bool:
        return self.images > 0

    @property
    def text_len(self) -> int:
        return len(self.ids)

    def total_len(self, n_visual: int) -> int:
        """Exact row length at N visual tokens: each marker becomes N + 2 ids."""
        return len(self.ids) + self.images * (n_visual + 1)

    def real_images(self) -> list[bool]:
        """Which of `pixels` are real images (a text-only sample's zero image is not)."""
        return [True] * self.images if self.images else [False]


def expand_image(sample: TextSample, n_visual: int, tok) -> tuple[list[int], list[int]]:
    block = block_ids(n_visual, tok.img_start_id, tok.img_ctx_id, tok.img_end_id)
    return expand_markers(sample.ids, sample.labels, tok.image_id, block, IGNORE)


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
        **pixel_fields(samples),
        "n_visual": n_visual,
        "keys": [s.key for s in samples],
        "meta": [s.meta for s in samples],
        "real_tokens": real,
        "padded_tokens": B * T - real,
    }


def pixel_fields(samples: list[TextSample]) -> dict:
    """Every image of the samples, in placeholder order, as the tower's float input; which of
    them are real (`has_image`, one entry per picture); how many the LLM gets N tokens of."""
    return {
        "pixel_values": normalise(torch.cat([s.pixels for s in samples]), samples[0].family),
        "has_image": torch.tensor([real for s in samples for real in s.real_images()]),
        "images": sum(s.images for s in samples),
    }
