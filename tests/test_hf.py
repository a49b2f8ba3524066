"""The Hugging Face ecosystem against an export, each client in a fresh process without tfx:
AutoProcessor / AutoImageProcessor load the folder's classes, `pipeline("image-text-to-text")`
answers at two N given as a keyword (the answers tfx eval calls right), an EfficientNet-tower
export matches tfx's logits, the Transformers serving backends' contract holds (placeholder
counts, mm_token_type_ids, attention through the registry), `tfx convert --check` proves
parity (and fails on a damaged export), and the model card's table and snippet work."""

import json
import re
import subprocess
import sys

import pytest
import torch
import yaml

from tfx.data.collate import collate
from tfx.data.decode import SkipCounter
from tfx.data.pipeline import read_eval_samples
from tfx.train.load import load_model

from conftest import run_tfx, set_train, tiny_config_yaml

pytestmark = pytest.mark.multiproc

PIPELINE = """
import json, sys
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, pipeline
folder, cases = sys.argv[1], json.loads(sys.argv[2])
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
images = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
answers = {}
for n in (4, 16):
    answers[n] = []
    for path, question in cases:
        chat = [{"role": "user", "content": [{"type": "image", "image": Image.open(path)},
                                             {"type": "text", "text": question}]}]
        out = pipe(text=chat, num_visual_tokens=n, max_new_tokens=4)
        answers[n].append(out[0]["generated_text"][-1]["content"].strip())
print(json.dumps({"processor": type(processor).__name__,
                  "image_processor": type(images).__name__, "answers": answers,
                  "tfx": any(m == "tfx" or m.startswith("tfx.") for m in sys.modules)}))
"""


