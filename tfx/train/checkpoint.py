"""Checkpoints: DeepSpeed engine state + tfx state under named keys, made visible atomically and
verifiable file by file.

Data flow position: loop -> **checkpoint** -> eval / export / resume. Layout:
`<output_dir>/checkpoints/step_000123/` holds DeepSpeed's files, `config.yaml`, and per rank
`tfx_state_rank{r}.json` (data position) and `rng_rank{r}.pt`. After every rank finished writing,
each rank hashes its share of the files; rank 0 writes `tfx_complete.json` (the train state and
every file's size and SHA-256), then moves `latest` (DeepSpeed's own pointer file). A crash during
a save therefore leaves the previous checkpoint as the latest complete one, and a file damaged
later (a truncated copy, a full disk) is found by `verify` before anything loads it: `--resume`
falls back to the previous complete checkpoint, eval and convert name the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from tfx.errors import CheckpointError
from tfx.train import faults
from tfx.train.dist import all_gather_objects, barrier, rank, world_size

COMPLETE = "tfx_complete.json"


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def _files(tag_dir: Path) -> list[Path]:
    return sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != COMPLETE)


def save(engine, ckpt_root: Path, train_state: dict, rank_state: dict, rng: dict,
         config_yaml: str, keep_last: int) -> Path:
    """Every rank calls this at the same step. `train_state` is the same on every rank;
    `rank_state` (JSON) and `rng` (torch.save) are this rank's own."""
    import torch

    tag = tag_for(train_state["step"])
    tag_dir = ckpt_root / tag
    engine.save_checkpoint(str(ckpt_root), tag=tag, client_state={"tfx": train_state},
                           save_latest=False)
    write_atomic(tag_dir / f"tfx_state_rank{rank()}.json", json.dumps(rank_state))
    torch.save(rng, tag_dir / f"rng_rank{rank()}.pt")
    faults.kill_in_save(train_state["step"])  # tests only: die with the checkpoint half written
    if rank() == 0:
        (tag_dir / "config.yaml").write_text(config_yaml)
    barrier()
    files = _files(tag_dir)
    mine = {str(p.relative_to(tag_dir)): {"size": p.stat().st_size, "sha256": sha256(p)}
            for i, p in enumerate(files) if i % world_size() == rank()}
    manifest = {}
    for part in all_gather_objects(mine):
        manifest.update(part)
    if rank() == 0:
        write_atomic(tag_dir / COMPLETE, json.dumps({"state": train_state, "files": manifest},
                                                    indent=1))
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


def read_complete(tag_dir: Path) -> dict:
    """The completion record: {"state": train state, "files": {name: {size, sha256}}}."""
    try:
        record = json.loads((tag_dir / COMPLETE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{tag_dir / COMPLETE}: unreadable ({e})") from None
    if "files" not in record:  # written before manifests existed: the record is the state
        record = {"state": record, "files": {}}
    return record


def verify(tag_dir: Path, share: tuple[int, int] = (0, 1)) -> str | None:
    """The first problem with this share (i % parts == part) of the checkpoint's files, as one
    line naming the file, or None. Sizes are checked for every file (cheap), checksums for the
    share only, so the ranks of a resume split the hashing."""
    part, parts = share
    files = read_complete(tag_dir)["files"]
    for i, (name, want) in enumerate(sorted(files.items())):
        path = tag_dir / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{path} has {size:,} bytes, {want['size']:,} when saved (truncated?)"
        if i % parts == part and sha256(path) != want["sha256"]:
            return f"{path} does not match its SHA-256 from the save (damaged)"
    return None


def verified_resume_tag(ckpt_root: Path, log) -> str | None:
    """Collective (every rank calls it): the newest complete checkpoint whose files all verify;
    a damaged one is named in one line and the previous one is tried."""
    tags = complete_tags(ckpt_root)
    latest = latest_tag(ckpt_root)
    order = ([latest] if latest else []) + [t for t in reversed(tags) if t != latest]
    for i, tag in enumerate(order):
        problems = [p for p in all_gather_objects(verify(ckpt_root / tag,
                                                         (rank(), world_size()))) if p]
        if not problems:
            return tag
        if rank() == 0:
            fallback = order[i + 1] if i + 1 < len(order) else "step 0 (no older checkpoint)"
            log.warning(f"checkpoint {tag} is damaged: {problems[0]}; falling back to {fallback}")
    return None


def resolve(path: str | Path) -> tuple[Path, str]:
    """A run folder (its latest checkpoint) or one checkpoint folder -> (ckpt_root, tag), with
    every file verified (CheckpointError naming a damaged one)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (expected a run folder or a "
                              f"checkpoints/step_* folder)")
    if (path / COMPLETE).is_file():
        root, tag = path.parent, path.name
    else:
        root, tag = next(((r, t) for r in (path / "checkpoints", path) if r.is_dir()
                          for t in [latest_tag(r)] if t), (None, None))
        if root is None:
            raise CheckpointError(f"{path}: no complete checkpoint (expected a run folder or a "
                                  f"checkpoints/step_* folder holding {COMPLETE})")
    problem = verify(root / tag)
    if problem:
        older = [t for t in complete_tags(root) if t < tag]
        hint = f"; an older one is {root / older[-1]}" if older else ""
        raise CheckpointError(f"checkpoint {root / tag} is damaged: {problem}{hint}")
    return root, tag


def run_dir_of(ckpt_root: Path) -> Path:
    """The run folder a checkpoints/ folder belongs to (eval writes beside what it evaluated)."""
    return ckpt_root.parent if ckpt_root.name == "checkpoints" else ckpt_root


def rank_files(tag_dir: Path) -> tuple[dict, dict | None]:
    """This rank's data position and RNG state from a checkpoint."""
    import torch

    data = json.loads((tag_dir / f"tfx_state_rank{rank()}.json").read_text())
    rng_file = tag_dir / f"rng_rank{rank()}.pt"
    return data, (torch.load(rng_file) if rng_file.is_file() else None)


def load_consolidated(ckpt_root: Path, tag: str) -> dict:
    """Full fp32 state dict from the (ZeRO-sharded) checkpoint, via DeepSpeed's consolidation.
    DeepSpeed is imported here too, lazily: its zero_to_fp32 is the reference consolidator."""
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:  # it prints its progress on stdout, which is the commands' output: keep it off
        with contextlib.redirect_stdout(io.StringIO()):
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_root), tag=tag)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{ckpt_root / tag}: cannot consolidate ({e})") from None
