"""`tfx eval RUN --auto`: accuracy against mean visual tokens for fixed N, the router at every
threshold and the consistency oracle, on the run's eval split; then the router's operating
point (chosen on the calib split by `tfx router train`) run for real.

Data flow position: checkpoint + router/ -> outcome table of the eval split
(`tfx.auto.outcomes`) -> **curve (read off the table) + live auto pass** -> auto.json,
auto.md, auto.png. Tokens are charged per sample for every pass of the LLM: the router
answers in one pass at its chosen N, so its cost is that N; its own compute (features and
MLP, on the tower's output that every N needs) is timed and counted separately.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from tfx.auto.fit import PRICES, knob_name, load_router, policy_point, threshold_curve
from tfx.auto.outcomes import (
    Outcomes,
    build_outcomes,
    cached_outcomes,
    image_features,
    table_key,
)
from tfx.errors import ConfigError
from tfx.eval.decode import greedy_answers, prompt_and_reference
from tfx.eval.plots import pyplot
from tfx.eval.runner import default_device, default_dtype, eval_samples
from tfx.log import get_logger
from tfx.model.router import choose
from tfx.train.load import load_model

log = get_logger(__name__)


def mixing_line(fixed: list[dict], tokens: float) -> float:
    """Accuracy on the upper envelope of the fixed-N points, joined by straight lines (a
    random share of samples at each of two N reaches any point of such a line)."""
    pts = sorted((p["tokens"], p["accuracy"]) for p in fixed)
    hull: list[tuple[float, float]] = []
    for p in pts:  # upper concave hull
        while len(hull) >= 2 and (hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1]) >= \
                (p[0] - hull[-2][0]) * (hull[-1][1] - hull[-2][1]):
            hull.pop()
        hull.append(p)
    if tokens <= hull[0][0]:
        return hull[0][1]
    for (x0, y0), (x1, y1) in zip(hull, hull[1:]):
        if tokens <= x1:
            return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)
    return hull[-1][1]


@torch.no_grad()
def live_auto(model, samples, tok, router, meta, batch_size: int) -> dict:
    """The auto path as a user runs it: features, router, one greedy pass at the chosen N
    (samples grouped by N), timed apart from everything else."""
    per_sample, t_router = {}, 0.0
    for i in range(0, len(samples), batch_size):
        batch = samples[i:i + batch_size]
        feats_BTC, f_BF = image_features(model, batch, tok, meta["ladder"])
        t1 = time.perf_counter()
        chosen = choose(router(f_BF.cpu()), meta["ladder"], meta["tau"], router.policy)
        t_router += time.perf_counter() - t1
        for n in sorted(set(chosen)):
            group = [b for b, c in enumerate(chosen) if c == n]
            outs = greedy_answers(model, [batch[b] for b in group], n, tok,
                                  feats_BTC[group])
            for b, out in zip(group, outs):
                s = batch[b]
                per_sample[s.key] = {"n": n, "answer": tok.decode(out).strip(),
                                     "correct": out == prompt_and_reference(s, n, tok)[1]}
    hits = [v["correct"] for v in per_sample.values()]
    return {"accuracy": sum(hits) / len(hits),
            "tokens": sum(v["n"] for v in per_sample.values()) / len(per_sample),
            "router_s": t_router, "per_sample": per_sample}


@torch.no_grad()
def router_cost(model, samples, tok, router, meta) -> dict:
    """Seconds per image of the router's own work (residuals, statistics, prompt embedding,
    MLP) against one forward pass at the top rung (tower + LLM prefill), same batch, best of
    3; and the router MLP's multiply-adds."""
    from tfx.data.collate import collate
    from tfx.eval.decode import left_padded, text_positions
    from tfx.model.router import prompt_embedding, router_features

    batch = samples[:32]
    top = meta["ladder"][-1]
    data = collate(batch, top, tok)
    device = next(model.parameters()).device
    ids, mask = data["input_ids"].to(device), data["attention_mask"].to(device)
    pixels = data["pixel_values"].to(device)
    side = model.vision.grid_hw[0]
    sides = [int(round(n ** 0.5)) for n in meta["ladder"]]

    def forward():
        model(ids, pixels, top, mask)

    feats = model.vision(pixels)
    prompts = [prompt_and_reference(s, 1, tok)[0] for s in batch]
    q_ids, q_mask = (t.to(device) for t in left_padded(prompts, tok.pad_id))
    text = text_positions(q_ids, q_mask, tok)

    def route():  # what the choice adds to a pass: the tower's grid is there for any N
        question = prompt_embedding(model.llm.get_input_embeddings()(q_ids), text)
        router(router_features(feats, side, sides, question).cpu())

    def best(fn):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times) / len(batch)

    fwd, rt = best(forward), best(route)
    mlp = router.macs()
    return {"forward_s_per_image": fwd, "router_s_per_image": rt, "share": rt / fwd,
            "router_mlp_macs": mlp, "batch": len(batch)}


