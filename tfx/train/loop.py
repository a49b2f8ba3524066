"""The training loop: N from the schedule -> bucketed batches -> forward/backward -> step -> log.

Data flow position: data pipeline + model -> **loop** (DeepSpeed engine) -> checkpoint. Each
optimizer step draws N once (`schedule.n_at(step)`), fetches `grad_accum` micro-batches of that
N on every rank, all-reduces their supervised-token count, and normalises the loss by it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import yaml

from tfx.config.load import config_hash, dump_config, to_dict
from tfx.config.schema import RunConfig
from tfx.data.builders.llava import read_index
from tfx.data.pipeline import TrainStream
from tfx.data.schedule import TokenSchedule
from tfx.data.tokenizer import load_tokenizer
from tfx.log import get_logger
from tfx.model.loss import supervised_count
from tfx.train import checkpoint, engine as eng
from tfx.train import faults
from tfx.train.dist import all_reduce_sum, barrier, rank, world_size
from tfx.train.divergence import DivergenceGuard
from tfx.train.metrics import MetricsLogger
from tfx.train.preempt import StopRequest, requeue_slurm_job

log = get_logger(__name__)


def write_run_files(cfg: RunConfig, out: Path, ds_config: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    (out / "deepspeed.json").write_text(json.dumps(ds_config, indent=2))


def log_param_table(table: list) -> None:
    lines = [f"{'part':<10} {'params':>12} {'on this rank':>13} {'trainable':>9}"]
    for name, total, local, trainable in table:
        lines.append(f"{name:<10} {total:>12,} {local:>13,} {str(trainable):>9}")
    log.info("parameters:\n" + "\n".join(lines))


def run_step(engine, stream: TrainStream, step: int, n_visual: int, cfg: RunConfig,
             device, stop_flag: float = 0.0) -> dict:
    batches = [stream.next_batch(n_visual) for _ in range(cfg.train.grad_accum)]
    if cfg.train.trace_samples:
        trace = Path(cfg.train.output_dir) / "trace" / f"rank{rank()}.jsonl"
        trace.parent.mkdir(parents=True, exist_ok=True)
        with trace.open("a") as f:
            f.write(json.dumps({"step": step, "n_visual": n_visual,
                                "keys": [k for b in batches for k in b["keys"]]}) + "\n")
    local = [sum(supervised_count(b["labels"]) for b in batches),
             sum(b["real_tokens"] for b in batches), sum(b["padded_tokens"] for b in batches),
             float(sum(len(b["keys"]) for b in batches)), float(stream.skipped), stop_flag]
    global_count, real, padded, images, skipped, stop = all_reduce_sum(local)
    world, gas = world_size(), cfg.train.grad_accum
    loss_sum = 0.0
    for b in batches:
        if faults.diverges(rank()):  # tests only: one rank makes an extra ZeRO-3 fetch
            with torch.no_grad():
                engine.module.vision(b["pixel_values"].to(device))
        summed = engine(input_ids=b["input_ids"].to(device),
                        pixel_values=b["pixel_values"].to(device), n_visual=n_visual,
                        attention_mask=b["attention_mask"].to(device),
                        labels=b["labels"].to(device))
        engine.backward(summed / max(global_count, 1) * world * gas)
        engine.step()
        loss_sum += float(summed.detach())
    (total_loss,) = all_reduce_sum([loss_sum])
    return {"loss": total_loss / max(global_count, 1), "real": real, "padded": padded,
            "images": images, "skipped": int(skipped), "stop": stop > 0}


def log_epoch_length(cfg: RunConfig, world: int) -> None:
    """From the shard set's index.json (`tfx data llava`), when there is one."""
    spec = cfg.data.train
    index = read_index(spec) if isinstance(spec, str) and Path(spec).is_dir() else None
    if not index or not index["samples"]:
        return
    per_step = world * cfg.train.grad_accum * cfg.data.micro_batch_size
    lengths = [n for s in index["shards"] for n in s["lengths"]]
    log.info(f"train set: {index['samples']:,} samples in {len(index['shards'])} shards, "
             f"~{index['samples'] / per_step:,.0f} steps per epoch at {per_step} samples per "
             f"step; text tokens per sample: median {sorted(lengths)[len(lengths) // 2]}, "
             f"max {max(lengths)}")


