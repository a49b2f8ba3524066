"""Typed run configuration: one frozen dataclass per component, nested into `RunConfig`.

Data flow position: YAML -> overrides -> (stages resolved) -> **these dataclasses** -> validate
-> run folder. Fields without a default are required; units are in the field comments;
`Literal` fields list their choices, which `tfx.config.load` checks for every field alike.
A recipe's `stages:` list is resolved into one RunConfig per stage by `load_recipe`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from tfx.errors import ConfigError

PRESETS = {"align": ("projector",), "enhance": ("vision", "projector", "llm"),
           "instruct": ("projector", "llm")}  # train.freeze: the parts that train


@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    family: str = "siglip"  # a key of tfx.model.families.VISION: siglip, clip, efficientnet
    path: str | None = None  # local HF folder (efficientnet: a .pth); None builds from sizes
    image_size: int = 224  # pixels (square)
    patch_size: int = 16  # pixels
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072

    @property
    def grid_side(self) -> int:
        """Patch-grid side length H (= W) of the encoder's output (the patch conv floors, as in
        SigLIP-so400m-patch14-384: 27 x 27)."""
        return self.image_size // self.patch_size


@dataclass(frozen=True, kw_only=True)
class LLMConfig:
    family: str = "qwen2"  # a key of tfx.model.families.LLM: qwen2, llama
    path: str | None = None  # local HF folder; None builds from the sizes below
    hidden_size: int = 512
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 1408
    max_position_embeddings: int = 4096  # tokens
    vocab_size: int | None = None  # embedding rows, >= the tokenizer's; None: the tokenizer's


@dataclass(frozen=True, kw_only=True)
class ProjectorConfig:
    pool: Literal["adaptive", "interp"] = "adaptive"  # adaptive_avg_pool2d bins | resize, pool
    hidden_ratio: float = 3.0  # SwiGLU hidden width = hidden_ratio * vision width
    kernel: Literal["auto", "triton", "torch"] = "auto"  # auto: Triton on CUDA
    # none: the paper's projector; fourier: + a learned map of each token's (row, column)
    # centre on [0, 1], the same at every N (it tells the LLM where a token sits in the image)
    position: Literal["none", "fourier"] = "none"


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    # auto: flash_attention_2 for bf16 on a GPU with flash-attn installed, else sdpa
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    default_visual_tokens: int = 256  # N used when a caller does not say


@dataclass(frozen=True, kw_only=True)
class TokensConfig:
    # fixed: one count; random: one count per step drawn with `probs`; all: every count in
    # every step, the loss averaged over them (M3-style; one tower pass, C LLM passes)
    mode: Literal["fixed", "random", "all"] = "random"
    counts: tuple[int, ...] = (64, 144, 256)  # visual tokens per image; each a perfect square
    probs: tuple[float, ...] | None = (0.2, 0.3, 0.5)  # random mode only; must sum to 1
    seed: int = 0  # the draw at step s is a pure function of (seed, s)


@dataclass(frozen=True, kw_only=True)
class TilesConfig:
    """High-resolution tiles (tfx.model.pixels): each image -> the aspect-matched grid of at
    most `max` tiles of `size` px (plus a thumbnail when there is more than one), N visual
    tokens per tile; max 1 keeps one square resize per image."""
    max: int = 1
    size: int = 0  # 0: the tower's model.vision.image_size
    thumbnail: bool = True


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    train: str | tuple[str, ...]  # shard folder, brace pattern or list of .tar files
    eval: str | tuple[str, ...] | None = None
    tokenizer: str  # sentencepiece .model file, or a local HF tokenizer folder
    max_text_tokens: int = 512  # text tokens per sample (image tokens excluded); longer is skipped
    micro_batch_size: int = 8  # samples per rank per micro-step
    bucket_batches: int = 128  # batches sorted together by length (the megabatch); 1 = none
    token_budget: int = 0  # >0: batches of varying size, each <= this many tokens at the largest N
    # (with packing: rows of pack_tokens x their count)
    packing: bool = False  # several samples a row, attention kept inside each (tfx.data.packing)
    pack_tokens: int = 0  # row length when packing; 0: the longest sample, max_text_tokens + N + 2
    tiles: TilesConfig = field(default_factory=TilesConfig)
    num_workers: int = 0  # DataLoader workers per rank (0: read in the training process)
    max_consecutive_errors: int = 100  # bad samples in a row before the run stops
    strict: bool = False  # raise on the first bad sample instead of skipping it


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    max_steps: int  # optimizer steps
    output_dir: str  # run folder: config, metrics, checkpoints (a recipe: one folder per stage)
    freeze: Literal["align", "enhance", "instruct"] = "instruct"  # PRESETS: the parts that train
    init_from: str | None = None  # weights to start from: a run, a checkpoint or an HF export
    grad_accum: int = 1  # micro-steps per optimizer step
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    grad_checkpointing: bool = False
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = 1e-3  # peak LR of the projector
    llm_lr: float = 1e-5
    vision_lr: float = 2e-6
    weight_decay: float = 0.0  # on matrices; biases and norm weights never decay
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW
    grad_clip: float = 1.0  # global norm; 0 disables


@dataclass(frozen=True, kw_only=True)
class LRScheduleConfig:
    warmup_ratio: float = 0.03  # linear warmup, as a fraction of max_steps
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of each peak LR


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    save_every: int = 0  # steps; 0 saves only at the end
    keep_last: int = 2  # checkpoints kept
    save_at_end: bool = True  # false: no final checkpoint (benchmarks)
    save_initial: bool = False  # also step 0: the weights before any update (after init_from)


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    log_every: int = 1  # steps
    trace_samples: bool = False  # each rank appends what it fed the model to trace/rank{r}.jsonl
    peak_tflops: float | None = None  # per device, for MFU; None: the GPU's bf16 peak, if known


@dataclass(frozen=True, kw_only=True)
class DistConfig:
    timeout_s: int = 600  # collective timeout; a hung rank fails after this long


@dataclass(frozen=True, kw_only=True)
class SlurmConfig:
    requeue: bool = True  # on SIGUSR1/SIGTERM under SLURM: checkpoint, then scontrol requeue


@dataclass(frozen=True, kw_only=True)
class DebugConfig:
    check_divergence_steps: int = 0  # check that ranks enter the same modules (K steps)


@dataclass(frozen=True, kw_only=True)
class DeepSpeedConfig:
    config: str = "configs/deepspeed/zero3.json"  # ZeRO JSON; batch, clipping, dtype filled in
    param_persistence_threshold: int | None = None  # overrides stage3_param_persistence_threshold


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    data: DataConfig
    train: TrainConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def validate(self) -> RunConfig:
        """Raise ConfigError naming the key and the fix; return self for chaining."""
        _validate_model(self.model)
        _validate_tokens(self.tokens, self.model.vision.grid_side)
        _validate_train(self)
        side = self.model.vision.grid_side
        dvt = self.model.default_visual_tokens
        if not _is_valid_count(dvt, side):
            raise ConfigError(
                f"model.default_visual_tokens: {dvt} is not n*n with n <= {side}; "
                f"use one of {suggest_counts(dvt, side)}")
        longest = self.data.max_text_tokens + max(self.tokens.counts) + 2
        if 0 < self.data.token_budget < longest:
            raise ConfigError(f"data.token_budget: {self.data.token_budget} cannot hold one sample "
                              f"of max_text_tokens + the largest N + 2 = {longest}")
        if 0 < self.data.pack_tokens < longest:
            raise ConfigError(f"data.pack_tokens: {self.data.pack_tokens} cannot hold one sample "
                              f"of max_text_tokens + the largest N + 2 = {longest}")
        if self.data.packing and self.tokens.mode == "all":
            raise ConfigError("data.packing: not supported with tokens.mode=all yet (each "
                              "count would pack the samples differently); use mode random or "
                              "fixed, or packing: false")
        return self


def _validate_model(m: ModelConfig) -> None:
    from tfx.model.families import llm_family, vision_family

    tower = vision_family(m.vision.family)
    llm_family(m.llm.family)
    if tower.patch_size and m.vision.patch_size != tower.patch_size:
        raise ConfigError(f"model.vision.patch_size: {tower.name}'s grid has stride "
                          f"{tower.patch_size}; set patch_size: {tower.patch_size}")
    if m.projector.kernel == "triton" and m.projector.pool != "adaptive":
        raise ConfigError(f"model.projector.kernel: the Triton kernel pools with adaptive bins "
                          f"only, not pool: {m.projector.pool}; set kernel: torch (or auto), "
                          f"or pool: adaptive")
    if m.vision.image_size < m.vision.patch_size:  # the patch conv floors: 384 / 14 -> 27
        raise ConfigError(f"model.vision.image_size: {m.vision.image_size} is smaller than "
                          f"patch_size {m.vision.patch_size}")
    if m.projector.hidden_ratio <= 0:
        raise ConfigError("model.projector.hidden_ratio: must be > 0")


def _is_valid_count(n_tokens: int, side: int) -> bool:
    n = math.isqrt(n_tokens) if n_tokens > 0 else 0
    return n > 0 and n * n == n_tokens and n <= side


def suggest_counts(n_tokens: int, side: int) -> str:
    """The three valid counts nearest to `n_tokens`, for error messages."""
    valid = sorted((k * k for k in range(1, side + 1)), key=lambda v: (abs(v - n_tokens), v))
    return ", ".join(str(v) for v in sorted(valid[:3]))


def _validate_tokens(t: TokensConfig, side: int) -> None:
    if not t.counts:
        raise ConfigError("tokens.counts: empty; give at least one count, e.g. [64]")
    for c in t.counts:
        if not _is_valid_count(c, side):
            n = math.isqrt(max(c, 0))
            what = (f"{n}x{n} but n exceeds the vision grid side {side}" if n * n == c and n
                    else "not n*n")
            raise ConfigError(f"tokens.counts: {c} is {what}; use e.g. {suggest_counts(c, side)}")
    if len(set(t.counts)) != len(t.counts):
        raise ConfigError(f"tokens.counts: {list(t.counts)} has duplicates")
    if t.mode == "fixed" and len(t.counts) != 1:
        raise ConfigError(f"tokens.counts: fixed mode takes one count, got {list(t.counts)}")
    if t.mode == "random":
        if t.probs is None:
            raise ConfigError("tokens.probs: random mode needs one probability per count")
        if len(t.probs) != len(t.counts):
            raise ConfigError(f"tokens.probs: {len(t.probs)} values for {len(t.counts)} counts")
        if any(p < 0 for p in t.probs) or abs(sum(t.probs) - 1.0) > 1e-6:
            raise ConfigError(f"tokens.probs: {list(t.probs)} must be >= 0 and sum to 1 "
                              f"(they sum to {sum(t.probs):.4g})")


def _validate_train(c: RunConfig) -> None:
    t, d, o = c.train, c.data, c.optim
    for key, value in (("train.max_steps", t.max_steps), ("train.grad_accum", t.grad_accum),
                       ("data.micro_batch_size", d.micro_batch_size),
                       ("data.tiles.max", d.tiles.max),
                       ("data.bucket_batches", d.bucket_batches),
                       ("data.max_text_tokens", d.max_text_tokens),
                       ("checkpoint.keep_last", c.checkpoint.keep_last),
                       ("logging.log_every", c.logging.log_every),
                       ("dist.timeout_s", c.dist.timeout_s)):
        if value < 1:
            raise ConfigError(f"{key}: {value} must be >= 1")
    for key, value in (("checkpoint.save_every", c.checkpoint.save_every),
                       ("data.token_budget", d.token_budget), ("data.num_workers", d.num_workers),
                       ("data.pack_tokens", d.pack_tokens), ("data.tiles.size", d.tiles.size),
                       ("debug.check_divergence_steps", c.debug.check_divergence_steps),
                       ("optim.lr", o.lr), ("optim.llm_lr", o.llm_lr),
                       ("optim.vision_lr", o.vision_lr), ("optim.weight_decay", o.weight_decay),
                       ("optim.grad_clip", o.grad_clip)):
        if value < 0:
            raise ConfigError(f"{key}: {value} must be >= 0")
    if not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas: {list(o.betas)} must each be in [0, 1)")
    if not 0 <= c.lr_schedule.warmup_ratio < 1:
        raise ConfigError(f"lr_schedule.warmup_ratio: {c.lr_schedule.warmup_ratio} must be in "
                          f"[0, 1)")
