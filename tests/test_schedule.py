"""Token-count schedule: a pure function of (seed, step), so every rank agrees."""

import subprocess
import sys
from collections import Counter

from tfx.config.schema import TokensConfig
from tfx.data.schedule import TokenSchedule

PAPER = TokensConfig(mode="random", counts=(64, 144, 256), probs=(0.2, 0.3, 0.5), seed=11)


def test_reproducible_from_seed_and_step():
    a, b = TokenSchedule(PAPER), TokenSchedule(PAPER)
    seq = [a.n_at(s) for s in range(500)]
    assert seq == [b.n_at(s) for s in range(500)]
    assert [a.n_at(s) for s in range(400, 500)] == seq[400:]  # no hidden state: resume-safe
    other = TokenSchedule(TokensConfig(mode="random", counts=(64, 144, 256),
                                       probs=(0.2, 0.3, 0.5), seed=12))
    assert [other.n_at(s) for s in range(500)] != seq


def test_frequencies_follow_probs():
    counts = Counter(TokenSchedule(PAPER).n_at(s) for s in range(20000))
    for n, p in zip(PAPER.counts, PAPER.probs):
        assert abs(counts[n] / 20000 - p) < 0.015
    assert abs(TokenSchedule(PAPER).mean_tokens() - 184.0) < 1e-9  # the paper's 184 tokens


def test_fixed_mode():
    s = TokenSchedule(TokensConfig(mode="fixed", counts=(144,), probs=None))
    assert {s.n_at(i) for i in range(100)} == {144}


def test_identical_in_two_processes():
    code = ("from tfx.config.schema import TokensConfig; from tfx.data.schedule import "
            "TokenSchedule; s=TokenSchedule(TokensConfig(counts=(64,144,256),"
            "probs=(0.2,0.3,0.5),seed=11)); print([s.n_at(i) for i in range(300)])")
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={"RANK": str(r), "PATH": "/usr/bin"}).stdout for r in (0, 1)]
    assert outs[0] == outs[1] == str([TokenSchedule(PAPER).n_at(i) for i in range(300)]) + "\n"
