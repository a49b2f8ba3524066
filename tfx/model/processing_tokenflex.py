"""Processor of an exported TokenFLEX model: chat messages or prompts + images -> inputs at N.

Self-contained (torch, numpy, PIL, transformers): `tfx convert` copies it into the exported
folder and saves both classes with `auto_map`s (processor_config.json, preprocessor_config.json),
so `AutoProcessor.from_pretrained(folder, trust_remote_code=True)` and
`pipeline("image-text-to-text", model=folder, trust_remote_code=True)` load them.
- `TokenFlexImageProcessor`: resize (bicubic) to the tower's square size, scale to [0, 1],
  normalise with the tower's mean/std -> `pixel_values` (images, 3, S, S).
- `TokenFlexProcessor.__call__(images=, text=, num_visual_tokens=N)`: every `<image>` in a text
  becomes `<img>` + N x `<IMG_CONTEXT>` + `</img>` (exactly as in training); an image given with
  a text that has no tag goes in front of it. The text is used as given: `apply_chat_template`
  renders chat messages (image parts become `<image>`) with the tokenizer's chat template.
  Rows are left-padded, so a batch generates at one N. `num_visual_tokens` is a processing
  kwarg (default: the model's), also returned for `generate`, which checks it.
- The contract of the Transformers serving backends (vLLM, SGLang): `image_token`,
  `image_token_ids` (start, context, end: the positions an image occupies),
  `_get_num_multimodal_tokens(image_sizes, num_visual_tokens=N)` -> 2 + N per image, and
  `mm_token_type_ids` (1 on those positions) with `return_mm_token_type_ids=True`.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ProcessorMixin

from .image_block import IMAGE_TAG, IMG_CONTEXT, IMG_END, IMG_START, block_ids
from .pixels import square_rgb, tile_image


def _tags_per_tile(texts: list[str], tags: list[int], tiles: list[int]) -> list[str]:
    """Each text's j-th image tag -> one tag per tile of that image (images in text order; an
    untagged text with one image gets its tag first, as in training)."""
    out, k = [], 0
    for text, count in zip(texts, tags):
        if IMAGE_TAG not in text and count:
            text = IMAGE_TAG + "\n" + text
        parts = text.split(IMAGE_TAG)
        joined = parts[0]
        for part in parts[1:]:
            joined += IMAGE_TAG * tiles[k] + part
            k += 1
        out.append(joined)
    return out


class TokenFlexImageProcessor(BaseImageProcessor):
    model_input_names = ["pixel_values"]

    def __init__(self, image_size: int = 224, image_mean=(0.5, 0.5, 0.5),
                 image_std=(0.5, 0.5, 0.5), max_tiles: int = 1, tile_size: int = 0,
                 thumbnail: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.image_size = image_size
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        # training's data.tiles: max_tiles 1 is one square resize per image
        self.max_tiles, self.tile_size, self.thumbnail = max_tiles, tile_size, thumbnail

    def pictures(self, image: Image.Image) -> list[Image.Image]:
        """What the tower sees of one image: itself, or its tiles (and thumbnail)."""
        return tile_image(image, self.tile_size or self.image_size, self.max_tiles,
                          self.thumbnail)

    def preprocess(self, images, return_tensors="pt", **kwargs) -> BatchFeature:
        """`pixel_values`: every picture of every image in order; `tiles_per_image`: how many
        of them each image gave (each gets its own image block)."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        mean, std = np.float32(self.image_mean), np.float32(self.image_std)
        out, per_image = [], []
        for image in images:
            if not isinstance(image, Image.Image):
                image = Image.fromarray(np.asarray(image))
            pictures = self.pictures(image)
            per_image.append(len(pictures))
            for picture in pictures:
                arr = np.asarray(square_rgb(picture, self.image_size), dtype=np.float32)
                out.append(torch.from_numpy((arr / 255.0 - mean) / std).permute(2, 0, 1))
        pixels = torch.stack(out).contiguous() if out else torch.zeros(0, 3, self.image_size,
                                                                       self.image_size)
        return BatchFeature({"pixel_values": pixels, "tiles_per_image": per_image},
                            tensor_type=None)

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)


