"""`tfx experiment flex-vs-fixed | modes CONFIG`: the paper's comparisons, in miniature.

- flex-vs-fixed: for every seed, one model trained at each fixed N of `tokens.counts` and one
  flex model (`tokens.mode=random` with the config's probabilities), all with the same data,
  steps and optimizer.
- modes: the three token-count modes at the same visual-token budget: `fixed` at the largest
  N for `train.max_steps` steps, `random` (the config's probabilities) and `all` (every count
  each step) for as many steps as that budget of visual tokens per image pays for.
Every model is then evaluated at every N of the set plus counts it never saw (between and
beyond). Results: `results.md` (model x infer-N, mean +- std over seeds), `results.json`,
`accuracy.png` (accuracy against N, one line per model), plus visual tokens consumed and wall
time per model. Resumable: a run with its eval.json is not run again, and a half-trained one
continues from its checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tfx.config.load import load_config
from tfx.errors import TfxError
from tfx.eval.plots import pyplot
from tfx.log import get_logger


def eval_counts(counts: list[int], side: int) -> list[int]:
    """The trained counts, every square between them, and one beyond on each side."""
    lo, hi = math.isqrt(min(counts)), math.isqrt(max(counts))
    ns = set(range(max(1, lo - 1), min(side, hi + 1) + 1))
    return sorted({n * n for n in ns} | set(counts))


def models(counts: list[int]) -> dict[str, list[str]]:
    out = {f"fixed-{n}": ["tokens.mode=fixed", f"tokens.counts=[{n}]", "tokens.probs=[1.0]"]
           for n in counts}
    out["flex"] = []
    return out


def mode_models(cfg) -> dict[str, list[str]]:
    """fixed at the largest N for max_steps, random and all for the same visual tokens."""
    from tfx.config.schema import TokensConfig
    from tfx.data.schedule import TokenSchedule

    counts, steps = list(cfg.tokens.counts), cfg.train.max_steps
    budget = steps * max(counts)  # visual tokens per image slot of the batch
    probs = cfg.tokens.probs or tuple(1 / len(counts) for _ in counts)
    mean = TokenSchedule(TokensConfig(mode="random", counts=tuple(counts), probs=probs))
    every = list(counts)
    return {f"fixed-{max(counts)}": ["tokens.mode=fixed", f"tokens.counts=[{max(counts)}]",
                                     "tokens.probs=[1.0]", f"train.max_steps={steps}"],
            "random": ["tokens.mode=random",
                       f"train.max_steps={round(budget / mean.mean_tokens())}"],
            "all": ["tokens.mode=all", f"train.max_steps={round(budget / sum(every))}"]}


def run_one(config: str, overrides: list[str], run_dir: Path, nproc: int, counts: list[int],
            log, threads: int | None = None) -> dict:
    """Train (or resume) and evaluate one model; returns its eval report and costs."""
    report_path = run_dir / "eval" / "eval.json"
    cost_path = run_dir / "cost.json"
    if report_path.is_file() and cost_path.is_file():
        log(f"{run_dir}: done before, skipped")
        return json.loads(report_path.read_text()) | json.loads(cost_path.read_text())
    cli = [sys.executable, "-m", "tfx.cli"]
    env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    t0 = time.perf_counter()
    train = cli + ["train", config, *overrides, f"train.output_dir={run_dir}", "--resume"]
    if nproc > 1:
        train += ["--nproc", str(nproc)]
    log(f"{run_dir}: training")
    done = subprocess.run(train, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise TfxError(f"training {run_dir} failed (exit {done.returncode}): "
                       f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    cost = {"wall_s": wall, "visual_tokens": rows[-1]["visual_tokens"], "steps": rows[-1]["step"]}
    ev = subprocess.run(cli + ["eval", str(run_dir), "--counts", ",".join(map(str, counts)),
                               "--out", str(run_dir / "eval")], capture_output=True, text=True,
                        env=env)
    if ev.returncode != 0:
        raise TfxError(f"evaluating {run_dir} failed: {ev.stderr.strip().splitlines()[-1]}")
    cost_path.write_text(json.dumps(cost))
    return json.loads(report_path.read_text()) | cost


def summarise(results: dict[str, list[dict]], counts: list[int]) -> dict:
    table = {}
    for model, runs in results.items():
        row = {}
        for n in counts:
            accs = [r["results"][str(n)]["all"] for r in runs]
            row[str(n)] = {"mean": statistics.mean(accs),
                           "std": statistics.stdev(accs) if len(accs) > 1 else 0.0}
        row["visual_tokens"] = statistics.mean(r["visual_tokens"] for r in runs)
        row["wall_s"] = statistics.mean(r["wall_s"] for r in runs)
        table[model] = row
    return table


def markdown(table: dict, counts: list[int], trained: list[int], seeds: int) -> str:
    head = "| train \\ infer N | " + " | ".join(
        f"{n}{'*' if n in trained else ''}" for n in counts) + " | visual tokens | wall s |"
    lines = [head, "|" + "---|" * (len(counts) + 3)]
    for model, row in table.items():
        cells = [f"{row[str(n)]['mean']:.3f} ± {row[str(n)]['std']:.3f}" for n in counts]
        lines.append(f"| {model} | " + " | ".join(cells)
                     + f" | {row['visual_tokens']:,.0f} | {row['wall_s']:.0f} |")
    lines.append("")
    lines.append(f"Exact-match accuracy, mean ± std over {seeds} seed(s); * = a count in the "
                 "training set.")
    return "\n".join(lines)


def plot(table: dict, counts: list[int], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for model, row in table.items():
        ax.errorbar(counts, [row[str(n)]["mean"] for n in counts],
                    yerr=[row[str(n)]["std"] for n in counts], marker="o", capsize=3,
                    lw=2.5 if model == "flex" else 1.2, label=model)
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(n) for n in counts])
    ax.set_xlabel("visual tokens N at inference")
    ax.set_ylabel("exact-match accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def flex_vs_fixed(config: str, overrides: list[str], out: str | Path, seeds: int,
                  nproc: int, jobs: int = 1, what: str = "flex-vs-fixed") -> dict:
    """`jobs` runs train side by side, each with cores / (jobs * nproc) threads per rank: on a
    small CPU machine two single-thread runs finish sooner than two runs in turn."""
    cfg = load_config(config, overrides)  # validates everything before the first run
    counts = list(cfg.tokens.counts)
    chosen = models(counts) if what == "flex-vs-fixed" else mode_models(cfg)
    if what == "modes":  # runs of different lengths: one checkpoint each, at the end
        chosen = {k: v + ["checkpoint.save_every=0"] for k, v in chosen.items()}
    infer = eval_counts(counts, cfg.model.vision.grid_side)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}

    log = get_logger(__name__).info  # thread-safe: runs side by side log from threads

    threads = max(1, (os.cpu_count() or 1) // (jobs * nproc)) if jobs > 1 else None
    plan = [(model, seed, [*overrides, *extra, f"train.seed={seed}", f"tokens.seed={seed}"])
            for seed in range(seeds) for model, extra in chosen.items()]
    failed = threading.Event()

    def job(model: str, seed: int, ov: list[str]) -> dict | None:
        if failed.is_set():  # after a failure no new run starts; the ones under way finish
            return None
        try:
            return run_one(config, ov, out / model / f"seed{seed}", nproc, infer, log, threads)
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(job, *p) for p in plan]
        # runs start in plan order, so the first failure comes before any run it skipped
        reports = [f.result() for f in futures]
    for (model, _, _), report in zip(plan, reports):
        results.setdefault(model, []).append(report)
    table = summarise(results, infer)
    (out / "results.json").write_text(json.dumps(
        {"experiment": what, "config": config, "overrides": overrides, "seeds": seeds,
         "trained_counts": counts, "eval_counts": infer, "models": chosen, "table": table},
        indent=2))
    text = markdown(table, infer, counts, seeds)
    flags = f" --nproc {nproc}" * (nproc > 1) + f" --jobs {jobs}" * (jobs > 1)
    command = " ".join([f"tfx experiment {what}", config, *overrides,
                        f"--seeds {seeds}{flags} --out {out}"])
    (out / "results.md").write_text(f"Command: `{command}`\n\n{text}\n")
    plot(table, infer, out / "accuracy.png")
    return {"table": table, "text": text,
            "written": f"wrote {out}/results.md, results.json, accuracy.png"}
