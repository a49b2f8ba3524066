"""Parameter names of the training model and of the exported HF model: one declared map.

Data flow position: beside the model; read by `tfx convert` (training -> HF) and by
`train.init_from` on an HF export (HF -> training). Prefixes map one to one.
"""

from __future__ import annotations

# training module prefix -> exported module prefix
PREFIXES = (("vision.encoder.", "vision_tower."), ("llm.", "language_model."),
            ("projector.", "projector."))


def _rename(key: str, pairs) -> str:
    for old, new in pairs:
        if key.startswith(old):
            return new + key[len(old):]
    raise KeyError(key)


def to_hf(key: str) -> str:
    return _rename(key, PREFIXES)


def from_hf(key: str) -> str:
    return _rename(key, [(new, old) for old, new in PREFIXES])
