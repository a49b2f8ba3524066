"""`tfx router reliability RUN`: how often the threshold rule keeps its share of the top rung's
accuracy on questions it did not choose the threshold on, from the calibration data alone.

Data flow position: the outcome tables `tfx router train` cached in RUN/router/ -> out-of-fold
scores (`tfx.auto.fit.out_of_fold`) -> for many random halves: the threshold chosen on one
half (`calibration_curve` + `operating_point`, the rule `router train` uses), measured on the
other -> the share of halves where it kept `keep`, and the tokens it spent, per rule (each
confidence of the keep rule, and `--budget` when given), for either router policy.
The eval split is not read: this is the check to make before spending it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tfx.auto.fit import (
    FOLDS,
    MEMBERS,
    calibration_curve,
    check_budget,
    check_confidence,
    check_members,
    check_policy,
    check_shrink,
    default_shrink,
    knob_name,
    operating_point,
    out_of_fold,
)
from tfx.auto.outcomes import LABELS, Outcomes, check_labels, read_table, table_path
from tfx.errors import ConfigError
from tfx.model.router import POLICIES, choose_index


def load_tables(run: str) -> Outcomes:
    paths = [table_path(Path(run) / "router", split) for split in ("router", "calib")]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"{', '.join(missing)} not found: run `tfx router train {run}` first "
                          "(it caches the outcome tables this reads)")
    return Outcomes.concat(*[read_table(p)[1] for p in paths])


def half_splits(table: Outcomes, q_SK: torch.Tensor, keep: float, confidences: list[float],
                halves: int = 200, goal_share: float = 0.45, seed: int = 0,
                policy: str = POLICIES[0], budget: float | None = None) -> list[dict]:
    """Per rule (each confidence of the keep rule, then the `budget` rule when given): over
    `halves` random halves, the share where the knob picked on one half keeps `keep` of the
    top rung's accuracy on the other, the mean token share there, and the share that also stays
    within `goal_share` of the top rung's tokens."""
    S = len(table.keys)
    g = torch.Generator().manual_seed(seed)
    splits = [torch.randperm(S, generator=g) for _ in range(halves)]
    ladder_K = torch.tensor(table.ladder, dtype=torch.float64)
    out = []
    rules = [(c, None) for c in confidences] + ([(0.5, budget)] if budget else [])
    for c, within in rules:
        kept, shares, both = [], [], []
        for perm in splits:
            a, b = perm[: S // 2], perm[S // 2:]
            curve = calibration_curve(q_SK[a], table.rows(a), keep, c, policy)
            point = operating_point(curve, policy, within and within * table.ladder[-1])
            k_S = choose_index(q_SK[b], point["tau"] if point else 1.0, table.ladder, policy)
            hits = table.hits_SK[b, k_S].double().mean().item()
            top = table.hits_SK[b, -1].double().mean().item()
            share = ladder_K[k_S].mean().item() / table.ladder[-1]
            kept.append(hits >= keep * top)
            shares.append(share)
            both.append(kept[-1] and share <= goal_share)
        out.append({"rule": f"budget {within:g}" if within else f"confidence {c:g}",
                    "confidence": c, "budget": within, "kept": sum(kept) / halves,
                    "token_share": sum(shares) / halves, "kept_within_goal": sum(both) / halves})
    return out


def run_reliability(run: str, keep: float = 0.99, confidences: tuple[float, ...] = (0.5, 0.8,
                    0.9, 0.95), halves: int = 200, goal_share: float = 0.45,
                    labels: str = LABELS[0], hidden: int = 32, seed: int = 0,
                    policy: str = POLICIES[0], budget: float | None = None,
                    members: int = MEMBERS, shrink: float | None = None) -> dict:
    check_labels(labels)
    check_policy(policy)
    check_budget(budget)
    check_members(members)
    shrink = default_shrink(shrink, policy)
    check_shrink(shrink, policy)
    for c in confidences:
        check_confidence(c)
    if halves < 1:
        raise ConfigError(f"--halves {halves}: at least 1")
    table = load_tables(run)
    q_SK = out_of_fold(table, FOLDS, hidden, seed, labels, policy, members, shrink)
    rows = half_splits(table, q_SK, keep, list(confidences), halves, goal_share, seed, policy,
                       budget)
    report = {"run": str(run), "questions": len(table.keys), "keep": keep, "halves": halves,
              "goal_share": goal_share, "labels": labels, "policy": policy, "budget": budget,
              "members": members, "shrink": shrink,
              "rows": rows}
    path = Path(run) / "router" / "reliability.json"
    path.write_text(json.dumps(report, indent=2))
    lines = [f"{len(table.keys)} router + calib questions, scored out of fold by the {policy} "
             f"router; its {knob_name(policy)} chosen on one random half, measured on the other "
             f"({halves} halves):", "",
             f"| rule | kept >= {100 * keep:g} % | mean token share | kept and <= "
             f"{100 * goal_share:g} % of the tokens |", "|---|---|---|---|"]
    lines += [f"| {r['rule']} | {100 * r['kept']:.0f} % | {100 * r['token_share']:.0f} % "
              f"| {100 * r['kept_within_goal']:.0f} % |" for r in rows]
    report["table"] = "\n".join(lines + ["", f"wrote {path}"])
    return report
