"""Data pipeline: shards -> decode -> tokenize -> bucketing by (N, length) -> collate."""
