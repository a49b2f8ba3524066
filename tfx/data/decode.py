"""Decode stage: raw WebDataset sample -> (key, RGB image, conversation turns), or skip it.

Data flow position: shards -> **decode** -> tokenize -> bucketing -> collate. A bad sample
(undecodable image, bad JSON, missing fields, and later: too long, no label) is counted and
skipped; too many in a row (a good sample is one that also tokenised), or any with
`data.strict=true`, raises DataError naming the shard and key.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from tfx.errors import DataError
from tfx.model.families import vision_family
from tfx.model.pixels import draft_jpeg, square_rgb

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class SkipCounter:
    """Counts skipped samples; raises when strict or after too many failures in a row."""

    def __init__(self, max_consecutive: int, strict: bool):
        self.max_consecutive, self.strict = max_consecutive, strict
        self.skipped, self.in_a_row = 0, 0
        self.last_reason = ""

    def __call__(self, reason: str, key: str | None, shard: str | None) -> None:
        where = f"{shard or '?'}:{key or '?'}"
        if self.strict:
            raise DataError(f"bad sample {where}: {reason} (data.strict=true)")
        self.skipped += 1
        self.in_a_row += 1
        self.last_reason = f"{where}: {reason}"
        if self.in_a_row > self.max_consecutive:
            raise DataError(f"{self.in_a_row} bad samples in a row, last {self.last_reason}")

    def ok(self) -> None:
        """A sample made it all the way through (decoded and tokenised): the run resets."""
        self.in_a_row = 0

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = state["skipped"]


@dataclass
class Decoded:
    key: str
    images: list[Image.Image]  # in the order of their tags; empty for a text-only sample
    turns: list[dict]  # [{"from": "human"|"gpt", "value": str}, ...]
    meta: dict  # the whole JSON record (eval reads e.g. its "type")


def decode_sample(raw: dict, on_error: SkipCounter, image_size: int | None = None
                  ) -> Decoded | None:
    """`image_size`: the tower's input side; a larger JPEG is decoded at reduced size (see
    `draft_jpeg`)."""
    key, shard = raw.get("__key__"), raw.get("__shard__")
    try:
        meta = json.loads(raw["json"]) if "json" in raw else None
        if not isinstance(meta, dict):
            raise ValueError("missing or non-object json")
        turns = meta.get("conversations")
        if not isinstance(turns, list) or not turns or not all(
                isinstance(t, dict) and t.get("from") in ("human", "gpt")
                and isinstance(t.get("value"), str) for t in turns):
            raise ValueError("conversations must be a non-empty list of {from, value}")
        if not any(t["from"] == "gpt" for t in turns):
            raise ValueError("no gpt turn to learn from")
        images = []
        for name in image_members(raw):
            image = Image.open(io.BytesIO(raw[name]))
            if image_size:
                draft_jpeg(image, image_size)
            image.load()
            images.append(image.convert("RGB"))
    except (ValueError, KeyError, OSError, UnicodeDecodeError, Image.DecompressionBombError) as e:
        on_error(f"{type(e).__name__}: {e}", key=key, shard=shard)
        return None
    return Decoded(key=key, images=images, turns=turns, meta=meta)


def image_members(raw: dict) -> list[str]:
    """A sample's image members in order: `jpg` (one image), or `0.jpg`, `1.png`, ... (several,
    as `tfx data llava` writes a list under `image`)."""
    single = [e for e in IMAGE_EXTS if e in raw]
    numbered = sorted((int(k.split(".", 1)[0]), k) for k in raw
                      if k.split(".", 1)[0].isdigit() and k.split(".", 1)[-1] in IMAGE_EXTS)
    if single and numbered:
        raise ValueError("both a single image and numbered images")
    return single[:1] if single else [k for _, k in numbered]


def image_to_uint8(image: Image.Image | None, size: int) -> torch.Tensor:
    """Resize to size x size (bicubic) as a (3, size, size) uint8 tensor: 4x smaller than floats
    while the sample waits in a bucketing buffer. A text-only sample gets a zero image (its
    features are still computed on every rank so ZeRO-3 sees the same module calls, then given
    weight 0)."""
    if image is None:
        return torch.zeros(3, size, size, dtype=torch.uint8)
    arr = np.asarray(square_rgb(image, size), dtype=np.uint8)
    # numpy's transpose copy: torch's permute().contiguous() of uint8 took 2-8 ms a picture
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def normalise(pixels_BCHW: torch.Tensor, family: str) -> torch.Tensor:
    """uint8 -> the tower's float input: /255, then per-channel mean/std of the family."""
    spec = vision_family(family)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (spec.pixel_mean, spec.pixel_std))
    return (pixels_BCHW.float() / 255.0 - mean) / std
