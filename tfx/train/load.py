"""A model from a checkpoint: the consolidated weights in a model built from the run's own files.

Data flow position: checkpoint -> **load** -> eval, export, generate. Everything comes from the
run folder (`tfx.train.runfolder`): the config saved with the checkpoint, the tokenizer copy and
the towers' HF configs, so a run that was moved or copied loads without the paths it was
trained with (runs from before these files existed fall back to the config's paths, relative to
the training's workdir). Pretrained tower weights are never read here: the checkpoint holds
every weight.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tfx.config.load import load_config
from tfx.config.schema import RunConfig
from tfx.data.tokenizer import load_tokenizer
from tfx.errors import CheckpointError
from tfx.model.vlm import ImageTokenIds, TokenFlexVLM
from tfx.train import checkpoint, runfolder

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Loaded:
    model: TokenFlexVLM
    cfg: RunConfig
    tok: object
    tag: str
    run_dir: Path  # the run folder the checkpoint belongs to (outputs go beside it)


def run_tokenizer(cfg: RunConfig, run_dir: Path):
    copy = run_dir / "tokenizer"
    if (copy / "tokenizer.model").is_file():
        return load_tokenizer(copy / "tokenizer.model")
    if copy.is_dir() and any(copy.iterdir()):
        return load_tokenizer(copy)
    return load_tokenizer(runfolder.resolve_path(cfg.data.tokenizer, run_dir, "data.tokenizer",
                                                 "a run folder with its tokenizer/"))


def hf_configs(run_dir: Path) -> dict:
    folder = run_dir / "model"
    return {part: json.loads((folder / f"{part}_config.json").read_text())
            for part in ("vision", "llm") if (folder / f"{part}_config.json").is_file()}


def build_empty(cfg: RunConfig, tok, run_dir: Path | None) -> TokenFlexVLM:
    """The run's model structure with fresh weights."""
    ids = ImageTokenIds(tok.img_start_id, tok.img_ctx_id, tok.img_end_id)
    configs = hf_configs(run_dir) if run_dir is not None else {}
    if not configs and run_dir is not None:  # an old run: its pretrained paths give the shapes
        cfg = _with_resolved_tower_paths(cfg, run_dir)
    return TokenFlexVLM(cfg.model, tok.vocab_size, ids, attn_implementation="sdpa",
                        hf_configs=configs or None)


def _with_resolved_tower_paths(cfg: RunConfig, run_dir: Path) -> RunConfig:
    import dataclasses

    v, m = cfg.model.vision, cfg.model.llm
    if v.path:
        v = dataclasses.replace(v, path=runfolder.resolve_path(v.path, run_dir,
                                                               "model.vision.path", "--config"))
    if m.path:
        m = dataclasses.replace(m, path=runfolder.resolve_path(m.path, run_dir,
                                                               "model.llm.path", "--config"))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vision=v, llm=m))


def load_model(path: str | Path, config: str | Path | None = None, device: str = "cpu",
               dtype: str = "fp32") -> Loaded:
    """The checkpoint's model (eval mode) on `device` in `dtype`, with its config and tokenizer.
    `config` replaces the config saved with the checkpoint (it must describe the same model)."""
    ckpt_root, tag = checkpoint.resolve(path)
    run_dir = checkpoint.run_dir_of(ckpt_root)
    cfg = load_config(config or ckpt_root / tag / "config.yaml", check_paths=False)
    tok = run_tokenizer(cfg, run_dir)
    model = build_empty(cfg, tok, run_dir if config is None else None)
    state = checkpoint.load_consolidated(ckpt_root, tag)
    load_weights(model, state, f"{ckpt_root / tag}")
    return Loaded(model.to(device=device, dtype=DTYPES[dtype]).eval(), cfg, tok, tag, run_dir)


def load_weights(model: TokenFlexVLM, state: dict, where: str) -> None:
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e))
        raise CheckpointError(f"{where} was trained with a different model config: {first}") \
            from None
    if missing or unexpected:
        raise CheckpointError(f"{where} was trained with a different model config: missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]}")
