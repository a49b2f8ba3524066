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

`--mixed` (`build_mixed`) is the benchmark where the N a question needs varies per sample: grid
sides drawn from `grids` (1x1 to 6x6 on one canvas size) and all three question types, so a
question about a 1x1 grid is answered at N = 1 while a cell of a 6x6 grid needs every token.
Four splits, no item shared between them: `train` (flex training) and `router` + `calib` (the
router's labels and its operating point) from disjoint item ranges of the original train split,
`eval` (the test split of the benchmark) from the original test split.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
from PIL import Image

from tfx.data.builders.writer import write_split
from tfx.data.tokenizer import train_sentencepiece
from tfx.errors import DataError

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
           "bag", "ankle boot"]  # the upstream names, shortened to one phrase each
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "eval": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
ORDINAL = ["first", "second", "third", "fourth", "fifth", "sixth"]
KINDS = {"cell": 0.7, "count": 0.3}
MIXED_GRIDS = (1, 2, 3, 4, 6)
MIXED_KINDS = {"cell": 0.4, "marked": 0.3, "count": 0.3}
MIXED_HOLDOUT = 50_000  # train items below this index train the model; the rest are held out
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


def compose(images: np.ndarray, picks: np.ndarray, k: int, marked: tuple[int, int] | None,
            size: int) -> Image.Image:
    """The k x k grid of items `picks` (row-major) at 28 px each, the `marked` one framed in red,
    resized to size x size (no resize when size == 28 k)."""
    tiles = images[picks].reshape(k, k, 28, 28).transpose(0, 2, 1, 3).reshape(k * 28, k * 28)
    rgb = np.repeat(tiles[:, :, None], 3, axis=2)
    if marked is not None:
        r, c = marked
        box = rgb[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28]
        inner = box[FRAME:28 - FRAME, FRAME:28 - FRAME].copy()
        box[:] = (255, 0, 0)
        box[FRAME:28 - FRAME, FRAME:28 - FRAME] = inner
    image = Image.fromarray(rgb)
    return image if size == k * 28 else image.resize((size, size), Image.BICUBIC)


def ask(rng: np.random.Generator, kind: str, names: list[str], k: int, r: int,
        c: int) -> tuple[str, str, dict]:
    """(question, answer, what it is about) for a grid whose items are `names` (row-major)."""
    if kind == "cell":
        return (f"What is in the {ORDINAL[r]} row, {ORDINAL[c]} column?", names[r * k + c],
                {"cell": [r, c]})
    if kind == "marked":
        return "What is in the red box?", names[r * k + c], {"cell": [r, c]}
    target = CLASSES[int(rng.integers(len(CLASSES)))]
    return f"How many {target} items are there?", str(names.count(target)), {"target": target}


def make_sample(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, k: int,
                cell: int, kinds: dict[str, float] = KINDS,
                pool: np.ndarray | None = None) -> tuple[Image.Image, dict]:
    """One k x k grid question; items drawn without replacement from `pool` (indices into the
    split; default: all of it). `meta["items"]` names the items, so answers can be checked."""
    pool = np.arange(len(images)) if pool is None else pool
    picks = pool[rng.choice(len(pool), size=k * k, replace=False)]
    names = [CLASSES[int(labels[p])] for p in picks]
    kind = list(kinds)[rng.choice(len(kinds), p=list(kinds.values()))]
    r, c = int(rng.integers(k)), int(rng.integers(k))
    image = compose(images, picks, k, (r, c) if kind == "marked" else None, k * cell)
    q, answer, about = ask(rng, kind, names, k, r, c)
    meta = {"conversations": [{"from": "human", "value": "<image>\n" + q},
                              {"from": "gpt", "value": answer}], "type": kind, "answer": answer,
            "grid": k, "items": [int(p) for p in picks]} | about
    return image, meta


