"""Shard listing and the per-rank raw sample stream (the first data stage).

Each reader (one per rank, or one per DataLoader worker of each rank: reader = rank * workers +
worker) reads its own shards, `order[reader::readers]` of an order re-shuffled every epoch from
(seed, epoch), and the stream never ends: it moves to the next epoch instead, so no rank runs dry
before another (a rank that stops early hangs ZeRO-3 collectives). The position is
(epoch, shard index, sample index) and is restored without reading the skipped shards.
"""

from __future__ import annotations

import glob
import os
import tarfile
from collections.abc import Iterator

import numpy as np

from tfx.errors import ConfigError, DataError


def expand_shards(spec: str | tuple[str, ...] | list[str], key: str = "data") -> list[str]:
    """A folder (its *.tar), a brace pattern (`a-{000..009}.tar`), a glob, or a list of those."""
    from braceexpand import braceexpand

    items = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, "*.tar")))
            if not found:
                raise ConfigError(f"{key}: folder {item} holds no .tar shards")
            urls += found
            continue
        for url in braceexpand(item):
            matches = sorted(glob.glob(url)) if any(c in url for c in "*?[") else [url]
            if not matches or not all(os.path.isfile(m) for m in matches):
                raise ConfigError(f"{key}: shard {url} not found")
            urls += matches
    return urls


def shard_order(n_shards: int, seed: int, epoch: int) -> list[int]:
    """The epoch's shard permutation; identical on every rank."""
    return np.random.default_rng([seed, epoch, 7]).permutation(n_shards).tolist()


# What a damaged shard raises (bad headers, a cut-off member, an empty file): skipped and counted.
# Anything else from reading, above all OSError (EIO, a shard deleted or unreadable), is the
# storage's fault, not the sample's: it stops the run, naming the shard.
TAR_DAMAGE = (tarfile.TarError, EOFError, ValueError, KeyError, UnicodeDecodeError)


def iter_tar(path: str, on_error) -> Iterator[dict]:
    """WebDataset samples of one shard; tar damage is reported through `on_error`, not raised;
    system errors raise DataError."""
    import webdataset as wds

    def handler(exn: Exception) -> bool:
        if isinstance(exn, DataError):  # strict mode's own error, back through webdataset, which
            raise DataError(exn.args[0]) from None  # appended (stream, url) to its args
        if not isinstance(exn, TAR_DAMAGE):
            raise DataError(f"I/O error reading shard {path}: {type(exn).__name__}: "
                            f"{str(exn).splitlines()[0] if str(exn) else ''} (a storage problem, "
                            f"not a bad sample: fix it and --resume)") from None
        on_error(f"{path}: damaged tar ({type(exn).__name__}: {exn})", key=None, shard=path)
        return True  # keep going with whatever members are still readable

    pipeline = wds.DataPipeline(wds.SimpleShardList([path]),
                                wds.tarfile_to_samples(handler=handler))
    for sample in pipeline:
        sample["__shard__"] = path
        yield sample


def check_shard_count(urls: list[str], readers: int) -> None:
    if len(urls) < readers:
        raise DataError(f"{len(urls)} shards for {readers} readers (ranks x data.num_workers): "
                        "every reader needs at least one shard; write more, smaller shards")


class ShardStream:
    """Endless raw samples of one reader, with an exactly restorable position."""

    def __init__(self, urls: list[str], *, reader: int, readers: int, seed: int, on_error):
        check_shard_count(urls, readers)
        self.urls, self.reader, self.readers, self.seed = urls, reader, readers, seed
        self.on_error = on_error
        self.epoch, self.shard_idx, self.sample_idx = 0, 0, 0

    def my_shards(self, epoch: int) -> list[str]:
        order = shard_order(len(self.urls), self.seed, epoch)
        return [self.urls[i] for i in order[self.reader::self.readers]]

    def __iter__(self) -> Iterator[dict]:
        while True:
            shards = self.my_shards(self.epoch)
            got_any = False
            while self.shard_idx < len(shards):
                skip = self.sample_idx
                for i, sample in enumerate(iter_tar(shards[self.shard_idx], self.on_error)):
                    got_any = True
                    if i < skip:
                        continue
                    self.sample_idx = i + 1
                    yield sample
                self.shard_idx, self.sample_idx = self.shard_idx + 1, 0
            if not got_any and self.shard_idx == len(shards):
                raise DataError(f"reader {self.reader}: its shards {shards} hold no readable "
                                f"sample")
            self.epoch, self.shard_idx, self.sample_idx = self.epoch + 1, 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "shard_idx": self.shard_idx, "sample_idx": self.sample_idx}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.shard_idx = state["epoch"], state["shard_idx"]
        self.sample_idx = state["sample_idx"]
