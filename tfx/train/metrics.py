"""Metrics: one logger with fixed keys, written as JSONL and TensorBoard events on rank 0.

Data flow position: loop -> **metrics** -> `metrics.jsonl`, `tb/`. A value may be a number, None
(not measured, e.g. MFU without a known peak) or a flat dict of numbers (`lr` per part), which
TensorBoard shows as `train/lr/projector`, ... A resumed run first drops the rows of the steps it
is about to redo, and its TensorBoard writer purges them, so no step appears twice.
"""

from __future__ import annotations

import json
from pathlib import Path

KEYS = ("step", "loss", "grad_norm", "lr", "tokens_per_s", "visual_tokens", "n_visual",
        "padding_frac", "mfu", "tflops", "peak_mem_mb", "skipped", "step_time_s", "loss_by_n")


class MetricsLogger:
    def __init__(self, out_dir: str | Path, enabled: bool, resume_step: int = 0):
        """`resume_step`: the step the run continues at; rows after it are replaced."""
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        if self.path.is_file():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            tmp.replace(self.path)
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=resume_step + 1)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        unknown = set(row) - set(KEYS)
        if unknown:
            raise KeyError(f"metric keys not in the fixed set: {sorted(unknown)}")
        full = {k: row.get(k) for k in KEYS}
        with self.path.open("a") as f:
            f.write(json.dumps(full) + "\n")
        for k, v in full.items():
            if k == "step":
                continue
            for name, x in (v.items() if isinstance(v, dict) else [(None, v)]):
                if isinstance(x, (int, float)):
                    self._tb.add_scalar(f"train/{k}" + (f"/{name}" if name else ""), x,
                                        full["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
