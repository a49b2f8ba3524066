"""Preemption without SLURM: SIGUSR1 to the ranks of a 2-rank ZeRO-3 run stops every rank after
the same step with a complete checkpoint and exit code 75; --resume finishes the run without
repeating a step before the signal, with the same N and samples as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import ROOT, set_train

pytestmark = pytest.mark.multiproc


def trace(run, r):
    return [json.loads(x) for x in (run / "trace" / f"rank{r}.jsonl").read_text().splitlines()]


def test_usr1_checkpoints_stops_and_resumes(synth_dir, two_rank_run, tmp_path):
    base_cfg, base_run = two_rank_run  # the same config, 6 steps uninterrupted
    raw = yaml.safe_load(base_cfg.read_text())
    run = tmp_path / "run"
    set_train(raw, output_dir=str(run), max_steps=40, save_every=0)
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "tfx.cli", "train", str(cfg), "--nproc", "2"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until both ranks have done 3 steps
        ok = all((run / "trace" / f"rank{r}.jsonl").exists() and len(trace(run, r)) >= 3
                 for r in (0, 1))
        if ok:
            break
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    for r in (0, 1):
        os.kill(int((run / f"rank{r}.pid").read_text()), signal.SIGUSR1)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 75, err[-3000:]
    stopped = [len(trace(run, r)) for r in (0, 1)]
    assert stopped[0] == stopped[1] < 40  # both ranks stopped after the same step
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{stopped[0]:07d}"
    assert (run / "checkpoints" / latest / "tfx_complete.json").is_file()
    assert "preempted: stopped after step" in err

    raw["train"]["max_steps"] = stopped[0] + 3
    cfg.write_text(yaml.safe_dump(raw))
    done = subprocess.run(["timeout", "240", sys.executable, "-m", "tfx.cli", "train", str(cfg),
                           "--nproc", "2", "--resume"], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for r in (0, 1):
        steps = [t["step"] for t in trace(run, r)]
        assert steps == list(range(stopped[0] + 3))  # nothing before the signal repeated
    # same N and samples as the uninterrupted 6-step run, across the stop
    for r in (0, 1):
        assert trace(run, r)[:6] == trace(base_run, r)
