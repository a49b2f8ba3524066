"""lmms-eval, the field's VLM benchmark harness, against a TokenFLEX export.

- `TokenFlexLMMS`: the `tokenflex` model of lmms-eval (registered through the entry-point
  group `lmms_eval.models`, see setup.py). It loads an exported folder with plain
  transformers (trust_remote_code: tfx is not needed to run it) and answers greedily at
  `num_visual_tokens` (`--model_args pretrained=DIR,num_visual_tokens=36`).
- `write_local_task(eval shards, out)`: an lmms-eval task folder built from tfx eval shards,
  for `--include_path out --tasks tfx_local`: the images as PNG files, one JSON line per
  sample, the YAML and its functions; the metric is exact match of the stripped answer, the
  rule of `tfx eval`. No hub.
Data flow position: HF export -> **lmms-eval model / task** -> lmms-eval's table.
"""

from __future__ import annotations

import json
from pathlib import Path

from tfx.errors import ConfigError

TASK = "tfx_local"
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: generate_until
doc_to_visual: !function tfx_local_utils.doc_to_visual
doc_to_text: !function tfx_local_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 16
  do_sample: false
  num_beams: 1
process_results: !function tfx_local_utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
TASK_UTILS = '''"""Functions of the tfx_local task (written by `tfx lmms-task`)."""
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc):
    return [Image.open(HERE / doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"].strip())}
'''


def write_local_task(shards: str, out: str | Path, tfx_config, tok) -> dict:
    """Every readable sample of `shards` (decoded as `tfx eval` decodes them) -> the task
    folder; returns {"samples", "folder"}."""
    from PIL import Image

    from tfx.data.decode import SkipCounter
    from tfx.data.pipeline import read_eval_samples

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; pick another --out")
    samples = read_eval_samples(shards, tfx_config, tok, SkipCounter(100, False))
    if not samples:
        raise ConfigError(f"{shards}: no readable sample")
    (out / "images").mkdir(parents=True)
    lines = []
    for s in samples:
        if s.images != 1:
            raise ConfigError(f"{s.key}: the local task takes one image per sample")
        name = f"images/{s.key.replace('/', '_')}.png"
        Image.fromarray(s.pixels[0].permute(1, 2, 0).numpy()).save(out / name)
        turns = s.meta["conversations"]
        lines.append(json.dumps({"key": s.key, "image": name,
                                 "question": turns[0]["value"].replace("<image>\n", ""),
                                 "answer": turns[1]["value"],
                                 "type": s.meta.get("type", "other")}))
    (out / "docs.jsonl").write_text("\n".join(lines) + "\n")
    (out / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, docs=out.resolve() /
                                                       "docs.jsonl"))
    (out / "tfx_local_utils.py").write_text(TASK_UTILS)
    return {"samples": len(samples), "folder": str(out)}


def manifest():
    """The entry point of group `lmms_eval.models`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="tokenflex",
                         simple_class_path="tfx.export.lmms_model.TokenFlexLMMS")
