"""`tfx eval RUN --every-checkpoint`: accuracy at each N for every kept checkpoint of a run.

Data flow position: run folder -> **each complete checkpoint -> eval at each N** -> learning
curve (curve.json, curve.md, curve.png: accuracy against step, one line per N). The eval set is
read once; `--chance` draws the chance level so "above chance" can be read off the plot.
"""

from __future__ import annotations

import json
from pathlib import Path

from tfx.errors import ConfigError
from tfx.eval.plots import pyplot
from tfx.eval.runner import (
    accuracies,
    check_counts,
    default_device,
    default_dtype,
    eval_samples,
    finish_accuracy_plot,
)
from tfx.log import get_logger
from tfx.train import checkpoint
from tfx.train.load import load_model

log = get_logger(__name__)


def run_curve(run_dir: str, counts: list[int], data: str | None = None, batch_size: int = 32,
              out: str | None = None, chance: float | None = None, device: str | None = None,
              dtype: str | None = None) -> dict:
    """The report: points (step, accuracies), and the files written."""
    if not Path(run_dir).exists():
        raise ConfigError(f"{run_dir} does not exist")
    root = Path(run_dir) / "checkpoints"
    tags = checkpoint.complete_tags(root) if root.is_dir() else []
    if not tags:
        raise ConfigError(f"{run_dir}: no complete checkpoint under checkpoints/ "
                          "(train with train.save_every > 0 and keep_last >= the points wanted)")
    device = default_device(device)
    points, samples = [], None
    for tag in tags:
        loaded = load_model(root / tag, device=device, dtype=default_dtype(dtype, device))
        if samples is None:
            check_counts(counts, loaded.cfg)
            samples, skipped = eval_samples(loaded, data)
        step = int(tag.removeprefix("step_"))
        accs = accuracies(loaded.model, samples, counts, loaded.tok, batch_size)
        log.info(f"{tag}: " + ", ".join(f"N={c} {accs[c]['all']:.3f}" for c in counts))
        points.append({"step": step, "tag": tag, "results": accs})
    out_dir = Path(out) if out else Path(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"run": str(run_dir), "samples": len(samples), "skipped": skipped,
              "chance": chance, "counts": counts, "points": points}
    (out_dir / "curve.json").write_text(json.dumps(report, indent=2))
    text = table(points, counts, chance)
    (out_dir / "curve.md").write_text(text + "\n")
    plot(points, counts, chance, out_dir / "curve.png", title=str(run_dir))
    report["table"] = text
    report["written"] = [f"wrote {out_dir / 'curve.json'}, curve.md and curve.png"]
    return report


def table(points: list[dict], counts: list[int], chance: float | None) -> str:
    lines = ["| step | " + " | ".join(f"N={c}" for c in counts) + " |",
             "|" + "---|" * (len(counts) + 1)]
    for p in points:
        lines.append(f"| {p['step']} | " + " | ".join(
            f"{p['results'][c]['all']:.3f}" for c in counts) + " |")
    if chance is not None:
        lines += ["", f"Exact-match accuracy on the held-out set; chance is {chance:.3f}."]
    return "\n".join(lines)


def plot(points: list[dict], counts: list[int], chance: float | None, path: Path,
         title: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [p["step"] for p in points]
    for c in counts:
        ax.plot(steps, [p["results"][c]["all"] for p in points], marker="o",
                label=f"N={c}")
    if chance is not None:
        ax.axhline(chance, color="grey", ls="--", label="chance")
    finish_accuracy_plot(fig, ax, "optimizer step", title, path)
