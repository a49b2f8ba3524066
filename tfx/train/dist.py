"""Process-group facts and the only collectives tfx calls itself (DeepSpeed does its own).

Data flow position: under the loop, the checkpoint and the divergence guard. Every collective
goes through here so its tensors sit on the backend's device (NCCL rejects CPU tensors; gloo
takes them): `device()` is this rank's `cuda:LOCAL_RANK` on GPU, else the CPU. The `deepspeed`
launcher shows every process all GPUs, so `setup_device()` must run before anything touches
CUDA, or every rank would use cuda:0.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_launcher_env() -> None:
    """A plain `python -m tfx.train` (no launcher) runs as rank 0 of 1."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def setup_device() -> torch.device:
    """Bind this process to its GPU (LOCAL_RANK) before CUDA is used; returns `device()`."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    return device()


def device() -> torch.device:
    """This rank's compute device: the GPU bound by `setup_device`, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _comm_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return device()
    return torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks of a few float64 numbers (counts, flags, losses)."""
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.cpu().tolist()


def all_gather_ints(values: list[int]) -> list[list[int]]:
    """Every rank's list of ints (all the same length), indexed by rank."""
    t = torch.tensor(values, dtype=torch.long, device=_comm_device())
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [values]
    every = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(every, t)
    return [e.cpu().tolist() for e in every]


def all_gather_objects(obj) -> list:
    """Every rank's small picklable object (e.g. the name of a damaged file), indexed by rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def init_process_group(timeout_s: int = 600) -> None:
    """For tools run under a launcher without DeepSpeed (`tfx eval --nproc`): join the group
    (NCCL on GPU, gloo on CPU) when WORLD_SIZE > 1; a single process stays alone."""
    import datetime

    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", 1)) < 2:
        return
    setup_device()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))


def broadcast_(tensor: torch.Tensor, src: int = 0) -> None:
    """In place: every rank gets rank `src`'s values (through the backend's device)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    moved = tensor.to(_comm_device())
    dist.broadcast(moved, src)
    if moved is not tensor:
        tensor.copy_(moved)


SHM_PREFIX = "deepspeed_allreduce_buffer"  # DeepSpeed's CPU comm op: one segment per rank


def shm_segments(port: int | str) -> list[Path]:
    """The /dev/shm segments DeepSpeed's CPU all-reduce made for the run on `port`."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return []
    return sorted(shm.glob(f"{SHM_PREFIX}_{os.getuid()}_*_{port}_*"))


def release_shm_segment() -> None:
    """Unlink this rank's all-reduce segment once every rank has mapped every peer's.

    DeepSpeed creates a 66 MB /dev/shm segment per rank in `init_distributed` and never
    unlinks it, so every CPU run (and every killed one) left its RAM behind until a reboot.
    Mapped segments stay valid after the unlink; the barrier makes sure no peer still has
    to open ours (a peer waiting for a missing segment would spin forever)."""
    port = os.environ.get("MASTER_PORT")
    if port is None or not dist.is_initialized():
        return
    dist.barrier()
    for seg in shm_segments(port):
        if seg.name.endswith(f"_{rank()}"):
            seg.unlink(missing_ok=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group in order (a process that exits inside gloo's teardown while
    its peer already left can abort with `terminate called without an active exception`)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
