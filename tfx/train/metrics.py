"""Metrics: one logger with fixed keys, written as JSONL and TensorBoard events on rank 0."""

from __future__ import annotations

import json
from pathlib import Path

KEYS = ("step", "loss", "grad_norm", "lr", "tokens_per_s", "visual_tokens", "n_visual",
        "padding_frac", "mfu", "peak_mem_mb", "skipped", "step_time_s")


class MetricsLogger:
    def __init__(self, out_dir: str | Path, enabled: bool):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(out_dir) / "tb"))

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
            if k != "step" and isinstance(v, (int, float)):
                self._tb.add_scalar(f"train/{k}", v, full["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
