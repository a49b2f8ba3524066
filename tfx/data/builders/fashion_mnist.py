"""`tfx data fashion-mnist`: real-image grid VQA from Debian's `dataset-fashion-mnist`.

Each image is a k x k grid of real 28x28 Fashion-MNIST items (train grids from the train split,
eval grids from the test split, so no item is shared). Questions, answered with a class name or a
number:
- `cell`: "What is in row r, column c?" -> the item's class. With fewer visual tokens than
  cells, neighbouring items are averaged together: this is the question where N matters.
- `count`: "How many <class> items are there?" -> a number (0..k*k).
Shards + a SentencePiece tokenizer trained on the generated text, like `tfx data synth`.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from tfx.data.tokenizer import train_sentencepiece
from tfx.errors import DataError

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
           "bag", "ankle boot"]  # the upstream names, shortened to one phrase each
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "eval": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
ORDINAL = ["first", "second", "third", "fourth", "fifth", "sixth"]


def read_split(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = (source / f for f in FILES[split])
    if not images_file.is_file():
        raise DataError(f"{images_file} not found: install Debian's dataset-fashion-mnist "
                        f"(apt-get install dataset-fashion-mnist) or pass --source DIR")
    with gzip.open(images_file) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(labels_file) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    if len(images) != len(labels):
        raise DataError(f"{source}: {len(images)} images but {len(labels)} labels in {split}")
    return images, labels


def make_sample(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, k: int,
                cell: int) -> tuple[Image.Image, dict]:
    picks = rng.choice(len(images), size=k * k, replace=False)
    tiles = images[picks].reshape(k, k, 28, 28).transpose(0, 2, 1, 3).reshape(k * 28, k * 28)
    image = Image.fromarray(tiles).convert("RGB")
    if cell != 28:
        image = image.resize((k * cell, k * cell), Image.BICUBIC)
    names = [CLASSES[int(labels[p])] for p in picks]
    if rng.random() < 0.7:
        r, c = int(rng.integers(k)), int(rng.integers(k))
        kind, answer = "cell", names[r * k + c]
        q = f"What is in the {ORDINAL[r]} row, {ORDINAL[c]} column?"
    else:
        target = CLASSES[int(rng.integers(len(CLASSES)))]
        kind, answer = "count", str(names.count(target))
        q = f"How many {target} items are there?"
    meta = {"conversations": [{"from": "human", "value": "<image>\n" + q},
                              {"from": "gpt", "value": answer}], "type": kind, "answer": answer}
    return image, meta


def build_fashion_mnist(out: str | Path, *, source: str | Path = DEBIAN_DIR, train: int = 20000,
                        eval: int = 1000, grid: int = 3, cell: int = 28, per_shard: int = 1000,
                        seed: int = 0, vocab_size: int = 128) -> dict:
    import webdataset as wds

    if not 1 <= grid <= len(ORDINAL):
        raise DataError(f"--grid {grid}: use 1..{len(ORDINAL)}")
    out, source = Path(out), Path(source)
    texts = []
    for split, n, split_seed in (("train", train, seed), ("eval", eval, seed + 1_000_003)):
        images, labels = read_split(source, split)
        rng = np.random.default_rng(split_seed)
        (out / split).mkdir(parents=True, exist_ok=True)
        with wds.ShardWriter(str(out / split / f"{split}-%05d.tar"), maxcount=per_shard,
                             verbose=0) as sink:
            for i in range(n):
                image, meta = make_sample(rng, images, labels, grid, cell)
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                sink.write({"__key__": f"{split}{i:07d}", "png": buf.getvalue(),
                            "json": json.dumps(meta).encode()})
                texts += [t["value"].replace("<image>\n", "") for t in meta["conversations"]]
    model = train_sentencepiece(texts, out / "tokenizer", vocab_size)
    info = {"train": train, "eval": eval, "grid": grid, "image_size": grid * cell,
            "tokenizer": str(model), "classes": CLASSES, "source": str(source)}
    (out / "info.json").write_text(json.dumps(info, indent=2))
    return info