def curve(table: Outcomes, router, meta: dict, choices: list[int]) -> dict:
    """`choices`: the router's N per sample at its threshold (the operating point)."""
    fixed = [{"n": n, "tokens": float(n), "accuracy": table.hits_SK[:, k].float().mean().item()}
             for k, n in enumerate(table.ladder)]
    oracle = policy_point(table, [table.ladder[k] for k in table.oracle_rung().tolist()])
    routed = threshold_curve(router, table)
    for p in routed:
        p["mixing_line"] = mixing_line(fixed, p["tokens"])
    op = {"tau": meta["tau"]} | policy_point(table, choices)
    return {"fixed": fixed, "oracle": oracle, "router": routed, "operating_point": op,
            "above_mixing_line": all(p["accuracy"] >= p["mixing_line"] for p in routed),
            "min_margin": min(p["accuracy"] - p["mixing_line"] for p in routed)}


def paired_ci(table: Outcomes, choices: list[int], resamples: int = 10_000,
              seed: int = 0) -> dict:
    """Accuracy of the choices minus the top rung's, with a paired bootstrap 95% interval."""
    index = {n: k for k, n in enumerate(table.ladder)}
    picked = torch.tensor([index[n] for n in choices])
    diff = (table.hits_SK[torch.arange(len(choices)), picked].float()
            - table.hits_SK[:, -1].float())
    g = torch.Generator().manual_seed(seed)
    means = diff[torch.randint(len(diff), (resamples, len(diff)), generator=g)].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975])).tolist()
    return {"difference": diff.mean().item(), "ci95": [lo, hi]}


def breakdown(table: Outcomes, choices: list[int], attr: str) -> dict:
    index = {n: k for k, n in enumerate(table.ladder)}
    out: dict = {}
    oracle = table.oracle_rung().tolist()  # once: it builds the whole stability table
    for s, n in enumerate(choices):
        key = str(getattr(table, attr)[s])
        row = out.setdefault(key, {"samples": 0, "hits": 0, "top_hits": 0, "tokens": 0,
                                   "oracle_tokens": 0})
        row["samples"] += 1
        row["hits"] += bool(table.hits_SK[s, index[n]])
        row["top_hits"] += bool(table.hits_SK[s, -1])
        row["tokens"] += n
        row["oracle_tokens"] += table.ladder[oracle[s]]
    return {k: {"samples": v["samples"], "accuracy": v["hits"] / v["samples"],
                "top_accuracy": v["top_hits"] / v["samples"],
                "tokens": v["tokens"] / v["samples"],
                "oracle_tokens": v["oracle_tokens"] / v["samples"]} for k, v in out.items()}


def run_auto(path: str, data: str | None = None, batch_size: int = 64, out: str | None = None,
             device: str | None = None, dtype: str | None = None, keep: float | None = None,
             goal_share: float = 0.45) -> dict:
    device = default_device(device)
    loaded = load_model(path, device=device, dtype=default_dtype(dtype, device))
    folder = loaded.run_dir / "router"
    if not (folder / "router.json").is_file():
        raise ConfigError(f"{folder}/router.json not found: run `tfx router train "
                          f"{loaded.run_dir}` first")
    router, meta = load_router(folder)
    if meta.get("tag") != loaded.tag:
        raise ConfigError(f"{folder} was trained on {meta.get('tag')}, but {path} is "
                          f"{loaded.tag}: run `tfx router train {path}` again")
    samples, skipped = eval_samples(loaded, data)
    key = table_key(loaded.tag, meta["ladder"], str(data), len(samples))
    table = cached_outcomes(folder, "eval", key, lambda: build_outcomes(
        loaded.model, samples, loaded.tok, meta["ladder"], batch_size, what="(eval)"))
    with torch.no_grad():
        choices = choose(router(table.feats_SF), table.ladder, meta["tau"], router.policy)
    result = curve(table, router, meta, choices)
    live = live_auto(loaded.model, samples, loaded.tok, router, meta, batch_size)
    cost = router_cost(loaded.model, samples, loaded.tok, router, meta)
    top = result["fixed"][-1]
    op = result["operating_point"]
    keep = keep if keep is not None else meta["keep"]
    report = {"checkpoint": str(path), "tag": loaded.tag, "samples": len(samples),
              "skipped": skipped, "ladder": meta["ladder"], "tau": meta["tau"],
              "policy": router.policy, "knob": knob_name(router.policy),
              "calib": meta["calib"]["point"], "chosen_on": chosen_on(meta), **result,
              "live": {k: v for k, v in live.items() if k != "per_sample"},
              "per_sample": live["per_sample"], "cost": cost,
              "vs_top": paired_ci(table, choices),
              "by_type": breakdown(table, choices, "kinds"),
              "by_grid": breakdown(table, choices, "grids"),
              "goal": {"keep": keep, "token_share": goal_share,
                       "accuracy_ratio": op["accuracy"] / max(top["accuracy"], 1e-12),
                       "token_share_used": op["tokens"] / top["tokens"],
                       "oracle_share": result["oracle"]["tokens"] / top["tokens"],
                       "met": top["accuracy"] > 0 and op["accuracy"] >= keep * top["accuracy"]
                       and op["tokens"] <= goal_share * top["tokens"]
                       and result["above_mixing_line"] and cost["share"] < 0.02}}
    out_dir = Path(out) if out else loaded.run_dir / "eval-auto"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "auto.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (out_dir / "auto.md").write_text(text + "\n")
    plot(report, out_dir / "auto.png", title=f"{loaded.run_dir.name} ({loaded.tag})")
    report["table"] = text
    report["written"] = [f"wrote {out_dir}/auto.json, auto.md and auto.png"]
    return report