def train(cfg: RunConfig, resume: bool = False) -> str:
    """Run to `max_steps` ("done"), or until a preemption signal ("preempted")."""
    out = Path(cfg.train.output_dir)
    eng.init_distributed(cfg.train.dist_timeout_s)
    torch.manual_seed(cfg.train.seed)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    ds_config = eng.build_ds_config(cfg, world_size())
    if rank() == 0:
        write_run_files(cfg, out, ds_config)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(cfg.data.tokenizer)
    model, _hf_ds_alive = eng.build_model(cfg, tok, ds_config)
    guard = DivergenceGuard(model, cfg.train.check_divergence_steps)  # hooks before DeepSpeed's
    engine, _, scheduler = eng.initialize(cfg, model, ds_config)
    table = eng.param_table(model)
    (out / f"params_rank{rank()}.json").write_text(json.dumps(
        {name: {"params": total, "on_rank": local, "trainable": tr}
         for name, total, local, tr in table}, indent=1))
    if rank() == 0:
        log_param_table(table)
        log_epoch_length(cfg, world_size())
    schedule = TokenSchedule(cfg.tokens)
    stream = TrainStream(cfg, tok, rank=rank(), world=world_size())
    ckpt_root = out / "checkpoints"
    start, visual_tokens = restore(engine, stream, schedule, ckpt_root, cfg) if resume \
        else (0, 0.0)
    metrics = MetricsLogger(out, enabled=rank() == 0)
    config_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    bar = progress_bar(start, cfg.train.max_steps)
    (out / f"rank{rank()}.pid").write_text(str(os.getpid()))  # kill -USR1 $(cat runs/x/*.pid)
    stop = StopRequest()
    status = "done"
    for step in range(start, cfg.train.max_steps):
        n_visual = schedule.n_at(step)
        t0 = time.perf_counter()
        stats = run_step(engine, stream, step, n_visual, cfg, device, stop.flag)
        guard.end_step()
        dt = time.perf_counter() - t0
        visual_tokens += stats["images"] * n_visual
        skipped = stats["skipped"]  # all ranks, summed with the step's token counts
        row = {"step": step + 1, "loss": stats["loss"], "n_visual": n_visual,
               "grad_norm": _float(engine.get_global_grad_norm()),
               "lr": scheduler.get_last_lr()[0], "tokens_per_s": stats["real"] / dt,
               "visual_tokens": visual_tokens,
               "padding_frac": stats["padded"] / max(stats["real"] + stats["padded"], 1),
               "mfu": None, "peak_mem_mb": _peak_mem_mb(), "skipped": int(skipped),
               "step_time_s": dt}
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.max_steps:
            metrics.log(row)
        if bar is not None:
            bar.set_postfix(loss=f"{row['loss']:.3f}", N=n_visual,
                            tok_s=f"{row['tokens_per_s']:.0f}", pad=f"{row['padding_frac']:.1%}",
                            skip=int(skipped), refresh=False)
            bar.update(1)
        last = step + 1 == cfg.train.max_steps or stats["stop"]
        if last or (cfg.train.save_every and (step + 1) % cfg.train.save_every == 0):
            save(engine, stream, schedule, ckpt_root, step + 1, cfg, config_yaml, visual_tokens)
        if stats["stop"] and step + 1 < cfg.train.max_steps:
            status = "preempted"
            log.warning(f"preempted: stopped after step {step + 1} with a complete checkpoint")
            if rank() == 0 and cfg.train.requeue:
                requeue_slurm_job()
            break
    stop.uninstall()
    if bar is not None:
        bar.close()
    metrics.close()
    barrier()
    return status


def save(engine, stream, schedule, ckpt_root: Path, step: int, cfg: RunConfig,
         config_yaml: str, visual_tokens: float = 0.0) -> None:
    train_state = {"step": step, "schedule": schedule.state_dict(),
                   "config_hash": config_hash(cfg), "world_size": world_size(),
                   "visual_tokens": visual_tokens}
    rng = {"torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    checkpoint.save(engine, ckpt_root, step, train_state, {"data": stream.state_dict()},
                    config_yaml, cfg.train.keep_last, rng)
    log.info(f"saved checkpoint {checkpoint.tag_for(step)}")


def restore(engine, stream, schedule, ckpt_root: Path, cfg: RunConfig) -> tuple[int, float]:
    """(step to continue at, visual tokens consumed so far)."""
    from tfx.errors import CheckpointError

    tag = checkpoint.latest_tag(ckpt_root) if ckpt_root.is_dir() else None
    if tag is None:
        log.info("--resume: no checkpoint yet, starting at step 0")
        return 0, 0.0
    _, client = engine.load_checkpoint(str(ckpt_root), tag=tag)
    state = client["tfx"]
    if state["config_hash"] != config_hash(cfg):
        raise CheckpointError(f"{ckpt_root / tag} was made by a different model config")
    if state["world_size"] != world_size():
        raise CheckpointError(f"{ckpt_root / tag} was made with {state['world_size']} ranks; "
                              f"restart with the same number ({world_size()} now)")
    if schedule.differs_from(state["schedule"]):
        log.warning(f"token schedule changed since {tag}: {state['schedule']} -> "
                    f"{schedule.state_dict()}")
    data = json.loads((ckpt_root / tag / f"tfx_state_rank{rank()}.json").read_text())
    stream.load_state_dict(data["data"])
    rng_file = ckpt_root / tag / f"rng_rank{rank()}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file)
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    log.info(f"resumed from {tag} at step {state['step']}")
    return int(state["step"]), float(state.get("visual_tokens", 0.0))


def progress_bar(start: int, total: int):
    if rank() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _float(x) -> float | None:
    return None if x is None else float(x)


def _peak_mem_mb() -> float | None:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
