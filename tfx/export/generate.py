"""`tfx generate`: answer a question about an image at one or several N, side by side.

Data flow position: HF folder (`tfx convert`) or training checkpoint -> **generate**. A
checkpoint is converted in memory (nothing written). Greedy decoding.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tfx.errors import ConfigError


def load_for_inference(path: str | Path):
    """(model, processor) from an exported folder or a checkpoint / run folder."""
    path = Path(path)
    if (path / "config.json").is_file():
        from transformers import AutoModelForImageTextToText

        import tfx.model  # noqa: F401  (registers the Auto classes)
        from tfx.model.processing_tokenflex import TokenFlexProcessor

        model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32)
        return model.eval(), TokenFlexProcessor.from_pretrained(path)
    from tfx.eval.runner import load_model
    from tfx.export.convert import processor_for, to_hf

    model, cfg, tok, _ = load_model(path)
    return to_hf(model, cfg, tok), processor_for(cfg, tok)


def parse_visual_tokens(text: str) -> list[int]:
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"--visual-tokens: {text!r} is not a comma list of integers") from None


@torch.no_grad()
def answer(model, processor, image, prompt: str, n_visual: int, max_new_tokens: int) -> str:
    try:
        model.config.check_visual_tokens(n_visual)
    except ValueError as e:
        raise ConfigError(f"--visual-tokens: {e}") from None
    inputs = processor(prompt, image, num_visual_tokens=n_visual)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:])[0].strip()


def run_generate(model_path: str, image_path: str, prompt: str, counts: list[int] | None = None,
                 max_new_tokens: int = 32) -> dict[int, str]:
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(image_path)
        image.load()
    except (OSError, UnidentifiedImageError) as e:
        raise ConfigError(f"--image {image_path}: cannot read it ({e})") from None
    model, processor = load_for_inference(model_path)
    counts = counts or [model.config.num_visual_tokens]
    answers = {n: answer(model, processor, image, prompt, n, max_new_tokens) for n in counts}
    width = max(len(str(n)) for n in counts)
    for n, text in answers.items():
        print(f"N={n:<{width}} | {text}")
    return answers
