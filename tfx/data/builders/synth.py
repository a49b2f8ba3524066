"""`tfx data synth`: the embedded default task, written as WebDataset shards + a tokenizer.

Each image is a g x g grid of coloured cells (some empty) with brightness jitter. Questions ask
in which row or column the single cell of a colour is (needs spatial resolution: with fewer
visual tokens than cells, neighbouring cells are averaged, so at N=4 only the half is known and
at N=1 nothing), or how many cells have a colour (survives pooling, since averaging keeps colour
proportions). Finding a colour is a content lookup that attention learns quickly; asking for
the colour at a named cell would need positional arithmetic, which a tiny model learns slowly. Train and held-out splits use disjoint seeds.
A SentencePiece BPE tokenizer is trained on the generated text and saved beside the shards.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from tfx.data.tokenizer import train_sentencepiece

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
          "yellow": (230, 210, 40), "white": (235, 235, 235)}
EMPTY = "empty"


def draw_grid(cells: list[list[str]], size: int, rng: np.random.Generator) -> Image.Image:
    g = len(cells)
    img = np.zeros((size, size, 3), np.float32)
    step = size / g
    for r in range(g):
        for c in range(g):
            if cells[r][c] == EMPTY:
                continue
            y0, x0 = int(round(r * step)), int(round(c * step))
            y1, x1 = int(round((r + 1) * step)), int(round((c + 1) * step))
            m = max(1, int(step * 0.12))  # a dark gutter keeps cells apart at full resolution
            jitter = rng.uniform(0.8, 1.0)
            img[y0 + m:y1 - m, x0 + m:x1 - m] = np.array(COLORS[cells[r][c]]) * jitter
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_sample(rng: np.random.Generator, grid: int, size: int) -> tuple[Image.Image, dict]:
    colors = list(COLORS)
    target = colors[int(rng.integers(len(colors)))]
    kind = ("row", "column", "count")[rng.choice(3, p=[0.4, 0.4, 0.2])]
    if kind == "count":
        names = colors + [EMPTY]
        cells = [[names[int(rng.integers(len(names)))] for _ in range(grid)] for _ in range(grid)]
        q = f"How many {target} cells are there?"
        answer = str(sum(row.count(target) for row in cells))
    else:  # exactly one cell has the target colour
        others = [c for c in colors if c != target] + [EMPTY, EMPTY]
        cells = [[others[int(rng.integers(len(others)))] for _ in range(grid)]
                 for _ in range(grid)]
        r, c = int(rng.integers(grid)), int(rng.integers(grid))
        cells[r][c] = target
        q = f"Which {kind} is the {target} cell in?"
        answer = str((r if kind == "row" else c) + 1)
    meta = {"conversations": [{"from": "human", "value": "<image>\n" + q},
                              {"from": "gpt", "value": answer}],
            "type": kind, "answer": answer}
    return draw_grid(cells, size, rng), meta


def write_split(out: Path, split: str, n: int, per_shard: int, grid: int, size: int,
                seed: int) -> list[str]:
    import webdataset as wds

    (out / split).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    texts = []
    pattern = str(out / split / f"{split}-%05d.tar")
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for i in range(n):
            image, meta = make_sample(rng, grid, size)
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            sink.write({"__key__": f"{split}{i:07d}", "png": buf.getvalue(),
                        "json": json.dumps(meta).encode()})
            texts += [t["value"].replace("<image>\n", "") for t in meta["conversations"]]
    return texts


def build_synth(out: str | Path, *, train: int = 4096, eval: int = 512, per_shard: int = 256,
                grid: int = 4, image_size: int = 64, seed: int = 0,
                vocab_size: int = 96) -> dict:
    out = Path(out)
    texts = write_split(out, "train", train, per_shard, grid, image_size, seed)
    write_split(out, "eval", eval, per_shard, grid, image_size, seed + 1_000_003)
    model = train_sentencepiece(texts, out / "tokenizer", vocab_size)
    info = {"train": train, "eval": eval, "grid": grid, "image_size": image_size,
            "tokenizer": str(model), "colors": list(COLORS) + [EMPTY]}
    (out / "info.json").write_text(json.dumps(info, indent=2))
    return info
