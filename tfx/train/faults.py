"""Fault injection for the fault-tolerance tests, from `TFX_FAULT` (unset in real runs).

`TFX_FAULT=kill_in_save:STEP` SIGKILLs every rank while checkpoint STEP is half written (the
DeepSpeed files are there, the completion marker is not). `TFX_FAULT=diverge:RANK` makes RANK
call the projector once more than the others in every step: the kind of rank-dependent branch
that desynchronises ZeRO-3's parameter fetches.
"""

from __future__ import annotations

import os
import signal


def _fault() -> tuple[str, int] | None:
    spec = os.environ.get("TFX_FAULT", "")
    if ":" not in spec:
        return None
    name, value = spec.split(":", 1)
    return name, int(value)


def kill_in_save(step: int) -> None:
    if _fault() == ("kill_in_save", step):
        os.kill(os.getpid(), signal.SIGKILL)


def diverges(rank: int) -> bool:
    return _fault() == ("diverge", rank)
