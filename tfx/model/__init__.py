"""Model: vision tower -> token-adaptive projector(N) -> causal LM. Plain nn.Modules, no DeepSpeed.

`families.py` is the registry of towers and LLMs; `vision`, `projector`, `llm`, `vlm` the
training model; `configuration_tokenflex`, `modeling_tokenflex`, `processing_tokenflex` (and
`projector`) the exported model's code, copied into every export; `hf.py` registers those with
transformers' Auto classes.
"""
