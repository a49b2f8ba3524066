"""Model FLOPs of a training step, shared by the loop's MFU and `tfx plan`'s per-N table.

Data flow position: model shape + the step's batches -> **FLOPs** -> metrics (mfu, tflops) / plan.
Counted like `torch.utils.flop_counter.FlopCounterMode`: matmuls and convolutions, 2 FLOPs per
multiply-add (norms, activations and pooling are negligible and not counted):
- vision tower at full resolution: its forward FLOPs per image (a transformer's by the same
  rules as the LLM's; a convolutional tower's measured once by FlopCounterMode on a meta-device
  copy), times the images;
- projector at N: 2 x (gate/up + down weights) x N per image;
- LLM over the real tokens (padding excluded): 2 x decoder matmul weights per token, the
  attention scores 4 x layers x heads x head_dim x (row length)^2 (the full square, as the
  usual MFU convention and FlopCounterMode count it), and the LM head 2 x D x V at the
  supervised positions only (the loss applies it there only);
- backward: weight gradients (1x the forward) for trainable parts, input gradients (1x; 2x for
  the weight-free attention products) wherever a trainable weight lies upstream (the
  projector's own LayerNorm counts). A frozen tower costs its forward only; a frozen LLM
  (stage align) still carries gradients to the projector.
MFU = FLOPs / (step time x world size x peak FLOP/s per device), the peak from `peak_tflops`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

# Dense bf16 tensor-core peaks per device, TFLOP/s (vendor datasheets, no sparsity). Matched as
# substrings of torch.cuda.get_device_name(), first match wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4),
                    ("H200", 989.4), ("GH200", 989.4), ("B200", 2250.0), ("A100", 312.0),
                    ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0))


def peak_tflops(configured: float | None, bf16: bool) -> float | None:
    """`logging.peak_tflops` when set, else the bf16 peak of the GPU from the table; None when
    unknown (a CPU, fp32 training, a device not in the table): MFU is then logged as null."""
    if configured:
        return configured
    if not (bf16 and torch.cuda.is_available()):
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def _numel(p: torch.Tensor) -> int:
    shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3: the full shape, not the partition's
    n = 1
    for d in shape:
        n *= d
    return n


def _linear_weights(module: nn.Module) -> int:
    return sum(_numel(m.weight) for m in module.modules() if isinstance(m, nn.Linear))


def vision_forward_flops(model) -> float:
    """Forward FLOPs of the tower for one image. A transformer tower (HF SigLIP/CLIP): its
    matmul and patch-convolution weights once per patch token, plus the attention products
    4 x layers x width x tokens^2 (a pooling head that sees one query is left out). A
    convolutional tower: measured by FlopCounterMode on a meta-device copy."""
    tower = model.vision
    if tower.spec.hf_classes is None:
        return _measured_conv_tower(model.cfg.vision)
    cfg = tower.encoder.config
    tokens = (cfg.image_size // cfg.patch_size) ** 2 + tower.spec.drops_cls
    weights = sum(_numel(m.weight) for name, m in tower.encoder.named_modules()
                  if isinstance(m, (nn.Linear, nn.Conv2d)) and ".head." not in f".{name}.")
    return 2.0 * weights * tokens + 4.0 * cfg.num_hidden_layers * cfg.hidden_size * tokens ** 2


def _measured_conv_tower(vision_cfg) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from tfx.model.vision import VisionTower

    vcfg = dataclasses.replace(vision_cfg, path=None)
    with torch.device("meta"):
        tower = VisionTower(vcfg, "eager")
        pixels = torch.zeros(1, 3, vcfg.image_size, vcfg.image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        tower.eval()(pixels)
    return float(counter.get_total_flops())


@dataclass(frozen=True)
class FlopModel:
    vision_per_image: float  # forward FLOPs of the tower per image
    projector_weights: int  # matmul weights of the projector
    llm_weights: int  # matmul weights of the decoder layers (no embeddings, no head)
    llm_layers: int
    attn_width: int  # heads x head_dim of the LLM's queries
    head: int  # D x V of the LM head
    trainable: frozenset

    @classmethod
    def of(cls, model, trainable) -> FlopModel:
        llm = model.llm
        cfg = llm.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(vision_per_image=vision_forward_flops(model),
                   projector_weights=_linear_weights(model.projector),
                   llm_weights=_linear_weights(llm.model), llm_layers=cfg.num_hidden_layers,
                   attn_width=cfg.num_attention_heads * head_dim,
                   head=_numel(llm.get_output_embeddings().weight), trainable=frozenset(trainable))

    def step(self, images: int, n_visual: int, row_lengths: list[int], supervised: int,
             include_vision: bool = True) -> float:
        """Forward + backward FLOPs of micro-batches holding `images` images at N, LLM rows of
        these real lengths, and `supervised` supervised positions. `include_vision=False`: a
        further count of tokens.mode all, whose tower pass is shared."""
        t = self.trainable
        vision = self.vision_per_image * images * include_vision
        projector = 2.0 * self.projector_weights * n_visual * images
        linear = 2.0 * self.llm_weights * sum(row_lengths)
        attention = 4.0 * self.llm_layers * self.attn_width * sum(n * n for n in row_lengths)
        head = 2.0 * self.head * supervised
        grads_reach_llm = bool(t & {"llm", "projector", "vision"})
        backward = (2 * vision if "vision" in t else 0.0)
        # the projector's LayerNorm weights come before its matmuls: its input gradients are
        # needed even with a frozen tower
        backward += 2 * projector if "projector" in t else projector * ("vision" in t)
        if "llm" in t:
            backward += 2 * (linear + attention + head)
        elif grads_reach_llm:
            backward += linear + 2 * attention + head
        return vision + projector + linear + attention + head + backward

    def batch_flops(self, batch: dict, n_visual: int, supervised: int,
                    include_vision: bool = True) -> float:
        # packed rows attend within each sample: the attention term is per sample
        lengths = batch.get("sample_lengths") or batch["attention_mask"].sum(dim=1).tolist()
        return self.step(int(batch["images"]), n_visual, lengths, supervised, include_vision)
