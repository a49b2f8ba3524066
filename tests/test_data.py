"""Data stages: shard stream, bad samples, bucketing padding, exact restore, collate."""

import io
import json
import tarfile

import pytest
import torch
import yaml

from tfx.config.load import build
from tfx.config.schema import RunConfig
from tfx.data.collate import collate
from tfx.data.pipeline import TrainStream
from tfx.data.shards import ShardStream, expand_shards
from tfx.data.tokenizer import IGNORE, load_tokenizer
from tfx.errors import ConfigError, DataError

from conftest import tiny_config_yaml


def run_config(synth, tmp_path, **data) -> RunConfig:
    raw = yaml.safe_load(tiny_config_yaml(synth, tmp_path / "out"))
    raw["data"].update(data)
    return build(RunConfig, raw, "").validate()


def test_every_rank_gets_its_own_shards_and_never_runs_dry(synth_dir):
    urls = expand_shards(str(synth_dir / "train"))
    for r in range(3):  # 8 shards of 48 over 3 ranks: uneven, yet every stream keeps going
        stream = ShardStream(urls, reader=r, readers=3, seed=0, on_error=print)
        it = iter(stream)
        keys = [next(it)["__key__"] for _ in range(500)]  # more than one epoch of this rank
        assert len(keys) == 500 and stream.epoch >= 1
    first_epoch = [ShardStream(urls, reader=r, readers=3, seed=0, on_error=print).my_shards(0)
                   for r in range(3)]
    assert sorted(sum(first_epoch, [])) == sorted(urls)  # a partition of the shards


def test_too_few_shards_is_a_clear_error(synth_dir):
    urls = expand_shards(str(synth_dir / "train"))[:1]
    with pytest.raises(DataError, match="1 shards for 2 readers"):
        ShardStream(urls, reader=0, readers=2, seed=0, on_error=print)


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


def add_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def conv(question="<image>\nHow many red cells are there?", answer="2"):
    return json.dumps({"conversations": [{"from": "human", "value": question},
                                         {"from": "gpt", "value": answer}]}).encode()


def damaged_shards(folder, pngs) -> set[str]:
    """a.tar: good samples (image, text-only, unicode) mixed with every kind of damage;
    b.tar: good samples, then cut in the middle of a member. Returns the good keys."""
    with tarfile.open(folder / "a.tar", "w") as tar:
        for i, png in enumerate(pngs):
            add_member(tar, f"good{i}.png", png)
            add_member(tar, f"good{i}.json", conv())
        add_member(tar, "goodtext.json", conv("Name a colour, no image.", "red"))
        add_member(tar, "goodutf.png", pngs[0])
        add_member(tar, "goodutf.json", conv("<image>\nFarbe? 颜色? цвет?", "rot 红"))
        for key, image, meta in [
                ("badimg", b"\x89PNG not really", conv()),
                ("badjson", pngs[0], b"{not json"),
                ("nofield", pngs[0], json.dumps({"conv": []}).encode()),
                ("emptyconv", pngs[0], json.dumps({"conversations": []}).encode()),
                ("nogpt", pngs[0], json.dumps({"conversations": [
                    {"from": "human", "value": "<image>\nhi"}]}).encode()),
                ("twoimages", pngs[0], conv("<image> <image> which?")),
                ("long", pngs[0], conv("<image>\n" + "red " * 500))]:
            add_member(tar, f"{key}.png", image)
            add_member(tar, f"{key}.json", meta)
    with tarfile.open(folder / "b.tar", "w") as tar:
        for i, png in enumerate(pngs[:4]):
            add_member(tar, f"cut{i}.png", png)
            add_member(tar, f"cut{i}.json", conv())
    with tarfile.open(folder / "b.tar") as tar:
        cut_at = tar.getmember("cut3.png").offset_data + 20
    data = (folder / "b.tar").read_bytes()
    (folder / "b.tar").write_bytes(data[:cut_at])  # cut3 is lost mid-image
    return ({f"good{i}" for i in range(len(pngs))} | {"goodtext", "goodutf"}
            | {f"cut{i}" for i in range(3)})


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_skipped_and_counted(synth_dir, tmp_path, workers):
    import webdataset as wds

    pngs = [s["png"] for s in wds.DataPipeline(
        wds.SimpleShardList([str(synth_dir / "train" / "train-00000.tar")]),
        wds.tarfile_to_samples())][:6]
    shards = tmp_path / "bad"
    shards.mkdir()
    good = damaged_shards(shards, pngs)
    tok = load_tokenizer(synth_dir / "tokenizer.model")
    cfg = run_config(synth_dir, tmp_path, train=str(shards), bucket_batches=1,
                     micro_batch_size=1, num_workers=workers)
    stream = TrainStream(cfg, tok, rank=0, world=1)
    batches = [stream.next_batch(4) for _ in range(30)]  # a few epochs of both shards
    keys = {k for b in batches for k in b["keys"]}
    assert keys == good  # every good sample used, no bad one
    text_only = [b for b in batches if b["keys"] == ["goodtext"]][0]
    assert not text_only["has_image"].any()
    assert (text_only["input_ids"] == tok.img_ctx_id).sum() == 0
    assert stream.skipped >= 8  # 7 bad samples + the cut member, at least once each
    strict = TrainStream(run_config(synth_dir, tmp_path, train=str(shards), strict=True,
                                    num_workers=workers, bucket_batches=1,
                                    micro_batch_size=1), tok, rank=0, world=1)
    with pytest.raises(DataError, match=r"^bad sample .*(a.tar:badimg|b.tar)"):
        for _ in range(30):
            strict.next_batch(4)


