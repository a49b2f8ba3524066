"""The train state: what besides the engine a checkpoint must restore, with its own state dict.

Data flow position: loop <-> **train state** <-> checkpoint. Identical on every rank (the
per-rank data position is saved beside it by `checkpoint.save`). Restoring checks that the
checkpoint was made by the same model config and world size, and warns when the token schedule
changed (a new stage, or an edited config).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tfx.errors import CheckpointError


@dataclass
class TrainState:
    config_hash: str
    world_size: int
    schedule: dict = field(default_factory=dict)
    step: int = 0  # optimizer steps done
    visual_tokens: float = 0.0  # visual tokens fed to the LLM so far, all ranks

    def state_dict(self) -> dict:
        return {"step": self.step, "visual_tokens": self.visual_tokens,
                "schedule": self.schedule, "config_hash": self.config_hash,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict, where: str, log) -> None:
        if state["config_hash"] != self.config_hash:
            raise CheckpointError(f"{where} was made by a different model config")
        if state["world_size"] != self.world_size:
            raise CheckpointError(f"{where} was made with {state['world_size']} ranks; "
                                  f"restart with the same number ({self.world_size} now)")
        if state["schedule"] != self.schedule:
            log.warning(f"token schedule changed since {where}: {state['schedule']} -> "
                        f"{self.schedule}")
        self.step = int(state["step"])
        self.visual_tokens = float(state.get("visual_tokens", 0.0))
