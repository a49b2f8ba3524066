"""`tfx data fashion-mnist`: real-image grid VQA from Debian's `dataset-fashion-mnist`.

Each image is a k x k grid of real 28x28 Fashion-MNIST items (train grids from the train split,
eval grids from the test split, so no item is shared). Questions, answered with a class name or a
number:
- `cell`: "What is in row r, column c?" -> the item's class. With fewer visual tokens than
  cells, neighbouring items are averaged together: this is the question where N matters.
- `count`: "How many <class> items are there?" -> a number (0..k*k).
- `marked`: "What is in the red box?" -> the class of the one item framed in red. Found by
  content, not by position, so a small model learns it fast; with fewer visual tokens than
  cells the framed item is averaged with its neighbours, so N matters here too.
`kinds` weights the question types (default: cell 0.7, count 0.3).
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
KINDS = {"cell": 0.7, "count": 0.3}
FRAME = 2  # pixels of red frame around the marked item, at the original 28 px


def parse_kinds(spec: str) -> dict[str, float]:
    """'cell:0.7,count:0.3' or 'marked' -> normalised weights; DataError on a bad spec."""
    kinds = {}
    for part in filter(None, (x.strip() for x in spec.split(","))):
        name, _, weight = part.partition(":")
        if name not in ("cell", "count", "marked"):
            raise DataError(f"--questions: {name!r} is not one of cell, count, marked")
        try:
            kinds[name] = float(weight or 1.0)
        except ValueError:
            raise DataError(f"--questions: weight {weight!r} of {name} is not a number") from None
    total = sum(kinds.values())
    if not kinds or total <= 0 or min(kinds.values()) < 0:
        raise DataError(f"--questions: {spec!r} gives no positive weights")
    return {k: v / total for k, v in kinds.items()}


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
                cell: int, kinds: dict[str, float] = KINDS) -> tuple[Image.Image, dict]:
    picks = rng.choice(len(images), size=k * k, replace=False)
    tiles = images[picks].reshape(k, k, 28, 28).transpose(0, 2, 1, 3).reshape(k * 28, k * 28)
    rgb = np.repeat(tiles[:, :, None], 3, axis=2)
    names = [CLASSES[int(labels[p])] for p in picks]
    kind = list(kinds)[rng.choice(len(kinds), p=list(kinds.values()))]
    r, c = int(rng.integers(k)), int(rng.integers(k))
    if kind == "marked":
        box = rgb[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28]
        inner = box[FRAME:28 - FRAME, FRAME:28 - FRAME].copy()
        box[:] = (255, 0, 0)
        box[FRAME:28 - FRAME, FRAME:28 - FRAME] = inner
    image = Image.fromarray(rgb)
    if cell != 28:
        image = image.resize((k * cell, k * cell), Image.BICUBIC)
    if kind == "cell":
        answer = names[r * k + c]
        q = f"What is in the {ORDINAL[r]} row, {ORDINAL[c]} column?"
    elif kind == "marked":
        answer, q = names[r * k + c], "What is in the red box?"
    else:
        target = CLASSES[int(rng.integers(len(CLASSES)))]
        answer = str(names.count(target))
        q = f"How many {target} items are there?"
    meta = {"conversations": [{"from": "human", "value": "<image>\n" + q},
                              {"from": "gpt", "value": answer}], "type": kind, "answer": answer}
    return image, meta


def build_fashion_mnist(out: str | Path, *, source: str | Path = DEBIAN_DIR, train: int = 20000,
                        eval: int = 1000, grid: int = 3, cell: int = 28, per_shard: int = 1000,
                        seed: int = 0, vocab_size: int = 128,
                        kinds: dict[str, float] = KINDS) -> dict:
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
                image, meta = make_sample(rng, images, labels, grid, cell, kinds)
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                sink.write({"__key__": f"{split}{i:07d}", "png": buf.getvalue(),
                            "json": json.dumps(meta).encode()})
                texts += [t["value"].replace("<image>\n", "") for t in meta["conversations"]]
    model = train_sentencepiece(texts, out / "tokenizer", vocab_size)
    info = {"train": train, "eval": eval, "grid": grid, "image_size": grid * cell,
            "tokenizer": str(model), "classes": CLASSES, "source": str(source),
            "questions": kinds}
    (out / "info.json").write_text(json.dumps(info, indent=2))
    return info
