"""Chat tokenisation: conversation turns -> token ids with one marker per image, and labels.

Data flow position: decode -> **tokenize** -> bucketing -> collate. Each image marker is a
single id here; collate expands it to the image block (`tfx.model.image_block`) once N is
known, so the exact total length (text + images x (N + 1)) is known without decoding twice.
Two back-ends: SentencePiece (the demo's own model, trained by `tfx data synth`) and a local HF
tokenizer folder with its chat template (real LLMs).
"""

from __future__ import annotations

from pathlib import Path

from tfx.errors import ConfigError
from tfx.model.image_block import IMAGE_TAG, IMG_CONTEXT, IMG_END, IMG_START

IGNORE = -100
USER_TAG, ASSISTANT_TAG = "<|user|>", "<|assistant|>"
SP_SYMBOLS = [IMAGE_TAG, IMG_START, IMG_CONTEXT, IMG_END, USER_TAG, ASSISTANT_TAG]


def train_sentencepiece(lines: list[str], out_prefix: str | Path, vocab_size: int) -> Path:
    """Train the demo's BPE model on the generated corpus; returns the .model path."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(out_prefix), vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        user_defined_symbols=SP_SYMBOLS, num_threads=2, minloglevel=2,
        hard_vocab_limit=False)
    return Path(f"{out_prefix}.model")


class SentencePieceChat:
    """`<s> (<|user|> text <|assistant|> answer </s>)*`; labels on answers and their `</s>`."""

    def __init__(self, model_file: str | Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.vocab_size = self.sp.get_piece_size()
        self.pad_id, self.bos_id, self.eos_id = self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()
        ids = {s: self.sp.piece_to_id(s) for s in SP_SYMBOLS}
        self.image_id, self.img_start_id = ids[IMAGE_TAG], ids[IMG_START]
        self.img_ctx_id, self.img_end_id = ids[IMG_CONTEXT], ids[IMG_END]
        self.user_id, self.assistant_id = ids[USER_TAG], ids[ASSISTANT_TAG]

    def encode_conversation(self, turns: list[dict]) -> tuple[list[int], list[int]]:
        ids, labels = [self.bos_id], [IGNORE]
        for turn in turns:
            if turn["from"] == "human":
                piece = [self.user_id] + self.sp.encode(turn["value"]) + [self.assistant_id]
                ids += piece
                labels += [IGNORE] * len(piece)
            else:
                piece = self.sp.encode(turn["value"]) + [self.eos_id]
                ids += piece
                labels += piece
        return ids, labels

    def encode_prompt(self, question: str) -> list[int]:
        """Ids of a single-turn prompt, ending where the model starts its answer."""
        return [self.bos_id, self.user_id] + self.sp.encode(question) + [self.assistant_id]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i != self.eos_id])

    def save(self, folder: str | Path) -> Path:
        """A copy of the model file in `folder` (a run folder's tokenizer/)."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        dest = Path(folder) / "tokenizer.model"
        dest.write_bytes(self.sp.serialized_model_proto())
        return dest


class HFChat:
    """A local HF tokenizer folder; the chat template decides the format, answers are found as
    the tokens between consecutive template prefixes. That needs a template under which a
    longer conversation renders as the shorter one plus new tokens; a template that re-renders
    earlier turns (e.g. adds a marker to the last message only) would shift every label, so it
    is refused when loaded, and a conversation that breaks the rule is skipped as a bad sample."""

    def __init__(self, folder: str | Path):
        from transformers import AutoTokenizer

        self.folder = str(folder)
        self.tok = AutoTokenizer.from_pretrained(str(folder))
        self.tok.add_special_tokens({"additional_special_tokens": SP_SYMBOLS[:4]})
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.vocab_size = len(self.tok)
        self.pad_id, self.eos_id = self.tok.pad_token_id, self.tok.eos_token_id
        conv = self.tok.convert_tokens_to_ids
        self.image_id, self.img_start_id = conv(IMAGE_TAG), conv(IMG_START)
        self.img_ctx_id, self.img_end_id = conv(IMG_CONTEXT), conv(IMG_END)
        probe = [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hi."},
                 {"from": "human", "value": "And again?"}, {"from": "gpt", "value": "Yes."}]
        try:
            self.encode_conversation(probe)
        except ValueError as e:
            raise ConfigError(f"data.tokenizer: {folder}: {e}; tfx cannot place answer labels "
                              f"with this chat template") from None

    def _ids(self, messages: list[dict], generation_prompt: bool) -> list[int]:
        text = self.tok.apply_chat_template(messages, tokenize=False,
                                            add_generation_prompt=generation_prompt)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def encode_conversation(self, turns: list[dict]) -> tuple[list[int], list[int]]:
        messages, ids, labels = [], [], []
        for turn in turns:
            role = "user" if turn["from"] == "human" else "assistant"
            if role == "assistant":
                prefix = self._ids(messages, generation_prompt=True)
                if prefix[:len(ids)] != ids:
                    raise ValueError(f"the chat template's generation prompt re-renders "
                                     f"earlier turns at turn {len(messages) + 1}")
                labels += [IGNORE] * (len(prefix) - len(ids))
                ids = prefix
            messages.append({"role": role, "content": turn["value"]})
            full = self._ids(messages, generation_prompt=False)
            if full[:len(ids)] != ids:
                raise ValueError(f"the chat template re-renders earlier turns when turn "
                                 f"{len(messages)} ({role}) is added, so the conversation is "
                                 f"not its prefix plus new tokens")
            new = full[len(ids):]
            labels += new if role == "assistant" else [IGNORE] * len(new)
            ids = full
        return ids, labels

    def encode_prompt(self, question: str) -> list[int]:
        return self._ids([{"role": "user", "content": question}], generation_prompt=True)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def save(self, folder: str | Path) -> Path:
        """The tokenizer files (with the image tokens) in `folder`, not the model weights a
        model folder used as a tokenizer may hold."""
        self.tok.save_pretrained(str(folder))
        return Path(folder)


def encode_with_image(tok, turns: list[dict], images: int) -> tuple[list[int], list[int]]:
    """Ids and labels of a conversation with one image marker per image, where its `<image>`
    tag stands (interleaved with the text). LLaVA convention: a single image without a tag
    goes before the first question. ValueError on a tag/image mismatch."""
    turns = [dict(t) for t in turns]
    images = int(images)
    tags = sum(t["value"].count(IMAGE_TAG) for t in turns)
    if images == 1 and tags == 0:
        turns[0]["value"] = IMAGE_TAG + "\n" + turns[0]["value"]
        tags = 1
    if tags != images:
        raise ValueError(f"{tags} {IMAGE_TAG} tags for {images} image{'s' * (images != 1)}")
    return tok.encode_conversation(turns)


def load_tokenizer(path: str | Path):
    path = Path(path)
    return HFChat(path) if path.is_dir() else SentencePieceChat(path)
