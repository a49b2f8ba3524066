"""Training: distributed set-up, DeepSpeed engine, loop, checkpoints, metrics."""
