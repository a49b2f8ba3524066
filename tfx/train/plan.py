"""`tfx plan CONFIG --nodes K --gpus-per-node G`: size a run before renting the cluster.

The model is built on the meta device (shapes only, no weights, no downloads), so a 7B config
plans in seconds on a laptop. Printed: parameters per part, ZeRO-3 memory per GPU for the
model states (DeepSpeed's own estimator, without and with CPU offload), and per N of the token
schedule the tokens per step, the visual-token share and the training FLOPs per step, from the
same formula as the loop's MFU (`tfx.train.flops`: the stage's frozen parts cost less), with
`text_tokens` per sample of which `answer_tokens` are supervised. Activations are not in the
memory figure.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tfx.config.schema import RunConfig
from tfx.data.tokenizer import load_tokenizer
from tfx.model.vlm import ImageTokenIds, TokenFlexVLM
from tfx.train.engine import TRAINABLE
from tfx.train.flops import FlopModel

ADDED_TOKENS = 4  # <image>, <img>, <IMG_CONTEXT>, </img>


def meta_model(cfg: RunConfig, vocab_size: int) -> TokenFlexVLM:
    with torch.device("meta"):
        return TokenFlexVLM(cfg.model, vocab_size, ImageTokenIds(0, 1, 2),
                            attn_implementation="sdpa")


def llm_vocab(cfg: RunConfig) -> int:
    """The LLM's own vocabulary: from its local folder, else its family's default config."""
    from transformers import AutoConfig

    from tfx.model.families import llm_family

    if cfg.model.llm.path and Path(cfg.model.llm.path).is_dir():
        return AutoConfig.from_pretrained(cfg.model.llm.path).vocab_size
    return llm_family(cfg.model.llm.family).load()[0]().vocab_size


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def largest_layer(model: torch.nn.Module) -> int:
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def plan(cfg: RunConfig, *, nodes: int, gpus_per_node: int, text_tokens: int,
         vocab_size: int | None = None, answer_tokens: int = 64) -> dict:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    if vocab_size is None:
        tok = Path(cfg.data.tokenizer)
        vocab_size = load_tokenizer(tok).vocab_size if tok.exists() else \
            llm_vocab(cfg) + ADDED_TOKENS
    model = meta_model(cfg, vocab_size)
    parts = {name: count(m) for name, m in model.parts().items()}
    total, largest = sum(parts.values()), largest_layer(model)
    memory = {}
    for label, offload, offload_params in (("none", False, False), ("optimizer", True, False),
                                           ("optimizer+params", True, True)):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total, largest, num_gpus_per_node=gpus_per_node, num_nodes=nodes,
            cpu_offload=offload, cpu_offload_params=offload_params)
        memory[label] = {"gpu_gib": gpu / 2**30, "cpu_gib_per_node": cpu / 2**30}
    flop_model = FlopModel.of(model, TRAINABLE[cfg.train.freeze])
    batch = nodes * gpus_per_node * cfg.data.micro_batch_size * cfg.train.grad_accum
    rows = []
    mode = cfg.tokens.mode
    weights = cfg.tokens.probs if mode == "random" else (1.0,) * len(cfg.tokens.counts)
    for c, (n_visual, prob) in enumerate(zip(cfg.tokens.counts, weights)):
        seq = text_tokens + n_visual + 2
        # tokens.mode all: every count in every step, the tower's pass shared (counted once)
        flops = flop_model.step(batch, n_visual, [seq] * batch,
                                min(answer_tokens, text_tokens) * batch,
                                include_vision=mode != "all" or c == 0)
        rows.append({"N": n_visual, "prob": prob, "tokens_per_step": batch * seq,
                     "visual_share": (n_visual + 2) / seq, "tflops_per_step": flops / 1e12})
    mean = {k: sum(r[k] * r["prob"] for r in rows) for k in ("tokens_per_step",
                                                             "tflops_per_step")}
    return {"parts": parts, "total": total, "largest_layer": largest, "memory": memory,
            "rows": rows, "mean": mean, "mode": mode, "global_batch": batch,
            "vocab_size": vocab_size,
            "gpus": nodes * gpus_per_node}


def format_plan(p: dict, cfg: RunConfig, text_tokens: int) -> str:
    lines = [f"model: {cfg.model.vision.family} {cfg.model.vision.image_size}px "
             f"(grid {cfg.model.vision.grid_side}x{cfg.model.vision.grid_side}) -> projector "
             f"({cfg.model.projector.pool}) -> {cfg.model.llm.family} "
             f"{cfg.model.llm.hidden_size}x{cfg.model.llm.num_layers}, vocab {p['vocab_size']:,}",
             "", "| part | parameters |", "|---|---|"]
    lines += [f"| {name} | {n / 1e6:,.1f}M |" for name, n in p["parts"].items()]
    lines += [f"| total | {p['total'] / 1e6:,.1f}M |", "",
              f"ZeRO-3 model states on {p['gpus']} GPUs (DeepSpeed's estimator; activations "
              f"excluded):", "", "| offload | per GPU | CPU per node |", "|---|---|---|"]
    lines += [f"| {k} | {v['gpu_gib']:.2f} GiB | {v['cpu_gib_per_node']:.1f} GiB |"
              for k, v in p["memory"].items()]
    lines += ["", f"per step: global batch {p['global_batch']} samples, {text_tokens} text tokens "
              f"each (assumed)", "", "| N | prob | tokens/step | visual share | TFLOP/step |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['N']} | {r['prob']:.2f} | {r['tokens_per_step']:,} | "
              f"{r['visual_share']:.1%} | {r['tflops_per_step']:,.1f} |" for r in p["rows"]]
    label = "step (all counts)" if p["mode"] == "all" else "mean"
    lines.append(f"| {label} | | {p['mean']['tokens_per_step']:,.0f} | | "
                 f"{p['mean']['tflops_per_step']:,.1f} |")
    return "\n".join(lines)
