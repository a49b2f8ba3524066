"""Shard builders: write WebDataset shards (image + LLaVA-style JSON conversation)."""
