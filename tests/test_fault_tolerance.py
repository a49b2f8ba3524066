"""Fault tolerance on 2 CPU ranks under ZeRO-3: kill -9 of every rank, then --resume, ends with
bitwise the weights of an uninterrupted run and the same sample keys; a kill in the middle of a
checkpoint save leaves the previous checkpoint as `latest` and training continues; an injected
rank divergence fails at once with the ranks and modules named."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import ROOT, run_tfx, tiny_config_yaml
from tfx.train import checkpoint

pytestmark = pytest.mark.multiproc


def write_cfg(synth_dir, tmp_path, name, **train):
    raw = yaml.safe_load(tiny_config_yaml(synth_dir, tmp_path / name))
    raw["data"]["num_workers"] = 2
    raw["train"].update(max_steps=10, save_every=2, keep_last=5, **train)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, tmp_path / name


def keys(run):
    return {r: [json.loads(x)["keys"] for x in (run / "trace" / f"rank{r}.jsonl")
                .read_text().splitlines()] for r in (0, 1)}


def final_weights(run):
    root, tag = checkpoint.resolve(run)
    assert tag == "step_0000010"
    return checkpoint.load_consolidated(root, tag)


def test_kill_9_then_resume_is_bitwise_identical(synth_dir, tmp_path):
    cfg_a, run_a = write_cfg(synth_dir, tmp_path, "straight")
    result = run_tfx("train", str(cfg_a), "--nproc", "2", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    cfg_b, run_b = write_cfg(synth_dir, tmp_path, "killed")
    kill_at = random.Random().randint(3, 8)
    proc = subprocess.Popen([sys.executable, "-m", "tfx.cli", "train", str(cfg_b), "--nproc",
                             "2"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    trace = run_b / "trace" / "rank0.jsonl"
    end = time.time() + 240
    while not (trace.exists() and len(trace.read_text().splitlines()) >= kill_at):
        assert time.time() < end and proc.poll() is None
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, no chance to save
    proc.wait()
    before = checkpoint.latest_tag(run_b / "checkpoints")
    assert before != "step_0000010", "the run finished before the kill"
    result = run_tfx("train", str(cfg_b), "--nproc", "2", "--resume", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {before}" in result.stderr

    a, b = final_weights(run_a), final_weights(run_b)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), f"killed at step {kill_at}"
    resumed_at = int(before.split("_")[1])
    for r in (0, 1):  # the resumed run re-read exactly the uninterrupted run's samples
        assert keys(run_b)[r][-(10 - resumed_at):] == keys(run_a)[r][resumed_at:]


def test_kill_during_save_keeps_the_previous_checkpoint(synth_dir, tmp_path):
    cfg, run = write_cfg(synth_dir, tmp_path, "run")
    result = run_tfx("train", str(cfg), "--nproc", "2", timeout=300,
                     env={"TFX_FAULT": "kill_in_save:4"})
    assert result.returncode != 0
    ckpts = run / "checkpoints"
    assert (ckpts / "step_0000004").is_dir()  # half written: DeepSpeed's files, no marker
    assert not (ckpts / "step_0000004" / "tfx_complete.json").exists()
    assert checkpoint.latest_tag(ckpts) == "step_0000002"
    result = run_tfx("train", str(cfg), "--nproc", "2", "--resume", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step_0000002 at step 2" in result.stderr
    assert checkpoint.latest_tag(ckpts) == "step_0000010"


def test_rank_divergence_fails_fast_naming_rank_and_module(synth_dir, tmp_path):
    cfg, run = write_cfg(synth_dir, tmp_path, "run", check_divergence_steps=3,
                         dist_timeout_s=60)
    t0 = time.time()
    result = run_tfx("train", str(cfg), "--nproc", "2", timeout=300,
                     env={"TFX_FAULT": "diverge:1"})
    assert result.returncode != 0
    assert time.time() - t0 < 120  # well before a hang would end
    line = next(ln for ln in result.stderr.splitlines() if "RankDivergence:" in ln)
    assert "ranks diverged at step 0" in line
    assert "rank 0 -> <root>" in line and "rank 1 -> vision" in line
