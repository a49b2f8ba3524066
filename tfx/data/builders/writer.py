"""Shards of a built data set: `n` (PNG, JSON) samples of one split, as every builder writes
them (`<split>/<split>-00000.tar`, keys `<split>0000000`, ...)."""

from __future__ import annotations

import io
import json
from pathlib import Path


def write_split(out: Path, split: str, n: int, per_shard: int, draw) -> list[str]:
    """`n` samples from `draw(i) -> (PIL image, meta)` into out/split/*.tar; returns their
    texts (for the tokenizer)."""
    import webdataset as wds

    texts = []
    (out / split).mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / split / f"{split}-%05d.tar"), maxcount=per_shard,
                         verbose=0) as sink:
        for i in range(n):
            image, meta = draw(i)
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            sink.write({"__key__": f"{split}{i:07d}", "png": buf.getvalue(),
                        "json": json.dumps(meta).encode()})
            texts += [t["value"].replace("<image>\n", "") for t in meta["conversations"]]
    return texts
