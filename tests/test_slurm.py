"""tfx under a real SLURM controller (launchers/local-cluster.sh: slurmctld + 2 slurmd on this
host): both launch paths train on 2 nodes, and a job sent SIGUSR1 mid-run checkpoints,
requeues itself, resumes and finishes without repeating a step. Needs root and Debian's slurm
packages (the cluster script installs them); skipped with the reason otherwise."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from conftest import ROOT, set_train, tiny_config_yaml

pytestmark = pytest.mark.multiproc
CLUSTER = ROOT / "launchers" / "local-cluster.sh"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("the local SLURM cluster needs root and apt-get (CI runs as root)")
    state = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, TFX_SLURM_DIR=str(state), TFX_SLURM_PORT="6917",
               TFX_SLURMD_PORT="17101")
    up = subprocess.run(["timeout", "180", "bash", str(CLUSTER), "up", "2"], env=env,
                        capture_output=True, text=True)
    if up.returncode != 0:
        subprocess.run(["bash", str(CLUSTER), "down"], env=env)
        pytest.fail(f"local SLURM cluster did not come up:\n{up.stdout[-2000:]}{up.stderr[-2000:]}")
    env.update(SLURM_CONF=str(state / "slurm.conf"), TFX_PYTHON=sys.executable)
    yield env
    subprocess.run(["timeout", "120", "bash", str(CLUSTER), "down"], env=env)


def job_field(env, job, field):
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True,
                         text=True).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith(field + "=")), None)


def wait_job(env, job, timeout=300):
    end = time.time() + timeout
    while time.time() < end:
        if job_field(env, job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                               "NODE_FAIL", "OUT_OF_MEMORY"):
            return job_field(env, job, "JobState")
        time.sleep(1)
    subprocess.run(["scancel", job], env=env)
    raise AssertionError(f"job {job} did not finish in {timeout} s")


def submit(env, script, cfg, out, *overrides):
    return subprocess.run(["sbatch", "--parsable", f"--chdir={ROOT}", f"--output={out}",
                           str(ROOT / "launchers" / script), str(cfg), *overrides], env=env,
                          capture_output=True, text=True, check=True).stdout.strip()


def steps(run, rank):
    return [json.loads(x)["step"]
            for x in (run / "trace" / f"rank{rank}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("script", ["tfx-srun.sbatch", "tfx-deepspeed.sbatch"])
def test_sbatch_trains_on_two_nodes(slurm, synth_dir, tmp_path, script):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(tiny_config_yaml(synth_dir, tmp_path / "run"))
    job = submit(slurm, script, cfg, tmp_path / "job.out")
    state = wait_job(slurm, job)
    log = (tmp_path / "job.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert job_field(slurm, job, "NodeList") == "n[1-2]"
    for rank in (0, 1):  # two ranks, one per node, sharded parameters
        table = json.loads((tmp_path / "run" / f"params_rank{rank}.json").read_text())
        assert all(row["on_rank"] < row["params"] for row in table.values())
        assert steps(tmp_path / "run", rank) == list(range(6))
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_0000006"


def test_usr1_checkpoints_requeues_and_resumes(slurm, synth_dir, tmp_path):
    raw = yaml.safe_load(tiny_config_yaml(synth_dir, tmp_path / "run"))
    set_train(raw, max_steps=120, save_every=0)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    job = submit(slurm, "tfx-srun.sbatch", cfg, tmp_path / "job.out")
    trace = tmp_path / "run" / "trace" / "rank1.jsonl"
    end = time.time() + 180
    while not (trace.exists() and len(trace.read_text().splitlines()) >= 3):
        assert time.time() < end and job_field(slurm, job, "JobState") in ("PENDING", "RUNNING")
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True)
    state = wait_job(slurm, job)
    log = (tmp_path / "job.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert job_field(slurm, job, "Restarts") == "1"
    assert "requeued SLURM job" in log and "run 1 on" in log
    stopped = int(log.split("preempted: stopped after step ")[1].split()[0])
    assert f"resumed from step_{stopped:07d} at step {stopped}" in log
    for rank in (0, 1):  # every step once: nothing before the signal was repeated
        assert steps(tmp_path / "run", rank) == list(range(120))
