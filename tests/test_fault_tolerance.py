"""Fault tolerance on 2 CPU ranks under ZeRO-3: kill -9 of every rank, or Ctrl-C at a random
step, then --resume, ends with bitwise the weights of an uninterrupted run and the same sample
keys; a second Ctrl-C aborts at once; a kill in the middle of a checkpoint save leaves the
previous checkpoint as `latest`; a crashed rank ends the run in seconds with a last line naming
the checkpoint and the resume command; a damaged checkpoint file is found and named, and
--resume falls back to the previous checkpoint; an injected rank divergence fails at once with
the ranks and modules named."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
import yaml

from tfx.train import checkpoint

from conftest import ROOT, last_line, run_tfx, set_train, tiny_config_yaml

pytestmark = pytest.mark.multiproc


def write_cfg(synth_dir, tmp_path, name, **train):
    raw = yaml.safe_load(tiny_config_yaml(synth_dir, tmp_path / name))
    raw["data"]["num_workers"] = 2
    set_train(raw, max_steps=10, save_every=2, keep_last=5, **train)
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


@pytest.fixture(scope="module")
def straight(synth_dir, tmp_path_factory):
    """The uninterrupted 10-step run the interrupted ones must reproduce bitwise."""
    cfg, run = write_cfg(synth_dir, tmp_path_factory.mktemp("straight"), "straight")
    result = run_tfx("train", str(cfg), "--nproc", "2", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return cfg, run


def wait_for_steps(proc, run, n, timeout=240):
    trace = run / "trace" / "rank0.jsonl"
    end = time.time() + timeout
    while not (trace.exists() and len(trace.read_text().splitlines()) >= n):
        assert time.time() < end and proc.poll() is None, proc.poll()
        time.sleep(0.05)


def start(cfg, *args, env=None):
    """`tfx train` as from a terminal: its own process group, the target of Ctrl-C."""
    return subprocess.Popen([sys.executable, "-m", "tfx.cli", "train", str(cfg), *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=dict(os.environ, **(env or {})))


def test_ctrl_c_checkpoints_the_step_and_resume_is_bitwise_identical(synth_dir, tmp_path,
                                                                      straight):
    _, run_a = straight
    cfg_b, run_b = write_cfg(synth_dir, tmp_path, "interrupted")
    stop_at = random.Random().randint(2, 8)
    proc = start(cfg_b, "--nproc", "2", env={"TFX_FAULT": "slow:150"})
    wait_for_steps(proc, run_b, stop_at)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    stopped = len((run_b / "trace" / "rank0.jsonl").read_text().splitlines())
    tag = f"step_{stopped:07d}"
    assert stopped < 10 and checkpoint.latest_tag(run_b / "checkpoints") == tag
    assert err.strip().splitlines()[-1] == (
        f"tfx train: interrupted; latest complete checkpoint {run_b / 'checkpoints' / tag}; "
        f"continue with: tfx train {cfg_b} --nproc 2 --resume")
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert sum("got SIGINT" in line for line in err.splitlines()) == 2  # one line per rank
    result = run_tfx("train", str(cfg_b), "--nproc", "2", "--resume", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {tag} at step {stopped}" in result.stderr
    a, b = final_weights(run_a), final_weights(run_b)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), f"interrupted after step {stopped}"


def test_a_second_ctrl_c_aborts_at_once(synth_dir, tmp_path):
    cfg, run = write_cfg(synth_dir, tmp_path, "aborted")
    proc = start(cfg, "--nproc", "2", env={"TFX_FAULT": "slow:400"})
    wait_for_steps(proc, run, 3)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.05)
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert time.time() - t0 < 10  # not after the step and a save
    assert proc.returncode == 130
    assert last_line(subprocess.CompletedProcess([], 130, "", err)).startswith(
        "tfx train: aborted by a second Ctrl-C; latest complete checkpoint")


def test_a_crashed_rank_ends_the_run_with_the_resume_command(synth_dir, tmp_path):
    cfg, run = write_cfg(synth_dir, tmp_path, "crashed")
    t0 = time.time()
    result = run_tfx("train", str(cfg), "--nproc", "2", timeout=120,
                     env={"TFX_FAULT": "crash:1:5"})
    assert time.time() - t0 < 60
    assert result.returncode == 1
    assert "injected crash on rank 1 in forward 5" in result.stderr
    assert last_line(result) == (
        f"tfx train: stopped (exit 1); latest complete checkpoint "
        f"{run / 'checkpoints' / 'step_0000004'}; after fixing the cause, continue with: "
        f"tfx train {cfg} --nproc 2 --resume")


def test_a_damaged_checkpoint_is_named_and_resume_falls_back(two_rank_run, tmp_path):
    import shutil

    cfg, base = two_rank_run  # checkpoints at steps 3 and 6
    run = tmp_path / "run"
    shutil.copytree(base, run)
    bad = run / "checkpoints" / "step_0000006" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    size = bad.stat().st_size
    bad.write_bytes(bad.read_bytes()[:size // 2])  # a truncated copy
    for cmd in (("eval", str(run), "--counts", "4"),
                ("convert", str(run), str(tmp_path / "hf"))):
        result = run_tfx(*cmd, timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert last_line(result) == (
            f"CheckpointError: checkpoint {run / 'checkpoints' / 'step_0000006'} is damaged: "
            f"{bad} has {size // 2:,} bytes, {size:,} when saved (truncated?); an older one is "
            f"{run / 'checkpoints' / 'step_0000003'}")
    result = run_tfx("train", str(cfg), f"train.output_dir={run}", "--nproc", "2", "--resume",
                     timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    damaged = [ln for ln in result.stderr.splitlines() if "is damaged" in ln]
    assert len(damaged) == 1 and damaged[0].endswith(
        f"checkpoint step_0000006 is damaged: {bad} has {size // 2:,} bytes, {size:,} when "
        f"saved (truncated?); falling back to step_0000003")
    assert "resumed from step_0000003 at step 3" in result.stderr
    assert checkpoint.latest_tag(run / "checkpoints") == "step_0000006"
    assert checkpoint.verify(run / "checkpoints" / "step_0000006") is None  # written anew


def test_a_flipped_byte_is_found_by_its_checksum(two_rank_run, tmp_path):
    import shutil

    _, base = two_rank_run
    tag = tmp_path / "step_0000003"
    shutil.copytree(base / "checkpoints" / "step_0000003", tag)
    assert checkpoint.verify(tag) is None
    victim = tag / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert checkpoint.verify(tag) == f"{victim} does not match its SHA-256 from the save " \
        "(damaged)"


def test_kill_9_then_resume_is_bitwise_identical(synth_dir, tmp_path, straight):
    _, run_a = straight
    cfg_b, run_b = write_cfg(synth_dir, tmp_path, "killed")
    kill_at = random.Random().randint(3, 8)
    proc = start(cfg_b, "--nproc", "2", env={"TFX_FAULT": "slow:100"})
    wait_for_steps(proc, run_b, kill_at)
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.kill()  # the launcher and both ranks, no chance to save
    proc.kill()
    proc.communicate()
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
