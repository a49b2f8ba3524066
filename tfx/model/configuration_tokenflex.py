"""Hugging Face config of an exported TokenFLEX model (`model_type: tokenflex`).

Self-contained (torch + transformers only): `tfx convert` copies this file into the exported
folder for `trust_remote_code`, and `import tfx` registers it with the Auto classes.
The vision and text configs are nested HF configs; `num_visual_tokens` is the default N, and
`min_visual_tokens`..`max_visual_tokens` the allowed range (N must be a perfect square).
"""

from __future__ import annotations

import math

from transformers import AutoConfig, PreTrainedConfig

DEFAULT_TYPES = {"vision_config": "siglip_vision_model", "text_config": "qwen2"}


class TokenFlexEfficientNetConfig(PreTrainedConfig):
    """The config of an EfficientNet-Lite tower (built by `efficientnet_lite_pytorch`, which
    transformers has no class for): its last feature map is the grid."""

    model_type = "tokenflex_efficientnet"
    variant: str = "efficientnet-lite0"
    image_size: int = 224
    patch_size: int = 32  # the output stride
    hidden_size: int = 1280  # channels of the last feature map


class TokenFlexConfig(PreTrainedConfig):
    model_type = "tokenflex"
    # a plain dict, converted in __post_init__: the form transformers 5.x accepts in every
    # release (5.23's SubConfigSpec does not exist in 5.17)
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    pool: str = "adaptive"
    projector_hidden_size: int = 0  # 0: 3 x vision width
    projector_position: str = "none"  # none | fourier: the projector's token-position offsets
    num_visual_tokens: int = 64
    min_visual_tokens: int = 1
    max_visual_tokens: int = 0  # 0: the whole patch grid
    image_token_id: int = 0  # the <image> marker in prompts
    image_start_id: int = 0
    image_context_id: int = 0
    image_end_id: int = 0
    tie_word_embeddings: bool = False
    # the auto-budget router (`tfx router train`), when exported with one: {"ladder": [N...],
    # "policy": sufficiency | accuracy, "tau": its knob (threshold | price), "keep": the share
    # of N_max's accuracy it was chosen to keep, "budget": or the token share it was chosen
    # within (None: keep), "in_dim": features, "hidden": MLP width}; None: no "auto" N
    router: dict | None = None

    def __post_init__(self, **kwargs):
        for key, default in DEFAULT_TYPES.items():
            value = getattr(self, key)
            if value is None:
                value = {"model_type": default}
            if isinstance(value, dict):
                value = dict(value)
                kind = value.pop("model_type", default)
                setattr(self, key, TokenFlexEfficientNetConfig(**value)
                        if kind == TokenFlexEfficientNetConfig.model_type
                        else AutoConfig.for_model(kind, **value))
        super().__post_init__(**kwargs)
        side = self.vision_config.image_size // self.vision_config.patch_size
        if not self.max_visual_tokens:
            self.max_visual_tokens = side * side
        if not self.projector_hidden_size:
            self.projector_hidden_size = 3 * self.vision_config.hidden_size

    @property
    def grid_side(self) -> int:
        return self.vision_config.image_size // self.vision_config.patch_size

    def check_visual_tokens(self, n_visual: int) -> int:
        """n for a valid N, else ValueError naming the allowed values."""
        n = math.isqrt(n_visual) if n_visual > 0 else 0
        if n * n != n_visual or not self.min_visual_tokens <= n_visual <= self.max_visual_tokens:
            lo, hi = math.isqrt(self.min_visual_tokens), math.isqrt(self.max_visual_tokens)
            raise ValueError(f"num_visual_tokens={n_visual} is not valid: use n*n for n in "
                             f"{lo}..{hi} (e.g. "
                             f"{', '.join(str(k * k) for k in range(lo, hi + 1)[:6])}"
                             f", ...)")
        return n


__all__ = ["TokenFlexConfig", "TokenFlexEfficientNetConfig"]
