"""Checkpoints: DeepSpeed engine state + tfx state under named keys, made visible atomically.

Layout: `<output_dir>/checkpoints/step_000123/` holds DeepSpeed's files, `config.yaml`, and
`tfx_state_rank{r}.json` (data position of each rank). `latest` (DeepSpeed's own pointer file)
is replaced atomically by rank 0 only after every rank finished writing, so a crash during a
save leaves the previous checkpoint as `latest`. The last `keep_last` complete checkpoints stay.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tfx.errors import CheckpointError
from tfx.train import faults
from tfx.train.dist import barrier, rank

COMPLETE = "tfx_complete.json"


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(engine, ckpt_root: Path, step: int, train_state: dict, data_state: dict,
         config_yaml: str, keep_last: int, rng: dict | None = None) -> Path:
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_root), tag=tag, client_state={"tfx": train_state},
                           save_latest=False)
    tag_dir = ckpt_root / tag
    write_atomic(tag_dir / f"tfx_state_rank{rank()}.json", json.dumps(data_state))
    if rng is not None:
        import torch

        torch.save(rng, tag_dir / f"rng_rank{rank()}.pt")
    faults.kill_in_save(step)  # tests only: die with the checkpoint half written
    barrier()
    if rank() == 0:
        (tag_dir / "config.yaml").write_text(config_yaml)
        write_atomic(tag_dir / COMPLETE, json.dumps(train_state))
        write_atomic(ckpt_root / "latest", tag)
        prune(ckpt_root, keep_last)
    barrier()
    return tag_dir


def complete_tags(ckpt_root: Path) -> list[str]:
    return sorted(p.name for p in ckpt_root.glob("step_*") if (p / COMPLETE).is_file())


def prune(ckpt_root: Path, keep_last: int) -> None:
    keep = set(complete_tags(ckpt_root)[-keep_last:])
    for p in ckpt_root.glob("step_*"):
        if p.name not in keep and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def latest_tag(ckpt_root: Path) -> str | None:
    pointer = ckpt_root / "latest"
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if (ckpt_root / tag / COMPLETE).is_file():
            return tag
    tags = complete_tags(ckpt_root)
    return tags[-1] if tags else None


def resolve(path: str | Path) -> tuple[Path, str]:
    """A run folder (its latest checkpoint) or one checkpoint folder -> (ckpt_root, tag)."""
    path = Path(path)
    if (path / COMPLETE).is_file():
        return path.parent, path.name
    for root in (path / "checkpoints", path):
        if root.is_dir():
            tag = latest_tag(root)
            if tag is not None:
                return root, tag
    raise CheckpointError(f"{path}: no complete checkpoint (expected a run folder or a "
                          f"checkpoints/step_* folder holding {COMPLETE})")


def load_consolidated(ckpt_root: Path, tag: str) -> dict:
    """Full fp32 state dict from the (ZeRO-sharded) checkpoint, via DeepSpeed's consolidation.
    DeepSpeed is imported here too, lazily: its zero_to_fp32 is the reference consolidator."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_root), tag=tag)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise CheckpointError(f"{ckpt_root / tag}: cannot consolidate ({e})") from None