class TokenFlexProcessor(ProcessorMixin):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None,
                 num_visual_tokens: int = 64, **kwargs):
        self.num_visual_tokens = num_visual_tokens
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.image_token = IMG_CONTEXT
        convert = tokenizer.convert_tokens_to_ids
        self.image_tag_id, self.image_token_id = convert(IMAGE_TAG), convert(IMG_CONTEXT)
        self.image_start_id, self.image_end_id = convert(IMG_START), convert(IMG_END)
        self._image_token_ids = [self.image_start_id, self.image_token_id, self.image_end_id]

    @property
    def image_token_ids(self) -> list[int]:
        return [self.image_start_id, self.image_token_id, self.image_end_id]

    @image_token_ids.setter
    def image_token_ids(self, value) -> None:  # the base class may assign it
        pass

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    def image_block(self, n_visual: int) -> list[int]:
        return block_ids(n_visual, self.image_start_id, self.image_token_id, self.image_end_id)

    def row_ids(self, text: str, images: int, n_visual: int) -> list[int]:
        """A text's ids with each `<image>` expanded to its block (one image: tag added)."""
        if images and IMAGE_TAG not in text:
            text = IMAGE_TAG * images + "\n" + text
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        out = []
        for i in ids:
            out += self.image_block(n_visual) if i == self.image_tag_id else [i]
        return out

    def __call__(self, images=None, text=None, num_visual_tokens: int | None = None,
                 return_tensors="pt", return_mm_token_type_ids: bool = False, **kwargs
                 ) -> BatchFeature:
        if isinstance(images, str) or (isinstance(images, (list, tuple)) and images
                                       and isinstance(images[0], str)):
            images, text = text, images  # the older (text, images) order
        if text is None:
            raise ValueError("TokenFlexProcessor needs text (use apply_chat_template for chats)")
        texts = [text] if isinstance(text, str) else list(text)
        images = [] if images is None else [images] if isinstance(images, Image.Image) else \
            [im for row in images for im in (row if isinstance(row, (list, tuple)) else [row])]
        n_visual = int(num_visual_tokens or self.num_visual_tokens)
        tags = [t.count(IMAGE_TAG) for t in texts]
        if sum(tags) == 0 and images:  # one image per text, LLaVA-style
            if len(images) != len(texts):
                raise ValueError(f"{len(texts)} texts without {IMAGE_TAG} tags but "
                                 f"{len(images)} images: tag them, or give one per text")
            tags = [1] * len(texts)
        if sum(tags) != len(images):
            raise ValueError(f"{sum(tags)} {IMAGE_TAG} tags but {len(images)} images")
        pictures = self.image_processor(images) if images else None
        if pictures is not None and any(k > 1 for k in pictures["tiles_per_image"]):
            texts = _tags_per_tile(texts, tags, pictures["tiles_per_image"])
            tags = [t.count(IMAGE_TAG) for t in texts]
        rows = [self.row_ids(t, k if IMAGE_TAG not in t else 0, n_visual)
                for t, k in zip(texts, tags)]
        T = max(map(len, rows))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for b, ids in enumerate(rows):  # left padding: generation continues at the right end
            input_ids[b, T - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[b, T - len(ids):] = 1
        data = {"input_ids": input_ids, "attention_mask": mask, "num_visual_tokens": n_visual}
        if pictures is not None:
            data["pixel_values"] = pictures["pixel_values"]
        if return_mm_token_type_ids:
            data["mm_token_type_ids"] = torch.tensor(self.create_mm_token_type_ids(input_ids))
        return BatchFeature(data, tensor_type=None)

    def create_mm_token_type_ids(self, input_ids) -> list[list[int]]:
        marks = set(self.image_token_ids)
        return [[int(i in marks) for i in (row.tolist() if hasattr(row, "tolist") else row)]
                for row in input_ids]

    def apply_chat_template(self, conversation, chat_template=None, add_generation_prompt=False,
                            continue_final_message=False, tokenize=False, return_dict=False,
                            return_tensors=None, processor_kwargs=None, **kwargs):
        """Chat messages (content a string, or parts {"type": "text"|"image"}) -> the text of
        the tokenizer's chat template with image parts as `<image>`; with `tokenize=True` the
        model inputs (`return_dict=True`: all of them, else the input ids)."""
        from transformers.image_utils import load_image

        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        texts, images = [], []
        for conv in (conversation if batched else [conversation]):
            flat = []
            for m in conv:
                content = m["content"]
                if not isinstance(content, str):
                    parts = []
                    for part in content:
                        if part.get("type") == "image":
                            source = next((part[k] for k in ("image", "url", "path")
                                           if k in part), None)
                            if source is not None:  # a bare {"type": "image"} only renders
                                images.append(source if isinstance(source, Image.Image)
                                              else load_image(source))
                            parts.append(IMAGE_TAG + "\n")
                        elif part.get("type") == "text":
                            parts.append(part["text"])
                    content = "".join(parts)
                flat.append({"role": m["role"], "content": content})
            texts.append(self.tokenizer.apply_chat_template(
                flat, chat_template=chat_template, tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message))
        if not tokenize:
            return texts if batched else texts[0]
        call = {k: v for k, v in kwargs.items() if k in ("num_visual_tokens",
                                                         "return_mm_token_type_ids")}
        out = self(images=images or None, text=texts, **call, **(processor_kwargs or {}))
        return out if return_dict else out["input_ids"]

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        """Placeholder positions per image: `<img>` + N x `<IMG_CONTEXT>` + `</img>`, whatever
        the image's size (it is resized to the tower's square)."""
        from transformers.processing_utils import MultiModalData

        n_visual = int(kwargs.get("num_visual_tokens") or kwargs.get("images_kwargs", {}).get(
            "num_visual_tokens") or self.num_visual_tokens)
        sizes = image_sizes or []
        return MultiModalData(num_image_tokens=[n_visual + 2] * len(sizes),
                              num_image_patches=[1] * len(sizes))

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True,
                                        **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(generated_outputs,
                                           skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, ids, **kwargs) -> list[str]:
        kwargs.setdefault("skip_special_tokens", True)
        return self.tokenizer.batch_decode(ids, **kwargs)

    def decode(self, ids, **kwargs) -> str:
        kwargs.setdefault("skip_special_tokens", True)
        return self.tokenizer.decode(ids, **kwargs)


__all__ = ["TokenFlexImageProcessor", "TokenFlexProcessor"]
