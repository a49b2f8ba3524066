"""`tfx bench data`: padding of bucketed vs random batching, and loader throughput.

1. Padding: one stream of samples with a realistic length mix, batched at each N in random
   order (the baseline), in length-bucketed megabatches of 16, 64 and 128 batches, and bucketed
   with a token budget. Lengths follow a
   mix modelled on LLaVA-1.5's instruction data: 60% short VQA (15-60 text tokens), 30%
   conversations (80-400), 10% long answers (400-1500). Padding = pad tokens / batch tokens.
2. Loader: samples/s of the full tfx path (JPEG decode + resize + normalise + tokenise +
   bucketing) in-process and with W DataLoader workers, against plain PIL decoding of the same
   JPEG bytes, on shards written by `tfx data llava` from generated 640x480 JPEGs (COCO's usual
   size; tfx decodes them at 320x240 in JPEG draft mode, the bare decode at full size).
3. Packing: real tokens/s of a forward + backward of the same samples and model, padded vs
   bucketed vs packed, against the padding-free ceiling (`tfx.bench.packing`).
Writes padding.csv, loader.csv, packing.csv and data.png under --out.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tfx.data.bucketing import LengthBucketer

LENGTH_MIX = ((0.6, 15, 60), (0.3, 80, 400), (0.1, 400, 1500))  # (share, low, high) tokens


@dataclass
class LenSample:
    text_len: int
    has_image: bool = True

    def total_len(self, n_visual: int) -> int:
        return self.text_len + n_visual + 1


def length_stream(seed: int):
    rng = np.random.default_rng(seed)
    shares = [m[0] for m in LENGTH_MIX]
    while True:
        _, lo, hi = LENGTH_MIX[rng.choice(len(LENGTH_MIX), p=shares)]
        yield LenSample(int(rng.integers(lo, hi + 1)))


def padding(n_visual: int, batch: int, bucket_batches: int, budget: int, steps: int) -> dict:
    stream = length_stream(0)
    bucketer = LengthBucketer(open_source=lambda: stream, snapshot=dict, restore=lambda s: None,
                              batch_size=batch, bucket_batches=bucket_batches, seed=0, reader=0,
                              token_budget=budget,
                              budget_length=lambda s: s.total_len(n_visual))
    real = total = rows = 0
    for _ in range(steps):
        lens = [s.total_len(n_visual) for s in bucketer.next_batch()]
        real, total, rows = real + sum(lens), total + max(lens) * len(lens), rows + len(lens)
    return {"padding": 1 - real / total, "mean_batch": rows / steps}


def padding_table(steps: int) -> list[dict]:
    rows = []
    for n in (64, 144, 256):
        for name, bb, budget in (("random", 1, 0), ("bucketed", 16, 0), ("bucketed", 64, 0),
                                 ("bucketed", 128, 0), ("bucketed+budget", 128, 8 * (512 + n))):
            r = padding(n, 8, bb, budget, steps)
            rows.append({"N": n, "batching": name, "bucket_batches": bb,
                         "padding_pct": round(100 * r["padding"], 2),
                         "mean_batch": round(r["mean_batch"], 2)})
    return rows


def make_llava_set(folder: Path, n: int) -> tuple[Path, Path]:
    """n generated 640x480 JPEGs + LLaVA JSON -> shards via `tfx data llava`; returns
    (shards folder, tokenizer)."""
    from PIL import Image

    from tfx.data.builders.llava import build_llava
    from tfx.data.tokenizer import train_sentencepiece

    rng = np.random.default_rng(0)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    records, texts = [], []
    for i in range(n):
        base = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)  # smooth, photo-like blocks
        img = Image.fromarray(base).resize((640, 480), Image.BICUBIC)  # COCO's usual size
        img.save(images / f"{i}.jpg", quality=90)
        q = " ".join(rng.choice(["what", "is", "the", "color", "of", "this", "item", "shown",
                                 "in", "picture", "describe", "it"], size=int(rng.integers(4, 30))))
        a = " ".join(rng.choice(["a", "red", "shirt", "on", "blue", "ground", "small", "bag"],
                                size=int(rng.integers(1, 40))))
        records.append({"id": str(i), "image": f"{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]})
        texts += [q, a]
    tok = train_sentencepiece(texts, folder / "tok", 128)
    (folder / "data.json").write_text(json.dumps(records))
    build_llava(folder / "data.json", images, folder / "shards", tokenizer=str(tok),
                max_count=max(4, n // 8), workers=2)
    return folder / "shards", tok


def loader_table(folder: Path, n: int, workers: list[int]) -> list[dict]:
    from PIL import Image

    from tfx.config.load import build
    from tfx.config.schema import RunConfig
    from tfx.data.pipeline import TrainStream
    from tfx.data.shards import expand_shards, iter_tar
    from tfx.data.tokenizer import load_tokenizer

    shards, tok_path = make_llava_set(folder, n)
    t0 = time.perf_counter()
    count = 0
    for url in expand_shards(str(shards)):
        for raw in iter_tar(url, on_error=print):
            Image.open(io.BytesIO(raw["jpg"])).convert("RGB").load()
            count += 1
    rows = [{"loader": "plain PIL decode", "workers": 1,
             "samples_per_s": round(count / (time.perf_counter() - t0), 1)}]
    t0, count = time.perf_counter(), 0
    for url in expand_shards(str(shards)):
        for raw in iter_tar(url, on_error=print):
            image = Image.open(io.BytesIO(raw["jpg"]))
            image.draft("RGB", (224, 224))
            image.convert("RGB").load()
            count += 1
    rows.append({"loader": "plain PIL decode, draft mode", "workers": 1,
                 "samples_per_s": round(count / (time.perf_counter() - t0), 1)})
    tok = load_tokenizer(tok_path)
    for w in workers:
        raw = {"model": {"vision": {"image_size": 224, "patch_size": 16},
                         "default_visual_tokens": 64},
               "tokens": {"mode": "fixed", "counts": [64], "probs": [1.0]},
               "data": {"train": str(shards), "tokenizer": str(tok_path), "num_workers": w,
                        "micro_batch_size": 16, "bucket_batches": 8, "max_text_tokens": 512},
               "train": {"max_steps": 1, "output_dir": str(folder / "unused")}}
        cfg = build(RunConfig, raw, "").validate()
        stream = TrainStream(cfg, tok, rank=0, world=1)
        stream.next_samples()  # start-up (worker fork, first megabatch) is not timed
        t0, got = time.perf_counter(), 0
        while got < n:
            got += len(stream.next_samples())
        rate = got / (time.perf_counter() - t0)
        rows.append({"loader": "tfx (decode+resize+tokenise+bucket)", "workers": w,
                     "samples_per_s": round(rate, 1)})
    for r in rows:
        r["per_worker"] = round(r["samples_per_s"] / max(r["workers"], 1), 1)
    return rows


def format_rows(title: str, rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = [f"\n{title}", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def plot(pad: list[dict], load: list[dict], path: Path) -> None:
    from tfx.eval.plots import pyplot

    plt = pyplot()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys((r["batching"], r["bucket_batches"]) for r in pad):
        rows = [r for r in pad if (r["batching"], r["bucket_batches"]) == name]
        a.plot([r["N"] for r in rows], [r["padding_pct"] for r in rows], marker="o",
               label=f"{name[0]} x{name[1]}")
    a.set_xlabel("visual tokens N")
    a.set_ylabel("padded tokens, %")
    a.legend()
    labels = [f"{r['loader'].split(' (')[0].replace('plain PIL decode', 'PIL')} w={r['workers']}"
              for r in load]
    b.bar(labels, [r["samples_per_s"] for r in load])
    b.set_ylabel("samples/s")
    fig.suptitle(f"data pipeline on {platform.node()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main(argv=None) -> str:
    """Runs the benchmark; returns the report (tables and the files written)."""
    import os
    import tempfile

    p = argparse.ArgumentParser(prog="tfx bench data")
    p.add_argument("--out", default="bench_out/data")
    p.add_argument("--steps", type=int, default=400, help="batches per padding measurement")
    p.add_argument("--samples", type=int, default=256, help="images for the loader benchmark")
    p.add_argument("--workers", default="0,1,2", help="DataLoader workers to time")
    p.add_argument("--pack-samples", type=int, default=64,
                   help="samples for the packing benchmark (0: leave it out)")
    p.add_argument("--pack-reps", type=int, default=3,
                   help="timed rounds (arrangements take turns; each keeps its fastest)")
    p.add_argument("--pack-row-tokens", type=int, default=1536,
                   help="packed row length (the longest sample of the mix is 1500)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pad = padding_table(args.steps)
    report = [f"device: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              format_rows("padding: same length stream, batch 8; bucket_batches = megabatch in "
                          "batches; budget = 8 x (512 + N) tokens", pad)]
    with tempfile.TemporaryDirectory() as tmp:
        load = loader_table(Path(tmp), args.samples,
                            [int(w) for w in args.workers.split(",")])
    report.append(format_rows(f"loader: {args.samples} JPEGs of 640x480 -> 224 px", load))
    write_csv(pad, out / "padding.csv")
    write_csv(load, out / "loader.csv")
    written = ["padding.csv", "loader.csv"]
    if args.pack_samples:
        from tfx.bench.packing import packing_table

        pack = packing_table(args.pack_samples, args.pack_reps, args.pack_row_tokens)
        report.append(format_rows(f"packing: {args.pack_samples} text samples of the length "
                                  f"mix, one forward + backward of a 2-layer Qwen2 (256 wide, "
                                  f"SDPA, fp32), rows of {args.pack_row_tokens}; ceiling = "
                                  f"padded batches' rate counting pad as real", pack))
        write_csv(pack, out / "packing.csv")
        written.append("packing.csv")
    plot(pad, load, out / "data.png")
    report.append(f"wrote {out}/{', '.join(written)}, data.png")
    return "\n".join(report)
