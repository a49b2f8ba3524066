"""`tfx generate`: answer a question about an image at one or several N, side by side.

Data flow position: HF folder (`tfx convert`) or training checkpoint -> **generate**. A
checkpoint is converted in memory (nothing written). Greedy decoding.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tfx.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_for_inference(path: str | Path, device: str = "cpu", dtype: str = "fp32"):
    """(model, processor) from an exported folder or a checkpoint / run folder."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--model {path} does not exist")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: use fp32 or bf16")
    if (path / "config.json").is_file():
        from transformers import AutoModelForImageTextToText, AutoProcessor

        import tfx.model.hf  # noqa: F401  (registers the Auto classes)

        model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=DTYPES[dtype])
        return model.to(device).eval(), AutoProcessor.from_pretrained(str(path))
    from tfx.export.convert import processor_for, run_router, to_hf
    from tfx.train.load import load_model

    loaded = load_model(path)
    hf = to_hf(loaded.model, loaded.cfg, loaded.tok, run_router(loaded))
    return hf.to(device=device, dtype=DTYPES[dtype]), processor_for(loaded.cfg, loaded.tok)


def parse_visual_tokens(text: str) -> list[int | str]:
    """Counts, or "auto" (the router's choice per image: an export or run with a router)."""
    try:
        return [c.strip() if c.strip() == "auto" else int(c) for c in text.split(",")
                if c.strip()]
    except ValueError:
        raise ConfigError(f"--visual-tokens: {text!r} is not a comma list of integers") from None


@torch.no_grad()
def answer(model, processor, image, prompt: str, n_visual: int | str, max_new_tokens: int
           ) -> str:
    """The greedy answer at N; for "auto", prefixed with the N the router chose."""
    auto = n_visual == "auto"
    if auto and model.router is None:
        raise ConfigError("--visual-tokens auto: this model has no router (`tfx router train "
                          "RUN`, then export or generate from that run)")
    try:
        model.config.check_visual_tokens(model.config.num_visual_tokens if auto else n_visual)
    except ValueError as e:
        raise ConfigError(f"--visual-tokens: {e}") from None
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": prompt}]}]
    inputs = processor.apply_chat_template(  # for auto the model rebuilds the image block
        messages, add_generation_prompt=True, tokenize=True, return_dict=True,
        num_visual_tokens=model.config.num_visual_tokens if auto else n_visual)
    inputs = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in inputs.items()
              if k != "num_visual_tokens"}
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         num_visual_tokens=n_visual)
    text = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:])[0].strip()
    return f"(chose N={model.last_num_visual_tokens[0]}) {text}" if auto else text


def run_generate(model_path: str, image_path: str, prompt: str, counts: list[int] | None = None,
                 max_new_tokens: int = 32, device: str | None = None,
                 dtype: str | None = None) -> dict[int | str, str]:
    """{N: answer}."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(image_path)
        image.load()
    except (OSError, UnidentifiedImageError) as e:
        raise ConfigError(f"--image {image_path}: cannot read it ({e})") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bf16" if device.startswith("cuda") else "fp32")
    model, processor = load_for_inference(model_path, device, dtype)
    counts = counts or [model.config.num_visual_tokens]
    return {n: answer(model, processor, image, prompt, n, max_new_tokens) for n in counts}


def format_answers(answers: dict[int, str]) -> str:
    width = max(len(str(n)) for n in answers)
    return "\n".join(f"N={n:<{width}} | {text}" for n, text in answers.items())
