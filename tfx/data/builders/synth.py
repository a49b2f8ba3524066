"""`tfx data synth`: the embedded default task, written as WebDataset shards + a tokenizer.

Each image is a g x g grid of coloured cells with brightness jitter and pixel noise. Two
question kinds, both answered with a colour name (chance 1/5):
- `majority`: which colour covers the most cells (a unique maximum is guaranteed). The answer
  depends on every cell; averaging mixes colours (red + green looks yellow), so pooling to few
  tokens has to be undone by the vision tower.
- `marked`: the colour of the one cell with a black square in its middle (fine detail: the
  marker covers 1/25 of a cell).
Both are content lookups a from-scratch tiny model learns in a few hundred steps. Questions
that need a cell's position (row/column of a colour, colour at a named cell, per-colour counts)
were tried and stay at chance for 800+ steps at this size (docs/status.md).
Train and held-out splits use disjoint seeds. A SentencePiece BPE tokenizer is trained on the
generated text and saved beside the shards.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from tfx.data.builders.writer import write_split
from tfx.data.tokenizer import train_sentencepiece

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
          "yellow": (230, 210, 40), "white": (235, 235, 235)}
KINDS, KIND_PROBS = ("majority", "marked"), (0.5, 0.5)


def draw_grid(cells: list[list[str]], size: int, rng: np.random.Generator,
              mark: tuple[int, int] | None = None) -> Image.Image:
    g = len(cells)
    img = np.zeros((size, size, 3), np.float32)
    step = size / g
    for r in range(g):
        for c in range(g):
            y0, x0 = int(round(r * step)), int(round(c * step))
            y1, x1 = int(round((r + 1) * step)), int(round((c + 1) * step))
            m = max(1, int(step * 0.12))  # a dark gutter keeps cells apart
            jitter = rng.uniform(0.8, 1.0)
            img[y0 + m:y1 - m, x0 + m:x1 - m] = np.array(COLORS[cells[r][c]]) * jitter
            if (r, c) == mark:  # a black square in the middle of the cell
                k = max(1, int(round(step * 0.2)))
                cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
                img[cy - k:cy + k, cx - k:cx + k] = 0.0
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_sample(rng: np.random.Generator, grid: int, size: int) -> tuple[Image.Image, dict]:
    colors = list(COLORS)
    kind = KINDS[rng.choice(len(KINDS), p=KIND_PROBS)]
    while True:
        cells = [[colors[int(rng.integers(len(colors)))] for _ in range(grid)]
                 for _ in range(grid)]
        counts = {c: sum(row.count(c) for row in cells) for c in colors}
        top = sorted(counts.values())
        if kind != "majority" or top[-1] > top[-2]:
            break
    r, c = int(rng.integers(grid)), int(rng.integers(grid))
    if kind == "majority":
        q, answer = "Which color has the most cells?", max(counts, key=counts.get)
    else:
        q, answer = "What color is the marked cell?", cells[r][c]
    meta = {"conversations": [{"from": "human", "value": "<image>\n" + q},
                              {"from": "gpt", "value": answer}],
            "type": kind, "answer": answer}
    return draw_grid(cells, size, rng, mark=(r, c) if kind == "marked" else None), meta


def build_synth(out: str | Path, *, train: int = 4096, eval: int = 512, per_shard: int = 256,
                grid: int = 4, image_size: int = 64, seed: int = 0,
                vocab_size: int = 96) -> dict:
    out = Path(out)

    def draws(split_seed: int):
        rng = np.random.default_rng(split_seed)
        return lambda i: make_sample(rng, grid, image_size)

    texts = write_split(out, "train", train, per_shard, draws(seed))  # the tokenizer's text
    write_split(out, "eval", eval, per_shard, draws(seed + 1_000_003))
    model = train_sentencepiece(texts, out / "tokenizer", vocab_size)
    info = {"train": train, "eval": eval, "grid": grid, "image_size": image_size,
            "tokenizer": str(model), "colors": list(COLORS)}
    (out / "info.json").write_text(json.dumps(info, indent=2))
    return info
