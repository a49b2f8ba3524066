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


def use_bf16(cfg: RunConfig) -> bool:
    p = cfg.train.precision
    return p == "bf16" or (p == "auto" and torch.cuda.is_available())


def build_ds_config(cfg: RunConfig, world: int) -> dict:
    """The DeepSpeed config: ZeRO settings from the JSON, every quantity tfx owns filled in. A
    JSON value that disagrees with the tfx config is a ConfigError, never silently replaced."""
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
    bf16 = use_bf16(cfg)
    if _enabled(ds.get("fp16")):
        raise ConfigError(f"deepspeed.config: fp16 is enabled in {path}; tfx trains in bf16 or "
                          f"fp32 (train.precision); remove the fp16 section")
    if "bf16" in ds and _enabled(ds["bf16"]) not in ("auto", bf16):
        raise ConfigError(f"deepspeed.config: bf16.enabled={_enabled(ds['bf16'])} in {path} "
                          f"disagrees with train.precision={cfg.train.precision} (bf16 "
                          f"{'on' if bf16 else 'off'}); remove it or set it to \"auto\"")
    ds["bf16"] = {**(ds.get("bf16") or {}), "enabled": bf16}
    ds.pop("fp16", None)
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if cfg.deepspeed.param_persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = cfg.deepspeed.param_persistence_threshold
    ds.setdefault("steps_per_print", 10**9)  # tfx logs; keep DeepSpeed's own prints quiet
    return ds


def _enabled(section) -> bool | str | None:
    """`enabled` of a DeepSpeed precision section (True, False, "auto"), None when absent."""
    if section is None:
        return None
    value = section.get("enabled", False) if isinstance(section, dict) else section
    return value if value == "auto" else bool(value)


def offloads_optimizer(ds_config: dict) -> bool:
    device = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device")
    return device in ("cpu", "nvme")


def init_distributed(timeout_s: int) -> None:
    import deepspeed

    announce_cpu_comm_op()
    deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s))


CPU_COMM_OP = "deepspeed_shm_comm"


def announce_cpu_comm_op() -> None:
    """On a CPU, DeepSpeed JIT-compiles a C++ comm op in `init_distributed` (25-50 s, silent).
    Say so before it starts, and fail in one line when there is no compiler to build it."""
    import os
    import shutil
    import sys

    from tfx.errors import SetupError

    if torch.cuda.is_available():
        return
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    folder = Path(root) if root else Path(get_default_build_root()) / \
        f"py{sys.version_info.major}{sys.version_info.minor}_cpu"
    if (folder / CPU_COMM_OP / f"{CPU_COMM_OP}.so").is_file():
        return
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise SetupError("DeepSpeed compiles a C++ comm op on the first CPU launch, and no C++ "
                       "compiler was found: install one (apt-get install g++; `make install` "
                       "does it) or set CXX")
    from tfx.train.dist import rank

    if rank() == 0:
        log.info(f"building DeepSpeed's C++ comm op for CPU training into {folder} (once per "
                 f"checkout, 25-50 s)")


