"""`tfx convert` and `tfx generate`: parity with the training model in a fresh process that never
imports tfx, both vision and both LLM families, sharded and bf16 export, processor = training
tokenisation, and one-line errors that leave OUT untouched."""

import json
import stat
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

# Runs in a fresh interpreter: plain transformers, the exported folder's own code, no tfx.
FRESH = """
import sys, torch
from transformers import AutoModelForImageTextToText
folder, inputs, out = sys.argv[1:]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
batches = torch.load(inputs)
with torch.no_grad():
    logits = {n: model(num_visual_tokens=n, **b).logits for n, b in batches.items()}
torch.save({"logits": logits, "dtype": str(model.dtype),
            "tfx_loaded": any(m == "tfx" or m.startswith("tfx.") for m in sys.modules)}, out)
"""


def two_image_sample(a, b, tok):
    """A sample with the pictures of `a` and `b`, interleaved with its question."""
    from tfx.data.collate import TextSample
    from tfx.data.tokenizer import encode_with_image

    turns = [{"from": "human", "value": "First <image> then <image>: which has more red?"},
             {"from": "gpt", "value": "red"}]
    ids, labels = encode_with_image(tok, turns, 2)
    return TextSample(key="two", pixels=torch.cat([a.pixels, b.pixels]), images=2, ids=ids,
                      labels=labels, meta={}, family=a.family)


