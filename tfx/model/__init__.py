"""Model: vision tower -> token-adaptive projector(N) -> causal LM. Plain nn.Modules, no DeepSpeed."""
