"""Data stages: shard stream, bad samples, bucketing padding, exact restore, collate."""

import io
import json
import tarfile

import pytest
import yaml

from conftest import tiny_config_yaml
from tfx.config.load import build
from tfx.config.schema import RunConfig
from tfx.data.collate import collate
from tfx.data.pipeline import TrainStream
from tfx.data.shards import ShardStream, expand_shards
from tfx.data.tokenizer import IGNORE, load_tokenizer
from tfx.errors import DataError


def run_config(synth, tmp_path, **data) -> RunConfig:
    raw = yaml.safe_load(tiny_config_yaml(synth, tmp_path / "out"))
    raw["data"].update(data)
    return build(RunConfig, raw, "").validate()


def test_every_rank_gets_its_own_shards_and_never_runs_dry(synth_dir):
    urls = expand_shards(str(synth_dir / "train"))
    for r in range(3):  # 8 shards of 48 over 3 ranks: uneven, yet every stream keeps going
        stream = ShardStream(urls, rank=r, world=3, seed=0, on_error=print)
        it = iter(stream)
        keys = [next(it)["__key__"] for _ in range(500)]  # more than one epoch of this rank
        assert len(keys) == 500 and stream.epoch >= 1
    first_epoch = [ShardStream(urls, rank=r, world=3, seed=0, on_error=print).my_shards(0)
                   for r in range(3)]
    assert sorted(sum(first_epoch, [])) == sorted(urls)  # a partition of the shards


def test_too_few_shards_is_a_clear_error(synth_dir):
    urls = expand_shards(str(synth_dir / "train"))[:1]
    with pytest.raises(DataError, match="1 shards for 2 ranks"):
        ShardStream(urls, rank=0, world=2, seed=0, on_error=print)


def padding_fraction(stream: TrainStream, steps: int, n: int) -> float:
    real = padded = 0
    for _ in range(steps):
        b = stream.next_batch(n)
        real, padded = real + b["real_tokens"], padded + b["padded_tokens"]
    return padded / (real + padded)


def test_bucketing_reduces_padding(synth_dir, mixed_len_dir, tmp_path):
    tok = load_tokenizer(synth_dir / "tokenizer.model")
    train = str(mixed_len_dir)
    plain = TrainStream(run_config(synth_dir, tmp_path, train=train, bucket_batches=1), tok,
                        rank=0, world=1)
    bucketed = TrainStream(run_config(synth_dir, tmp_path, train=train, bucket_batches=8), tok,
                           rank=0, world=1)
    p_plain, p_bucket = padding_fraction(plain, 64, 16), padding_fraction(bucketed, 64, 16)
    print(f"\npadding fraction on the same stream: unbucketed {p_plain:.2%}, "
          f"bucketed {p_bucket:.2%}")
    assert p_bucket < p_plain / 2


def test_restore_reproduces_the_stream_exactly(synth_dir, tmp_path):
    tok = load_tokenizer(synth_dir / "tokenizer.model")
    cfg = run_config(synth_dir, tmp_path, bucket_batches=4)
    straight = TrainStream(cfg, tok, rank=1, world=2)
    keys = [straight.next_batch(16)["keys"] for _ in range(30)]
    first = TrainStream(cfg, tok, rank=1, world=2)
    for _ in range(13):
        first.next_batch(16)
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
    resumed = TrainStream(cfg, tok, rank=1, world=2)
    resumed.load_state_dict(state)
    assert [resumed.next_batch(16)["keys"] for _ in range(17)] == keys[13:]


def damaged_shard(path, good_pngs):
    """Good samples mixed with each kind of damage."""
    with tarfile.open(path, "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        conv = {"conversations": [{"from": "human", "value": "<image>\nHow many red cells "
                                   "are there?"}, {"from": "gpt", "value": "2"}]}
        for i, png in enumerate(good_pngs):
            add(f"good{i}.png", png)
            add(f"good{i}.json", json.dumps(conv).encode())
        add("badimg.png", b"\x89PNG not really")
        add("badimg.json", json.dumps(conv).encode())
        add("badjson.png", good_pngs[0])
        add("badjson.json", b"{not json")
        add("nofield.png", good_pngs[0])
        add("nofield.json", json.dumps({"conv": []}).encode())
        add("long.png", good_pngs[0])
        add("long.json", json.dumps({"conversations": [
            {"from": "human", "value": "<image>\n" + "red " * 500},
            {"from": "gpt", "value": "2"}]}).encode())


def test_bad_samples_are_skipped_and_counted(synth_dir, tmp_path):
    import webdataset as wds

    pngs = [s["png"] for s in wds.DataPipeline(
        wds.SimpleShardList([str(synth_dir / "train" / "train-00000.tar")]),
        wds.tarfile_to_samples())][:6]
    shards = tmp_path / "bad"
    shards.mkdir()
    damaged_shard(shards / "a.tar", pngs)
    truncated = (shards / "a.tar").read_bytes()
    (shards / "b.tar").write_bytes(truncated[: len(truncated) // 2])  # cut mid-member
    tok = load_tokenizer(synth_dir / "tokenizer.model")
    cfg = run_config(synth_dir, tmp_path, train=str(shards), bucket_batches=1,
                     micro_batch_size=3)
    stream = TrainStream(cfg, tok, rank=0, world=1)
    keys = [k for _ in range(4) for k in stream.next_batch(4)["keys"]]
    assert all(k.startswith("good") for k in keys)
    assert stream.skips.skipped >= 4  # bad image, bad json, missing field, over-long, ...
    strict = TrainStream(run_config(synth_dir, tmp_path, train=str(shards), strict=True), tok,
                         rank=0, world=1)
    with pytest.raises(DataError, match=r"bad sample .*a.tar:badimg"):
        for _ in range(4):
            strict.next_batch(4)


def test_collate_expands_image_and_masks_labels(synth_dir, tmp_path):
    tok = load_tokenizer(synth_dir / "tokenizer.model")
    stream = TrainStream(run_config(synth_dir, tmp_path), tok, rank=0, world=1)
    for n in (4, 36):
        b = stream.next_batch(n)
        ids, labels = b["input_ids"], b["labels"]
        assert ((ids == tok.img_ctx_id).sum(dim=1) == n).all()
        assert (labels[ids == tok.img_ctx_id] == IGNORE).all()
        assert ((labels != IGNORE).sum(dim=1) >= 2).all()  # answer + end token
        lengths = b["attention_mask"].sum(dim=1)
        assert int(lengths.max()) == ids.shape[1]  # padded only to the batch maximum
    one = collate(stream.bucketer.next_batch()[:1], 16, tok)
    assert one["padded_tokens"] == 0
