"""`tfx data llava`: a hand-made LLaVA JSON (multi-turn, text-only, unicode, several images
interleaved with the text, a missing image, a tag mismatch) becomes shards + index.json with
exact lengths, then trains on 2 ranks and evaluates; ranks with no image and with many tiles
stay in step under ZeRO-3."""

import io
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from tfx.data.builders.llava import read_index, sample_key
from tfx.data.tokenizer import encode_with_image, load_tokenizer

from conftest import run_tfx, set_train, tiny_config_yaml

pytestmark = pytest.mark.multiproc


def llava_records(images):
    rng = np.random.default_rng(0)
    records = []
    for i in range(40):
        name = f"img{i}.jpg" if i % 2 else f"sub/img{i}.png"
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 255, (24 + i, 32, 3), dtype=np.uint8)  # uneven sizes
        Image.fromarray(arr).save(images / name)
        turns = [{"from": "human", "value": "<image>\nWhich color has the most cells?"},
                 {"from": "gpt", "value": "red"}]
        if i % 5 == 0:  # multi-turn, the image tag in the middle of the first turn
            turns = [{"from": "human", "value": "Look: <image>\nWhat color is the marked cell?"},
                     {"from": "gpt", "value": "blue"},
                     {"from": "human", "value": "And which color has the most cells?"},
                     {"from": "gpt", "value": "green"}]
        records.append({"id": f"s.{i}", "image": name, "conversations": turns})
    records.append({"id": "text-only", "conversations": [
        {"from": "human", "value": "Name a color."}, {"from": "gpt", "value": "yellow"}]})
    records.append({"id": "unicode ü", "image": "img1.jpg", "conversations": [
        {"from": "human", "value": "Farbe? 颜色? <image>"}, {"from": "gpt", "value": "weiß"}]})
    records.append({"id": "missing", "image": "nope.jpg", "conversations": [
        {"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "red"}]})
    # several images, interleaved with the text (LLaVA-OneVision style: a list under image)
    records.append({"id": "two", "image": ["img1.jpg", "sub/img2.png"], "conversations": [
        {"from": "human", "value": "First <image> then <image>: which has more red?"},
        {"from": "gpt", "value": "the second"}]})
    records.append({"id": "three", "image": ["img3.jpg", "img5.jpg", "img7.jpg"],
                    "conversations": [
                        {"from": "human", "value": "<image> <image>\nAre these the same?"},
                        {"from": "gpt", "value": "no"},
                        {"from": "human", "value": "And this one? <image>"},
                        {"from": "gpt", "value": "yes"}]})
    records.append({"id": "tags-mismatch", "image": ["img1.jpg", "img3.jpg"], "conversations": [
        {"from": "human", "value": "<image> which?"}, {"from": "gpt", "value": "red"}]})
    return records


def test_llava_json_converts_trains_and_evaluates(synth_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    records = llava_records(images)
    src = tmp_path / "data.json"
    src.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "shards"
    tokenizer = str(synth_dir / "tokenizer.model")
    result = run_tfx("data", "llava", "--json", str(src), "--images", str(images), "--out",
                     str(out), "--tokenizer", tokenizer, "--max-count", "8", "--workers", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped record 42 (missing)" in result.stderr
    assert "skipped record 45 (tags-mismatch)" in result.stderr
    index = read_index(out)
    assert index["samples"] == len(records) - 2 and index["skipped"] == 2
    assert len(index["shards"]) == 6 and all(s["samples"] <= 8 for s in index["shards"])
    # exact lengths: the index agrees with tokenising each record again, one marker per image
    tok = load_tokenizer(tokenizer)
    by_key = {sample_key(r, i): r for i, r in enumerate(records)}
    for shard in index["shards"]:
        for key, length, images in zip(shard["keys"], shard["lengths"], shard["images"]):
            r = by_key[key]
            names = r.get("image") or []
            count = len(names) if isinstance(names, list) else 1
            assert images == count
            assert length == len(encode_with_image(tok, r["conversations"], count)[0])
    # and the shards hold what the records say: a text-only sample has no image member
    import webdataset as wds

    seen = {s["__key__"]: s for s in wds.WebDataset(str(out / "shard-{000000..000005}.tar"),
                                                    shardshuffle=False)}
    assert "jpg" not in seen[sample_key(records[40], 40)]
    assert Image.open(io.BytesIO(seen[sample_key(records[3], 3)]["jpg"])).size == (32, 27)
    three = seen[sample_key(records[44], 44)]
    assert {"0.jpg", "1.jpg", "2.jpg"} <= set(three) and "jpg" not in three
    assert {"0.jpg", "1.png"} <= set(seen[sample_key(records[43], 43)])

    raw = yaml.safe_load(tiny_config_yaml(synth_dir, tmp_path / "run"))
    raw["data"].update(train=str(out), eval=str(out), max_text_tokens=64,
                       tiles={"max": 4})  # uneven sizes: 1 x 1, 2 x 1, ... grids + thumbnails
    set_train(raw, max_steps=4, save_every=4)
    cfg = tmp_path / "llava.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    result = run_tfx("train", str(cfg), "--nproc", "2", timeout=300)  # ZeRO-3 on 2 ranks
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train set: 44 samples in 6 shards" in result.stderr + result.stdout
    result = run_tfx("eval", str(tmp_path / "run"), "--counts", "4,16", "--out",
                     str(tmp_path / "ev"), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["samples"] == 44


def test_ranks_with_no_and_many_images_stay_in_step_under_zero3(synth_dir, tmp_path):
    """Two shards, one all text-only, one all samples of two images, the first of them cut
    into 6 tiles + a thumbnail (`data.tiles`): every step one rank feeds no image and the
    other 16 pictures, under ZeRO-3 on 2 ranks, for 20 steps, without a hang."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(images / "0.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / "1.png")
    text = [{"id": f"t{i}", "conversations": [{"from": "human", "value": "Name a color."},
                                              {"from": "gpt", "value": "red"}]}
            for i in range(8)]
    many = [{"id": f"m{i}", "image": ["0.png", "1.png"], "conversations": [
        {"from": "human", "value": "<image> or <image>: which is redder?"},
        {"from": "gpt", "value": "the first"}]} for i in range(8)]
    src = tmp_path / "data.json"
    src.write_text(json.dumps(text + many))
    out = tmp_path / "shards"
    result = run_tfx("data", "llava", "--json", str(src), "--images", str(images), "--out",
                     str(out), "--tokenizer", str(synth_dir / "tokenizer.model"),
                     "--max-count", "8", "--workers", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    raw = yaml.safe_load(tiny_config_yaml(synth_dir, tmp_path / "run"))
    raw["data"].update(train=str(out), max_text_tokens=64, micro_batch_size=2, bucket_batches=1,
                       tiles={"max": 6})  # 3:2 -> 3 x 2 tiles + thumbnail; square -> 2 x 2 + 1
    raw.setdefault("logging", {})["trace_samples"] = True
    set_train(raw, max_steps=20, save_every=0, dist_timeout_s=60)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    result = run_tfx("train", str(cfg), "--nproc", "2", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").open()]
    assert len(rows) == 20
    n_at = {r["step"] - 1: r["n_visual"] for r in rows}
    fed = {}
    for rank in (0, 1):
        for t in map(json.loads, (tmp_path / "run" / "trace" / f"rank{rank}.jsonl").open()):
            fed.setdefault(t["step"], []).append(sum(t["context_tokens"]) // n_at[t["step"]])
    assert all(sorted(v) == [0, 2 * (7 + 5)] for v in fed.values()), fed


def test_nothing_written_is_an_error_with_the_reasons(synth_dir, tmp_path):
    from conftest import last_line

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "x.gif")
    turns = [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "red"}]
    records = [{"id": "a", "image": "missing.png", "conversations": turns},
               {"id": "b", "image": "x.gif", "conversations": turns},
               {"id": "c", "image": "x.gif", "conversations": "not a list"}]
    src = tmp_path / "data.json"
    src.write_text(json.dumps(records))
    out = tmp_path / "shards"
    result = run_tfx("data", "llava", "--json", str(src), "--images", str(images), "--out",
                     str(out), "--tokenizer", str(synth_dir / "tokenizer.model"))
    assert result.returncode == 2
    assert last_line(result).startswith(
        "DataError: no sample written: all 3 records skipped (image not found: 1, image type "
        "not supported: 1, record without conversations: 1); first: record 0 (a): "
        "FileNotFoundError")
    assert not list(out.glob("*.tar")) and not (out / "index.json").exists()


def test_a_chat_template_that_re_renders_turns_is_refused(synth_dir, tmp_path):
    """Labels are the tokens a turn adds to the conversation; a template that changes earlier
    turns when one is added (here: it marks only the last message) would shift them."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    from conftest import last_line

    folder = tmp_path / "tok"
    SentencePieceBackend(
        vocab_file=str(synth_dir / "tokenizer.model"), bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", pad_token="<pad>",
        chat_template="{% for m in messages %}{% if loop.last %}LAST {% endif %}"
                      "{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}A: "
                      "{% endif %}").save_pretrained(str(folder))
    src = tmp_path / "data.json"
    src.write_text(json.dumps([{"id": "t", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "red"}]}]))
    result = run_tfx("data", "llava", "--json", str(src), "--images", str(tmp_path), "--out",
                     str(tmp_path / "shards"), "--tokenizer", str(folder))
    assert result.returncode == 2
    assert last_line(result).startswith(f"ConfigError: data.tokenizer: {folder}: the chat "
                                        "template")
    assert "re-renders earlier turns" in last_line(result)
