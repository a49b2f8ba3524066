"""Tiles (tfx.model.pixels, `data.tiles`): the grid, and parity between training and the exported
processor (same tiles, same pixels, same image blocks)."""

import io
import json

import numpy as np
import torch
import yaml
from PIL import Image

from tfx.config.load import build
from tfx.config.schema import RunConfig
from tfx.data.collate import collate
from tfx.data.decode import SkipCounter, decode_sample
from tfx.data.pipeline import draft_size, to_text_sample
from tfx.data.tokenizer import load_tokenizer
from tfx.model.pixels import tile_grid, tile_image

from conftest import tiny_config_yaml


def test_tile_grid_matches_the_aspect_ratio_within_the_budget():
    assert tile_grid(224, 224, 1) == (1, 1)
    assert tile_grid(224, 224, 4) == (2, 2)
    assert tile_grid(448, 224, 4) == (2, 1)
    assert tile_grid(1000, 200, 4) == (4, 1) and tile_grid(200, 1000, 4) == (1, 4)
    assert tile_grid(640, 480, 6) == (3, 2)
    for w, h in ((300, 100), (123, 457), (640, 480)):
        for k in (1, 2, 3, 6, 12):
            c, r = tile_grid(w, h, k)
            assert c * r <= k


def test_tile_image_cuts_one_decode_into_tiles_and_a_thumbnail():
    image = Image.fromarray(np.arange(60 * 120 * 3, dtype=np.uint8).reshape(60, 120, 3))
    tiles = tile_image(image, 32, 4, thumbnail=True)
    assert [t.size for t in tiles] == [(32, 32)] * 2 + [(120, 60)]  # 2 x 1 grid + thumbnail
    assert len(tile_image(image, 32, 4, thumbnail=False)) == 2
    assert tile_image(image, 32, 1, thumbnail=True) == [image]


def test_tiled_training_sample_equals_the_exported_processor(synth_dir, tmp_path):
    from tfx.export.convert import processor_for

    raw = yaml.safe_load(tiny_config_yaml(synth_dir, tmp_path / "run"))
    raw["data"]["tiles"] = {"max": 4, "thumbnail": True}
    cfg = build(RunConfig, raw, "").validate()
    tok = load_tokenizer(cfg.data.tokenizer)
    rng = np.random.default_rng(0)
    wide = np.kron(rng.integers(0, 255, (6, 12, 3)), np.ones((10, 10, 1))).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, "PNG")
    question = "Which color has the most cells?"
    record = {"conversations": [{"from": "human", "value": "<image>\n" + question},
                                {"from": "gpt", "value": "red"}]}
    decoded = decode_sample({"__key__": "w", "png": buf.getvalue(),
                             "json": json.dumps(record)}, SkipCounter(1, True), draft_size(cfg))
    v = cfg.model.vision
    sample = to_text_sample(decoded, tok, v.image_size, v.family, 64, SkipCounter(1, True),
                            tiles=cfg.data.tiles)
    assert sample.images == 3  # a 2 x 1 grid of a 2:1 picture, plus its thumbnail
    processor = processor_for(cfg, tok)
    messages = [{"role": "user", "content": [
        {"type": "image", "image": Image.open(io.BytesIO(buf.getvalue()))},
        {"type": "text", "text": question}]}]
    for n in (4, 16):
        batch = collate([sample], n, tok)
        row = batch["input_ids"][0].tolist()
        served = processor.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=True, return_dict=True,
                                               num_visual_tokens=n)
        prompt = served["input_ids"][0].tolist()
        assert row[:len(prompt)] == prompt  # three image blocks, then the question
        assert prompt.count(tok.img_start_id) == 3
        assert torch.equal(served["pixel_values"], batch["pixel_values"])
