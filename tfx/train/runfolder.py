"""The run folder: refusing to silently reuse one, and what a run writes into it before step 0.

Data flow position: config -> **run folder** -> loop. `output_dir` holds a run when it has a
checkpoint or metric rows; starting a new run there needs `--overwrite` (which removes what tfx
wrote, and nothing else), continuing it needs `--resume`. Before step 0, rank 0 writes:
- `config.yaml`, `deepspeed.json`: the resolved configs;
- `run.json`: the working directory and command of the training, so that relative paths in the
  config (data, tokenizer) resolve later as they did then, wherever the run folder is moved;
- `tokenizer/` (a copy) and `model/{vision,llm}_config.json` (the HF configs of the towers):
  eval, convert and `init_from` rebuild the model from these without the original files.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from tfx.errors import ConfigError

RUN_JSON = "run.json"
# Everything tfx writes into a run folder; --overwrite removes exactly these.
OWNED = ("checkpoints", "metrics.jsonl", "tb", "trace", "config.yaml", "deepspeed.json",
         RUN_JSON, "tokenizer", "model")
OWNED_GLOBS = ("params_rank*.json", "rank*.pid", "eval*.json", "eval*.png", "curve.*")


def describe_run(out: Path) -> str | None:
    """What makes `out` an existing run (a checkpoint, metric rows), or None."""
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*")) \
        if (out / "checkpoints").is_dir() else []
    metrics = out / "metrics.jsonl"
    rows = sum(1 for line in metrics.read_text().splitlines() if line.strip()) \
        if metrics.is_file() else 0
    if not ckpts and not rows:
        return None
    parts = ([f"checkpoint {ckpts[-1]}"] if ckpts else []) + ([f"{rows} metric rows"]
                                                               if rows else [])
    return ", ".join(parts)


def check_output_dir(out: str | Path, *, resume: bool, overwrite: bool) -> None:
    """ConfigError when `out` holds a run and neither --resume nor --overwrite was given."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir: {out} exists and is not a folder")
    what = describe_run(out) if out.is_dir() else None
    if what and not resume and not overwrite:
        raise ConfigError(f"train.output_dir: {out} already holds a run ({what}); pass "
                          f"--resume to continue it or --overwrite to start again (deletes it)")


def clear(out: Path) -> None:
    """Remove what tfx wrote into `out` (for --overwrite); other files stay."""
    for name in OWNED:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    for pattern in OWNED_GLOBS:
        for p in out.glob(pattern):
            p.unlink()


def write_run_json(out: Path, runtime: dict | None = None, recipe: dict | None = None) -> None:
    """`runtime`: what the run resolved at start (device, dtype, attention, world size);
    `recipe`: the stages of the recipe this run is one of, and its index."""
    record = {"workdir": os.getcwd(), "argv": sys.argv, "started": time.strftime("%F %T"),
              "runtime": runtime or {}}
    if recipe:
        record["recipe"] = recipe
    (out / RUN_JSON).write_text(json.dumps(record, indent=1))


def workdir_of(run_dir: Path) -> Path | None:
    path = run_dir / RUN_JSON
    return Path(json.loads(path.read_text())["workdir"]) if path.is_file() else None


def resolve_path(value: str, run_dir: Path, key: str, flag: str) -> str:
    """A path from a run's config: absolute as is; relative against the training's workdir.
    ConfigError naming the flag to pass when it is not there."""
    p = Path(value)
    workdir = workdir_of(run_dir)
    full = p if p.is_absolute() or workdir is None else workdir / p
    if not any(Path(x).exists() for x in _expanded(full)):
        where = f" (relative to {workdir}, where the run was trained)" \
            if workdir is not None and not p.is_absolute() else ""
        raise ConfigError(f"{key}: {value}{where} does not exist; pass {flag}")
    return str(full)


def _expanded(path: Path) -> list[str]:
    import glob

    from braceexpand import braceexpand

    out = []
    for item in braceexpand(str(path)):
        out += glob.glob(item) if any(c in item for c in "*?[") else [item]
    return out


def pid_file(out: Path, rank: int) -> Path:
    return out / f"rank{rank}.pid"
