"""Fault injection for the fault-tolerance tests, from `TFX_FAULT` (unset in real runs).

- `kill_in_save:STEP` SIGKILLs every rank while checkpoint STEP is half written (the DeepSpeed
  files are there, the completion marker is not).
- `diverge:RANK` makes RANK call the vision tower once more than the others in every step: the
  kind of rank-dependent branch that desynchronises ZeRO-3's parameter fetches.
- `slow:MS` makes every forward of the model sleep MS milliseconds on every rank (numerics
  unchanged), so a test can signal a tiny run at a step of its choosing.
- `crash:RANK:CALL` raises a RuntimeError on RANK in its CALL-th forward of the model
  (0-based; the step CALL when grad_accum is 1), as a bug or a dying GPU would.
Hooks are installed on the model, so the loop itself carries no test code.
"""

from __future__ import annotations

import os
import signal


def _fault() -> tuple[str, list[int]] | None:
    spec = os.environ.get("TFX_FAULT", "")
    if ":" not in spec:
        return None
    name, *values = spec.split(":")
    return name, [int(v) for v in values]


def kill_in_save(step: int) -> None:
    if _fault() == ("kill_in_save", [step]):
        os.kill(os.getpid(), signal.SIGKILL)


def install(model, rank: int) -> None:
    """Register this rank's injected fault, if any, as hooks on the model."""
    import torch

    fault = _fault()
    if fault is None:
        return
    name, values = fault
    if name == "diverge" and values == [rank]:
        def extra_fetch(module, args, kwargs):
            with torch.no_grad():  # one more ZeRO-3 fetch than the other ranks make
                module.vision(kwargs["pixel_values"])
        # prepend: before the divergence guard's own hook on the root module
        model.register_forward_pre_hook(extra_fetch, with_kwargs=True, prepend=True)
    if name == "slow":
        import time

        model.register_forward_pre_hook(lambda module, args: time.sleep(values[0] / 1000))
    if name == "crash" and values[0] == rank:
        calls = [0]

        def crash(module, args):
            if calls[0] == values[1]:
                raise RuntimeError(f"TFX_FAULT: injected crash on rank {rank} in forward "
                                   f"{values[1]}")
            calls[0] += 1
        model.register_forward_pre_hook(crash)
