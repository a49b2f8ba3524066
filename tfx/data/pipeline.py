"""The assembled data pipelines: training stream per rank, and the one-pass eval reader.

Data flow: shards (per rank, endless) -> decode -> tokenize -> bucketing -> collate(N).
`TrainStream.next_batch(n)` is called `grad_accum` times per step with the step's N; each rank
gets exactly as many batches as it asks for, so no rank runs dry. Readers (one per rank, or one
per worker of each rank) each own a disjoint part of the shards.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from tfx.config.schema import RunConfig, TilesConfig
from tfx.data.bucketing import LengthBucketer
from tfx.data.collate import TextSample, collate
from tfx.data.decode import Decoded, SkipCounter, decode_sample, image_to_uint8
from tfx.data.packing import collate_packed
from tfx.data.shards import ShardStream, check_shard_count, expand_shards, iter_tar
from tfx.data.tokenizer import IGNORE, encode_with_image
from tfx.errors import DataError
from tfx.model.pixels import tile_image


def to_text_sample(d: Decoded, tok, image_size: int, family: str, max_text: int,
                   skips: SkipCounter, shard: str | None = None,
                   tiles: TilesConfig | None = None) -> TextSample | None:
    """`tiles` (max > 1): each image becomes its tiles (and thumbnail), each tile an image of
    its own with its own marker, in the order `tfx.model.pixels.tile_image` gives."""
    try:
        ids, labels = encode_with_image(tok, d.turns, len(d.images))
    except ValueError as e:
        skips(str(e), key=d.key, shard=shard)
        return None
    if len(ids) > max_text:
        skips(f"over-long: {len(ids)} text tokens > data.max_text_tokens={max_text}",
              key=d.key, shard=shard)
        return None
    if all(label == IGNORE for label in labels):
        skips("no supervised token", key=d.key, shard=shard)
        return None
    pictures = d.images
    if tiles is not None and tiles.max > 1 and d.images:
        cut = [tile_image(im, tiles.size or image_size, tiles.max, tiles.thumbnail)
               for im in d.images]
        ids, labels = repeat_markers(ids, labels, tok.image_id, [len(c) for c in cut])
        pictures = [tile for c in cut for tile in c]
    pixels = torch.stack([image_to_uint8(im, image_size) for im in pictures or [None]])
    return TextSample(key=d.key, pixels=pixels, family=family, images=len(pictures), ids=ids,
                      labels=labels, meta=d.meta)


def repeat_markers(ids: list[int], labels: list[int], marker_id: int, times: list[int]
                   ) -> tuple[list[int], list[int]]:
    """The j-th image marker -> `times[j]` markers (one per tile)."""
    out_ids, out_labels, j = [], [], 0
    for i, lab in zip(ids, labels):
        k = 1
        if i == marker_id:
            k, j = times[j], j + 1
        out_ids += [i] * k
        out_labels += [lab] * k
    return out_ids, out_labels


def draft_size(cfg: RunConfig) -> int | None:
    """The side JPEGs may be decoded down to: the tower's input; none when tiling (tiles are
    cut from the full-size decode, as the exported processor does)."""
    return cfg.model.vision.image_size if cfg.data.tiles.max <= 1 else None


def row_tokens(cfg: RunConfig) -> int:
    """The packed row length: `data.pack_tokens`, else the longest sample at the largest N."""
    d = cfg.data
    return d.pack_tokens or d.max_text_tokens + max(cfg.tokens.counts) + 2


class ReaderStream:
    """One reader's bucketed lists of samples, with an exactly restorable position."""

    def __init__(self, cfg: RunConfig, tok, *, reader: int, readers: int):
        d = cfg.data
        self.cfg, self.tok = cfg, tok
        self.skips = SkipCounter(d.max_consecutive_errors, d.strict)
        self.shards = ShardStream(expand_shards(d.train, "data.train"), reader=reader,
                                  readers=readers, seed=cfg.train.seed, on_error=self.skips)
        largest_n = max(cfg.tokens.counts)
        self.bucketer = LengthBucketer(
            open_source=self._samples, snapshot=self._snapshot, restore=self._restore,
            batch_size=d.micro_batch_size, bucket_batches=d.bucket_batches,
            seed=cfg.train.seed, reader=reader, token_budget=d.token_budget,
            budget_length=lambda s: s.total_len(largest_n),
            pack_tokens=row_tokens(cfg) if d.packing else 0)

    def _samples(self) -> Iterator[TextSample]:
        v = self.cfg.model.vision
        for raw in self.shards:
            tiles = self.cfg.data.tiles
            decoded = decode_sample(raw, self.skips, draft_size(self.cfg))
            if decoded is None:
                continue
            sample = to_text_sample(decoded, self.tok, v.image_size, v.family,
                                    self.cfg.data.max_text_tokens, self.skips, raw["__shard__"],
                                    tiles)
            if sample is not None:
                self.skips.ok()
                yield sample

    def _snapshot(self) -> dict:
        return {"shards": self.shards.state_dict(), "skips": self.skips.state_dict()}

    def _restore(self, state: dict) -> None:
        self.shards.load_state_dict(state["shards"])
        self.skips.load_state_dict(state["skips"])

    def next_samples(self) -> list[TextSample]:
        return self.bucketer.next_batch()

    def state_dict(self) -> dict:
        return {"bucketer": self.bucketer.state_dict(), "skipped": self.skips.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.bucketer.load_state_dict(state["bucketer"])
        self.skips.skipped = state["skipped"]


def _as_is(item):
    return item


def _worker_init(_worker_id: int) -> None:
    """Loader workers leave Ctrl-C and SIGUSR1 to the training process, which stops at a step
    boundary (a terminal's Ctrl-C reaches the whole process group)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class _WorkerBatches(torch.utils.data.IterableDataset):
    """Inside DataLoader worker w: the reader of stream (w + offset) % W, endless."""

    def __init__(self, cfg: RunConfig, tok, rank: int, world: int, states: list, offset: int):
        super().__init__()
        self.cfg, self.tok, self.rank, self.world = cfg, tok, rank, world
        self.states, self.offset = states, offset

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers = info.num_workers
        stream = (info.id + self.offset) % workers
        reader = ReaderStream(self.cfg, self.tok, reader=self.rank * workers + stream,
                              readers=self.world * workers)
        if self.states[stream] is not None:
            reader.load_state_dict(self.states[stream])
        while True:
            samples = reader.next_samples()
            yield stream, samples, reader.state_dict()


class TrainStream:
    """One rank's training batches at the step's N, read in-process (`data.num_workers=0`) or
    by W DataLoader workers. Workers hand out batches round-robin, so batch c comes from stream
    c % W; each batch carries its stream's position after it. The state is the count consumed
    plus, per stream, the position after its last consumed batch: prefetched batches are not
    lost, and a restored loader starts at stream c % W, so the sequence continues exactly."""

    def __init__(self, cfg: RunConfig, tok, *, rank: int, world: int):
        self.cfg, self.tok, self.rank, self.world = cfg, tok, rank, world
        self.workers = cfg.data.num_workers
        self.consumed = 0
        self.states: list[dict | None] = [None] * max(self.workers, 1)
        self.reader = None if self.workers else ReaderStream(cfg, tok, reader=rank,
                                                             readers=world)
        self._it = None
        if self.workers:  # fail here, not in a worker, when there are too few shards
            check_shard_count(expand_shards(cfg.data.train, "data.train"), world * self.workers)

    def _loader(self):
        dataset = _WorkerBatches(self.cfg, self.tok, self.rank, self.world, list(self.states),
                                 self.consumed % self.workers)
        return iter(torch.utils.data.DataLoader(dataset, batch_size=None,
                                                num_workers=self.workers, collate_fn=_as_is,
                                                prefetch_factor=2,
                                                worker_init_fn=_worker_init))

    def next_samples(self) -> list[TextSample]:
        if self.reader is not None:
            samples = self.reader.next_samples()
        else:
            if self._it is None:
                self._it = self._loader()
            try:
                stream, samples, state = next(self._it)
            except DataError as e:  # re-raised from a worker with its traceback: keep the cause
                raise DataError(str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1]) \
                    from None
            self.states[stream] = state
        self.consumed += 1
        return samples

    def collate(self, samples: list[TextSample], n_visual: int) -> dict:
        """A micro-batch at the step's N: packed rows with `data.packing`, else one sample a
        row."""
        if self.cfg.data.packing:
            return collate_packed(samples, n_visual, self.tok, row_tokens(self.cfg))
        return collate(samples, n_visual, self.tok)

    def next_batch(self, n_visual: int) -> dict:
        return self.collate(self.next_samples(), n_visual)

    @property
    def skipped(self) -> int:
        if self.reader is not None:
            return self.reader.skips.skipped
        return sum(s["skipped"] for s in self.states if s is not None)

    def state_dict(self) -> dict:
        streams = [self.reader.state_dict()] if self.reader is not None else list(self.states)
        return {"consumed": self.consumed, "workers": self.workers, "streams": streams}

    def load_state_dict(self, state: dict) -> None:
        if state.get("workers", 0) != self.workers:
            raise DataError(f"the checkpoint's data position was saved with data.num_workers="
                            f"{state.get('workers', 0)}; resume with the same value "
                            f"(now {self.workers})")
        self.consumed, self._it = state["consumed"], None
        if self.reader is not None:
            self.reader.load_state_dict(state["streams"][0])
        else:
            self.states = list(state["streams"])


def read_eval_samples(spec, cfg: RunConfig, tok, skips: SkipCounter) -> list[TextSample]:
    """Every good sample of the eval shards, once, sorted by length (for low padding)."""
    v = cfg.model.vision
    out = []
    for url in expand_shards(spec, "data.eval"):
        for raw in iter_tar(url, skips):
            decoded = decode_sample(raw, skips, draft_size(cfg))
            sample = decoded and to_text_sample(decoded, tok, v.image_size, v.family,
                                                cfg.data.max_text_tokens, skips, url,
                                                cfg.data.tiles)
            if sample:
                skips.ok()
                out.append(sample)
    return sorted(out, key=lambda s: s.text_len)
