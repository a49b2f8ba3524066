"""Sample trace (`logging.trace_samples`): what each rank actually fed the model at each step.

Data flow position: beside the loop, after collate. One JSON line per step and rank in
`trace/rank{r}.jsonl`: the step, its micro-batches' sample keys, and per row the number of
`<IMG_CONTEXT>` ids counted in the batch's input ids (the visual tokens the model really got:
0 for a text-only row). Tests compare it with the schedule and across ranks; users use it to
find which samples a step saw. Rows of steps redone after a resume replace the old ones.
"""

from __future__ import annotations

import json
from pathlib import Path


class SampleTrace:
    def __init__(self, out_dir: Path, rank: int, enabled: bool, context_id: int):
        self.path = out_dir / "trace" / f"rank{rank}.jsonl"
        self.enabled, self.context_id = enabled, context_id
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """Drop rows of steps >= `step` (0-based): a resumed run redoes them."""
        if self.enabled and self.path.is_file():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] < step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            tmp.replace(self.path)

    def write(self, step: int, batches: list[dict]) -> None:
        if not self.enabled:
            return
        row = {"step": step,
               "micro_batches": [b["keys"] for b in batches],
               "keys": [k for b in batches for k in b["keys"]],
               "context_tokens": [int(c) for b in batches
                                  for c in (b["input_ids"] == self.context_id).sum(dim=1)]}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
