"""Hugging Face model of an exported TokenFLEX VLM: vision tower -> projector(N) -> causal LM.

Self-contained (torch + transformers, plus `projector.py` and `configuration_tokenflex.py` beside
it): `tfx convert` copies these files into the exported folder for `trust_remote_code`, and
`import tfx` registers the classes with the Auto classes. The training model
(`tfx.model.vlm.TokenFlexVLM`) uses `splice_visual` from here, so both write visual tokens the
same way. N is read from the prompt: the processor writes N `<IMG_CONTEXT>` ids per image, and
`num_visual_tokens=N` (in `forward` or `generate`) is checked against them.
Shape legend: B batch, T sequence, N visual tokens, D LLM width.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from .configuration_tokenflex import TokenFlexConfig
from .projector import TokenAdaptiveProjector


def splice_visual(embeds_BTD: torch.Tensor, input_ids_BT: torch.Tensor, visual_BND: torch.Tensor,
                  context_id: int) -> torch.Tensor:
    """Write each image row's N visual embeddings at its N context placeholders, in order."""
    slots_BT = input_ids_BT == context_id
    rows_with_image = slots_BT.any(dim=1)
    found, n_visual = int(slots_BT.sum()), visual_BND.shape[1]
    expected = int(rows_with_image.sum()) * n_visual
    if found != expected:
        raise ValueError(f"{found} image placeholders for N={n_visual} x "
                         f"{int(rows_with_image.sum())} images")
    return embeds_BTD.masked_scatter(slots_BT[..., None],
                                     visual_BND[rows_with_image].to(embeds_BTD.dtype))


class TokenFlexPreTrainedModel(PreTrainedModel):
    config_class = TokenFlexConfig
    config: TokenFlexConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _skip_keys_device_placement = ["past_key_values"]

    def _init_weights(self, module):
        # the vision tower and the LLM initialise themselves; the projector keeps PyTorch's init
        pass


class TokenFlexForConditionalGeneration(TokenFlexPreTrainedModel, GenerationMixin):
    def __init__(self, config: TokenFlexConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.projector = TokenAdaptiveProjector(
            config.vision_config.hidden_size, config.text_config.hidden_size,
            hidden=config.projector_hidden_size, pool=config.pool, kernel="auto")
        self.drop_cls = config.vision_config.model_type == "clip_vision_model"
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def get_image_features(self, pixel_values: torch.Tensor, num_visual_tokens: int
                           ) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N, D) visual embeddings for the LLM."""
        n = self.config.check_visual_tokens(num_visual_tokens)
        dtype = self.vision_tower.get_input_embeddings().weight.dtype
        hidden = self.vision_tower(pixel_values=pixel_values.to(dtype)).last_hidden_state
        grid_BTC = hidden[:, 1:] if self.drop_cls else hidden
        side = self.config.grid_side
        return self.projector(grid_BTC, (side, side), n)

    def forward(self, input_ids: torch.LongTensor | None = None,
                pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None,
                past_key_values=None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                num_visual_tokens: int | None = None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            if pixel_values is not None:
                per_row = (input_ids == self.config.image_context_id).sum(dim=1)
                n_visual = int(per_row.max())
                if num_visual_tokens is not None and n_visual != num_visual_tokens:
                    raise ValueError(f"num_visual_tokens={num_visual_tokens}, but the prompt has "
                                     f"{n_visual} image placeholders per image: build it with "
                                     f"the processor at the same N")
                rows = per_row > 0
                visual_BND = self.get_image_features(pixel_values[rows], n_visual)
                full_BND = visual_BND.new_zeros(len(rows), *visual_BND.shape[1:])
                full_BND[rows] = visual_BND
                inputs_embeds = splice_visual(inputs_embeds, input_ids, full_BND,
                                              self.config.image_context_id)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, past_key_values=past_key_values,
                                   labels=labels, use_cache=use_cache, **kwargs)


__all__ = ["TokenFlexForConditionalGeneration", "TokenFlexPreTrainedModel", "splice_visual"]
