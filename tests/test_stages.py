"""The paper's three-stage recipe (configs/demo-3stage.yaml) on 2 ranks under ZeRO-3: each
stage starts from the previous stage's final weights (bitwise), trains only its preset's parts,
and a kill during stage 2 then --resume finishes stages 2 and 3 without running stage 1 again."""

import json
import os
import subprocess
import sys
import time

import psutil
import pytest
import torch
import yaml

from tfx.config.schema import PRESETS
from tfx.train import checkpoint

from conftest import ROOT, run_tfx

pytestmark = pytest.mark.multiproc
RECIPE = str(ROOT / "configs" / "demo-3stage.yaml")
STAGES = ("align", "enhance", "instruct")


def overrides(synth_dir, out):
    return [f"data.train={synth_dir / 'train'}", f"data.eval={synth_dir / 'eval'}",
            f"data.tokenizer={synth_dir / 'tokenizer.model'}", f"train.output_dir={out}",
            "checkpoint.save_initial=true", "checkpoint.save_every=2", "checkpoint.keep_last=10",
            "logging.trace_samples=true", *[f"stages.{s}.train.max_steps=4" for s in STAGES]]


def weights(run, step):
    return checkpoint.load_consolidated(run / "checkpoints", checkpoint.tag_for(step))


def part_of(key):
    return {"vision": "vision", "projector": "projector", "llm": "llm"}[key.split(".")[0]]


def test_stages_chain_their_weights_and_train_only_their_parts(synth_dir, tmp_path):
    out = tmp_path / "recipe"
    result = run_tfx("train", RECIPE, *overrides(synth_dir, out), "--nproc", "2", timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    previous = None
    for name in STAGES:
        run = out / name
        start, end = weights(run, 0), weights(run, 4)
        if previous is not None:  # step 0 of stage k is stage k-1's final weights, bitwise
            assert start.keys() == previous.keys()
            assert all(torch.equal(start[k], previous[k]) for k in start), name
        trained = set(PRESETS[yaml.safe_load((run / "config.yaml").read_text())["train"]
                              ["freeze"]])
        for part in ("vision", "projector", "llm"):
            keys = [k for k in start if part_of(k) == part and start[k].is_floating_point()]
            changed = sum(not torch.equal(start[k], end[k]) for k in keys)
            if part in trained:
                assert changed > 0, (name, part)
            else:
                assert changed == 0, (name, part, "a frozen part moved")
        previous = end
    rows = [json.loads(x) for x in (out / "instruct" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["n_visual"] == [4, 16, 36] and set(r["loss_by_n"]) == {"4", "16", "36"}
               for r in rows)  # the demo's instruct stage uses tokens.mode: all


def test_a_kill_in_stage_two_resumes_there(synth_dir, tmp_path):
    out = tmp_path / "recipe"
    args = ["train", RECIPE, *overrides(synth_dir, out), "--nproc", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "tfx.cli", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=dict(os.environ, TFX_FAULT="slow:150"))
    trace = out / "enhance" / "trace" / "rank0.jsonl"
    end = time.time() + 300
    while not (trace.exists() and len(trace.read_text().splitlines()) >= 3):
        assert time.time() < end and proc.poll() is None
        time.sleep(0.05)
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.kill()  # the launcher and the ranks (they run in their own session)
    proc.kill()
    proc.wait()
    align_final = out / "align" / "checkpoints" / "step_0000004" / checkpoint.COMPLETE
    stamp = align_final.stat().st_mtime_ns
    assert not (out / "instruct" / "checkpoints").exists()  # killed before stage 3
    again = run_tfx(*args, timeout=60)
    assert again.returncode == 2 and "--resume" in again.stderr.strip().splitlines()[-1]
    result = run_tfx(*args, "--resume", timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stage align: finished before, not run again" in result.stderr
    assert "resumed from step_0000002 at step 2" in result.stderr  # enhance saves every 2
    assert align_final.stat().st_mtime_ns == stamp  # stage 1 untouched
    for name in STAGES:
        assert checkpoint.latest_tag(out / name / "checkpoints") == "step_0000004", name
    steps = [json.loads(x)["step"] for x in (out / "enhance" / "trace" / "rank0.jsonl")
             .read_text().splitlines()]
    assert steps == [0, 1, 2, 3]  # steps after the checkpoint redone once, not duplicated
