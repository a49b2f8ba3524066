"""Greedy answers of the training model at one N, a batch at a time, plus the router's inputs.

Data flow position: checkpoint -> **prompt (left-padded) -> vision -> projector(N) -> LLM
generate** -> answers. The prompt is a sample's ids up to its first answer token (the first
turn), each image marker expanded to its image block; decoding is transformers' greedy
`generate` over the spliced input embeddings. An answer is correct when its tokens are the
reference's answer tokens and end token: the same rule as `tfx eval`'s teacher-forced check.
"""

from __future__ import annotations

import torch

from tfx.data.collate import expand_image, pixel_fields
from tfx.data.tokenizer import IGNORE
from tfx.model.router import prompt_embedding


def prompt_and_reference(sample, n_visual: int, tok) -> tuple[list[int], list[int]]:
    """(prompt ids, reference answer ids with the end token) of the first turn."""
    ids, labels = expand_image(sample, n_visual, tok)
    start = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    end = next((i for i in range(start, len(labels)) if labels[i] == IGNORE), len(labels))
    return ids[:start], ids[start:end]


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = 1
    return ids, mask


def text_positions(ids_BT: torch.Tensor, mask_BT: torch.Tensor, tok) -> torch.Tensor:
    """Prompt positions that hold text: not padding, not an image block."""
    image = torch.zeros_like(ids_BT, dtype=torch.bool)
    for i in (tok.img_start_id, tok.img_ctx_id, tok.img_end_id, tok.image_id):
        image |= ids_BT == i
    return mask_BT.bool() & ~image


@torch.no_grad()
def question_embeddings(model, samples, tok) -> torch.Tensor:
    """(B, D) mean input embedding of each prompt's text (the router's question input)."""
    device = next(model.parameters()).device
    prompts = [prompt_and_reference(s, 1, tok)[0] for s in samples]
    ids, mask = left_padded(prompts, tok.pad_id)
    ids, mask = ids.to(device), mask.to(device)
    embeds = model.llm.get_input_embeddings()(ids)
    return prompt_embedding(embeds, text_positions(ids, mask, tok))


@torch.no_grad()
def greedy_answers(model, samples, n_visual: int, tok, feats_BTC: torch.Tensor | None = None,
                   max_new_tokens: int = 8) -> list[list[int]]:
    """Each sample's generated ids at N (up to and with the end token)."""
    device = next(model.parameters()).device
    prompts = [prompt_and_reference(s, n_visual, tok)[0] for s in samples]
    ids, mask = left_padded(prompts, tok.pad_id)
    ids, mask = ids.to(device), mask.to(device)
    pixels = pixel_fields(samples)
    embeds = model.embed(ids, pixels["pixel_values"].to(device), n_visual, feats_BTC,
                         pixels["has_image"].to(device))
    out = model.llm.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=tok.eos_id,
                             pad_token_id=tok.pad_id, num_beams=1)
    answers = []
    for row in out.tolist():
        answers.append(row[:row.index(tok.eos_id) + 1] if tok.eos_id in row else row)
    return answers
