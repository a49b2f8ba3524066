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
from dataclasses import dataclass
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
from tfx.train.dist import all_reduce_sum, barrier, rank, setup_device, world_size
from tfx.train.divergence import DivergenceGuard
from tfx.train.flops import FlopModel, peak_tflops
from tfx.train.init import init_weights
from tfx.train.metrics import MetricsLogger
from tfx.train.signals import StopRequest, requeue_slurm_job
from tfx.train.state import TrainState
from tfx.train.trace import SampleTrace

log = get_logger(__name__)


def write_run_folder(cfg: RunConfig, out: Path, ds_config: dict, tok, model, device,
                     recipe: dict | None = None) -> None:
    """Rank 0, before step 0: resolved configs, run.json, the tokenizer and the towers' HF
    configs (see `tfx.train.runfolder`)."""
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    (out / "deepspeed.json").write_text(json.dumps(ds_config, indent=2))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    runfolder.write_run_json(out, {
        "device": name, "world_size": world_size(),
        "dtype": "bf16" if ds_config["bf16"]["enabled"] else "fp32",
        "attn_implementation": model.llm.config._attn_implementation,
        "projector_kernel": "triton" if model.projector.use_triton(
            torch.empty(0, device=device)) else "torch",
        "versions": {"torch": torch.__version__, "transformers": _version("transformers"),
                     "deepspeed": _version("deepspeed"), "triton": _version("triton")}},
        recipe)
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


def run_step(engine, batches: list[list[dict]], counts: tuple[int, ...], cfg: RunConfig,
             device, votes: list[float], skipped: int, scheduler, group_names: list[str],
             flop_model: FlopModel) -> dict:
    """Forward/backward of the step's micro-batches and the optimizer step. `batches[i][c]` is
    micro-batch i collated at counts[c] (one count unless tokens.mode is all). The loss backed
    up per micro-batch is `sum_c ce_c / (C * global_count) * world * grad_accum`, one backward:
    DeepSpeed averages over ranks and divides by grad_accum, so the update sees every
    supervised token of the step, at every count, with equal weight, and its micro-step
    bookkeeping is the usual one."""
    C = len(counts)
    supervised = [supervised_count(per[0]["labels"]) for per in batches]  # equal at every N
    flops = sum(flop_model.batch_flops(b, n, s, include_vision=c == 0)
                for per, s in zip(batches, supervised) for c, (b, n) in enumerate(zip(per, counts)))
    flat = [b for per in batches for b in per]
    local = [sum(supervised), sum(b["real_tokens"] for b in flat),
             sum(b["padded_tokens"] for b in flat), float(sum(per[0]["images"] for per in batches)),
             float(skipped), flops, *votes]
    (global_count, real, padded, images, skipped_all, flops_all, stop,
     interrupted) = all_reduce_sum(local)
    world, gas = world_size(), cfg.train.grad_accum
    sums_C = torch.zeros(C, dtype=torch.float64, device=device)
    lrs = {}
    for i, per in enumerate(batches):
        if C == 1:
            b = per[0]
            packed = ({k: b[k].to(device) for k in ("position_ids", "has_image")}
                      if "position_ids" in b else {})  # tfx.data.packing
            sums = engine(input_ids=b["input_ids"].to(device),
                          pixel_values=b["pixel_values"].to(device), n_visual=counts[0],
                          attention_mask=b["attention_mask"].to(device),
                          labels=b["labels"].to(device), **packed)[None]
        else:
            sums = engine(input_ids=tuple(b["input_ids"].to(device) for b in per),
                          pixel_values=per[0]["pixel_values"].to(device), n_visual=counts,
                          attention_mask=tuple(b["attention_mask"].to(device) for b in per),
                          labels=tuple(b["labels"].to(device) for b in per))
        engine.backward(sums.sum() / (C * max(global_count, 1)) * world * gas)
        if i == len(batches) - 1:  # the LRs this optimizer step uses, before it advances them
            lrs = eng.step_lrs(scheduler, group_names)
        engine.step()
        sums_C += sums.detach().double()
    totals = all_reduce_sum(sums_C.tolist())
    count = max(global_count, 1)
    return {"loss": sum(totals) / (C * count), "real": real, "padded": padded,
            "images": images, "skipped": int(skipped_all), "stop": stop > 0,
            "interrupted": interrupted > 0, "lr": lrs, "flops": flops_all,
            "loss_by_n": {str(n): t / count for n, t in zip(counts, totals)} if C > 1 else None}


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


