"""`tfx eval`: exact-match answer accuracy at each N, as a table, JSON and a PNG plot.

Data flow position: checkpoint -> load (fp32 or bf16, CPU or GPU) -> **eval at each N**.
An answer counts as correct when the argmax at every answer position (answer tokens and the end
token, teacher-forced) is the reference token; this equals greedy decoding of the answer.
Under a launcher (`tfx eval --nproc K`, or srun), rank r takes the batches b with b % K == r:
each batch is exactly the batch one process would run, so the per-sample results, gathered on
rank 0, equal a single process's. Outputs go beside what was evaluated (or `--out`); an earlier
`eval.json` is kept in `eval-history/`, never overwritten.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from tfx.config.schema import RunConfig, suggest_counts
from tfx.data.collate import collate
from tfx.data.decode import SkipCounter
from tfx.data.pipeline import read_eval_samples
from tfx.errors import ConfigError
from tfx.eval.plots import pyplot
from tfx.log import get_logger
from tfx.train import runfolder
from tfx.train.dist import all_gather_objects, rank, world_size
from tfx.train.load import Loaded, load_model

log = get_logger(__name__)


def parse_counts(text: str) -> list[int]:
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"--counts: {text!r} is not a comma list of integers") from None


def default_device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(dtype: str | None, device: str) -> str:
    if dtype is None:
        return "bf16" if device.startswith("cuda") else "fp32"
    if dtype not in ("fp32", "bf16"):
        raise ConfigError(f"--dtype {dtype!r}: use fp32 or bf16")
    return dtype


@torch.no_grad()
def sample_hits(model, samples, counts: list[int], tok, batch_size: int,
                share: tuple[int, int] = (0, 1)) -> dict[int, dict[str, bool]]:
    """Per N, per sample key: is the teacher-forced greedy answer exactly the reference? Only
    the batches i with i % parts == part (see the module docstring). The vision tower runs once
    per batch; only the projector and the LLM run once per N."""
    part, parts = share
    device = next(model.parameters()).device
    hits: dict[int, dict[str, bool]] = {c: {} for c in counts}
    for index, i in enumerate(range(0, len(samples), batch_size)):
        if index % parts != part:
            continue
        feats_BTC = None
        for c in counts:
            batch = collate(samples[i:i + batch_size], c, tok)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            pixels = batch["pixel_values"].to(device)
            if feats_BTC is None:
                feats_BTC = model.vision(pixels.to(next(model.vision.parameters()).dtype))
            logits_KV, targets_K, keep_BT = model.answer_logits(
                ids, pixels, c, mask, batch["labels"].to(device), feats_BTC)
            hit = ~keep_BT  # positions without a target count as hits
            hit[keep_BT] = logits_KV.argmax(-1) == targets_K
            for key, row in zip(batch["keys"], hit.all(dim=1).tolist()):
                hits[c][key] = bool(row)
    return hits


def summarise(hits: dict[int, dict[str, bool]], samples) -> dict[int, dict]:
    """Accuracy (all, and per question type) at each N."""
    kinds = {s.key: s.meta.get("type", "other") for s in samples}
    out = {}
    for c, by_key in hits.items():
        groups: dict[str, list[bool]] = {"all": list(by_key.values())}
        for key, ok in by_key.items():
            groups.setdefault(kinds[key], []).append(ok)
        out[c] = {k: sum(v) / len(v) for k, v in groups.items()} | {"n": len(by_key)}
    return out


def accuracies(model, samples, counts: list[int], tok, batch_size: int) -> dict[int, dict]:
    return summarise(sample_hits(model, samples, counts, tok, batch_size), samples)


def check_counts(counts: list[int], cfg: RunConfig) -> None:
    side = cfg.model.vision.grid_side
    for c in counts:
        if int(round(c ** 0.5)) ** 2 != c or c < 1 or c > side * side:
            raise ConfigError(f"--counts: {c} is not n*n with n <= {side}; use e.g. "
                              f"{suggest_counts(c, side)}")


def eval_samples(loaded: Loaded, data: str | None) -> tuple[list, int]:
    """The held-out samples (`--data`, else the run's data.eval resolved as at training time)
    and how many were skipped."""
    cfg = loaded.cfg
    if data is None:
        if cfg.data.eval is None:
            raise ConfigError("no eval data: pass --data DIR or set data.eval in the config")
        specs = [cfg.data.eval] if isinstance(cfg.data.eval, str) else list(cfg.data.eval)
        data = [runfolder.resolve_path(s, loaded.run_dir, "data.eval", "--data DIR")
                for s in specs]
    skips = SkipCounter(cfg.data.max_consecutive_errors, strict=False)
    samples = read_eval_samples(data, cfg, loaded.tok, skips)
    if not samples:
        raise ConfigError(f"eval data {data}: no readable sample")
    return samples, skips.skipped


def run_eval(path: str, counts: list[int], data: str | None = None, batch_size: int = 32,
             out: str | None = None, device: str | None = None, dtype: str | None = None,
             chance: float | None = None) -> dict | None:
    """The report (rank 0; None on other ranks): results per N, per-sample hits, and the
    files written."""
    device = default_device(device)
    loaded = load_model(path, device=device, dtype=default_dtype(dtype, device))
    check_counts(counts, loaded.cfg)
    samples, skipped = eval_samples(loaded, data)
    part_hits = sample_hits(loaded.model, samples, counts, loaded.tok, batch_size,
                            (rank(), world_size()))
    gathered = all_gather_objects(part_hits)
    if rank() != 0:
        return None
    hits = {c: {k: v for h in gathered for k, v in h[c].items()} for c in counts}
    results = summarise(hits, samples)
    trained = sorted(set(loaded.cfg.tokens.counts))
    report = {"checkpoint": str(path), "tag": loaded.tag, "trained_counts": trained,
              "samples": len(samples), "skipped": skipped, "device": device,
              "dtype": default_dtype(dtype, device), "ranks": world_size(),
              "results": {str(c): r for c, r in results.items()},
              "per_sample": {str(c): hits[c] for c in counts}}
    out_dir = Path(out) if out else loaded.run_dir
    report["written"] = write_report(report, out_dir, trained, chance,
                                     title=f"{loaded.run_dir.name} ({loaded.tag})")
    report["table"] = format_table(results, set(trained))
    return report


def write_report(report: dict, out_dir: Path, trained: list[int], chance: float | None,
                 title: str) -> list[str]:
    """eval.json + eval.png in `out_dir`; an earlier pair moves to eval-history/ first."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    old = out_dir / "eval.json"
    if old.is_file():
        history = out_dir / "eval-history"
        history.mkdir(exist_ok=True)
        prev = json.loads(old.read_text())
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(old.stat().st_mtime))
        counts = "-".join(prev.get("results", {}))
        stem = f"eval-{prev.get('tag', 'unknown')}-N{counts}-{stamp}"
        os.replace(old, history / f"{stem}.json")
        if (out_dir / "eval.png").is_file():
            os.replace(out_dir / "eval.png", history / f"{stem}.png")
        written.append(f"kept the previous eval as {history / stem}.json")
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2))
    results = {int(c): r for c, r in report["results"].items()}
    drawn = plot(results, set(trained), out_dir / "eval.png", title=title, chance=chance)
    written.append(f"wrote {out_dir / 'eval.json'} and {out_dir / 'eval.png'}" if drawn else
                   f"wrote {out_dir / 'eval.json'} (no matplotlib: no plot)")
    return written