def build_fashion_mnist(out: str | Path, *, source: str | Path = DEBIAN_DIR, train: int = 20000,
                        eval: int = 1000, grid: int = 3, cell: int = 28, per_shard: int = 1000,
                        seed: int = 0, vocab_size: int = 128,
                        kinds: dict[str, float] = KINDS) -> dict:
    if not 1 <= grid <= len(ORDINAL):
        raise DataError(f"--grid {grid}: use 1..{len(ORDINAL)}")
    out, source = Path(out), Path(source)
    texts = []
    for split, n, split_seed in (("train", train, seed), ("eval", eval, seed + 1_000_003)):
        images, labels = read_split(source, split)
        rng = np.random.default_rng(split_seed)
        texts += write_split(out, split, n, per_shard,
                             lambda i: make_sample(rng, images, labels, grid, cell, kinds))
    model = train_sentencepiece(texts, out / "tokenizer", vocab_size)
    info = {"train": train, "eval": eval, "grid": grid, "image_size": grid * cell,
            "tokenizer": str(model), "classes": CLASSES, "source": str(source),
            "questions": kinds}
    (out / "info.json").write_text(json.dumps(info, indent=2))
    return info


def parse_grids(spec: str) -> tuple[int, ...]:
    try:
        grids = tuple(sorted({int(x) for x in spec.split(",") if x.strip()}))
    except ValueError:
        raise DataError(f"--grids {spec!r}: give grid sides as a comma list, e.g. 1,2,3,4,6") \
            from None
    if not grids or min(grids) < 1 or max(grids) > len(ORDINAL):
        raise DataError(f"--grids {spec!r}: sides must be in 1..{len(ORDINAL)}")
    return grids


def build_mixed(out: str | Path, *, source: str | Path = DEBIAN_DIR, train: int = 10000,
                router: int = 3000, calib: int = 1500, eval: int = 3000,
                grids: tuple[int, ...] = MIXED_GRIDS, image_size: int = 192,
                kinds: dict[str, float] = MIXED_KINDS, per_shard: int = 1000, seed: int = 0,
                vocab_size: int = 128) -> dict:
    """The mixed-difficulty benchmark (module docstring): grid side uniform over `grids`,
    question type by `kinds`, every image `image_size` px square."""
    out, source = Path(out), Path(source)
    train_images, train_labels = read_split(source, "train")
    test_images, test_labels = read_split(source, "eval")
    held = len(train_images) - MIXED_HOLDOUT
    if held < 2 * max(grids) ** 2:
        raise DataError(f"{source}: {len(train_images)} train items leave too few held out "
                        f"beyond item {MIXED_HOLDOUT} for the router and calib splits")
    router_end = MIXED_HOLDOUT + held // 2
    pools = {"train": (train_images, train_labels, np.arange(MIXED_HOLDOUT), train),
             "router": (train_images, train_labels, np.arange(MIXED_HOLDOUT, router_end), router),
             "calib": (train_images, train_labels, np.arange(router_end, len(train_images)),
                       calib),
             "eval": (test_images, test_labels, np.arange(len(test_images)), eval)}
    texts = []
    for offset, (split, (images, labels, pool, n)) in enumerate(pools.items()):
        rng = np.random.default_rng([seed, offset])

        def draw(i):
            k = grids[int(rng.integers(len(grids)))]
            image, meta = make_sample(rng, images, labels, k, 28, kinds, pool)
            return image.resize((image_size, image_size), Image.BICUBIC), meta

        texts += write_split(out, split, n, per_shard, draw)
    model = train_sentencepiece(texts, out / "tokenizer", vocab_size)
    info = {"mixed": True, "grids": list(grids), "image_size": image_size, "questions": kinds,
            "tokenizer": str(model), "classes": CLASSES, "source": str(source),
            "splits": {split: {"samples": n, "source": "test" if split == "eval" else "train",
                               "items": [int(pool[0]), int(pool[-1]) + 1]}
                       for split, (_, _, pool, n) in pools.items()}}
    (out / "info.json").write_text(json.dumps(info, indent=2))
    return info
