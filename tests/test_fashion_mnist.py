"""`tfx data fashion-mnist`: real Fashion-MNIST items from Debian's package in k x k grids, the
original train/test split kept, and every answer true to the item's real label."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from tfx.data.builders.fashion_mnist import CLASSES, DEBIAN_DIR, FRAME, ORDINAL, read_split

from conftest import run_tfx

pytestmark = pytest.mark.skipif(not Path(DEBIAN_DIR).is_dir(),
                                reason=f"{DEBIAN_DIR} missing: apt-get install "
                                       "dataset-fashion-mnist (.ci/run does)")


def tiles(split):
    """Each real item of the split, keyed by its pixels and by its pixels inside a red frame."""
    images, labels = read_split(Path(DEBIAN_DIR), split)
    known = {img.tobytes(): CLASSES[int(lab)] for img, lab in zip(images, labels)}
    inner = {img[FRAME:28 - FRAME, FRAME:28 - FRAME].tobytes(): CLASSES[int(lab)]
             for img, lab in zip(images, labels)}
    return known, inner


def test_grids_keep_the_split_and_answers_match_real_labels(tmp_path):
    out = tmp_path / "fm"
    result = run_tfx("data", "fashion-mnist", "--out", str(out), "--train", "60", "--eval",
                     "40", "--grid", "3", "--per-shard", "25", "--questions",
                     "cell:1,count:1,marked:1", timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((out / "info.json").read_text())
    assert info["image_size"] == 84 and (out / "tokenizer.model").is_file()
    train_tiles, test_tiles = tiles("train"), tiles("eval")
    kinds = set()
    for split, (known, inner) in (("train", train_tiles), ("eval", test_tiles)):
        shards = sorted(str(p) for p in (out / split).glob("*.tar"))
        samples = list(wds.WebDataset(shards, shardshuffle=False))
        assert len(samples) == (60 if split == "train" else 40)
        for s in samples:
            rgb = np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB")).astype(int)
            meta = json.loads(s["json"])
            q, a = (t["value"] for t in meta["conversations"])
            kinds.add(meta["type"])
            red = (rgb[..., 0] - rgb[..., 1]) > 200  # only the frame is coloured
            if meta["type"] == "marked":
                ys, xs = np.nonzero(red)
                r, c = ys.min() // 28, xs.min() // 28
                assert (ys.max() // 28, xs.max() // 28) == (r, c) and q.endswith("red box?")
                box = rgb[r * 28 + FRAME:(r + 1) * 28 - FRAME, c * 28 + FRAME:(c + 1) * 28 - FRAME]
                assert a == inner[box[..., 0].astype(np.uint8).tobytes()]
                continue
            assert not red.any()
            grid = rgb[..., 0].astype(np.uint8)
            cells = [grid[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28].tobytes()
                     for r in range(3) for c in range(3)]
            assert all(t in known for t in cells)  # real items of this split only
            names = [known[t] for t in cells]
            if meta["type"] == "cell":
                r, c = (ORDINAL.index(w.strip("?,")) for w in q.split() if w.strip("?,")
                        in ORDINAL)
                assert a == names[r * 3 + c]
            else:
                target = q.removeprefix("<image>\nHow many ").removesuffix(" items are there?")
                assert a == str(names.count(target))
    assert kinds == {"cell", "count", "marked"}
    assert info["questions"] == pytest.approx({"cell": 1 / 3, "count": 1 / 3, "marked": 1 / 3})


def test_bad_question_spec_is_one_line(tmp_path):
    result = run_tfx("data", "fashion-mnist", "--out", str(tmp_path / "o"), "--questions",
                     "cell:0.5,colour", timeout=60)
    assert result.returncode == 2
    assert "'colour' is not one of cell, count, marked" in result.stderr.strip().splitlines()[-1]


def test_missing_source_is_one_line(tmp_path):
    result = run_tfx("data", "fashion-mnist", "--out", str(tmp_path / "o"), "--source",
                     str(tmp_path), timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("DataError:")
    assert "apt-get install dataset-fashion-mnist" in result.stderr


def z(a):
    a = np.asarray(a, float).ravel()
    return (a - a.mean()) / (a.std() + 1e-9)


def test_mixed_benchmark_answers_match_real_labels_and_splits_share_no_item(tmp_path):
    """Every answer recomputed from the question text and the real IDX labels of the items the
    sample names; every cell of the image is that item (shrunk back to 28 px); the red frame is
    in the asked cell; the four splits draw from disjoint items."""
    out = tmp_path / "mixed"
    result = run_tfx("data", "fashion-mnist", "--mixed", "--out", str(out), "--train", "80",
                     "--router", "40", "--calib", "40", "--eval", "60", "--per-shard", "30",
                     timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((out / "info.json").read_text())
    assert info["mixed"] and info["grids"] == [1, 2, 3, 4, 6]
    raw = {"train": read_split(Path(DEBIAN_DIR), "train"),
           "test": read_split(Path(DEBIAN_DIR), "eval")}
    used, sides, kinds = {}, set(), set()
    for split in ("train", "router", "calib", "eval"):
        images, labels = raw[info["splits"][split]["source"]]
        shards = sorted(str(p) for p in (out / split).glob("*.tar"))
        samples = list(wds.WebDataset(shards, shardshuffle=False))
        assert len(samples) == info["splits"][split]["samples"]
        used[split] = set()
        for s in samples:
            meta = json.loads(s["json"])
            q, a = (t["value"].removeprefix("<image>\n") for t in meta["conversations"])
            items = meta["items"]
            k = int(round(len(items) ** 0.5))
            assert k * k == len(items) and len(set(items)) == len(items)
            used[split] |= set(items)
            sides.add(k)
            kinds.add(meta["type"])
            names = [CLASSES[int(labels[i])] for i in items]
            rgb = Image.open(io.BytesIO(s["png"])).convert("RGB")
            assert rgb.size == (192, 192)
            small = np.asarray(rgb.resize((28 * k, 28 * k), Image.BOX)).astype(float)
            red = (small[..., 0] - small[..., 1]) > 150
            inner = slice(FRAME + 1, 28 - FRAME - 1)
            own = np.stack([z(images[i][inner, inner]) for i in items])
            for r in range(k):
                for c in range(k):
                    cell = small[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28, 1][inner, inner]
                    corr = own @ z(cell) / cell.size  # against every item of the sample
                    assert corr[r * k + c] > 0.75 and corr.argmax() == r * k + c, (
                        split, s["__key__"], r, c, corr)
            if meta["type"] == "cell":
                r, c = (ORDINAL.index(w.strip("?,")) for w in q.split() if w.strip("?,")
                        in ORDINAL)
                assert r < k and c < k and a == names[r * k + c] and not red.any()
            elif meta["type"] == "marked":
                ys, xs = np.nonzero(red)
                r, c = int(np.median(ys)) // 28, int(np.median(xs)) // 28
                assert q == "What is in the red box?" and a == names[r * k + c]
            else:
                target = q.removeprefix("How many ").removesuffix(" items are there?")
                assert target in CLASSES and a == str(names.count(target)) and not red.any()
    train_range = info["splits"]["train"]["items"]
    assert max(used["train"]) < train_range[1] <= min(used["router"] | used["calib"])
    assert not used["router"] & used["calib"]
    assert info["splits"]["eval"]["source"] == "test"
    assert sides == {1, 2, 3, 4, 6} and kinds == {"cell", "marked", "count"}


def test_mixed_with_a_fixed_grid_is_one_line(tmp_path):
    result = run_tfx("data", "fashion-mnist", "--mixed", "--grid", "3", "--out",
                     str(tmp_path / "o"), timeout=60)
    assert result.returncode == 2
    assert "drop --grid/--cell" in result.stderr.strip().splitlines()[-1]
