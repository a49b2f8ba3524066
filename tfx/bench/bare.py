"""The baseline of the device check's step-time comparison: a bare PyTorch + DeepSpeed loop.

tfx's own model and one batch from tfx's data stream at N, then nothing of tfx's loop: no data
pipeline in the timed part, no per-step all-reduce of counts and votes, no FLOP count, no
metrics, no trace. Forward, backward, `engine.step()`, synchronise, time. The loss is the
batch's token mean (the normalisation does not change the cost).
Usage: python -m tfx.bench.bare CONFIG [key=value ...] --n 256 --steps 30 --warmup 5
Prints one JSON line: median and mean step time of the timed steps, in seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m tfx.bench.bare")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--n", type=int, required=True, help="visual tokens")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_intermixed_args(argv)
    from tfx.cli import _cpu_env_defaults

    _cpu_env_defaults()  # before deepspeed is imported (a CPU in the dry run)
    import deepspeed
    import torch

    from tfx.config.load import load_config
    from tfx.data.pipeline import TrainStream
    from tfx.data.tokenizer import load_tokenizer
    from tfx.model.loss import supervised_count
    from tfx.train import engine as eng
    from tfx.train.dist import ensure_launcher_env, setup_device

    cfg = load_config(args.config, args.overrides)
    ensure_launcher_env()
    device = setup_device()
    eng.init_distributed(cfg.dist.timeout_s)
    ds_config = eng.build_ds_config(cfg, 1)
    tok = load_tokenizer(cfg.data.tokenizer)
    model, _keep_alive = eng.build_model(cfg, tok, ds_config)
    model.set_trainable(eng.TRAINABLE[cfg.train.freeze])
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    batch = TrainStream(cfg, tok, rank=0, world=1).next_batch(args.n)
    inputs = {k: batch[k].to(device) for k in ("input_ids", "pixel_values", "attention_mask",
                                              "labels")}
    count = max(supervised_count(batch["labels"]), 1)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = engine(n_visual=args.n, **inputs) / count
        engine.backward(loss)
        engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    report = {"median_step_s": statistics.median(times), "mean_step_s": statistics.mean(times),
              "steps": len(times), "n_visual": args.n, "rows": len(batch["keys"])}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
