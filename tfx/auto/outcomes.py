"""The outcome table: for every sample and every rung N of a ladder, the model's greedy answer,
whether it is right, and the router's input features. Every auto-budget policy (fixed N, the
mixing line, the consistency oracle, the router at any threshold) is read off this table.

Data flow position: checkpoint + eval shards -> vision (once per batch) -> **greedy answer at
each N + router features** -> router training (`tfx.auto.fit`) and the curve
(`tfx.auto.report`). Shape legend: S samples, K rungs, F features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from tfx.data.collate import pixel_fields
from tfx.errors import ConfigError
from tfx.eval.decode import greedy_answers, prompt_and_reference, question_embeddings
from tfx.log import get_logger
from tfx.model.router import FEATURES_VERSION, router_features

log = get_logger(__name__)


LABELS = ("correct", "consistency")  # the router's "N_k suffices" labels; the first is the default


def from_here_up(ok_SK: torch.Tensor) -> torch.Tensor:
    """True at rung k where `ok_SK` holds at k and at every larger rung."""
    return ok_SK.flip(1).cummin(dim=1).values.flip(1)


def check_labels(kind: str) -> None:
    if kind not in LABELS:
        raise ConfigError(f"--labels {kind!r}: one of {', '.join(LABELS)}")


@dataclass
class Outcomes:
    ladder: list[int]
    keys: list[str]
    kinds: list[str]  # question type per sample
    grids: list[int]  # grid side per sample (0 when the data does not say)
    answers: list[list[str]]  # [sample][rung] decoded answer
    hits_SK: torch.Tensor  # bool: the answer at rung k is the reference
    feats_SF: torch.Tensor  # router features

    def stable_SK(self) -> torch.Tensor:
        """True where the answer at rung k, and at every larger rung, is the top rung's answer:
        the consistency label ("N_k suffices")."""
        return from_here_up(self.agrees_SK())

    def correct_SK(self) -> torch.Tensor:
        """True where neither rung k nor any larger rung is wrong on a sample the top rung gets
        right: the correctness label ("N_k loses nothing"). It needs the answer key and, unlike
        the consistency label, does not ask for more tokens where the top rung is wrong too
        (where more N changes the answer but not the accuracy)."""
        return from_here_up(self.hits_SK | ~self.hits_SK[:, -1:])

    def labels_SK(self, kind: str) -> torch.Tensor:
        check_labels(kind)
        return self.correct_SK() if kind == "correct" else self.stable_SK()

    def agrees_SK(self) -> torch.Tensor:
        """True where the answer at rung k is the top rung's (no answer key needed)."""
        return torch.tensor([[a == row[-1] for a in row] for row in self.answers])

    def targets_SK(self, policy: str, kind: str) -> torch.Tensor:
        """What a router of `policy` learns to predict at each rung: "N_k suffices" by `kind`
        below the top rung (sufficiency), or the answer at N_k being right (accuracy,
        `kind` correct) or being the top rung's (accuracy, consistency)."""
        if policy == "sufficiency":
            return self.labels_SK(kind)[:, :-1]
        check_labels(kind)
        return self.hits_SK if kind == "correct" else self.agrees_SK()

    def oracle_rung(self) -> torch.Tensor:
        """(S,) index of the smallest sufficient rung."""
        return self.stable_SK().int().argmax(dim=1)

    def rows(self, index: torch.Tensor) -> "Outcomes":
        """The samples at `index` (a 1-D long tensor), in that order."""
        i = index.tolist()
        return Outcomes(self.ladder, [self.keys[k] for k in i], [self.kinds[k] for k in i],
                        [self.grids[k] for k in i], [self.answers[k] for k in i],
                        self.hits_SK[index], self.feats_SF[index])

    @classmethod
    def concat(cls, *tables: "Outcomes") -> "Outcomes":
        if any(t.ladder != tables[0].ladder for t in tables):
            raise ConfigError(f"outcome tables of different ladders: "
                              f"{[t.ladder for t in tables]}")
        return cls(tables[0].ladder, sum((t.keys for t in tables), []),
                   sum((t.kinds for t in tables), []), sum((t.grids for t in tables), []),
                   sum((t.answers for t in tables), []),
                   torch.cat([t.hits_SK for t in tables]), torch.cat([t.feats_SF for t in tables]))

    def to_dict(self) -> dict:
        return {"ladder": self.ladder, "keys": self.keys, "kinds": self.kinds,
                "grids": self.grids, "answers": self.answers, "hits": self.hits_SK,
                "features": self.feats_SF}

    @classmethod
    def from_dict(cls, d: dict) -> "Outcomes":
        return cls(d["ladder"], d["keys"], d["kinds"], d["grids"], d["answers"], d["hits"],
                   d["features"])


