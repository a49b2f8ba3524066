"""The image block, in one place: how an image sits in a token sequence and how its visual
embeddings get there. Torch only; `tfx convert` copies it into exports beside `projector.py`.

Each image (tagged `<image>` in the text) becomes `<img>` + N x `<IMG_CONTEXT>` + `</img>`,
with N = n * n visual tokens from the projector's n x n pooling. Collate (training), the
processor (serving), the training model and the exported model all use these functions, so the
layout cannot drift apart. Visual embeddings fill the context slots in order: row by row, left
to right, which is the order of the images in `pixel_values`.
Shape legend: B rows, T sequence, I images, N visual tokens, D LLM width.
"""

from __future__ import annotations

import math

import torch

IMAGE_TAG, IMG_START, IMG_CONTEXT, IMG_END = "<image>", "<img>", "<IMG_CONTEXT>", "</img>"


def grid_side(n_visual: int) -> int:
    """n of N = n * n; ValueError for a count that is not a perfect square."""
    n = math.isqrt(int(n_visual))
    if n < 1 or n * n != n_visual:
        raise ValueError(f"{n_visual} visual tokens is not n*n (use 1, 4, 9, 16, ...)")
    return n


def block_ids(n_visual: int, start_id: int, context_id: int, end_id: int) -> list[int]:
    return [start_id] + [context_id] * n_visual + [end_id]


def expand_markers(ids: list[int], labels: list[int], marker_id: int, block: list[int],
                   ignore: int) -> tuple[list[int], list[int]]:
    """Every image marker id -> the block (its labels `ignore`)."""
    if marker_id not in ids:
        return ids, labels
    out_ids, out_labels = [], []
    for i, lab in zip(ids, labels):
        if i == marker_id:
            out_ids += block
            out_labels += [ignore] * len(block)
        else:
            out_ids.append(i)
            out_labels.append(lab)
    return out_ids, out_labels


def real_image_mask(input_ids_BT: torch.Tensor, context_id: int, n_visual: int) -> torch.Tensor:
    """Which entries of a training batch's `pixel_values` are real images, for rows holding one
    sample each: a row with k images has k entries, a text-only row one zero image (every rank
    runs the tower, ZeRO-3 needs the same module calls). Packed rows pass the mask instead."""
    per_row = (input_ids_BT == context_id).sum(dim=1) // n_visual
    entries = [[True] * k if k else [False] for k in per_row.tolist()]
    return torch.tensor([e for row in entries for e in row], device=input_ids_BT.device)


def splice_visual(embeds_BTD: torch.Tensor, input_ids_BT: torch.Tensor, visual_IND: torch.Tensor,
                  context_id: int) -> torch.Tensor:
    """Write the N visual embeddings of each image, in order (row by row, left to right), at
    the context placeholders."""
    slots_BT = input_ids_BT == context_id
    images, n_visual = visual_IND.shape[:2]
    found = int(slots_BT.sum())
    if found != images * n_visual:
        raise ValueError(f"{found} image placeholders for {images} images of N={n_visual}")
    return embeds_BTD.masked_scatter(slots_BT[..., None],
                                     visual_IND.reshape(-1, visual_IND.shape[-1])
                                     .to(embeds_BTD.dtype))
