"""Loss: cross-entropy summed over answer tokens, normalised by the global supervised count.

Data flow position: LLM -> **loss** -> engine.backward. `TokenFlexVLM.forward(..., labels=...)`
returns the summed cross-entropy of the answer tokens (LM head at those positions only).
DeepSpeed averages gradients over ranks and divides the loss by grad_accum, so the loop backs
up `ce_sum / global_count * world_size * grad_accum`; the optimizer step then sees
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