def chosen_on(meta: dict) -> str:
    """Where the router's threshold was measured, in words (routers from before
    `--calibrate` were all fitted on `router/` and thresholded on `calib/`)."""
    how = meta.get("calibrate", "split")
    where = (f"{meta['calib_samples']} router + calib questions, out of fold"
             if how == "crossfit" else "calib")
    if meta.get("budget"):
        return f"{where}, the most spent within {100 * meta['budget']:g} % of the tokens"
    conf = meta.get("confidence", 0.5)
    return where if conf == 0.5 else f"{where}, confidence {conf}"


def markdown(r: dict) -> str:
    top = r["fixed"][-1]
    lines = ["| policy | mean visual tokens | % of N_max | accuracy | % of N_max's |",
             "|---|---|---|---|---|"]

    def row(name, p):
        share = (f"{100 * p['accuracy'] / top['accuracy']:.1f}%" if top["accuracy"] > 0
                 else "n/a")
        lines.append(f"| {name} | {p['tokens']:.1f} | {100 * p['tokens'] / top['tokens']:.0f}% "
                     f"| {p['accuracy']:.3f} | {share} |")

    for p in r["fixed"]:
        row(f"fixed N = {p['n']}", p)
    row("consistency oracle", r["oracle"])
    knob = r["knob"]
    shown = (0.1, 0.3, 0.5, 0.7, 0.9) if knob == "tau" else PRICES[::8]
    for p in r["router"]:
        if p["tau"] in shown:
            row(f"router, {knob} = {p['tau']:g}", p)
    row(f"**router, {knob} = {r['tau']:g} (chosen on {r['chosen_on']})**",
        r["operating_point"])
    row("router, live run of that point", r["live"])
    g, c = r["goal"], r["cost"]
    d = r["vs_top"]
    lines += ["", f"Operating point minus N_max: {d['difference']:+.3f} accuracy (paired "
              f"bootstrap 95% interval {d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f})."]
    lines += ["", f"Goal: >= {100 * g['keep']:.0f}% of N_max's accuracy at <= "
              f"{100 * g['token_share']:.0f}% of its tokens, above the fixed-N mixing line at "
              f"every threshold, router < 2% of a forward pass: "
              f"{'met' if g['met'] else 'not met'} (accuracy {100 * g['accuracy_ratio']:.1f}%, "
              f"tokens {100 * g['token_share_used']:.0f}%, oracle "
              f"{100 * g['oracle_share']:.0f}%; lowest margin over the mixing line "
              f"{r['min_margin']:+.3f}; router {1e3 * c['router_s_per_image']:.3f} ms vs "
              f"{1e3 * c['forward_s_per_image']:.2f} ms per image = {100 * c['share']:.2f}%)."]
    for what, title in (("by_type", "question type"), ("by_grid", "grid side")):
        lines += ["", f"At the operating point, by {title}:", "",
                  f"| {title} | samples | accuracy | N_max's accuracy | mean N | oracle's mean N |",
                  "|---|---|---|---|---|---|"]
        for key, v in sorted(r[what].items()):
            lines.append(f"| {key} | {v['samples']} | {v['accuracy']:.3f} | "
                         f"{v['top_accuracy']:.3f} | {v['tokens']:.1f} | "
                         f"{v['oracle_tokens']:.1f} |")
    return "\n".join(lines)


def plot(r: dict, path: Path, title: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    fx = [p["tokens"] for p in r["fixed"]]
    ax.plot(fx, [mixing_line(r["fixed"], x) for x in fx], color="grey", lw=1,
            label="fixed N, mixing line")
    ax.scatter(fx, [p["accuracy"] for p in r["fixed"]], color="grey", zorder=3)
    for p in r["fixed"]:
        ax.annotate(f"N={p['n']}", (p["tokens"], p["accuracy"]), fontsize=7,
                    textcoords="offset points", xytext=(3, -10))
    pts = sorted(r["router"], key=lambda p: p["tokens"])
    ax.plot([p["tokens"] for p in pts], [p["accuracy"] for p in pts], marker=".", lw=1.8,
            label=f"router ({r['policy']}), {r['knob']} sweep")
    op = r["operating_point"]
    ax.scatter([op["tokens"]], [op["accuracy"]], marker="*", s=160, color="C3", zorder=4,
               label=f"operating point ({r['knob']} {r['tau']:g})")
    ax.scatter([r["oracle"]["tokens"]], [r["oracle"]["accuracy"]], marker="D", color="C2",
               zorder=4, label="consistency oracle")
    ax.set_xlabel("mean visual tokens per sample (all passes)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
