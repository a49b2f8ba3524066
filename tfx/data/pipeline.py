"""The assembled data pipelines: training stream per rank, and the one-pass eval reader.

Data flow: shards (per rank, endless) -> decode -> tokenize -> bucketing -> collate(N).
`TrainStream.next_batch(n)` is called `grad_accum` times per step with the step's N; each rank
gets exactly as many batches as it asks for, so no rank runs dry.
"""

from __future__ import annotations

from collections.abc import Iterator

from tfx.config.schema import RunConfig
from tfx.data.bucketing import LengthBucketer
from tfx.data.collate import TextSample, collate
from tfx.data.decode import Decoded, SkipCounter, decode_sample, image_to_tensor
from tfx.data.shards import ShardStream, expand_shards, iter_tar
from tfx.data.tokenizer import IGNORE, IMAGE_TAG


def to_text_sample(d: Decoded, tok, image_size: int, family: str, max_text: int,
                   skips: SkipCounter, shard: str | None = None) -> TextSample | None:
    turns = [dict(t) for t in d.turns]
    has_image = d.image is not None
    tags = sum(t["value"].count(IMAGE_TAG) for t in turns)
    if has_image and tags == 0:  # LLaVA convention: the image goes before the first question
        turns[0]["value"] = IMAGE_TAG + "\n" + turns[0]["value"]
    if tags > 1 or (not has_image and tags):
        skips(f"{tags} {IMAGE_TAG} tags for {int(has_image)} image", key=d.key, shard=shard)
        return None
    ids, labels = tok.encode_conversation(turns)
    if len(ids) > max_text:
        skips(f"over-long: {len(ids)} text tokens > data.max_text_tokens={max_text}",
              key=d.key, shard=shard)
        return None
    if all(label == IGNORE for label in labels):
        skips("no supervised token", key=d.key, shard=shard)
        return None
    return TextSample(key=d.key, pixels=image_to_tensor(d.image, image_size, family),
                      has_image=has_image, ids=ids, labels=labels, meta=d.meta)


class TrainStream:
    """One rank's training batches with an exactly restorable position."""

    def __init__(self, cfg: RunConfig, tok, *, rank: int, world: int):
        d = cfg.data
        self.cfg, self.tok = cfg, tok
        self.skips = SkipCounter(d.max_consecutive_errors, d.strict)
        self.shards = ShardStream(expand_shards(d.train, "data.train"), rank=rank, world=world,
                                  seed=cfg.train.seed, on_error=self.skips)
        self.bucketer = LengthBucketer(
            open_source=self._samples, snapshot=self._snapshot, restore=self._restore,
            batch_size=d.micro_batch_size, bucket_batches=d.bucket_batches,
            seed=cfg.train.seed, rank=rank)

    def _samples(self) -> Iterator[TextSample]:
        v = self.cfg.model.vision
        for raw in self.shards:
            decoded = decode_sample(raw, self.skips)
            if decoded is None:
                continue
            sample = to_text_sample(decoded, self.tok, v.image_size, v.family,
                                    self.cfg.data.max_text_tokens, self.skips, raw["__shard__"])
            if sample is not None:
                yield sample

    def _snapshot(self) -> dict:
        return {"shards": self.shards.state_dict(), "skips": self.skips.state_dict()}

    def _restore(self, state: dict) -> None:
        self.shards.load_state_dict(state["shards"])
        self.skips.load_state_dict(state["skips"])

    def next_batch(self, n_visual: int) -> dict:
        return collate(self.bucketer.next_batch(), n_visual, self.tok)

    def state_dict(self) -> dict:
        return {"bucketer": self.bucketer.state_dict(), "skipped": self.skips.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.bucketer.load_state_dict(state["bucketer"])


def read_eval_samples(spec, cfg: RunConfig, tok, skips: SkipCounter) -> list[TextSample]:
    """Every good sample of the eval shards, once, sorted by length (for low padding)."""
    v = cfg.model.vision
    out = []
    for url in expand_shards(spec, "data.eval"):
        for raw in iter_tar(url, skips):
            decoded = decode_sample(raw, skips)
            sample = decoded and to_text_sample(decoded, tok, v.image_size, v.family,
                                                cfg.data.max_text_tokens, skips, url)
            if sample:
                out.append(sample)
    return sorted(out, key=lambda s: s.text_len)
