"""The training loop: N from the schedule -> bucketed batches -> forward/backward -> step -> log.

Data flow position: data pipeline + model -> **loop** (DeepSpeed engine) -> checkpoint. Each
optimizer step draws N once (`schedule.n_at(step)`), fetches `grad_accum` micro-batches of that
N on every rank, all-reduces their supervised-token count (and the ranks' stop votes), and
normalises the loss by it. The run stops at `max_steps`, or after the step in which any rank got
SIGUSR1/SIGTERM ("preempted") or SIGINT ("interrupted"), always with a complete checkpoint.
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
from tfx.train import checkpoint, faults, runfolder
from tfx.train import engine as eng
from tfx.train.dist import all_reduce_sum, barrier, rank, setup_device, shutdown, world_size
from tfx.train.divergence import DivergenceGuard
from tfx.train.flops import FlopModel, peak_tflops
from tfx.train.metrics import MetricsLogger
from tfx.train.signals import StopRequest, requeue_slurm_job
from tfx.train.state import TrainState
from tfx.train.trace import SampleTrace

log = get_logger(__name__)


def write_run_folder(cfg: RunConfig, out: Path, ds_config: dict, tok, model) -> None:
    """Rank 0, before step 0: resolved configs, run.json, the tokenizer and the towers' HF
    configs (see `tfx.train.runfolder`)."""
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    (out / "deepspeed.json").write_text(json.dumps(ds_config, indent=2))
    runfolder.write_run_json(out)
    tok.save(out / "tokenizer")
    (out / "model").mkdir(exist_ok=True)
    for part, hf in model.hf_configs().items():
        if hf is not None:
            (out / "model" / f"{part}_config.json").write_text(json.dumps(hf, indent=1))


def log_param_table(table: list) -> None:
    lines = [f"{'part':<10} {'params':>12} {'on this rank':>13} {'trainable':>9}"]
    for name, total, local, trainable in table:
        lines.append(f"{name:<10} {total:>12,} {local:>13,} {str(trainable):>9}")
    log.info("parameters:\n" + "\n".join(lines))


def run_step(engine, batches: list[dict], n_visual: int, cfg: RunConfig, device,
             votes: list[float], skipped: int, scheduler, group_names: list[str],
             flop_model: FlopModel) -> dict:
    """Forward/backward of the step's micro-batches and the optimizer step. The loss backed up
    is `ce_sum / global_count * world * grad_accum`: DeepSpeed averages over ranks and divides
    by grad_accum, so the update sees every supervised token of the step with equal weight."""
    counts = [supervised_count(b["labels"]) for b in batches]
    flops = sum(flop_model.batch_flops(b, n_visual, c) for b, c in zip(batches, counts))
    local = [sum(counts), sum(b["real_tokens"] for b in batches),
             sum(b["padded_tokens"] for b in batches),
             float(sum(b["images"] for b in batches)), float(skipped), flops, *votes]
    (global_count, real, padded, images, skipped_all, flops_all, stop,
     interrupted) = all_reduce_sum(local)
    world, gas = world_size(), cfg.train.grad_accum
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    lrs = {}
    for i, b in enumerate(batches):
        summed = engine(input_ids=b["input_ids"].to(device),
                        pixel_values=b["pixel_values"].to(device), n_visual=n_visual,
                        attention_mask=b["attention_mask"].to(device),
                        labels=b["labels"].to(device))
        engine.backward(summed / max(global_count, 1) * world * gas)
        if i == len(batches) - 1:  # the LRs this optimizer step uses, before it advances them
            lrs = eng.step_lrs(scheduler, group_names)
        engine.step()
        loss_sum += summed.detach().double()
    (total_loss,) = all_reduce_sum([float(loss_sum)])
    return {"loss": total_loss / max(global_count, 1), "real": real, "padded": padded,
            "images": images, "skipped": int(skipped_all), "stop": stop > 0,
            "interrupted": interrupted > 0, "lr": lrs, "flops": flops_all}


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


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False,
          stop: StopRequest | None = None) -> str:
    """Run to `max_steps` ("done"), or stop after a signal ("preempted", "interrupted")."""
    out = Path(cfg.train.output_dir)
    runfolder.check_output_dir(out, resume=resume, overwrite=overwrite)  # every rank, no writes
    stop = stop or StopRequest()
    device = setup_device()
    eng.init_distributed(cfg.train.dist_timeout_s)  # every rank has checked before rank 0 clears
    if overwrite and rank() == 0 and out.is_dir():
        runfolder.clear(out)
        log.info(f"--overwrite: removed the previous run in {out}")
    torch.manual_seed(cfg.train.seed)
    ds_config = eng.build_ds_config(cfg, world_size())
    tok = load_tokenizer(cfg.data.tokenizer)
    model, _hf_ds_alive = eng.build_model(cfg, tok, ds_config)
    faults.install(model, rank())
    guard = DivergenceGuard(model, cfg.train.check_divergence_steps)  # hooks before DeepSpeed's
    engine, _, scheduler, group_names = eng.initialize(cfg, model, ds_config)
    flop_model = FlopModel.of(model, eng.TRAINABLE[cfg.train.stage])
    peak = peak_tflops(cfg.train.peak_tflops, ds_config["bf16"]["enabled"])
    if rank() == 0:
        write_run_folder(cfg, out, ds_config, tok, model)
    barrier()  # the run folder exists before any rank writes into it
    table = eng.param_table(model)
    (out / f"params_rank{rank()}.json").write_text(json.dumps(
        {name: {"params": total, "on_rank": local, "trainable": tr}
         for name, total, local, tr in table}, indent=1))
    if rank() == 0:
        log_param_table(table)
        log_epoch_length(cfg, world_size())
    schedule = TokenSchedule(cfg.tokens)
    stream = TrainStream(cfg, tok, rank=rank(), world=world_size())
    state = TrainState(config_hash=config_hash(cfg), world_size=world_size(),
                       schedule=schedule.state_dict())
    ckpt_root = out / "checkpoints"
    if resume:
        restore(engine, stream, state, ckpt_root)
    metrics = MetricsLogger(out, enabled=rank() == 0, resume_step=state.step)
    trace = SampleTrace(out, rank(), cfg.train.trace_samples, tok.img_ctx_id)
    trace.truncate_after(state.step)
    config_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    pid = runfolder.pid_file(out, rank())
    pid.write_text(str(os.getpid()))  # kill -USR1 $(cat runs/x/rank*.pid); removed at exit
    bar = progress_bar(state.step, cfg.train.max_steps)
    status = "done"
    stop.arm()
    try:
        for step in range(state.step, cfg.train.max_steps):
            n_visual = schedule.n_at(step)
            t0 = time.perf_counter()
            batches = [stream.next_batch(n_visual) for _ in range(cfg.train.grad_accum)]
            trace.write(step, batches)
            stats = run_step(engine, batches, n_visual, cfg, device, stop.votes, stream.skipped,
                             scheduler, group_names, flop_model)
            guard.end_step()
            dt = time.perf_counter() - t0
            state.step = step + 1
            state.visual_tokens += stats["images"] * n_visual
            row = metric_row(stats, state, n_visual, engine, dt, peak)
            if state.step % cfg.train.log_every == 0 or state.step == cfg.train.max_steps:
                metrics.log(row)
            if bar is not None:
                bar.set_postfix(loss=f"{row['loss']:.3f}", N=n_visual,
                                tok_s=f"{row['tokens_per_s']:.0f}",
                                pad=f"{row['padding_frac']:.1%}", skip=row["skipped"],
                                refresh=False)
                bar.update(1)
            last = state.step == cfg.train.max_steps
            if last or stats["stop"] or (cfg.train.save_every and
                                         state.step % cfg.train.save_every == 0):
                save(engine, stream, state, ckpt_root, cfg, config_yaml)
            if stats["stop"] and not last:
                status = "interrupted" if stats["interrupted"] else "preempted"
                if rank() == 0:
                    log.info(f"{status}: stopped after step {state.step} with a complete "
                             f"checkpoint")
                if status == "preempted" and rank() == 0 and cfg.train.requeue:
                    requeue_slurm_job()
                break
    finally:
        pid.unlink(missing_ok=True)
        if bar is not None:
            bar.close()
        metrics.close()
    shutdown()
    return status


def metric_row(stats: dict, state: TrainState, n_visual: int, engine, dt: float,
               peak: float | None) -> dict:
    tflops = stats["flops"] / dt / world_size() / 1e12  # achieved, per device
    return {"step": state.step, "loss": stats["loss"], "n_visual": n_visual,
            "grad_norm": _float(engine.get_global_grad_norm()), "lr": stats["lr"],
            "tokens_per_s": stats["real"] / dt, "visual_tokens": state.visual_tokens,
            "padding_frac": stats["padded"] / max(stats["real"] + stats["padded"], 1),
            "tflops": tflops, "mfu": tflops / peak if peak else None,
            "peak_mem_mb": _peak_mem_mb(), "skipped": stats["skipped"], "step_time_s": dt}


def save(engine, stream, state: TrainState, ckpt_root: Path, cfg: RunConfig,
         config_yaml: str) -> None:
    rng = {"torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    checkpoint.save(engine, ckpt_root, state.state_dict(), {"data": stream.state_dict()}, rng,
                    config_yaml, cfg.train.keep_last)
    if rank() == 0:
        log.info(f"saved checkpoint {checkpoint.tag_for(state.step)}")


def restore(engine, stream, state: TrainState, ckpt_root: Path) -> None:
    """Continue from the newest checkpoint whose files verify (an older one if it is damaged)."""
    from tfx.errors import CheckpointError

    tag = checkpoint.verified_resume_tag(ckpt_root, log) if ckpt_root.is_dir() else None
    if tag is None:
        log.info("--resume: no checkpoint yet, starting at step 0")
        return
    _, client = engine.load_checkpoint(str(ckpt_root), tag=tag)
    if client is None or "tfx" not in client:
        raise CheckpointError(f"{ckpt_root / tag}: DeepSpeed could not load it")
    state.load_state_dict(client["tfx"], str(ckpt_root / tag), log)
    data, rng = checkpoint.rank_files(ckpt_root / tag)
    stream.load_state_dict(data["data"])
    if rng is not None:
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    log.info(f"resumed from {tag} at step {state.step}")


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
