"""`tfx convert CHECKPOINT OUT`: a DeepSpeed (ZeRO) checkpoint -> a Hugging Face model folder.

Data flow position: checkpoint -> consolidate (DeepSpeed's zero_to_fp32) -> **HF export**.
OUT holds config.json (`model_type: tokenflex`, nested vision and text configs, pooling mode,
default N and its range, `auto_map`), model.safetensors (sharded above `max_shard_size`),
tokenizer files with the image tokens and a chat template, processor_config.json, and the
modeling code for `trust_remote_code`. Everything is written to a temporary folder beside OUT
and renamed into place at the end, so a failure leaves OUT as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from tfx.config.schema import RunConfig
from tfx.data.tokenizer import ASSISTANT_TAG, USER_TAG, SentencePieceChat
from tfx.errors import CheckpointError, ConfigError
from tfx.export.card import write_card
from tfx.model import export_names
from tfx.model.configuration_tokenflex import TokenFlexConfig
from tfx.model.families import vision_family
from tfx.model.modeling_tokenflex import TokenFlexForConditionalGeneration
from tfx.model.processing_tokenflex import TokenFlexImageProcessor, TokenFlexProcessor
from tfx.model.vlm import TokenFlexVLM
from tfx.train.load import load_model

MODEL_DIR = Path(__file__).resolve().parents[1] / "model"
REMOTE_CODE = ("configuration_tokenflex.py", "modeling_tokenflex.py", "projector.py",
               "processing_tokenflex.py", "pixels.py", "image_block.py", "router.py")
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_tokenflex.TokenFlexProcessor",
                      "AutoImageProcessor": "processing_tokenflex.TokenFlexImageProcessor"}
AUTO_MAP = {"AutoConfig": "configuration_tokenflex.TokenFlexConfig",
            "AutoModelForImageTextToText": "modeling_tokenflex.TokenFlexForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_tokenflex.TokenFlexForConditionalGeneration"}
# The SentencePiece chat format of training (tfx.data.tokenizer.SentencePieceChat) as a template.
SP_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    f"{USER_TAG}{{{{ m['content'] }}}}{ASSISTANT_TAG}"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def vision_config(model: TokenFlexVLM, cfg: RunConfig) -> dict:
    """The exported tower's config: the HF config of a transformers tower, else the family's
    own (`TokenFlexEfficientNetConfig`)."""
    family = vision_family(cfg.model.vision.family)
    hf = model.vision.hf_config()
    if hf is not None:
        return hf
    return {"model_type": family.export_model_type, "image_size": cfg.model.vision.image_size,
            "patch_size": family.patch_size, "hidden_size": family.width}


def hf_config(model: TokenFlexVLM, cfg: RunConfig, tok,
              router: dict | None = None) -> TokenFlexConfig:
    text = model.llm.config.to_dict()
    text["use_cache"] = True  # training turns the KV cache off; generation wants it
    side = cfg.model.vision.grid_side
    return TokenFlexConfig(
        vision_config=vision_config(model, cfg), text_config=text,
        pool=cfg.model.projector.pool, projector_hidden_size=model.projector.hidden,
        projector_position=cfg.model.projector.position,
        num_visual_tokens=cfg.model.default_visual_tokens, min_visual_tokens=1,
        max_visual_tokens=side * side, image_token_id=tok.image_id,
        image_start_id=tok.img_start_id, image_context_id=tok.img_ctx_id,
        image_end_id=tok.img_end_id, bos_token_id=getattr(tok, "bos_id", None),
        eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, router=router)


def run_router(loaded) -> tuple[dict | None, dict]:
    """(router config, router weights) of `tfx router train` beside the run, when it was
    trained on this checkpoint; (None, {}) otherwise."""
    folder = loaded.run_dir / "router"
    if not (folder / "router.json").is_file():
        return None, {}
    from tfx.auto.fit import load_router

    router, meta = load_router(folder)
    if meta.get("tag") != loaded.tag:
        from tfx.log import get_logger

        get_logger(__name__).warning(
            f"{folder} was trained on {meta.get('tag')}, not {loaded.tag}: not exported "
            f"(run `tfx router train` on this checkpoint for num_visual_tokens='auto')")
        return None, {}
    keep = ("ladder", "tau", "keep", "in_dim", "hidden")
    config = {k: meta[k] for k in keep} | {"policy": meta.get("policy", "sufficiency"),
                                           "budget": meta.get("budget"),
                                           "members": meta.get("members", 1),
                                           "shrink": meta.get("shrink", 0.0)}
    return config, {f"router.{k}": v for k, v in router.state_dict().items()}


def rename_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    try:
        return {export_names.to_hf(key): value for key, value in state.items()}
    except KeyError as e:
        raise CheckpointError(f"unexpected weight {e.args[0]!r} in the training model") from None


def to_hf(model: TokenFlexVLM, cfg: RunConfig, tok, router: tuple[dict | None, dict] = (None, {})
          ) -> TokenFlexForConditionalGeneration:
    """The exported model with the training model's weights (and the router's, if given:
    `run_router`)."""
    hf = TokenFlexForConditionalGeneration(hf_config(model, cfg, tok, router[0]))
    hf.load_state_dict(rename_state(model.state_dict()) | router[1], strict=True)
    hf.generation_config.eos_token_id = tok.eos_id
    hf.generation_config.pad_token_id = tok.pad_id
    return hf.eval()


def hf_tokenizer(cfg: RunConfig, tok):
    if not isinstance(tok, SentencePieceChat):
        return tok.tok  # a local HF tokenizer: image tokens already added, its own template
    import tempfile

    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    piece = tok.sp.id_to_piece
    vocab = Path(tempfile.mkdtemp(prefix="tfx-sp-")) / "tokenizer.model"
    vocab.write_bytes(tok.sp.serialized_model_proto())  # the run's own copy, wherever it is
    return SentencePieceBackend(
        vocab_file=str(vocab), bos_token=piece(tok.bos_id),
        eos_token=piece(tok.eos_id), unk_token=piece(tok.sp.unk_id()),
        # only the chat tags are special: the image tags stay SentencePiece pieces, tokenised
        # in the text as in training (a special token would drop the piece before it)
        pad_token=piece(tok.pad_id), extra_special_tokens=[USER_TAG, ASSISTANT_TAG],
        chat_template=SP_CHAT_TEMPLATE)


def processor_for(cfg: RunConfig, tok) -> TokenFlexProcessor:
    family = vision_family(cfg.model.vision.family)
    images = TokenFlexImageProcessor(image_size=cfg.model.vision.image_size,
                                     image_mean=list(family.pixel_mean),
                                     image_std=list(family.pixel_std),
                                     max_tiles=cfg.data.tiles.max,
                                     tile_size=cfg.data.tiles.size,
                                     thumbnail=cfg.data.tiles.thumbnail)
    return TokenFlexProcessor(images, hf_tokenizer(cfg, tok),
                              num_visual_tokens=cfg.model.default_visual_tokens)


def write_folder(hf: TokenFlexForConditionalGeneration, processor: TokenFlexProcessor,
                 folder: Path, dtype: str, max_shard_size: str) -> None:
    hf.config.auto_map = dict(AUTO_MAP)
    hf.to(DTYPES[dtype]).save_pretrained(str(folder), max_shard_size=max_shard_size)
    save_processor(processor, folder)
    for name in REMOTE_CODE:
        shutil.copy2(MODEL_DIR / name, folder / name)
    umask = os.umask(0)
    os.umask(umask)
    for p in folder.iterdir():  # safetensors writes 0600; give every file the same mode
        if p.is_file():
            p.chmod(0o666 & ~umask)


def save_processor(processor: TokenFlexProcessor, folder: Path) -> None:
    """processor_config.json and preprocessor_config.json, each with the auto_map that lets
    AutoProcessor / AutoImageProcessor load the folder's own classes (trust_remote_code)."""
    processor.save_pretrained(str(folder))
    for name, auto in (("processor_config.json", PROCESSOR_AUTO_MAP),
                       ("preprocessor_config.json", PROCESSOR_AUTO_MAP)):
        path = folder / name
        record = json.loads(path.read_text()) if path.is_file() else {}
        if name == "preprocessor_config.json" and not record:
            record = processor.image_processor.to_dict()
        record["auto_map"] = {**record.get("auto_map", {}), **auto}
        record.setdefault("processor_class", "TokenFlexProcessor")
        if isinstance(record.get("image_processor"), dict):  # 5.2x nests it here and reads it
            record["image_processor"]["auto_map"] = dict(auto)
        if name == "preprocessor_config.json":
            record["image_processor_type"] = "TokenFlexImageProcessor"
        path.write_text(json.dumps(record, indent=2))


def convert(src: str | Path, out: str | Path, *, dtype: str = "fp32", config: str | None = None,
            max_shard_size: str = "2GB", force: bool = False) -> str:
    """Writes the folder; returns the one-line summary."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder; pick another OUT")
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out} exists and is not empty; pass --force to replace it")
    loaded = load_model(src, config=config)
    model, cfg, tok, tag = loaded.model, loaded.cfg, loaded.tok, loaded.tag
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        router = run_router(loaded)
        write_folder(to_hf(model, cfg, tok, router), processor_for(cfg, tok), tmp, dtype,
                     max_shard_size)
        write_card(tmp, cfg, loaded.run_dir, tag, final=out, router=router[0])
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return f"wrote {out} ({tag}, {dtype})"
