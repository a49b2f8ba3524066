"""`tfx generate`: answer a question about one or several images at one or several N, side by
side.

Data flow position: HF folder (`tfx convert`) or training checkpoint -> **generate**. A
checkpoint is converted in memory (nothing written). Greedy decoding.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tfx.errors import ConfigError
from tfx.model.image_block import IMAGE_TAG

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


def check_tags(prompt: str, images: int) -> int:
    """The prompt's `<image>` tags: none, or one per image."""
    tags = prompt.count(IMAGE_TAG)
    if tags and tags != images:
        raise ConfigError(f"--prompt has {tags} {IMAGE_TAG} tags for {images} --image: one tag "
                          f"per image, or none (the images then come first)")
    return tags


def prompt_inputs(processor, images: list, prompt: str, n_visual: int) -> dict:
    """The model inputs of one user turn at N. `<image>` tags in the prompt place the images
    (one tag per image, in order, LLaVA style: the text stays as written, as in training
    data); without tags every image comes first, each on its own line."""
    if check_tags(prompt, len(images)):
        text = processor.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=False)
        return processor(images=images, text=text, num_visual_tokens=n_visual)
    content = [*({"type": "image", "image": im} for im in images),
               {"type": "text", "text": prompt}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True,
        return_dict=True, num_visual_tokens=n_visual)


@torch.no_grad()
def answer(model, processor, images: list, prompt: str, n_visual: int | str,
           max_new_tokens: int) -> str:
    """The greedy answer at N (for every image, or every tile); for "auto", prefixed with the
    N the router chose."""
    auto = n_visual == "auto"
    if auto and model.router is None:
        raise ConfigError("--visual-tokens auto: this model has no router (`tfx router train "
                          "RUN`, then export or generate from that run)")
    if auto and len(images) != 1:
        raise ConfigError(f"--visual-tokens auto: the router picks N for one image; got "
                          f"{len(images)} --image (give N instead)")
    try:
        model.config.check_visual_tokens(model.config.num_visual_tokens if auto else n_visual)
    except ValueError as e:
        raise ConfigError(f"--visual-tokens: {e}") from None
    # for auto the model rebuilds the image block at the N it picks
    inputs = prompt_inputs(processor, images, prompt,
                           model.config.num_visual_tokens if auto else n_visual)
    inputs = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in inputs.items()
              if k != "num_visual_tokens"}
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         num_visual_tokens=n_visual)
    text = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:])[0].strip()
    return f"(chose N={model.last_num_visual_tokens[0]}) {text}" if auto else text


def read_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except (OSError, UnidentifiedImageError) as e:
        raise ConfigError(f"--image {path}: cannot read it ({e})") from None
    return image


def run_generate(model_path: str, image_paths: list[str], prompt: str,
                 counts: list[int] | None = None, max_new_tokens: int = 32,
                 device: str | None = None, dtype: str | None = None) -> dict[int | str, str]:
    """{N: answer}. Every image is read before the model loads, so a bad path fails fast."""
    images = [read_image(p) for p in image_paths]
    check_tags(prompt, len(images))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bf16" if device.startswith("cuda") else "fp32")
    model, processor = load_for_inference(model_path, device, dtype)
    counts = counts or [model.config.num_visual_tokens]
    return {n: answer(model, processor, images, prompt, n, max_new_tokens) for n in counts}


def format_answers(answers: dict[int, str]) -> str:
    width = max(len(str(n)) for n in answers)
    return "\n".join(f"N={n:<{width}} | {text}" for n, text in answers.items())
