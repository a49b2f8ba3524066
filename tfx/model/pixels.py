"""The tower's input picture, in one place for training (`tfx.data.decode`) and for the
exported processor (copied beside it, like `projector.py`): PIL and numpy only.

Data flow position: shards -> **decode (pixels)** -> tokenize -> ... ; in an export:
image -> **processor (pixels)** -> model.
"""

from __future__ import annotations

from PIL import Image


def draft_jpeg(image: Image.Image, size: int) -> Image.Image:
    """A JPEG not yet decoded is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still
    covers size x size: 2-4x faster for photos larger than the tower's input. Training reads
    every JPEG this way; so does the processor when handed `Image.open(path)`. An image that is
    already decoded is resized from full size (a slightly different picture)."""
    if getattr(image, "format", None) == "JPEG" and getattr(image, "tile", None):
        image.draft("RGB", (size, size))
    return image


def square_rgb(image: Image.Image, size: int) -> Image.Image:
    """RGB, size x size, bicubic: what the vision tower sees, in training and serving alike."""
    return draft_jpeg(image, size).convert("RGB").resize((size, size), Image.BICUBIC)
