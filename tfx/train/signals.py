"""Signals: SIGUSR1/SIGTERM (preemption) and SIGINT (Ctrl-C) stop the run at a step boundary.

Data flow position: beside the loop. The handler only records the signal. The step's one
all-reduce carries each rank's flag, so all ranks see the same sum and stop after the same step:
they write a complete checkpoint (model, optimizer, scheduler, token schedule, data position,
RNG) and exit with EXIT_PREEMPTED (SIGUSR1/SIGTERM; under SLURM with `requeue`, rank 0 runs
`scontrol requeue $SLURM_JOB_ID`) or EXIT_INTERRUPTED (SIGINT). Before the loop is armed
(start-up: nothing to save yet) and on a second SIGINT, Ctrl-C aborts at once
(KeyboardInterrupt, which the CLI turns into one line). `#SBATCH --signal=USR1@120` asks SLURM
for the signal two minutes before the time limit.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

from tfx.log import get_logger

log = get_logger(__name__)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"
EXIT_INTERRUPTED = 130  # the shell's code for a process stopped by SIGINT
SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Installed for the whole life of a training process; `arm()` once the loop starts."""

    def __init__(self):
        self.signum: int | None = None
        self.armed = False
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and (not self.armed or self.signum == signal.SIGINT):
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            raise KeyboardInterrupt  # start-up, or the second Ctrl-C: abort now
        if not self.armed:  # SIGTERM/SIGUSR1 before the first step: stop right after it
            self.signum = self.signum or signum
            return
        if self.signum is None:
            self.signum = signum
            log.warning(f"got {signal.Signals(signum).name}: stopping after this step "
                        f"(a second Ctrl-C aborts without saving)"
                        if signum == signal.SIGINT else
                        f"got {signal.Signals(signum).name}: stopping after this step")

    def arm(self) -> None:
        self.armed = True

    @property
    def votes(self) -> list[float]:
        """This rank's votes in the step's all-reduce: [stop, stop because of Ctrl-C]."""
        return [float(self.signum is not None), float(self.signum == signal.SIGINT)]

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
