"""Token-count schedule: the number(s) of visual tokens N used at each optimizer step.

Data flow position: shards -> decode -> **N = schedule.counts_at(step)** -> bucketing ->
collate. The counts are a pure function of (seed, step): every rank and every micro-batch of a
step agree without communicating, and a resumed run draws what it would have drawn
uninterrupted. `fixed` and `random` give one count per step; `all` gives every count in every
step (the loss is then averaged over them).
"""

from __future__ import annotations

import numpy as np

from tfx.config.schema import TokensConfig


class TokenSchedule:
    def __init__(self, cfg: TokensConfig):
        self.mode, self.counts, self.seed = cfg.mode, tuple(cfg.counts), cfg.seed
        self.probs = tuple(cfg.probs) if cfg.mode == "random" else \
            (1.0,) * (len(self.counts) if cfg.mode == "all" else 1)

    def n_at(self, step: int) -> int:
        """The step's one count (fixed and random modes)."""
        if self.mode == "all":
            raise ValueError("tokens.mode all uses every count in every step: use counts_at")
        if self.mode == "fixed":
            return self.counts[0]
        rng = np.random.default_rng([self.seed, step, 0x70F1E])
        return int(self.counts[rng.choice(len(self.counts), p=self.probs)])

    def counts_at(self, step: int) -> tuple[int, ...]:
        return self.counts if self.mode == "all" else (self.n_at(step),)

    def mean_tokens(self) -> float:
        """Visual tokens per image per step, on average."""
        if self.mode == "all":
            return float(sum(self.counts))
        return float(sum(c * p for c, p in zip(self.counts, self.probs)))

    def state_dict(self) -> dict:
        return {"mode": self.mode, "counts": list(self.counts), "probs": list(self.probs),
                "seed": self.seed}

    def differs_from(self, state: dict) -> bool:
        """True when a checkpoint was made under another schedule (e.g. a new stage)."""
        return state != self.state_dict()
