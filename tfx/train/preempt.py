"""Preemption: SIGUSR1 or SIGTERM asks the run to stop at the next step boundary.

The handler only records the signal. The step's one all-reduce carries each rank's flag, so all
ranks see the same sum and stop after the same step: they write a complete checkpoint (model,
optimizer, scheduler, token schedule, data position, RNG), then, under SLURM with
`train.requeue`, rank 0 runs `scontrol requeue $SLURM_JOB_ID`. Every rank exits with
EXIT_PREEMPTED, which the sbatch templates in launchers/ also treat as "requeue me".
`#SBATCH --signal=USR1@120` asks SLURM for the signal two minutes before the time limit.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

from tfx.log import get_logger

log = get_logger(__name__)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    def __init__(self):
        self.signum: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            log.warning(f"got {signal.Signals(signum).name}: stopping after this step")

    @property
    def flag(self) -> float:
        return 0.0 if self.signum is None else 1.0

    def uninstall(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)


def requeue_slurm_job() -> None:
    job = os.environ.get("SLURM_JOB_ID")
    if not job or not shutil.which("scontrol"):
        return
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if done.returncode == 0:
        log.info(f"requeued SLURM job {job}")
    else:
        log.warning(f"scontrol requeue {job} failed ({done.stderr.strip()}); the exit code "
                    f"{EXIT_PREEMPTED} lets the job script requeue instead")