@pytest.fixture(scope="module")
def export(synth_dir, tmp_path_factory):
    """A tiny model trained long enough to answer some questions right, evaluated and
    converted with --check."""
    folder = tmp_path_factory.mktemp("hf")
    raw = yaml.safe_load(tiny_config_yaml(synth_dir, folder / "run"))
    set_train(raw, max_steps=150, save_every=0, lr=2e-3, llm_lr=2e-3, vision_lr=2e-3,
              trace_samples=False)
    (folder / "run.yaml").write_text(yaml.safe_dump(raw))
    run = folder / "run"
    result = run_tfx("train", str(folder / "run.yaml"), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = folder / "export"
    ev = run_tfx("eval", str(run), "--counts", "4,16", timeout=180)
    assert ev.returncode == 0, ev.stderr[-2000:]
    result = run_tfx("convert", str(run), str(out), "--check", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return run, out, result.stdout


def test_auto_processor_and_pipeline_answer_like_tfx_eval(export, tmp_path):
    run, out, _ = export
    report = json.loads((run / "eval.json").read_text())
    loaded = load_model(run)
    samples = read_eval_samples(loaded.cfg.data.eval, loaded.cfg, loaded.tok,
                                SkipCounter(10, False))
    right = [s for s in samples if report["per_sample"]["4"][s.key]
             and report["per_sample"]["16"][s.key]][:3]
    assert right, "tfx eval found no sample answered right at both N"
    from PIL import Image

    cases = []
    for i, s in enumerate(right):
        path = tmp_path / f"{i}.png"
        Image.fromarray(s.pixels[0].permute(1, 2, 0).numpy()).save(path)
        cases.append([str(path), s.meta["conversations"][0]["value"].replace("<image>\n", "")])
    proc = subprocess.run(["timeout", "300", sys.executable, "-c", PIPELINE, str(out),
                           json.dumps(cases)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (got["processor"], got["image_processor"], got["tfx"]) == (
        "TokenFlexProcessor", "TokenFlexImageProcessor", False)
    for n in ("4", "16"):
        assert got["answers"][n] == [s.meta["answer"] for s in right], n


@pytest.mark.skipif(__import__("importlib").util.find_spec("lmms_eval") is None,
                    reason="lmms-eval missing: make install-lmms (make test does)")
def test_lmms_eval_scores_the_export_like_tfx_eval(export, tmp_path):
    """lmms-eval's own CLI with `--model tokenflex` on a local task made from the run's eval
    shards: at N = 4 and 36 its exact-match accuracy is tfx eval's, sample by sample."""
    run, out, _ = export
    ev = run_tfx("eval", str(run), "--counts", "4,36", "--out", str(tmp_path / "ev"),
                 timeout=180)
    assert ev.returncode == 0, ev.stderr[-2000:]
    tfx_report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    task = tmp_path / "task"
    made = run_tfx("lmms-task", str(run), "--out", str(task), timeout=120)
    assert made.returncode == 0, made.stderr[-2000:]
    docs = [json.loads(x) for x in (task / "docs.jsonl").read_text().splitlines()]
    assert len(docs) == tfx_report["samples"]
    for n in ("4", "36"):
        results = tmp_path / f"lmms-{n}"
        proc = subprocess.run(
            ["timeout", "600", sys.executable, "-m", "lmms_eval", "--model", "tokenflex",
             "--model_args", f"pretrained={out},num_visual_tokens={n}", "--tasks",
             "tfx_local", "--include_path", str(task), "--batch_size", "1", "--log_samples",
             "--output_path", str(results)],
            capture_output=True, text=True, cwd=tmp_path,
            env=dict(__import__("os").environ, HF_DATASETS_OFFLINE="1"))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert "tfx_local" in proc.stdout and "exact_match" in proc.stdout
        scored = json.loads(next(results.rglob("*_results.json")).read_text())
        accuracy = scored["results"]["tfx_local"]["exact_match,none"]
        assert accuracy == pytest.approx(tfx_report["results"][n]["all"], abs=1e-12), n
        logged = [json.loads(x) for f in results.rglob("*_samples_tfx_local.jsonl")
                  for x in f.read_text().splitlines()]
        verdicts = {docs[r["doc_id"]]["key"]: r["exact_match"] == 1.0 for r in logged}
        assert verdicts == tfx_report["per_sample"][n], n
    assert 0 < tfx_report["results"]["36"]["all"] < 1  # a score that can disagree


def test_convert_check_reports_parity_and_catches_a_damaged_export(export, tmp_path):
    from safetensors.torch import load_file, save_file

    from tfx.export.check import run_check

    run, out, stdout = export
    assert "weights: 42 tensors, 0 differ, 0 missing, 0 extra (bitwise equal" in stdout
    rows = re.findall(r"^\| (\d+) \| (yes|no) \|", stdout, re.M)
    assert rows == [("4", "yes"), ("16", "yes"), ("25", "no"), ("36", "yes")]
    assert "parity passed" in stdout
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in out.iterdir():
        if f.is_file():
            (damaged / f.name).write_bytes(f.read_bytes())
    state = load_file(str(damaged / "model.safetensors"))
    state["projector.down.weight"] = state["projector.down.weight"] * 1.01
    save_file(state, str(damaged / "model.safetensors"), metadata={"format": "pt"})
    report, ok = run_check(run, damaged)
    assert not ok and "1 differ" in report and "parity FAILED" in report
    assert "projector.down.weight" in report


def test_model_card_has_the_table_and_a_snippet_that_runs(export, tmp_path):
    run, out, _ = export
    card = (out / "README.md").read_text()
    report = json.loads((run / "eval.json").read_text())
    for n in ("4", "16"):
        assert f"| {n} | yes | {report['results'][n]['all']:.3f} |" in card
    assert (out / "eval.png").is_file() and "![accuracy at each N](eval.png)" in card
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    proc = subprocess.run(["timeout", "300", sys.executable, "-c", snippet],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line.split()[0] for line in proc.stdout.strip().splitlines()] == ["4", "16", "36"]


SERVING = """
import json, sys, torch
from PIL import Image
from transformers import AttentionInterface, AutoModelForImageTextToText, AutoProcessor
from transformers.integrations.sdpa_attention import sdpa_attention_forward
folder = sys.argv[1]
calls = []
def counting(module, *args, **kwargs):
    calls.append(type(module).__name__)
    return sdpa_attention_forward(module, *args, **kwargs)
AttentionInterface.register("tfx_counting", counting)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
counts = processor._get_num_multimodal_tokens(image_sizes=[[32, 32], [90, 60]],
                                              num_visual_tokens=9)
default = processor._get_num_multimodal_tokens(image_sizes=[[32, 32]])
image = Image.new("RGB", (40, 30), "red")
text = processor.apply_chat_template([{"role": "user", "content": [
    {"type": "image"}, {"type": "text", "text": "Which color?"}]}], add_generation_prompt=True)
inputs = processor(images=[image], text=[text], num_visual_tokens=9,
                   return_mm_token_type_ids=True)
marks = inputs["mm_token_type_ids"][0].tolist()
ids = inputs["input_ids"][0].tolist()
out = {"num_image_tokens": counts["num_image_tokens"], "default": default["num_image_tokens"],
       "image_token": processor.image_token, "image_token_ids": processor.image_token_ids,
       "marked": sum(marks), "marked_ids": sorted({i for i, m in zip(ids, marks) if m})}
logits = {}
for impl in ("sdpa", "tfx_counting"):
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True,
                                                        attn_implementation=impl).eval()
    with torch.no_grad():
        logits[impl] = model(**inputs).logits  # mm_token_type_ids passed as the backends do
out["supports_backend"] = type(model)._supports_attention_backend
out["same"] = bool(torch.allclose(logits["sdpa"], logits["tfx_counting"], atol=1e-6))
out["calls"] = sorted(set(calls))
print(json.dumps(out))
"""


def test_serving_backend_contract(export, tmp_path):
    _, out, _ = export
    config = json.loads((out / "config.json").read_text())
    proc = subprocess.run(["timeout", "300", sys.executable, "-c", SERVING, str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["num_image_tokens"] == [11, 11]  # <img> + 9 + </img>, whatever the size
    assert got["default"] == [config["num_visual_tokens"] + 2]
    assert got["image_token"] == "<IMG_CONTEXT>"
    block = [config["image_start_id"], config["image_context_id"], config["image_end_id"]]
    assert got["image_token_ids"] == block
    assert got["marked"] == 11 and got["marked_ids"] == sorted(block)
    assert got["supports_backend"] and got["same"]
    # both sub-models' attention went through the registered function
    assert got["calls"] == ["Qwen2Attention", "SiglipAttention"], got["calls"]


@pytest.mark.skipif(__import__("importlib").util.find_spec("efficientnet_lite_pytorch") is None,
                    reason="real backbones not installed: make install-real")
def test_an_efficientnet_tower_exports_and_matches(synth_dir, tmp_path):
    from tfx.model.backbones import export_efficientnet_lite0

    weights = export_efficientnet_lite0(tmp_path / "effnet.pth")
    raw = yaml.safe_load(tiny_config_yaml(synth_dir, tmp_path / "run"))
    raw["model"]["vision"] = {"family": "efficientnet", "path": str(weights), "image_size": 64,
                              "patch_size": 32}
    raw["model"]["default_visual_tokens"] = 4
    raw["tokens"] = {"mode": "random", "counts": [1, 4], "probs": [0.5, 0.5], "seed": 3}
    set_train(raw, stage="instruct", max_steps=2, save_every=2)
    cfg = tmp_path / "effnet.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert run_tfx("train", str(cfg), timeout=300).returncode == 0
    out = tmp_path / "hf"
    result = run_tfx("convert", str(tmp_path / "run"), str(out), "--check", timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "parity passed" in result.stdout
    assert json.loads((out / "config.json").read_text())["vision_config"]["model_type"] == \
        "tokenflex_efficientnet"
    loaded = load_model(tmp_path / "run")
    samples = read_eval_samples(loaded.cfg.data.eval, loaded.cfg, loaded.tok,
                                SkipCounter(10, False))[:4]
    batches, ours = {}, {}
    for n in (1, 4):
        b = collate(samples, n, loaded.tok)
        batches[n] = {k: b[k] for k in ("input_ids", "pixel_values", "attention_mask")}
        with torch.no_grad():
            ours[n] = loaded.model(b["input_ids"], b["pixel_values"], n, b["attention_mask"])
    torch.save(batches, tmp_path / "inputs.pt")
    fresh = ("import sys, torch\nfrom transformers import AutoModelForImageTextToText as A\n"
             "m = A.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
             "b = torch.load(sys.argv[2])\nwith torch.no_grad():\n"
             "    torch.save({n: m(num_visual_tokens=n, **x).logits for n, x in b.items()}, "
             "sys.argv[3])\n")
    proc = subprocess.run(["timeout", "300", sys.executable, "-c", fresh, str(out),
                           str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.load(tmp_path / "out.pt")
    for n in (1, 4):
        mask = batches[n]["attention_mask"].bool()
        assert (theirs[n] - ours[n])[mask].abs().max().item() <= 1e-4, n
