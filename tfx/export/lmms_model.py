"""The `tokenflex` model of lmms-eval (see `tfx.export.lmms`): an exported folder loaded with
plain transformers, greedy answers at `num_visual_tokens` (an integer N = n*n, or "auto" with
an exported router). Imports lmms-eval, so only loaded by lmms-eval itself."""

from __future__ import annotations

import torch
from lmms_eval.api.model import lmms
from tqdm import tqdm


class TokenFlexLMMS(lmms):
    def __init__(self, pretrained: str, num_visual_tokens: int | str | None = None,
                 device: str = "cpu", dtype: str = "float32", max_new_tokens: int = 16,
                 batch_size: int = 1, **kwargs) -> None:
        super().__init__()
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.model = AutoModelForImageTextToText.from_pretrained(
            pretrained, trust_remote_code=True, dtype=getattr(torch, dtype)).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=True)
        n = num_visual_tokens if num_visual_tokens is not None else \
            self.model.config.num_visual_tokens
        self.num_visual_tokens = n if str(n) == "auto" else int(n)
        if self.num_visual_tokens != "auto":
            self.model.config.check_visual_tokens(self.num_visual_tokens)
        self.max_new_tokens = int(max_new_tokens)
        self.device_name = device

    def answer(self, image, text: str, gen_kwargs: dict) -> str:
        auto = self.num_visual_tokens == "auto"
        chat = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": text}]}]
        inputs = self.processor.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=True, return_dict=True,
            num_visual_tokens=self.model.config.num_visual_tokens if auto
            else self.num_visual_tokens)
        inputs = {k: v.to(self.device_name) if torch.is_tensor(v) else v
                  for k, v in inputs.items() if k != "num_visual_tokens"}
        new = int(gen_kwargs.get("max_new_tokens", self.max_new_tokens))
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=new, do_sample=False,
                                      num_visual_tokens=self.num_visual_tokens)
        return self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:])[0].strip()

    def generate_until(self, requests) -> list[str]:
        answers = []
        for req in tqdm(requests, disable=self.rank != 0, desc="tokenflex"):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id])
            visuals = visuals if isinstance(visuals, list) else [visuals]
            if len(visuals) != 1:
                raise ValueError(f"tokenflex takes one image per question, got {len(visuals)}")
            answers.append(self.answer(visuals[0], context, dict(gen_kwargs or {})))
        return answers

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("tokenflex answers single-turn questions")

    def loglikelihood(self, requests):
        raise NotImplementedError("tokenflex runs generate_until tasks")