def parity(run, out, tmp_path, counts=(4, 16, 36), atol=1e-5):
    """Logits of the training model and of the export in a fresh process without tfx, at each
    N, on a batch whose last row holds two images."""
    loaded = load_model(run)
    model, cfg, tok = loaded.model, loaded.cfg, loaded.tok
    samples = read_eval_samples(cfg.data.eval, cfg, tok, SkipCounter(10, False))[:6]
    samples[-1] = two_image_sample(samples[0], samples[1], tok)
    batches, expected = {}, {}
    for n in counts:
        b = collate(samples, n, tok)
        batches[n] = {k: b[k] for k in ("input_ids", "pixel_values", "attention_mask")}
        with torch.no_grad():
            expected[n] = model(b["input_ids"], b["pixel_values"], n, b["attention_mask"])
    torch.save(batches, tmp_path / "inputs.pt")
    proc = subprocess.run(["timeout", "120", sys.executable, "-c", FRESH, str(out),
                           str(tmp_path / "inputs.pt"), str(tmp_path / "logits.pt")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "logits.pt")
    assert not got["tfx_loaded"]
    for n in counts:
        mask = batches[n]["attention_mask"].bool()
        diff = (got["logits"][n].float() - expected[n])[mask].abs().max().item()
        assert diff <= atol, (n, diff)
    return got


def test_export_parity_fresh_process_siglip_qwen2(two_rank_run, tmp_path):
    _, run = two_rank_run
    out = tmp_path / "hf"
    result = run_tfx("convert", str(run), str(out), timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "tokenflex" and config["pool"] == "adaptive"
    assert config["vision_config"]["model_type"] == "siglip_vision_model"
    assert config["text_config"]["model_type"] == "qwen2"
    assert config["num_visual_tokens"] == 16 and config["max_visual_tokens"] == 64
    assert "AutoModelForImageTextToText" in config["auto_map"]
    for name in ("model.safetensors", "tokenizer.model", "tokenizer_config.json",
                 "chat_template.jinja", "processor_config.json", "modeling_tokenflex.py"):
        assert (out / name).is_file(), name
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes  # not 0600 alone
    parity(run, out, tmp_path)
    # with tfx installed, its registration replaces trust_remote_code
    code = ("import sys, tfx\ntfx.register_auto_classes()\n"
            "from transformers import AutoModelForImageTextToText as A, AutoProcessor as P\n"
            "print(type(A.from_pretrained(sys.argv[1])).__module__)\n"
            "print(type(P.from_pretrained(sys.argv[1])).__module__)")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.split() == ["tfx.model.modeling_tokenflex",
                                   "tfx.model.processing_tokenflex"], proc.stderr[-2000:]


def test_processor_matches_training_tokenisation(two_rank_run, tmp_path):
    from tfx.export.convert import processor_for

    _, run = two_rank_run
    loaded = load_model(run)
    cfg, tok = loaded.cfg, loaded.tok
    processor = processor_for(cfg, tok)
    sample = read_eval_samples(cfg.data.eval, cfg, tok, SkipCounter(10, False))[0]
    question = sample.meta["conversations"][0]["value"].replace("<image>\n", "")
    from PIL import Image

    image = Image.fromarray(sample.pixels[0].permute(1, 2, 0).numpy())
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": question}]}]
    for n in (1, 16, 49):
        row = collate([sample], n, tok)["input_ids"][0].tolist()
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=True, num_visual_tokens=n)[0].tolist()
        assert row[:len(prompt)] == prompt  # the answer follows in training
    # the saved tokenizer, loaded by plain transformers, gives the same ids
    processor.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    text = reloaded.apply_chat_template([{"role": "user", "content": "<image>\n" + question}],
                                        tokenize=False, add_generation_prompt=True)
    assert reloaded(text, add_special_tokens=False)["input_ids"] == tok.encode_prompt(
        "<image>\n" + question)


def test_clip_llama_round_trip_sharded_and_bf16(synth_dir, tmp_path):
    raw = yaml.safe_load(tiny_config_yaml(synth_dir, tmp_path / "run"))
    raw["model"]["vision"].update(family="clip")
    raw["model"]["llm"].update(family="llama")
    raw["model"]["projector"] = {**raw["model"].get("projector", {}), "position": "fourier"}
    set_train(raw, max_steps=2, save_every=2)
    cfg = tmp_path / "clip_llama.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    result = run_tfx("train", str(cfg), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "hf"
    result = run_tfx("convert", str(tmp_path / "run"), str(out), "--max-shard-size", "100KB",
                     timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert (out / "model.safetensors.index.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"]["model_type"] == "clip_vision_model"
    assert config["text_config"]["model_type"] == "llama"
    assert config["projector_position"] == "fourier"  # its weights are in the parity below
    parity(tmp_path / "run", out, tmp_path, counts=(1, 9, 64))
    bf16 = tmp_path / "hf16"
    result = run_tfx("convert", str(tmp_path / "run"), str(bf16), "--dtype", "bf16",
                     timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    got = parity(tmp_path / "run", bf16, tmp_path, counts=(16,), atol=0.1)
    assert got["dtype"] == "torch.bfloat16"


def test_generate_answers_at_several_counts(two_rank_run, tmp_path):
    import webdataset as wds

    cfg, run = two_rank_run
    eval_spec = yaml.safe_load(cfg.read_text())["data"]["eval"]
    first = next(iter(wds.WebDataset(f"{eval_spec}/eval-00000.tar", shardshuffle=False)))
    image = tmp_path / "q.png"
    image.write_bytes(first["png"])
    question = json.loads(first["json"])["conversations"][0]["value"].replace("<image>\n", "")
    result = run_tfx("generate", "--model", str(run), "--image", str(image), "--prompt",
                     question, "--visual-tokens", "4,16,36", "--max-new-tokens", "4",
                     timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("N=")]
    assert [ln.split("|")[0].strip() for ln in lines] == ["N=4", "N=16", "N=36"]
    bad = run_tfx("generate", "--model", str(run), "--image", str(image), "--prompt", question,
                  "--visual-tokens", "4,20", timeout=180)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("ConfigError: --visual-tokens")


def test_generate_answers_about_two_images_like_the_training_model(two_rank_run, tmp_path):
    """`--image` twice, placed by the prompt's <image> tags: the CLI's greedy answer at each N
    is the training model's on the same two-image sample."""
    from PIL import Image

    from tfx.eval.decode import greedy_answers, prompt_and_reference
    from tfx.export.convert import processor_for
    from tfx.export.generate import prompt_inputs

    _, run = two_rank_run
    loaded = load_model(run)
    model, cfg, tok = loaded.model, loaded.cfg, loaded.tok
    samples = read_eval_samples(cfg.data.eval, cfg, tok, SkipCounter(10, False))
    sample = two_image_sample(samples[0], samples[1], tok)
    paths = []
    for k, s in enumerate(samples[:2]):
        paths += ["--image", str(tmp_path / f"{k}.png")]
        Image.fromarray(s.pixels[0].permute(1, 2, 0).numpy()).save(paths[-1])
    prompt = "First <image> then <image>: which has more red?"  # two_image_sample's turn
    result = run_tfx("generate", "--model", str(run), *paths, "--prompt", prompt,
                     "--visual-tokens", "4,36", "--max-new-tokens", "4", timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    got = dict(ln.split(" | ", 1) for ln in result.stdout.splitlines() if ln.startswith("N="))
    processor = processor_for(cfg, tok)
    images = [Image.open(p) for p in paths[1::2]]
    for n in (4, 36):
        ids = greedy_answers(model, [sample], n, tok, max_new_tokens=4)[0]
        assert got[f"N={n:<2}"] == processor.batch_decode([ids])[0].strip(), (n, got)
        # what the CLI fed the model is the training prompt, both images in place
        inputs = prompt_inputs(processor, images, prompt, n)
        assert inputs["input_ids"][0].tolist() == prompt_and_reference(sample, n, tok)[0]
        assert inputs["pixel_values"].shape[0] == 2
    untagged = run_tfx("generate", "--model", str(run), *paths, "--prompt", "which has more red?",
                       "--visual-tokens", "4", "--max-new-tokens", "2", timeout=180)
    assert untagged.returncode == 0, untagged.stderr[-3000:]  # both images first
    wrong = run_tfx("generate", "--model", str(run), *paths, "--prompt", "only <image> here",
                    timeout=180)
    assert wrong.returncode == 2
    assert wrong.stderr.strip().splitlines()[-1] == (
        "ConfigError: --prompt has 1 <image> tags for 2 --image: one tag per image, or none "
        "(the images then come first)")


def test_errors_are_one_line_and_leave_out_untouched(two_rank_run, synth_dir, tmp_path):
    _, run = two_rank_run
    other = yaml.safe_load(tiny_config_yaml(synth_dir, tmp_path / "x"))
    other["model"]["llm"]["hidden_size"] = 48
    other_cfg = tmp_path / "other.yaml"
    other_cfg.write_text(yaml.safe_dump(other))
    out = tmp_path / "hf"
    cases = [
        (("convert", str(run), str(out), "--config", str(other_cfg)),
         "CheckpointError:", "different model config"),
        (("convert", str(tmp_path / "missing"), str(out)), "CheckpointError:", "does not exist"),
        (("convert", str(tmp_path), str(out)), "CheckpointError:", "no complete"),
        (("convert", str(run), str(out), "--dtype", "fp8"), "ConfigError:", "--dtype"),
        (("generate", "--model", str(run), "--image", str(tmp_path / "none.png"), "--prompt",
          "q"), "ConfigError:", "--image"),
    ]
    for args, kind, text in cases:
        result = run_tfx(*args, timeout=180)
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 2 and last.startswith(kind) and text in last, (args, last)
        assert "Traceback" not in result.stderr
        assert not out.exists() and not list(tmp_path.glob(".hf.tmp-*"))
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_tfx("convert", str(run), str(out), timeout=180)
    assert result.returncode == 2 and "--force" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    a_file = tmp_path / "model.bin"
    a_file.write_text("mine")
    result = run_tfx("convert", str(run), str(a_file), "--force", timeout=180)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"ConfigError: {a_file} exists and is not a folder; pick another OUT")
    assert a_file.read_text() == "mine"


def test_batched_generate_equals_one_by_one(two_rank_run):
    from tfx.export.convert import processor_for, to_hf

    _, run = two_rank_run
    loaded = load_model(run)
    model, cfg, tok = loaded.model, loaded.cfg, loaded.tok
    hf, processor = to_hf(model, cfg, tok), processor_for(cfg, tok)
    samples = read_eval_samples(cfg.data.eval, cfg, tok, SkipCounter(10, False))
    from PIL import Image

    images = [Image.fromarray(s.pixels[0].permute(1, 2, 0).numpy()) for s in samples[:3]]
    questions = ["What color is the marked cell?", "Which color has the most cells?",
                 "Which color has the most cells? Answer with one word."]  # uneven: left pad
    prompts = [processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True)
        for q in questions]
    with torch.no_grad():
        batch = processor(images=images, text=prompts, num_visual_tokens=16)
        assert batch["input_ids"].shape[0] == 3 and (batch["attention_mask"] == 0).any()
        steps = {"min_new_tokens": 4, "max_new_tokens": 4, "do_sample": False}  # no early EOS
        together = hf.generate(**batch, **steps)
        together = together[:, batch["input_ids"].shape[1]:].tolist()
        for i in range(3):
            one = processor(images=[images[i]], text=prompts[i], num_visual_tokens=16)
            alone = hf.generate(**one, **steps)
            assert alone[0, one["input_ids"].shape[1]:].tolist() == together[i]
