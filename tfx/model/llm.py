"""Causal LM: an HF Qwen2 or Llama model, built from sizes or loaded from a local folder.

Data flow position: projector(N) -> splice -> **LLM** -> logits. Embeddings are resized to the
tokenizer's vocabulary (which includes the image tokens).
"""

from __future__ import annotations

import torch
from torch import nn

from tfx.config.schema import LLMConfig
from tfx.errors import ConfigError


def resolve_attn(requested: str, on_cuda: bool, dtype: torch.dtype) -> str:
    """`auto` -> flash_attention_2 for bf16/fp16 on a GPU with flash-attn installed (it has no
    fp32 kernels), else sdpa."""
    from transformers.utils import is_flash_attn_2_available

    half = dtype in (torch.bfloat16, torch.float16)
    if requested == "flash_attention_2":
        if not (on_cuda and is_flash_attn_2_available()):
            raise ConfigError("model.attn_implementation: flash_attention_2 needs a GPU and the "
                              "flash-attn package; use auto (sdpa without them)")
        if not half:
            raise ConfigError("model.attn_implementation: flash_attention_2 has no fp32 "
                              "kernels; train in bf16 (train.precision) or use auto")
    if requested != "auto":
        return requested
    return "flash_attention_2" if on_cuda and half and is_flash_attn_2_available() else "sdpa"


def build_llm(cfg: LLMConfig, vocab_size: int, attn_implementation: str,
              hf_config: dict | None = None) -> nn.Module:
    """`hf_config`: build that HF config's structure with fresh weights (a checkpoint's weights
    follow), instead of loading `cfg.path`. `sdpa` becomes `sdpa_varlen` (`tfx.model.varlen`):
    SDPA itself, except that packed rows attend one sample at a time."""
    from tfx.model import varlen
    from tfx.model.families import llm_family

    if attn_implementation == "sdpa":
        varlen.register()
        attn_implementation = varlen.NAME

    config_cls, model_cls = llm_family(cfg.family).load()
    vocab_size = max(vocab_size, cfg.vocab_size or 0)
    if hf_config is not None:
        hf = config_cls.from_dict({**hf_config,
                                   "vocab_size": max(vocab_size, hf_config["vocab_size"])})
        model = model_cls._from_config(hf, attn_implementation=attn_implementation)
    elif cfg.path is not None:
        model = model_cls.from_pretrained(cfg.path, attn_implementation=attn_implementation)
        if model.get_input_embeddings().num_embeddings < vocab_size:
            model.resize_token_embeddings(vocab_size)
    else:
        hf = config_cls(vocab_size=vocab_size, hidden_size=cfg.hidden_size,
                        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                        num_key_value_heads=cfg.num_kv_heads,
                        intermediate_size=cfg.intermediate_size,
                        max_position_embeddings=cfg.max_position_embeddings,
                        tie_word_embeddings=False)
        # _from_config (not the constructor) so HF weight init runs under deepspeed.zero.Init
        model = model_cls._from_config(hf, attn_implementation=attn_implementation)
    model.config.use_cache = False  # training never uses a KV cache; generate() asks for one
    return model
