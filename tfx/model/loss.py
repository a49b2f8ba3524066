"""Loss: cross-entropy summed over answer tokens, normalised by the global supervised count.

Data flow position: LLM logits -> **loss** -> engine.backward. DeepSpeed averages gradients over
ranks and divides the loss by grad_accum, so the per-micro-batch loss is
`ce_sum / global_count * world_size * grad_accum`; the optimizer step then sees
`sum over all supervised tokens of the step / global_count` exactly. A per-rank mean would weight
a token on a rank with few answers more than one on a busy rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tfx.data.tokenizer import IGNORE


def shifted_targets(labels_BT: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t+1; the last position predicts nothing."""
    return F.pad(labels_BT[:, 1:], (0, 1), value=IGNORE)


def supervised_count(labels_BT: torch.Tensor) -> int:
    return int((shifted_targets(labels_BT) != IGNORE).sum())


def ce_sum(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    targets = shifted_targets(labels_BT)
    return F.cross_entropy(logits_BTV.float().flatten(0, 1), targets.flatten(),
                           ignore_index=IGNORE, reduction="sum")


def global_normalised_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor, *,
                           global_count: int, world_size: int, grad_accum: int) -> torch.Tensor:
    return ce_sum(logits_BTV, labels_BT) / max(global_count, 1) * world_size * grad_accum
