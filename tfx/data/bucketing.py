"""Length bucketing: groups samples of similar exact length into the batches of one step.

Data flow position: tokenize -> **bucketing** -> collate. Every batch of a step has one N, so
sorting by text length is sorting by the exact total length (text + N + 2). The bucketer takes a
megabatch of `bucket_batches * batch_size` samples, sorts it by length, cuts it into batches and
serves them in a seeded random order (so a step is not always the shortest batch). With a token
budget, the sorted megabatch is cut where rows x longest row would pass the budget (lengths at
the largest N), so short samples come in large batches and long ones in small. Its state is
(megabatch index, batches served) plus the upstream position where the megabatch began: restoring
re-reads that megabatch and skips the served batches, which reproduces the stream exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np


def first_fit_decreasing(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of total length <= `row_tokens` (a sample longer
    than that gets a row of its own). Ties keep the input order, so the result is a pure
    function of the lengths."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(row_tokens - lengths[i])
    return rows


def cut_by_budget(samples: list, budget: int, lengths: Callable,
                  pack_tokens: int = 0) -> list[list]:
    """Consecutive (length-sorted) samples -> batches whose padded size, rows x longest row,
    stays within `budget` tokens. `pack_tokens` > 0 (packing): rows of that length, filled
    first-fit decreasing, so a batch is cut where its rows would no longer fit the budget."""
    batches, current, longest = [], [], 0
    for s in samples:
        grown = max(longest, lengths(s))
        if pack_tokens:
            rows = first_fit_decreasing([lengths(x) for x in current] + [lengths(s)],
                                        pack_tokens)
            cost = len(rows) * pack_tokens
        else:
            cost = grown * (len(current) + 1)
        if current and cost > budget:
            batches.append(current)
            current, grown = [], lengths(s)
        current.append(s)
        longest = grown
    return batches + [current] if current else batches


def make_batches(samples: list, batch_size: int, sort: bool, lengths: Callable,
                 rng: np.random.Generator, budget: int = 0, pack_tokens: int = 0) -> list[list]:
    if sort:
        samples = sorted(samples, key=lengths)
    if budget:
        batches = cut_by_budget(samples, budget, lengths, pack_tokens)
    else:
        batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    if sort:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


class LengthBucketer:
    """Batches from `source()`; `source` is re-created from `snapshot` on restore."""

    def __init__(self, *, open_source: Callable[[], Iterator], snapshot: Callable[[], dict],
                 restore: Callable[[dict], None], batch_size: int, bucket_batches: int,
                 seed: int, reader: int, length: Callable = lambda s: s.text_len,
                 token_budget: int = 0, budget_length: Callable | None = None,
                 pack_tokens: int = 0):
        self.open_source, self.snapshot, self.restore = open_source, snapshot, restore
        self.batch_size, self.bucket_batches = batch_size, bucket_batches
        self.seed, self.reader, self.length = seed, reader, length
        self.token_budget, self.budget_length = token_budget, budget_length or length
        self.pack_tokens = pack_tokens
        self.megabatch_idx, self.served = -1, 0
        self.start_state: dict | None = None
        self._pending: list[list] = []
        self._it: Iterator | None = None

    def _fill(self) -> None:
        if self._it is None:
            self._it = self.open_source()
        self.start_state = self.snapshot()
        self.megabatch_idx += 1
        self.served = 0
        samples = [next(self._it) for _ in range(self.batch_size * self.bucket_batches)]
        rng = np.random.default_rng([self.seed, self.reader, self.megabatch_idx, 0xB0C])
        if self.token_budget:
            self._pending = make_batches(samples, 0, True, self.budget_length, rng,
                                         self.token_budget, self.pack_tokens)
        else:
            self._pending = make_batches(samples, self.batch_size, self.bucket_batches > 1,
                                         self.length, rng)

    def next_batch(self) -> list:
        if not self._pending:
            self._fill()
        self.served += 1
        return self._pending.pop(0)

    def state_dict(self) -> dict:
        return {"megabatch_idx": self.megabatch_idx, "served": self.served,
                "start_state": self.start_state}

    def load_state_dict(self, state: dict) -> None:
        self._pending, self._it = [], None
        if state["start_state"] is None:  # nothing was consumed yet
            self.megabatch_idx, self.served = -1, 0
            return
        self.restore(state["start_state"])
        self.megabatch_idx = state["megabatch_idx"] - 1
        self._fill()
        for _ in range(state["served"]):
            self.next_batch()