def format_table(results: dict[int, dict], trained: set[int]) -> str:
    kinds = sorted({k for r in results.values() for k in r if k not in ("all", "n")})
    head = f"| {'N':>5} | trained | {'accuracy':>8} | " + " | ".join(f"{k:>8}" for k in kinds)
    head += " |"
    lines = [head, "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"]
    for c, r in results.items():
        cells = " | ".join(f"{r.get(k, float('nan')):>8.3f}" for k in kinds)
        lines.append(f"| {c:>5} | {'yes' if c in trained else 'no':>7} | {r['all']:>8.3f} | "
                     f"{cells} |")
    if kinds:
        lines.append(f"Columns after accuracy: accuracy per question type ({', '.join(kinds)}).")
    return "\n".join(lines)


def plot(results: dict[int, dict], trained: set[int], path: Path, title: str,
         chance: float | None = None) -> list[str]:
    """Accuracy against N; returns the legend's labels (none without matplotlib)."""
    plt = pyplot()
    if plt is None:
        return []
    xs = sorted(results)
    fig, ax = plt.subplots(figsize=(6, 4))
    kinds = sorted({k for r in results.values() for k in r if k != "n"})
    for kind in kinds:
        ax.plot(xs, [results[x].get(kind, float("nan")) for x in xs], marker="o",
                lw=2.5 if kind == "all" else 1,
                label="all questions" if kind == "all" else f"question type: {kind}")
    if chance is not None:
        ax.axhline(chance, color="grey", ls="--", label=f"chance ({chance:.2f})")
    for x in xs:
        if x in trained:
            ax.axvline(x, color="grey", alpha=0.25, lw=6)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    return finish_accuracy_plot(fig, ax, "visual tokens N at inference (shaded: trained)",
                                title, path)


def finish_accuracy_plot(fig, ax, xlabel: str, title: str, path: Path) -> list[str]:
    """Shared axes of the accuracy plots (0..1, labelled, legend), then write and close;
    returns the legend's labels."""
    plt = pyplot()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    legend = ax.legend()
    labels = [t.get_text() for t in legend.get_texts()]
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return labels
