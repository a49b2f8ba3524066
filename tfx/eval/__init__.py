"""Evaluation: accuracy of a checkpoint on held-out shards at several visual-token counts."""