def test_workers_restore_the_stream_exactly(synth_dir, tmp_path):
    tok = load_tokenizer(synth_dir / "tokenizer.model")
    cfg = run_config(synth_dir, tmp_path, bucket_batches=4, num_workers=2)
    straight = TrainStream(cfg, tok, rank=1, world=2)
    keys = [straight.next_batch(16)["keys"] for _ in range(30)]
    first = TrainStream(cfg, tok, rank=1, world=2)
    for _ in range(13):  # odd: the restored loader must start at the second stream
        first.next_batch(16)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = TrainStream(cfg, tok, rank=1, world=2)
    resumed.load_state_dict(state)
    assert [resumed.next_batch(16)["keys"] for _ in range(17)] == keys[13:]
    rank0 = TrainStream(cfg, tok, rank=0, world=2)
    other = {k for _ in range(30) for k in rank0.next_batch(16)["keys"]}
    assert not other & {k for b in keys for k in b}  # 4 readers, disjoint shards


def test_token_budget_batches_stay_within_budget(synth_dir, mixed_len_dir, tmp_path):
    tok = load_tokenizer(synth_dir / "tokenizer.model")
    budget = 64 + 36 + 2 + 200
    cfg = run_config(synth_dir, tmp_path, train=str(mixed_len_dir), token_budget=budget,
                     bucket_batches=8)
    stream = TrainStream(cfg, tok, rank=0, world=1)
    sizes = []
    for _ in range(40):
        b = stream.next_batch(36)  # 36 is the largest N of the tiny config
        assert b["input_ids"].numel() <= budget
        sizes.append(len(b["keys"]))
    assert len(set(sizes)) > 1  # short samples in bigger batches


def test_token_budget_too_small_is_a_config_error(synth_dir, tmp_path):
    with pytest.raises(ConfigError, match="data.token_budget: 50 cannot hold"):
        run_config(synth_dir, tmp_path, token_budget=50)


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
    one = collate(stream.next_samples()[:1], 16, tok)
    assert one["padded_tokens"] == 0


@pytest.mark.multiproc
def test_tokenisation_skips_count_towards_the_consecutive_limit(synth_dir, tmp_path):
    """Every sample too long for data.max_text_tokens: both ranks stop with one DataError line
    in seconds (they used to skip forever while the other rank waited in a collective)."""
    import time

    from conftest import run_tfx, tiny_run_config

    cfg, _ = tiny_run_config(synth_dir, tmp_path, max_steps=50)
    t0 = time.time()
    result = run_tfx("train", str(cfg), "data.max_text_tokens=3",
                     "data.max_consecutive_errors=20", "--nproc", "2", timeout=120)
    assert time.time() - t0 < 90 and result.returncode == 2, result.stderr[-2000:]
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("DataError:")]
    assert errors and all("21 bad samples in a row" in ln and "over-long" in ln
                          for ln in errors)


def test_a_storage_error_stops_the_run_naming_the_shard(synth_dir, tmp_path):
    """A shard that cannot be read (EIO) is not a damaged sample to skip: the run stops with
    one line naming it (it used to train on, silently skipping the shard every epoch)."""
    import os

    from conftest import last_line, run_tfx, tiny_run_config

    shards = tmp_path / "shards"
    shards.mkdir()
    for p in sorted((synth_dir / "train").glob("*.tar"))[:2]:
        os.symlink(p, shards / p.name)
    bad = shards / "zzz-unreadable.tar"
    os.symlink("/proc/self/mem", bad)  # a regular file whose every read fails with EIO
    cfg, _ = tiny_run_config(synth_dir, tmp_path, max_steps=40, save_every=0)
    result = run_tfx("train", str(cfg), f"data.train={shards}", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"DataError: I/O error reading shard {bad}: OSError: [Errno 5] Input/output error" \
        in result.stderr
    assert "Traceback" not in result.stderr
    assert last_line(result).startswith("tfx train: stopped (DataError)")


def test_large_jpegs_decode_at_reduced_size_as_the_processor_does():
    """A 640x480 photo is decoded at 320x240 (JPEG draft) for a 224 px tower, in training and in
    the exported processor alike: the same pixels reach the model."""
    import numpy as np
    from PIL import Image

    from tfx.data.decode import SkipCounter, decode_sample, image_to_uint8, normalise
    from tfx.model.processing_tokenflex import TokenFlexImageProcessor

    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 255, (30, 40, 3)), np.ones((16, 16, 1))).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(smooth).save(buf, "JPEG", quality=90)
    raw = {"__key__": "k", "jpg": buf.getvalue(), "json": conv().decode()}
    decoded = decode_sample(raw, SkipCounter(1, True), image_size=224)
    assert decoded.images[0].size == (320, 240)
    assert decode_sample(raw, SkipCounter(1, True)).images[0].size == (640, 480)  # no size: full
    train = normalise(image_to_uint8(decoded.images[0], 224)[None], "siglip")
    served = TokenFlexImageProcessor(image_size=224)(Image.open(io.BytesIO(raw["jpg"])))
    assert torch.equal(served["pixel_values"], train)
