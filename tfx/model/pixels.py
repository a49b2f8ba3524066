"""The tower's input pictures, in one place for training (`tfx.data.decode`, `data.tiles`) and
for the exported processor (copied beside it, like `projector.py`): PIL only. A picture is
either one square resize or, with tiles, the aspect-matched grid of at most K tiles plus a
thumbnail; each tile or thumbnail then gets N visual tokens of its own.

Data flow position: shards -> **decode (pixels)** -> tokenize -> ... ; in an export:
image -> **processor (pixels)** -> model.
"""

from __future__ import annotations

import math

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


def tile_grid(width: int, height: int, max_tiles: int) -> tuple[int, int]:
    """(columns, rows) of the tile grid for a picture: of the grids with at most `max_tiles`
    tiles, the one whose aspect ratio is closest to the picture's (in log ratio); among equally
    close ones, the most tiles (more detail), so a square picture with max 4 gets 2 x 2."""
    target = math.log(width / height)
    grids = [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles // c + 1)]
    return min(grids, key=lambda g: (round(abs(math.log(g[0] / g[1]) - target), 9),
                                     -g[0] * g[1]))


def tile_image(image: Image.Image, size: int, max_tiles: int, thumbnail: bool
               ) -> list[Image.Image]:
    """A picture -> its tiles (row by row), each size x size, cut from one decode at full size;
    plus the whole picture last as a thumbnail when there is more than one tile and `thumbnail`.
    `max_tiles` 1: the picture itself (today's single square resize)."""
    if max_tiles <= 1:
        return [image]
    image = image.convert("RGB")
    cols, rows = tile_grid(image.width, image.height, max_tiles)
    if cols * rows == 1:
        return [image]
    big = image.resize((cols * size, rows * size), Image.BICUBIC)
    tiles = [big.crop((x * size, y * size, (x + 1) * size, (y + 1) * size))
             for y in range(rows) for x in range(cols)]
    return tiles + [image] if thumbnail else tiles
