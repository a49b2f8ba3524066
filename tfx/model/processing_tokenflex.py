"""Processor of an exported TokenFLEX model: prompts + images -> model inputs at a chosen N.

Self-contained (torch, numpy, PIL, transformers); `tfx convert` copies it into the exported
folder. Each prompt becomes one user turn of the tokenizer's chat template with `<image>` in
front; after tokenising, the `<image>` id is replaced by `<img>` + N x `<IMG_CONTEXT>` + `</img>`
(exactly as in training). Rows are left-padded so a batch can be generated at one N. Images are
resized (bicubic) to the tower's size and normalised with its mean/std.
Without tfx installed: `get_class_from_dynamic_module("processing_tokenflex.TokenFlexProcessor",
FOLDER).from_pretrained(FOLDER, trust_remote_code=True)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CONFIG_NAME = "processor_config.json"
IMAGE_TAG = "<image>"


class TokenFlexProcessor:
    def __init__(self, tokenizer, *, image_size: int, image_mean: list[float],
                 image_std: list[float], image_token_id: int, image_start_id: int,
                 image_context_id: int, image_end_id: int, num_visual_tokens: int):
        self.tokenizer = tokenizer
        self.image_size, self.image_mean, self.image_std = image_size, image_mean, image_std
        self.ids = {"image": image_token_id, "start": image_start_id,
                    "context": image_context_id, "end": image_end_id}
        self.num_visual_tokens = num_visual_tokens

    @classmethod
    def from_pretrained(cls, folder: str | Path, **tokenizer_kwargs) -> "TokenFlexProcessor":
        from transformers import AutoTokenizer

        cfg = json.loads((Path(folder) / CONFIG_NAME).read_text())
        cfg.pop("processor_class", None)
        return cls(AutoTokenizer.from_pretrained(str(folder), **tokenizer_kwargs), **cfg)

    def to_dict(self) -> dict:
        return {"processor_class": "TokenFlexProcessor", "image_size": self.image_size,
                "image_mean": self.image_mean, "image_std": self.image_std,
                "image_token_id": self.ids["image"], "image_start_id": self.ids["start"],
                "image_context_id": self.ids["context"], "image_end_id": self.ids["end"],
                "num_visual_tokens": self.num_visual_tokens}

    def save_pretrained(self, folder: str | Path) -> None:
        self.tokenizer.save_pretrained(str(folder))
        (Path(folder) / CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2))

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        out = []
        for image in images:
            image = image.convert("RGB").resize((self.image_size, self.image_size),
                                                Image.BICUBIC)
            arr = (np.asarray(image, dtype=np.float32) / 255.0 - np.float32(self.image_mean)) \
                / np.float32(self.image_std)
            out.append(torch.from_numpy(arr).permute(2, 0, 1))
        return torch.stack(out).contiguous()

    def prompt_ids(self, prompt: str, num_visual_tokens: int) -> list[int]:
        messages = [{"role": "user", "content": f"{IMAGE_TAG}\n{prompt}"}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        at = ids.index(self.ids["image"])
        block = [self.ids["start"]] + [self.ids["context"]] * num_visual_tokens + [self.ids["end"]]
        return ids[:at] + block + ids[at + 1:]

    def __call__(self, prompts: str | list[str], images, num_visual_tokens: int | None = None
                 ) -> dict:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        images = [images] if isinstance(images, Image.Image) else list(images)
        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} images: one image each")
        n_visual = num_visual_tokens or self.num_visual_tokens
        rows = [self.prompt_ids(p, n_visual) for p in prompts]
        T = max(map(len, rows))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for b, ids in enumerate(rows):  # left padding: generation continues at the right end
            input_ids[b, T - len(ids):] = torch.tensor(ids)
            mask[b, T - len(ids):] = 1
        return {"input_ids": input_ids, "attention_mask": mask,
                "pixel_values": self.preprocess(images), "num_visual_tokens": n_visual}

    def batch_decode(self, ids, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True, **kwargs)


__all__ = ["TokenFlexProcessor"]
