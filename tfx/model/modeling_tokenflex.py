"""Hugging Face model of an exported TokenFLEX VLM: vision tower -> projector(N) -> causal LM.

Self-contained (torch + transformers, plus `projector.py`, `image_block.py` and
`configuration_tokenflex.py` beside it; an EfficientNet tower also needs the PyPI package
`efficientnet-lite-pytorch`): `tfx convert` copies these files into the exported folder for
`trust_remote_code`, and `tfx.register_auto_classes()` registers the classes with the Auto
classes. The training model (`tfx.model.vlm.TokenFlexVLM`) and this one write visual tokens
with the same `splice_visual` (`image_block.py`). N is read from the prompt: the processor
writes N `<IMG_CONTEXT>` ids per image (several images per prompt: one `<image>` tag each), and
`num_visual_tokens=N` (in `forward` or `generate`) is checked against them. An export with a
router (`tfx router train`, then `tfx convert`) also takes `generate(..., num_visual_tokens=
"auto")`: the router reads the tower's grid and the prompt, picks N per image, the prompt's
image block is rebuilt at that N and each row is generated on its own (rows may get different
N); `choose_num_visual_tokens(**inputs)` gives the choice alone. Attention runs
through transformers' attention registry in both sub-models (`attn_implementation=` picks any
registered function), which the Transformers serving backends of vLLM and SGLang rely on.
Shape legend: B batch, I images, T sequence, N visual tokens, D LLM width.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from .configuration_tokenflex import TokenFlexConfig
from .image_block import splice_visual
from .projector import TokenAdaptiveProjector
from .router import Router, choose, prompt_embedding, router_features


class EfficientNetTower(nn.Module):
    """EfficientNet-Lite's last feature map as a (B, H*W, C) grid."""

    def __init__(self, config):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.config = config
        self.net = EfficientNet.from_name(config.variant)
        self.net._fc = nn.Identity()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.contiguous(memory_format=torch.channels_last)
        return self.net.extract_features(x).flatten(2).transpose(1, 2)


def build_vision_tower(config) -> nn.Module:
    if config.model_type == "tokenflex_efficientnet":
        return EfficientNetTower(config)
    return AutoModel.from_config(config)


class TokenFlexPreTrainedModel(PreTrainedModel):
    config_class = TokenFlexConfig
    config: TokenFlexConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True  # attention goes through ALL_ATTENTION_FUNCTIONS
    _skip_keys_device_placement = ["past_key_values"]

    def _init_weights(self, module):
        # the vision tower and the LLM initialise themselves; the projector keeps PyTorch's init
        pass


