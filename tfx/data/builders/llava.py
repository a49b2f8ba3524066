"""`tfx data llava`: LLaVA-format JSON/JSONL + an image folder -> WebDataset shards + index.json.

Input records: `{"id", "image" (optional: text-only; a file name, or a list of them for several
images), "conversations": [{"from": "human"|"gpt", "value"}]}` with one `<image>` tag per image
where it goes (interleaved; one image may go untagged, before the first question). Records are
grouped into shards of at most `max_count` samples and `max_bytes` of image data, in input
order, then the shards are written by a pool of processes (deterministic names
`{prefix}-000000.tar`, ...). Each sample holds the image files' bytes (`jpg`, or `0.jpg`,
`1.png`, ... for several) and the record as JSON. A record whose image is missing, or whose
conversation does not tokenise, is skipped and counted, never written. `index.json` lists per
shard its sample count, each sample's exact text-token length (with the given tokenizer, one
marker per image) and its image count, so a run knows its epoch length and the exact length
mix at any N (text + images x (N + 1)) without decoding.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tfx.data.decode import IMAGE_EXTS
from tfx.errors import DataError

INDEX = "index.json"


def read_records(path: str | Path) -> list[dict]:
    text = Path(path).read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not JSON or JSONL ({e})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path}: expected a list of objects")
    return records


def sample_key(record: dict, i: int) -> str:
    """WebDataset splits keys at the first dot: keep ids readable but dot-free and unique."""
    raw = str(record.get("id", i))
    return f"{i:08d}_" + re.sub(r"[^0-9A-Za-z_-]", "_", raw)[:64]


def image_names(record: dict) -> list:
    """`image`: absent (text-only), one file name, or a list of them (several images, one
    `<image>` tag each where it goes in the text)."""
    image = record.get("image")
    if not image:
        return []
    return list(image) if isinstance(image, list) else [image]


def plan_shards(records: list[dict], images: Path, max_count: int, max_bytes: int
                ) -> list[list[int]]:
    shards, current, size = [], [], 0
    for i, record in enumerate(records):
        nbytes = sum((images / name).stat().st_size for name in image_names(record)
                     if isinstance(name, str) and (images / name).is_file())
        if current and (len(current) >= max_count or size + nbytes > max_bytes):
            shards.append(current)
            current, size = [], 0
        current.append(i)
        size += nbytes
    return shards + [current] if current else shards


def skip_reason(e: Exception) -> str:
    """The category a skipped record is counted under."""
    if isinstance(e, FileNotFoundError):
        return "image not found"
    if isinstance(e, OSError):
        return "image unreadable"
    if isinstance(e, (KeyError, TypeError)):
        return "record without conversations"
    if "extension" in str(e):
        return "image type not supported"
    if "chat template" in str(e):
        return "chat template"
    return "image tags do not match the images"


def write_shard(job: tuple) -> dict:
    """One shard (in a worker process): returns its index entry and its skips."""
    import webdataset as wds

    from tfx.data.tokenizer import encode_with_image, load_tokenizer

    path, indices, records, images, tokenizer = job
    tok = load_tokenizer(tokenizer)
    lengths, counts, keys, skipped = [], [], [], []
    with wds.TarWriter(str(path)) as sink:
        for i, record in zip(indices, records):
            key = sample_key(record, i)
            try:
                names = image_names(record)
                turns = record["conversations"]
                if not isinstance(turns, list) or not all(
                        isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
                    raise TypeError("conversations must be a list of {from, value}")
                ids, _ = encode_with_image(tok, turns, len(names))
                sample = {"__key__": key, "json": json.dumps(record).encode()}
                for k, name in enumerate(names):
                    if not isinstance(name, str):
                        raise TypeError(f"image {name!r}: not a file name")
                    ext = Path(name).suffix.lower().lstrip(".")
                    if ext not in IMAGE_EXTS:
                        raise ValueError(f"image {name}: extension not in {IMAGE_EXTS}")
                    # one image: `jpg`; several: `0.jpg`, `1.png`, ... (tfx.data.decode)
                    sample[ext if len(names) == 1 else f"{k}.{ext}"] = \
                        (images / name).read_bytes()
            except (KeyError, TypeError, ValueError, OSError) as e:
                skipped.append((skip_reason(e), f"record {i} ({record.get('id')}): "
                                f"{type(e).__name__}: {e}"))
                continue
            sink.write(sample)
            lengths.append(len(ids))
            counts.append(len(names))
            keys.append(key)
    return {"name": path.name, "samples": len(keys), "lengths": lengths, "images": counts,
            "keys": keys, "skipped": skipped}


def build_llava(json_path: str | Path, images: str | Path, out: str | Path, *, tokenizer: str,
                max_count: int = 1000, max_bytes: int = 1 << 30, workers: int = 2,
                prefix: str = "shard") -> dict:
    images, out = Path(images), Path(out)
    if not images.is_dir():
        raise DataError(f"--images {images}: not a folder")
    if not Path(tokenizer).exists():
        raise DataError(f"--tokenizer {tokenizer}: not found")
    from tfx.data.tokenizer import load_tokenizer

    load_tokenizer(tokenizer)  # a template tfx cannot label fails here, once, in one line
    records = read_records(json_path)
    plan = plan_shards(records, images, max_count, max_bytes)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(out / f"{prefix}-{k:06d}.tar", idx, [records[i] for i in idx], images, tokenizer)
            for k, idx in enumerate(plan)]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            entries = list(pool.map(write_shard, jobs))
    else:
        entries = [write_shard(job) for job in jobs]
    skipped = [s for e in entries for s in e.pop("skipped")]
    by_reason: dict[str, int] = {}
    for reason, _ in skipped:
        by_reason[reason] = by_reason.get(reason, 0) + 1
    samples = sum(e["samples"] for e in entries)
    if samples == 0:
        for e in entries:
            (out / e["name"]).unlink(missing_ok=True)
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(by_reason.items()))
        first = skipped[0][1] if skipped else "no records"
        raise DataError(f"no sample written: all {len(records)} records skipped ({reasons}); "
                        f"first: {first}")
    index = {"source": str(json_path), "tokenizer": str(tokenizer), "samples": samples,
             "skipped": len(skipped), "skipped_by_reason": by_reason, "shards": entries}
    write_index(out, index)
    return {"index": index, "skipped": [line for _, line in skipped]}


def write_index(folder: Path, index: dict) -> None:
    tmp = folder / f".{INDEX}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(index))
    tmp.replace(folder / INDEX)


def read_index(folder: str | Path) -> dict | None:
    path = Path(folder) / INDEX
    return json.loads(path.read_text()) if path.is_file() else None
