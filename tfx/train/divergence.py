"""Divergence guard (`train.check_divergence_steps: K`, a debug option).

Under ZeRO-3 every forward of a module fetches its parameters with a collective, so all ranks
must enter the same modules in the same order. A rank-dependent branch (skipping the vision
tower for a text-only batch, an extra call on one rank) desynchronises these fetches and the
job hangs until the collective timeout. For the first K steps the guard adds a pre-forward hook
to every module, registered before DeepSpeed's own, that all-gathers the index of the module
each rank is about to enter; the first mismatch raises at once with the ranks and module names.
It costs one small collective per module call, so it is off by default.
"""

from __future__ import annotations

from torch import nn

from tfx.errors import TfxError
from tfx.train.dist import all_gather_ints, world_size


class RankDivergence(TfxError):
    """Ranks entered different modules: they would desynchronise ZeRO-3's collectives."""


class DivergenceGuard:
    def __init__(self, model: nn.Module, steps: int):
        self.steps, self.step, self.calls = steps, 0, 0
        self.names = [name or "<root>" for name, _ in model.named_modules()]
        self.handles = [m.register_forward_pre_hook(self._hook(i))
                        for i, (_, m) in enumerate(model.named_modules())] if steps else []

    def _hook(self, index: int):
        def check(module, args):
            if self.step >= self.steps or world_size() < 2:
                return
            self.calls += 1
            every = all_gather_ints([index, self.calls])
            seen = {r: t[0] for r, t in enumerate(every)}
            if len(set(seen.values())) > 1:
                where = ", ".join(f"rank {r} -> {self.names[i]}" for r, i in seen.items())
                raise RankDivergence(f"ranks diverged at step {self.step}, module call "
                                     f"{self.calls}: {where}")
        return check

    def end_step(self) -> None:
        self.step += 1
        self.calls = 0
        if self.step == self.steps:
            for h in self.handles:
                h.remove()
            self.handles = []