def default_ladder(trained: list[int], side: int) -> list[int]:
    """Every n*n from 1 up to the largest trained count."""
    return [n * n for n in range(1, math.isqrt(max(trained)) + 1) if n <= side]


def parse_ladder(text: str, side: int) -> list[int]:
    try:
        ladder = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--ladder {text!r}: a comma list of counts, e.g. 1,4,9,16") from None
    for n in ladder:
        if math.isqrt(n) ** 2 != n or not 1 <= math.isqrt(n) <= side:
            raise ConfigError(f"--ladder: {n} is not n*n with 1 <= n <= {side}")
    if len(ladder) < 2:
        raise ConfigError("--ladder: give at least two counts")
    return ladder


@torch.no_grad()
def image_features(model, samples, tok, ladder: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tower grid (B, T, C), router features (B, F)) of a batch."""
    device = next(model.parameters()).device
    pixels = pixel_fields(samples)["pixel_values"].to(device)
    if len(pixels) != len(samples):
        raise ConfigError("the auto budget takes one image per sample; this data has samples "
                          "with several images or none")
    feats_BTC = model.vision(pixels.to(next(model.vision.parameters()).dtype))
    side = model.vision.grid_hw[0]
    q_BD = question_embeddings(model, samples, tok)
    return feats_BTC, router_features(feats_BTC, side, [math.isqrt(n) for n in ladder], q_BD)


@torch.no_grad()
def build_outcomes(model, samples, tok, ladder: list[int], batch_size: int = 64,
                   max_new_tokens: int = 8, what: str = "") -> Outcomes:
    keys, kinds, grids, answers, hits, feats = [], [], [], [], [], []
    for i in range(0, len(samples), batch_size):
        batch = samples[i:i + batch_size]
        feats_BTC, f_BF = image_features(model, batch, tok, ladder)
        rows = [[] for _ in batch]
        row_hits = [[] for _ in batch]
        for n in ladder:
            for b, (s, out) in enumerate(zip(batch, greedy_answers(model, batch, n, tok,
                                                                   feats_BTC, max_new_tokens))):
                rows[b].append(tok.decode(out).strip())
                row_hits[b].append(out == prompt_and_reference(s, n, tok)[1])
        keys += [s.key for s in batch]
        kinds += [s.meta.get("type", "other") for s in batch]
        grids += [int(s.meta.get("grid", 0)) for s in batch]
        answers += rows
        hits += row_hits
        feats.append(f_BF.cpu())
        log.info(f"outcome table{' ' + what if what else ''}: {len(keys)}/{len(samples)} "
                 f"samples at N = {ladder}")
    return Outcomes(ladder, keys, kinds, grids, answers, torch.tensor(hits), torch.cat(feats))


def table_key(tag: str, ladder: list[int], data: str, samples: int) -> dict:
    """What a cached table must have been built for to be reused."""
    return {"tag": tag, "ladder": ladder, "data": data, "keys": samples,
            "features": FEATURES_VERSION}


def table_path(folder: Path, split: str) -> Path:
    return Path(folder) / f"outcomes-{split}.pt"


def read_table(path: Path) -> tuple[dict, Outcomes]:
    """(the key it was built for, the table) of a cached outcome table."""
    saved = torch.load(path, weights_only=False)
    return saved.get("key"), Outcomes.from_dict(saved["table"])


def cached_outcomes(folder: Path, split: str, key: dict, build) -> Outcomes:
    """The table in `folder/outcomes-<split>.pt` when it was built for the same `key`
    (checkpoint tag, ladder, data, samples), else `build()`, saved there for next time: a
    second `tfx router train` (another width, seed or --keep) skips the model passes."""
    path = table_path(folder, split)
    if path.is_file():
        saved_key, table = read_table(path)
        if saved_key == key:
            log.info(f"outcome table ({split}): reused {path}")
            return table
    table = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"key": key, "table": table.to_dict()}, tmp)
    tmp.replace(path)
    return table
