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

from tfx.config.schema import PRESETS, RunConfig
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
            "gradient_clipping": cfg.optim.grad_clip,
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
    from tfx.train.dist import release_shm_segment

    release_shm_segment()


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


def load_partitioned(module: torch.nn.Module, state: dict | None, strict: bool = True,
                     where: str = "weights") -> dict:
    """Collective: copy rank 0's `state` (other ranks pass None) into `module`, whose
    parameters may be ZeRO-3 partitions. One parameter at a time is gathered, written on rank 0
    and re-partitioned, so the whole model is never materialised on a rank; a parameter that is
    not partitioned (ZeRO stage < 3) and the buffers are broadcast from rank 0. Shapes are
    checked on rank 0 first, and every rank raises the same one-line ConfigError. Returns
    {"loaded": [names], "missing": [names the state lacked], "unexpected": [...]}."""
    import deepspeed

    from tfx.train.dist import all_gather_objects, broadcast_, rank

    params = dict(module.named_parameters())
    persistent = set(module.state_dict(keep_vars=True))  # buffers a checkpoint holds
    buffers = {n: b for n, b in module.named_buffers() if n in persistent}
    report = None
    if rank() == 0:
        wanted = {n: shape_of(p) for n, p in params.items()} | {
            n: tuple(b.shape) for n, b in buffers.items()}
        report = {"missing": [n for n in wanted if n not in state],
                  "unexpected": [k for k in state if k not in wanted],
                  "mismatch": next(([n, list(state[n].shape), list(s)] for n, s in wanted.items()
                                    if n in state and tuple(state[n].shape) != s), None)}
    report = all_gather_objects(report)[0]
    if report["mismatch"]:
        name, theirs, ours = report["mismatch"]
        raise ConfigError(f"{where}: {name} has shape {tuple(theirs)} there but {tuple(ours)} "
                          f"in this model")
    if strict and (report["missing"] or report["unexpected"]):
        raise ConfigError(f"{where}: missing {report['missing'][:3]}, unexpected "
                          f"{report['unexpected'][:3]}")
    loaded = []
    for name, p in params.items():
        if name in report["missing"]:
            continue
        if hasattr(p, "ds_id"):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank() == 0:
                    p.data.copy_(state[name].to(p.dtype))
        else:
            with torch.no_grad():
                if rank() == 0:
                    p.copy_(state[name].to(p.dtype))
                broadcast_(p.data)
        loaded.append(name)
    for name, b in buffers.items():
        if name not in report["missing"]:
            if rank() == 0:
                b.copy_(state[name].to(b.dtype))
            broadcast_(b)
            loaded.append(name)
    return {"loaded": loaded, "missing": report["missing"], "unexpected": report["unexpected"]}


def _preimport_model_code(cfg: RunConfig) -> None:
    """zero.Init patches tensor constructors; modules imported lazily inside it (torch._dynamo,
    pulled in by transformers' attention integrations) then fail with `TypeError: Signature
    mismatch ... tensor_pynew`. Import them first."""
    import importlib

    import torch._dynamo  # noqa: F401
    import transformers.integrations.hub_kernels  # noqa: F401

    from tfx.model.families import llm_family, vision_family
    from tfx.model.llm import build_llm  # noqa: F401
    from tfx.model.vision import VisionTower  # noqa: F401

    tower = vision_family(cfg.model.vision.family)
    if tower.package:
        try:
            importlib.import_module(tower.package)
        except ImportError:
            raise ConfigError(f"model.vision.family={tower.name} needs the package "
                              f"{tower.package} ({tower.install_hint})") from None
    if tower.hf_classes:
        tower.load()
    llm_family(cfg.model.llm.family).load()


TRAINABLE = PRESETS  # train.freeze -> the parts that train (one table, in the schema)


def shape_of(p: torch.nn.Parameter) -> tuple[int, ...]:
    """The full shape: under ZeRO-3 a parameter's own `.shape` is that of its (1-D, possibly
    empty) local partition."""
    return tuple(getattr(p, "ds_shape", p.shape))


def param_groups(cfg: RunConfig, model: TokenFlexVLM) -> list[dict]:
    """Freeze per stage and give each trainable part its own LR; returns optimizer groups.
    Matrices (2-D and up: linear weights, embeddings, convolutions) decay; biases and norm
    weights do not."""
    lrs = {"vision": cfg.optim.vision_lr, "projector": cfg.optim.lr, "llm": cfg.optim.llm_lr}
    trainable = TRAINABLE[cfg.train.freeze]
    model.set_trainable(trainable)
    groups = []
    for name in trainable:
        params = list(model.parts()[name].parameters())
        decay = [p for p in params if len(shape_of(p)) >= 2]
        no_decay = [p for p in params if len(shape_of(p)) < 2]
        groups += [{"params": decay, "lr": lrs[name], "weight_decay": cfg.optim.weight_decay,
                    "name": name},
                   {"params": no_decay, "lr": lrs[name], "weight_decay": 0.0, "name": name}]
    return [g for g in groups if g["params"]]


def lr_factor(step: int, cfg: RunConfig) -> float:
    """Linear warmup then cosine to min_lr_ratio; a factor on every group's peak LR."""
    total = cfg.train.max_steps
    warm = int(math.ceil(cfg.lr_schedule.warmup_ratio * total))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    floor = cfg.lr_schedule.min_lr_ratio
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
        optimizer = DeepSpeedCPUAdam(groups, betas=cfg.optim.betas, adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(groups, betas=cfg.optim.betas, fused=False)
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