@dataclass
class Run:
    """Everything a started run's steps use."""
    cfg: RunConfig
    out: Path
    device: torch.device
    tok: object
    engine: object
    scheduler: object
    group_names: list[str]
    schedule: TokenSchedule
    stream: TrainStream
    state: TrainState
    flop_model: FlopModel
    peak: float | None
    guard: DivergenceGuard
    config_yaml: str = ""
    keep_alive: object = None  # the HfDeepSpeedConfig: transformers sees ZeRO-3 while it lives

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"


def start(cfg: RunConfig, resume: bool, overwrite: bool, recipe: dict | None = None) -> Run:
    """Every rank: check the run folder, build the model (ZeRO-3 partitioned), load
    `init_from` weights when starting fresh, wrap it in the engine, restore a checkpoint when
    resuming, and write the run folder."""
    out = Path(cfg.train.output_dir)
    runfolder.check_output_dir(out, resume=resume, overwrite=overwrite)  # every rank, no writes
    device = setup_device()
    eng.init_distributed(cfg.dist.timeout_s)  # every rank has checked before rank 0 clears
    if overwrite and rank() == 0 and out.is_dir():
        runfolder.clear(out)
        log.info(f"--overwrite: removed the previous run in {out}")
    torch.manual_seed(cfg.train.seed)
    ds_config = eng.build_ds_config(cfg, world_size())
    tok = load_tokenizer(cfg.data.tokenizer)
    model, hf_ds_alive = eng.build_model(cfg, tok, ds_config)
    tag = checkpoint.verified_resume_tag(out / "checkpoints", log) \
        if resume and (out / "checkpoints").is_dir() else None
    if tag is None and cfg.train.init_from:
        init_weights(model, cfg.train.init_from, log)
    faults.install(model, rank())
    guard = DivergenceGuard(model, cfg.debug.check_divergence_steps)  # hooks before DeepSpeed's
    engine, _, scheduler, group_names = eng.initialize(cfg, model, ds_config)
    schedule = TokenSchedule(cfg.tokens)
    run = Run(cfg=cfg, out=out, device=device, tok=tok, engine=engine, scheduler=scheduler,
              group_names=group_names, schedule=schedule,
              stream=TrainStream(cfg, tok, rank=rank(), world=world_size()),
              state=TrainState(config_hash=config_hash(cfg), world_size=world_size(),
                               schedule=schedule.state_dict()),
              flop_model=FlopModel.of(model, eng.TRAINABLE[cfg.train.freeze]),
              peak=peak_tflops(cfg.logging.peak_tflops, ds_config["bf16"]["enabled"]),
              guard=guard, config_yaml=yaml.safe_dump(to_dict(cfg), sort_keys=False),
              keep_alive=hf_ds_alive)
    if rank() == 0:
        write_run_folder(cfg, out, ds_config, tok, model, device, recipe)
    barrier()  # the run folder exists before any rank writes into it
    table = eng.param_table(model)
    (out / f"params_rank{rank()}.json").write_text(json.dumps(
        {name: {"params": total, "on_rank": local, "trainable": tr}
         for name, total, local, tr in table}, indent=1))
    if rank() == 0:
        log_param_table(table)
        log_epoch_length(cfg, world_size())
    if tag is not None:
        restore(run, tag)
    elif resume:
        log.info("--resume: no checkpoint yet, starting at step 0")
    if run.state.step == 0 and cfg.checkpoint.save_initial:
        save(run)  # step_0000000: the weights every update starts from
    return run


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False,
          stop: StopRequest | None = None, recipe: dict | None = None) -> str:
    """Run to `max_steps` ("done"), or stop after a signal ("preempted", "interrupted"). The
    caller owns the process group (several stages share it). `recipe`: {"stages": [names],
    "index": i} when this is a stage of one, recorded in run.json."""
    stop = stop or StopRequest()
    run = start(cfg, resume, overwrite, recipe)
    metrics = MetricsLogger(run.out, enabled=rank() == 0, resume_step=run.state.step)
    trace = SampleTrace(run.out, rank(), cfg.logging.trace_samples, run.tok.img_ctx_id)
    trace.truncate_after(run.state.step)
    pid = runfolder.pid_file(run.out, rank())
    pid.write_text(str(os.getpid()))  # kill -USR1 $(cat runs/x/rank*.pid); removed at exit
    bar = progress_bar(run.state.step, cfg.train.max_steps)
    stop.arm()
    try:
        status = steps(run, stop, metrics, trace, bar)
    finally:  # no collective here: after an exception the other ranks may never come
        pid.unlink(missing_ok=True)
        if bar is not None:
            bar.close()
        metrics.close()
    barrier()
    return status