class TokenFlexForConditionalGeneration(TokenFlexPreTrainedModel, GenerationMixin):
    def __init__(self, config: TokenFlexConfig):
        super().__init__(config)
        self.vision_tower = build_vision_tower(config.vision_config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.projector = TokenAdaptiveProjector(
            config.vision_config.hidden_size, config.text_config.hidden_size,
            hidden=config.projector_hidden_size, pool=config.pool, kernel="auto",
            position=config.projector_position)
        self.drop_cls = config.vision_config.model_type == "clip_vision_model"
        r = config.router
        self.router = (Router(r["in_dim"], len(r["ladder"]), r["hidden"],
                              r.get("policy", "sufficiency"), r.get("members", 1),
                              r.get("shrink", 0.0))
                       if r else None)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def vision_grid(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(I, 3, S, S) -> the tower's (I, H*W, C) patch grid."""
        dtype = next(self.vision_tower.parameters()).dtype
        out = self.vision_tower(pixel_values=pixel_values.to(dtype))
        hidden = out if torch.is_tensor(out) else out.last_hidden_state
        return hidden[:, 1:] if self.drop_cls else hidden

    def get_image_features(self, pixel_values: torch.Tensor, num_visual_tokens: int
                           ) -> torch.Tensor:
        """(I, 3, S, S) -> (I, N, D) visual embeddings for the LLM."""
        n = self.config.check_visual_tokens(num_visual_tokens)
        side = self.config.grid_side
        return self.projector(self.vision_grid(pixel_values), (side, side), n)

    def forward(self, input_ids: torch.LongTensor | None = None,
                pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None,
                past_key_values=None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                num_visual_tokens: int | None = None, **kwargs):
        kwargs.pop("mm_token_type_ids", None)  # the serving backends' marks; N says it all
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            slots = input_ids == self.config.image_context_id
            if pixel_values is not None and bool(slots.any()):  # not in later decoding steps
                images = pixel_values.shape[0]
                n_visual = int(slots.sum()) // max(images, 1)
                if num_visual_tokens is not None and n_visual != num_visual_tokens:
                    raise ValueError(f"num_visual_tokens={num_visual_tokens}, but the prompt has "
                                     f"{n_visual} image placeholders per image: build it with "
                                     f"the processor at the same N")
                visual_IND = self.get_image_features(pixel_values, n_visual)
                inputs_embeds = splice_visual(inputs_embeds, input_ids, visual_IND,
                                              self.config.image_context_id)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, past_key_values=past_key_values,
                                   labels=labels, use_cache=use_cache, **kwargs)


    @torch.no_grad()
    def choose_num_visual_tokens(self, input_ids: torch.LongTensor, pixel_values: torch.Tensor,
                                 attention_mask: torch.Tensor | None = None, **kwargs
                                 ) -> list[int]:
        """The router's N for each row (one image per row) of a processor's batch."""
        if self.router is None:
            raise ValueError("this export has no router: num_visual_tokens='auto' needs "
                             "`tfx router train RUN` before `tfx convert`")
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(f"num_visual_tokens='auto' takes one image per row; got "
                             f"{pixel_values.shape[0]} images for {input_ids.shape[0]} rows")
        c = self.config
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        image = torch.isin(input_ids, torch.tensor(
            [c.image_token_id, c.image_start_id, c.image_context_id, c.image_end_id],
            device=input_ids.device))
        question = prompt_embedding(self.get_input_embeddings()(input_ids),
                                    mask.bool() & ~image)
        ladder = c.router["ladder"]
        feats = router_features(self.vision_grid(pixel_values), c.grid_side,
                                [int(round(n ** 0.5)) for n in ladder], question)
        return choose(self.router(feats), ladder, c.router["tau"], self.router.policy)

    def at_visual_tokens(self, ids: list[int], n_visual: int) -> list[int]:
        """A one-image prompt's ids with its image block rebuilt at N."""
        ctx = self.config.image_context_id
        slots = [i for i, t in enumerate(ids) if t == ctx]
        return ids[:slots[0]] + [ctx] * n_visual + ids[slots[-1] + 1:]

    def generate(self, *args, num_visual_tokens=None, **kwargs):
        if num_visual_tokens != "auto":
            if num_visual_tokens is not None:
                kwargs["num_visual_tokens"] = num_visual_tokens
            return super().generate(*args, **kwargs)
        input_ids = kwargs.pop("input_ids", args[0] if args else None)
        pixel_values = kwargs.pop("pixel_values")
        mask = kwargs.pop("attention_mask", None)
        mask = torch.ones_like(input_ids) if mask is None else mask
        chosen = self.choose_num_visual_tokens(input_ids, pixel_values, mask)
        new_tokens = []
        for b, n in enumerate(chosen):  # one row at a time: rows may differ in N
            row = self.at_visual_tokens(input_ids[b][mask[b].bool()].tolist(), n)
            ids = torch.tensor([row], device=input_ids.device)
            out = super().generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   pixel_values=pixel_values[b:b + 1], num_visual_tokens=n,
                                   **kwargs)
            new_tokens.append(out[0, ids.shape[1]:])
        self.last_num_visual_tokens = chosen
        pad = self.generation_config.pad_token_id or 0
        width = max(len(t) for t in new_tokens)
        tail = torch.full((len(chosen), width), pad, dtype=input_ids.dtype,
                          device=input_ids.device)
        for b, t in enumerate(new_tokens):
            tail[b, :len(t)] = t
        return torch.cat([input_ids, tail], dim=1)  # new tokens after the prompt as given


__all__ = ["TokenFlexForConditionalGeneration", "TokenFlexPreTrainedModel", "splice_visual"]
