"""TokenFlexVLM: vision -> projector(N) -> visual embeddings written at the image placeholders.

Data flow position: collate -> **vision -> projector(N) -> splice -> LLM** -> loss. Every row
runs the vision tower (text-only rows on a zero image, kept in the graph with weight 0) so all
ranks call the same modules in the same order under ZeRO-3. Shape legend: B batch, T sequence,
N visual tokens, D LLM width, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tfx.config.schema import ModelConfig
from tfx.data.tokenizer import IGNORE
from tfx.model.image_block import grid_side, real_image_mask, splice_visual
from tfx.model.llm import build_llm
from tfx.model.loss import shifted_targets
from tfx.model.projector import TokenAdaptiveProjector
from tfx.model.varlen import packed_attention
from tfx.model.vision import VisionTower


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """The loss in fp32 for bf16 logits, and in the logits' own precision when higher."""
    return x if x.dtype == torch.float64 else x.float()


@dataclass(frozen=True)
class ImageTokenIds:
    start: int
    context: int
    end: int


class TokenFlexVLM(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, image_ids: ImageTokenIds,
                 attn_implementation: str = "sdpa", hf_configs: dict | None = None):
        """`hf_configs` ({"vision": dict, "llm": dict}, as saved in a run folder): build those
        structures with fresh weights instead of loading the pretrained paths of `cfg`."""
        super().__init__()
        self.cfg, self.image_ids = cfg, image_ids
        hf_configs = hf_configs or {}
        self.vision = VisionTower(cfg.vision, attn_implementation, hf_configs.get("vision"))
        self.llm = build_llm(cfg.llm, vocab_size, attn_implementation, hf_configs.get("llm"))
        self.projector = TokenAdaptiveProjector(
            self.vision.embed_dim, self.llm.config.hidden_size,
            hidden_ratio=cfg.projector.hidden_ratio, pool=cfg.projector.pool,
            kernel=cfg.projector.kernel, position=cfg.projector.position)

    def visual_tokens(self, feats_BTC: torch.Tensor, n_visual: int) -> torch.Tensor:
        """The tower's (B, H*W, C) grid -> (B, N, D) visual tokens."""
        return self.projector(feats_BTC, self.vision.grid_hw, grid_side(n_visual))

    def embed(self, input_ids_BT: torch.Tensor, pixel_values: torch.Tensor, n_visual: int,
              feats_BTC: torch.Tensor | None = None,
              has_image: torch.Tensor | None = None) -> torch.Tensor:
        """`feats_BTC`: the tower's output for `pixel_values` when already computed (eval at
        several N runs the tower once per batch). `has_image`: which entries of
        `pixel_values` are real images, in placeholder order; needed when rows are packed
        (several samples a row), else counted from the rows (`real_image_mask`)."""
        embeds_BTD = self.llm.get_input_embeddings()(input_ids_BT)
        if feats_BTC is None:
            feats_BTC = self.vision(pixel_values.to(embeds_BTD.dtype))
        visual_BND = self.visual_tokens(feats_BTC, n_visual).to(embeds_BTD.dtype)
        if has_image is None:
            has_image = real_image_mask(input_ids_BT, self.image_ids.context, n_visual)
        embeds_BTD = splice_visual(embeds_BTD, input_ids_BT, visual_BND[has_image.bool()],
                                   self.image_ids.context)
        # Rows without an image still ran the tower: keep it in the graph with weight 0.
        return embeds_BTD + 0.0 * visual_BND.sum()

    def forward(self, input_ids, pixel_values: torch.Tensor, n_visual,
                attention_mask=None, labels=None, position_ids=None,
                has_image=None) -> torch.Tensor:
        """Logits (B, T, V); with `labels`, the summed cross-entropy of the answer tokens,
        with the LM head applied at those positions only (the V-way logits of every prompt
        and image position are never formed: most of the cost for a large vocabulary).
        `n_visual` a tuple of C counts (tokens.mode all): `input_ids`, `attention_mask` and
        `labels` are then C-tuples, one batch per count over the same samples, and the result
        is the (C,) summed cross-entropies; the tower runs once for all of them.
        `position_ids` (packed rows, `tfx.data.packing`): restart at 0 at each sample; the
        attention then stays inside each sample and `attention_mask` is not used."""
        if isinstance(n_visual, (tuple, list)):
            dtype = self.llm.get_input_embeddings().weight.dtype
            feats_BTC = self.vision(pixel_values.to(dtype))
            sums = []
            for ids, n, mask, lab in zip(input_ids, n_visual, attention_mask, labels):
                logits_KV, targets_K, _ = self.answer_logits(ids, pixel_values, n, mask, lab,
                                                             feats_BTC)
                sums.append(F.cross_entropy(_at_least_fp32(logits_KV), targets_K, reduction="sum"))
            return torch.stack(sums)
        if labels is None:
            embeds_BTD = self.embed(input_ids, pixel_values, n_visual)
            out = self.llm(inputs_embeds=embeds_BTD, attention_mask=attention_mask,
                           use_cache=False)
            return out.logits
        logits_KV, targets_K, _ = self.answer_logits(input_ids, pixel_values, n_visual,
                                                     attention_mask, labels,
                                                     position_ids=position_ids,
                                                     has_image=has_image)
        return F.cross_entropy(_at_least_fp32(logits_KV), targets_K, reduction="sum")

    def answer_logits(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, n_visual: int,
                      attention_mask: torch.Tensor | None, labels: torch.Tensor,
                      feats_BTC: torch.Tensor | None = None, position_ids=None,
                      has_image=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(K, V) logits at the K supervised positions, their (K,) targets, and the (B, T)
        mask of those positions."""
        embeds_BTD = self.embed(input_ids, pixel_values, n_visual, feats_BTC, has_image)
        attention = ({"attention_mask": attention_mask} if position_ids is None else
                     packed_attention(self.llm.config, embeds_BTD, position_ids))
        hidden_BTD = self.llm.model(inputs_embeds=embeds_BTD, position_ids=position_ids,
                                    use_cache=False, **attention).last_hidden_state
        targets_BT = shifted_targets(labels)
        keep_BT = targets_BT != IGNORE
        return self.llm.lm_head(hidden_BTD[keep_BT]), targets_BT[keep_BT], keep_BT

    def parts(self) -> dict[str, nn.Module]:
        return {"vision": self.vision, "projector": self.projector, "llm": self.llm}

    def set_trainable(self, names) -> None:
        """Train the named parts, freeze the others, and re-apply the train/eval modes (a
        frozen part keeps its normalisation statistics: see `train`)."""
        for name, part in self.parts().items():
            for p in part.parameters():
                p.requires_grad_(name in names)
        self.train(self.training)

    def train(self, mode: bool = True) -> "TokenFlexVLM":
        """BatchNorm layers of frozen parts stay in eval mode: their running statistics are
        weights nobody trains, and would drift with every training batch otherwise."""
        super().train(mode)
        for part in self.parts().values():
            if mode and not any(p.requires_grad for p in part.parameters()):
                for m in part.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    def deferred_weights(self) -> list[tuple[nn.Module, dict]]:
        """(module, state dict) pairs of pretrained weights a part could not load itself
        because its parameters were created partitioned (ZeRO-3)."""
        encoder = self.vision.encoder
        state = getattr(encoder, "deferred_state", None)
        return [(encoder.net, state)] if state is not None else []

    def hf_configs(self) -> dict:
        """The HF configs of the towers, for a run folder (see `__init__`)."""
        return {"vision": self.vision.hf_config(), "llm": self.llm.config.to_dict()}
