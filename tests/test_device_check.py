"""`make device-check DRY=1`: the GPU check's script on this CPU at tiny sizes, end to end, so
it is known to work before a GPU is lent."""

import pytest

from conftest import ROOT

pytestmark = pytest.mark.multiproc


def test_device_check_dry_run_writes_its_report(tmp_path):
    import os
    import subprocess

    env = dict(os.environ, DRY="1", OUT=str(tmp_path))
    result = subprocess.run(["timeout", "600", "bash", str(ROOT / "launchers/device-check.sh")],
                            capture_output=True, text=True, env=env, cwd=ROOT)
    report = (tmp_path / "device-check.md").read_text()
    assert result.returncode == 0, result.stdout[-3000:] + report[-3000:]
    for step in ("environment", "gpu-tests", "kernel", "training", "eval"):
        assert f"| {step} | ok |" in report, step
    assert "| fixed-36 | 36 |" in report and "| flex 2:3:5 | all |" in report
    assert "tfx step / bare DeepSpeed loop at N=36" in report
    assert (tmp_path / "training.csv").is_file() and (tmp_path / "kernel" / "projector.csv")
