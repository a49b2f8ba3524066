"""`train.init_from`: a run started from an HF export begins at exactly the export's model (its
step-0 logits equal the export's in a fresh process at two N); parts the weights lack keep their
fresh initialisation and are named; a shape mismatch is one line before training starts."""

import subprocess
import sys

import pytest
import torch
import yaml

from tfx.data.collate import collate
from tfx.data.decode import SkipCounter
from tfx.data.pipeline import read_eval_samples
from tfx.train.load import load_model

from conftest import last_line, run_tfx, tiny_config_yaml, tiny_run_config

pytestmark = pytest.mark.multiproc

FRESH = """
import sys, torch
from transformers import AutoModelForImageTextToText
folder, inputs, out = sys.argv[1:]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
with torch.no_grad():
    logits = {n: model(num_visual_tokens=n, **b).logits for n, b in torch.load(inputs).items()}
torch.save(logits, out)
"""


@pytest.fixture(scope="module")
def export(two_rank_run, tmp_path_factory):
    _, run = two_rank_run
    hf = tmp_path_factory.mktemp("init") / "hf"
    result = run_tfx("convert", str(run), str(hf), timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return hf


def test_a_run_from_an_export_starts_at_its_logits(export, synth_dir, tmp_path):
    cfg, run = tiny_run_config(synth_dir, tmp_path, "fine", max_steps=1, save_every=0,
                               save_initial=True)
    result = run_tfx("train", str(cfg), f"train.init_from={export}", timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"init_from {export}: " in result.stderr and "tensors loaded" in result.stderr
    loaded = load_model(run / "checkpoints" / "step_0000000")
    samples = read_eval_samples(loaded.cfg.data.eval, loaded.cfg, loaded.tok,
                                SkipCounter(10, False))[:6]
    batches, ours = {}, {}
    for n in (4, 36):
        b = collate(samples, n, loaded.tok)
        batches[n] = {k: b[k] for k in ("input_ids", "pixel_values", "attention_mask")}
        with torch.no_grad():
            ours[n] = loaded.model(b["input_ids"], b["pixel_values"], n, b["attention_mask"])
    torch.save(batches, tmp_path / "inputs.pt")
    proc = subprocess.run(["timeout", "120", sys.executable, "-c", FRESH, str(export),
                           str(tmp_path / "inputs.pt"), str(tmp_path / "logits.pt")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.load(tmp_path / "logits.pt")
    for n in (4, 36):
        mask = batches[n]["attention_mask"].bool()
        assert (theirs[n] - ours[n])[mask].abs().max().item() <= 1e-5, n


def test_missing_parts_stay_fresh_and_shapes_must_match(export, two_rank_run, synth_dir,
                                                        tmp_path):
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    partial.mkdir()
    for f in export.iterdir():
        (partial / f.name).write_bytes(f.read_bytes())
    state = load_file(str(partial / "model.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("projector.")},
              str(partial / "model.safetensors"), metadata={"format": "pt"})
    cfg, run = tiny_run_config(synth_dir, tmp_path, "new-projector", max_steps=1)
    result = run_tfx("train", str(cfg), f"train.init_from={partial}", timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(ln for ln in result.stderr.splitlines() if f"init_from {partial}" in ln)
    assert "kept their fresh initialisation: projector.down, projector.gate_up, " \
           "projector.norm (6 tensors)" in line

    _, base = two_rank_run
    raw = yaml.safe_load(tiny_config_yaml(synth_dir, tmp_path / "wider"))
    raw["model"]["llm"]["intermediate_size"] = 48
    wider = tmp_path / "wider.yaml"
    wider.write_text(yaml.safe_dump(raw))
    bad = run_tfx("train", str(wider), f"train.init_from={base}", timeout=240)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert last_line(bad) == (
        f"ConfigError: train.init_from {base}: llm.model.layers.0.mlp.gate_proj.weight has "
        f"shape (64, 32) there but (48, 32) in this model")
    assert not (tmp_path / "wider" / "metrics.jsonl").exists()  # before any step