def build_model(cfg: RunConfig, tok, ds_config: dict) -> tuple[TokenFlexVLM, object]:
    """Build under zero.Init for ZeRO-3 (parameters partitioned at creation). Returns the model
    and the HfDeepSpeedConfig, which must stay alive for transformers to see ZeRO-3."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    stage3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    hf_ds = HfDeepSpeedConfig(ds_config) if stage3 else None
    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    attn = resolve_attn(cfg.model.attn_implementation, torch.cuda.is_available(), dtype)
    ids = ImageTokenIds(tok.img_start_id, tok.img_ctx_id, tok.img_end_id)
    _preimport_model_code(cfg)
    ctx = deepspeed.zero.Init(config_dict_or_path=ds_config) if stage3 else \
        contextlib.nullcontext()
    with ctx:
        model = TokenFlexVLM(cfg.model, tok.vocab_size, ids, attn_implementation=attn)
    for module, state in model.deferred_weights():
        load_partitioned(module, state)
    if cfg.train.grad_checkpointing:
        model.llm.gradient_checkpointing_enable({"use_reentrant": False})
        model.vision.gradient_checkpointing_enable()
    return model, hf_ds


def load_partitioned(module: torch.nn.Module, state: dict, strict: bool = True) -> list[str]:
    """Copy `state` into `module`, whose parameters may be ZeRO-3 partitions: one parameter at
    a time is gathered, written on rank 0 and re-partitioned (the whole model is never
    materialised on a rank). Returns the names of the module's tensors `state` lacked."""
    import deepspeed

    from tfx.train.dist import rank

    missing = []
    for name, p in module.named_parameters():
        if name not in state:
            missing.append(name)
            continue
        want = state[name]
        if tuple(want.shape) != shape_of(p):
            raise ConfigError(f"{name}: the weights have shape {tuple(want.shape)}, the model "
                              f"{shape_of(p)}")
        if hasattr(p, "ds_id"):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank() == 0:
                    p.data.copy_(want.to(p.dtype))
        else:
            with torch.no_grad():
                p.copy_(want.to(p.dtype))
    for name, b in module.named_buffers():
        if name in state:
            b.copy_(state[name].to(b.dtype))
        else:
            missing.append(name)
    if strict and missing:
        raise ConfigError(f"weights for {type(module).__name__} lack {missing[:3]}")
    return missing


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


def shape_of(p: torch.nn.Parameter) -> tuple[int, ...]:
    """The full shape: under ZeRO-3 a parameter's own `.shape` is that of its (1-D, possibly
    empty) local partition."""
    return tuple(getattr(p, "ds_shape", p.shape))


def param_groups(cfg: RunConfig, model: TokenFlexVLM) -> list[dict]:
    """Freeze per stage and give each trainable part its own LR; returns optimizer groups.
    Matrices (2-D and up: linear weights, embeddings, convolutions) decay; biases and norm
    weights do not."""
    lrs = {"vision": cfg.train.vision_lr, "projector": cfg.train.lr, "llm": cfg.train.llm_lr}
    trainable = TRAINABLE[cfg.train.stage]
    model.set_trainable(trainable)
    groups = []
    for name in trainable:
        params = list(model.parts()[name].parameters())
        decay = [p for p in params if len(shape_of(p)) >= 2]
        no_decay = [p for p in params if len(shape_of(p)) < 2]
        groups += [{"params": decay, "lr": lrs[name], "weight_decay": cfg.train.weight_decay,
                    "name": name},
                   {"params": no_decay, "lr": lrs[name], "weight_decay": 0.0, "name": name}]
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
    """(engine, optimizer, scheduler, group part names). AdamW: torch's (DeepSpeed's own
    JIT-compiles FusedAdam, ~107 s on a CPU), or DeepSpeedCPUAdam when the optimizer state is
    offloaded (ZeRO-Offload refuses a client torch optimizer; cpu_adam is JIT-built once)."""
    import deepspeed

    groups = param_groups(cfg, model)
    names = [g.pop("name") for g in groups]
    if offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        log.info("optimizer state offloaded: DeepSpeedCPUAdam (its C++ op is compiled on the "
                 "first use on a machine, about a minute)")
        optimizer = DeepSpeedCPUAdam(groups, betas=(0.9, 0.95), adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), fused=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine, optimizer, scheduler, names


def step_lrs(scheduler, names: list[str]) -> dict[str, float]:
    """The LR each part uses in the coming optimizer step (read before engine.step(), which
    advances the scheduler)."""
    return {name: lr for name, lr in zip(names, scheduler.get_last_lr())}


def param_table(model: TokenFlexVLM) -> list[tuple[str, int, int, bool]]:
    """(part, total params, params held on this rank, trainable) using ZeRO-3's shapes."""
    rows = []
    for name, part in model.parts().items():
        total = sum(math.prod(shape_of(p)) for p in part.parameters())
        local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                    for p in part.parameters())
        rows.append((name, total, local, any(p.requires_grad for p in part.parameters())))
    return rows
