"""DeepSpeed engine set-up (elsewhere only DeepSpeed utilities are used: zero_to_fp32 in
checkpoint.py, the ZeRO-3 memory estimator in plan.py).

Data flow position: model + optimizer -> **deepspeed.initialize** -> loop. The DeepSpeed JSON in
`configs/deepspeed/` holds only ZeRO settings; batch size, accumulation, clipping and dtype are
filled from the tfx config (a JSON that disagrees is an error, not a silent override).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
from pathlib import Path

import torch

from tfx.config.schema import RunConfig
from tfx.errors import ConfigError
from tfx.log import get_logger
from tfx.model.llm import resolve_attn
from tfx.model.vlm import ImageTokenIds, TokenFlexVLM

log = get_logger(__name__)
OWNED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "gradient_clipping", "train_batch_size")


def use_bf16(cfg: RunConfig) -> bool:
    p = cfg.train.precision
    return p == "bf16" or (p == "auto" and torch.cuda.is_available())


def build_ds_config(cfg: RunConfig, world: int) -> dict:
    path = Path(cfg.deepspeed.config)
    if not path.is_file():
        raise ConfigError(f"deepspeed.config: {path} not found")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config: {path} is not JSON ({e})") from None
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"deepspeed.config: remove {key!r} from {path}; tfx builds it "
                              "from the train section")
    want = {"train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
            "gradient_accumulation_steps": cfg.train.grad_accum,
            "gradient_clipping": cfg.train.grad_clip,
            "train_batch_size": cfg.data.micro_batch_size * cfg.train.grad_accum * world}
    for key, value in want.items():
        if key in ds and ds[key] not in ("auto", value):
            raise ConfigError(f"deepspeed.config: {key}={ds[key]} in {path} disagrees with the "
                              f"tfx config ({value}); remove it or set it to \"auto\"")
        ds[key] = value
    ds["bf16"] = {"enabled": use_bf16(cfg)}
    ds.pop("fp16", None)
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if cfg.deepspeed.param_persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = cfg.deepspeed.param_persistence_threshold
    ds.setdefault("steps_per_print", 10**9)  # tfx logs; keep DeepSpeed's own prints quiet
    return ds


def init_distributed(timeout_s: int) -> None:
    import deepspeed

    deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s))


def build_model(cfg: RunConfig, tok, ds_config: dict) -> tuple[TokenFlexVLM, object]:
    """Build under zero.Init for ZeRO-3 (parameters partitioned at creation). Returns the model
    and the HfDeepSpeedConfig, which must stay alive for transformers to see ZeRO-3."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    stage3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    hf_ds = HfDeepSpeedConfig(ds_config) if stage3 else None
    attn = resolve_attn(cfg.model.attn_implementation, torch.cuda.is_available())
    ids = ImageTokenIds(tok.img_start_id, tok.img_ctx_id, tok.img_end_id)
    _preimport_model_code(cfg)
    ctx = deepspeed.zero.Init(config_dict_or_path=ds_config) if stage3 else \
        contextlib.nullcontext()
    with ctx:
        model = TokenFlexVLM(cfg.model, tok.vocab_size, ids, attn_implementation=attn)
    if cfg.train.grad_checkpointing:
        model.llm.gradient_checkpointing_enable({"use_reentrant": False})
        model.vision.encoder.gradient_checkpointing_enable({"use_reentrant": False})
    return model, hf_ds


def _preimport_model_code(cfg: RunConfig) -> None:
    """zero.Init patches tensor constructors; modules imported lazily inside it (torch._dynamo,
    pulled in by transformers' attention integrations) then fail with `TypeError: Signature
    mismatch ... tensor_pynew`. Import them first."""
    import torch._dynamo  # noqa: F401
    import transformers.integrations.hub_kernels  # noqa: F401

    from tfx.model.llm import build_llm  # noqa: F401
    from tfx.model.vision import _hf_classes

    if cfg.model.vision.family == "efficientnet":
        import efficientnet_lite_pytorch  # noqa: F401
    else:
        _hf_classes(cfg.model.vision.family)


TRAINABLE = {"align": ("projector",), "enhance": ("vision", "projector", "llm"),
             "instruct": ("projector", "llm")}


def param_groups(cfg: RunConfig, model: TokenFlexVLM) -> list[dict]:
    """Freeze per stage and give each trainable part its own LR; returns optimizer groups."""
    lrs = {"vision": cfg.train.vision_lr, "projector": cfg.train.lr, "llm": cfg.train.llm_lr}
    groups = []
    for name, part in model.parts().items():
        trainable = name in TRAINABLE[cfg.train.stage]
        for p in part.parameters():
            p.requires_grad_(trainable)
        if trainable:
            decay = [p for p in part.parameters() if p.ndim >= 2]
            no_decay = [p for p in part.parameters() if p.ndim < 2]
            groups += [{"params": decay, "lr": lrs[name], "weight_decay":
                        cfg.train.weight_decay, "name": name},
                       {"params": no_decay, "lr": lrs[name], "weight_decay": 0.0,
                        "name": name + ".no_decay"}]
    return [g for g in groups if g["params"]]


def lr_factor(step: int, cfg: RunConfig) -> float:
    """Linear warmup then cosine to min_lr_ratio; a factor on every group's peak LR."""
    total = cfg.train.max_steps
    warm = int(math.ceil(cfg.train.warmup_ratio * total))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    floor = cfg.train.min_lr_ratio
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def initialize(cfg: RunConfig, model: TokenFlexVLM, ds_config: dict):
    import deepspeed

    groups = param_groups(cfg, model)
    # Client torch AdamW: DeepSpeed's own AdamW JIT-compiles FusedAdam (~107 s on CPU).
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), fused=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine, optimizer, scheduler


def param_table(model: TokenFlexVLM) -> list[tuple[str, int, int, bool]]:
    """(part, total params, params held on this rank, trainable) using ZeRO-3's shapes."""
    rows = []
    for name, part in model.parts().items():
        total = sum(getattr(p, "ds_numel", p.numel()) for p in part.parameters())
        local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                    for p in part.parameters())
        rows.append((name, total, local, any(p.requires_grad for p in part.parameters())))
    return rows