def steps(run: Run, stop: StopRequest, metrics: MetricsLogger, trace: SampleTrace, bar) -> str:
    cfg, state = run.cfg, run.state
    for step in range(state.step, cfg.train.max_steps):
        counts = run.schedule.counts_at(step)
        t0 = time.perf_counter()
        micro = [run.stream.next_samples() for _ in range(cfg.train.grad_accum)]
        batches = [[run.stream.collate(samples, n) for n in counts] for samples in micro]
        trace.write(step, [b for per in batches for b in per])
        stats = run_step(run.engine, batches, counts, cfg, run.device, stop.votes,
                         run.stream.skipped, run.scheduler, run.group_names, run.flop_model)
        run.guard.end_step()
        dt = time.perf_counter() - t0
        state.step = step + 1
        state.visual_tokens += stats["images"] * sum(counts)
        row = metric_row(stats, state, counts[0] if len(counts) == 1 else list(counts),
                         run.engine, dt, run.peak)
        if state.step % cfg.logging.log_every == 0 or state.step == cfg.train.max_steps:
            metrics.log(row)
        if bar is not None:
            bar.set_postfix(loss=f"{row['loss']:.3f}", N="all" if len(counts) > 1 else counts[0],
                            tok_s=f"{row['tokens_per_s']:.0f}", pad=f"{row['padding_frac']:.1%}",
                            skip=row["skipped"], refresh=False)
            bar.update(1)
        last = state.step == cfg.train.max_steps
        if (last and cfg.checkpoint.save_at_end) or stats["stop"] or (
                cfg.checkpoint.save_every and state.step % cfg.checkpoint.save_every == 0):
            save(run)
        if stats["stop"] and not last:
            status = "interrupted" if stats["interrupted"] else "preempted"
            if rank() == 0:
                log.info(f"{status}: stopped after step {state.step} with a complete checkpoint")
            if status == "preempted" and rank() == 0 and cfg.slurm.requeue:
                requeue_slurm_job()
            return status
    return "done"


def metric_row(stats: dict, state: TrainState, n_visual, engine, dt: float,
               peak: float | None) -> dict:
    tflops = stats["flops"] / dt / world_size() / 1e12  # achieved, per device
    return {"step": state.step, "loss": stats["loss"], "n_visual": n_visual,
            "grad_norm": _float(engine.get_global_grad_norm()), "lr": stats["lr"],
            "tokens_per_s": stats["real"] / dt, "visual_tokens": state.visual_tokens,
            "padding_frac": stats["padded"] / max(stats["real"] + stats["padded"], 1),
            "tflops": tflops, "mfu": tflops / peak if peak else None,
            "peak_mem_mb": _peak_mem_mb(), "skipped": stats["skipped"], "step_time_s": dt,
            "loss_by_n": stats["loss_by_n"]}


def save(run: Run) -> None:
    rng = {"torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    checkpoint.save(run.engine, run.ckpt_root, run.state.state_dict(),
                    {"data": run.stream.state_dict()}, rng, run.config_yaml,
                    run.cfg.checkpoint.keep_last)
    if rank() == 0:
        log.info(f"saved checkpoint {checkpoint.tag_for(run.state.step)}")


def restore(run: Run, tag: str) -> None:
    """Continue from checkpoint `tag` (already verified by `checkpoint.verified_resume_tag`)."""
    from tfx.errors import CheckpointError

    _, client = run.engine.load_checkpoint(str(run.ckpt_root), tag=tag)
    if client is None or "tfx" not in client:
        raise CheckpointError(f"{run.ckpt_root / tag}: DeepSpeed could not load it")
    run.state.load_state_dict(client["tfx"], str(run.ckpt_root / tag), log)
    data, rng = checkpoint.rank_files(run.ckpt_root / tag)
    run.stream.load_state_dict(data["data"])
    if rng is not None:
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    log.info(f"resumed from {tag} at step {run.state.step}")


def progress_bar(start: int, total: int):
    if rank() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _float(x) -> float | None:
    return None if x is None else float(x)


def _peak_mem_mb() -> float | None:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
