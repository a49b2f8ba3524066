"""`tfx eval`: exact-match answer accuracy at each N, as a table, JSON and a PNG plot.

Data flow position: checkpoint -> consolidate (fp32) -> model -> **eval at each N**.
An answer counts as correct when the argmax at every answer position (answer tokens and the end
token, teacher-forced) is the reference token; this equals greedy decoding of the answer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tfx.config.load import load_config
from tfx.config.schema import RunConfig, suggest_counts
from tfx.data.collate import collate
from tfx.data.decode import SkipCounter
from tfx.data.pipeline import read_eval_samples
from tfx.data.tokenizer import load_tokenizer
from tfx.errors import ConfigError
from tfx.log import get_logger
from tfx.model.vlm import ImageTokenIds, TokenFlexVLM
from tfx.train import checkpoint

log = get_logger(__name__)


def parse_counts(text: str) -> list[int]:
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"--counts: {text!r} is not a comma list of integers") from None


def load_model(path: str | Path, config: str | Path | None = None
               ) -> tuple[TokenFlexVLM, RunConfig, object, str]:
    """Model in fp32 with the checkpoint's consolidated weights; also config, tokenizer, tag.
    `config` replaces the config saved with the checkpoint (it must describe the same model)."""
    ckpt_root, tag = checkpoint.resolve(path)
    cfg = load_config(config or ckpt_root / tag / "config.yaml", check_paths=False)
    if not Path(cfg.data.tokenizer).exists():
        raise ConfigError(f"data.tokenizer {cfg.data.tokenizer} (from the checkpoint's config) "
                          f"does not exist")
    tok = load_tokenizer(cfg.data.tokenizer)
    ids = ImageTokenIds(tok.img_start_id, tok.img_ctx_id, tok.img_end_id)
    model = TokenFlexVLM(cfg.model, tok.vocab_size, ids, attn_implementation="sdpa")
    state = checkpoint.load_consolidated(ckpt_root, tag)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e))
        raise checkpoint.CheckpointError(
            f"{ckpt_root / tag} was trained with a different model config: {first}") from None
    if missing or unexpected:
        raise checkpoint.CheckpointError(
            f"{ckpt_root / tag} was trained with a different model config: missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval(), cfg, tok, tag


@torch.no_grad()
def accuracies(model: TokenFlexVLM, samples, counts: list[int], tok, batch_size: int
               ) -> dict[int, dict]:
    """Accuracy (all, and per question type) at each N of `counts`, keyed by N. The
    vision tower runs once per batch; only the projector and the LLM run once per N."""
    correct: dict[int, dict[str, list[int]]] = {c: {} for c in counts}
    for i in range(0, len(samples), batch_size):
        feats_BTC = None
        for c in counts:
            batch = collate(samples[i:i + batch_size], c, tok)
            if feats_BTC is None:
                feats_BTC = model.vision(batch["pixel_values"])
            logits_KV, targets_K, keep_BT = model.answer_logits(
                batch["input_ids"], batch["pixel_values"], c, batch["attention_mask"],
                batch["labels"], feats_BTC)
            hit = ~keep_BT  # positions without a target count as hits
            hit[keep_BT] = logits_KV.argmax(-1) == targets_K
            for row, meta in zip(hit.all(dim=1).tolist(), batch["meta"]):
                for kind in ("all", meta.get("type", "other")):
                    correct[c].setdefault(kind, []).append(int(row))
    return {c: {k: sum(v) / len(v) for k, v in by_kind.items()} | {"n": len(samples)}
            for c, by_kind in correct.items()}


def check_counts(counts: list[int], cfg: RunConfig) -> None:
    side = cfg.model.vision.grid_side
    for c in counts:
        if int(round(c ** 0.5)) ** 2 != c or c < 1 or c > side * side:
            raise ConfigError(f"--counts: {c} is not n*n with n <= {side}; use e.g. "
                              f"{suggest_counts(c, side)}")


def eval_samples(cfg: RunConfig, tok, data: str | None) -> tuple[list, int]:
    """The held-out samples (`data` or the config's data.eval) and how many were skipped."""
    spec = data or cfg.data.eval
    if spec is None:
        raise ConfigError("no eval data: pass --data DIR or set data.eval in the config")
    skips = SkipCounter(cfg.data.max_consecutive_errors, strict=False)
    samples = read_eval_samples(spec, cfg, tok, skips)
    if not samples:
        raise ConfigError(f"eval data {spec}: no readable sample")
    return samples, skips.skipped


def run_eval(path: str, counts: list[int], data: str | None = None, batch_size: int = 32,
             out: str | None = None) -> dict:
    model, cfg, tok, tag = load_model(path)
    check_counts(counts, cfg)
    samples, skipped = eval_samples(cfg, tok, data)
    trained = set(cfg.tokens.counts)
    results = accuracies(model, samples, counts, tok, batch_size)
    for c, r in results.items():
        log.info(f"N={c}: accuracy {r['all']:.3f}")
    report = {"checkpoint": str(path), "tag": tag, "trained_counts": sorted(trained),
              "samples": len(samples), "skipped": skipped,
              "results": {str(c): r for c, r in results.items()}}
    out_dir = Path(out) if out else Path(cfg.train.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2))
    plot(results, trained, out_dir / "eval.png", title=f"{cfg.train.output_dir} ({tag})")
    print(format_table(results, trained))
    print(f"wrote {out_dir / 'eval.json'} and {out_dir / 'eval.png'}")
    return report


def format_table(results: dict[int, dict], trained: set[int]) -> str:
    kinds = sorted({k for r in results.values() for k in r if k not in ("all", "n")})
    head = f"| {'N':>5} | trained | {'accuracy':>8} | " + " | ".join(f"{k:>8}" for k in kinds)
    head += " |"
    lines = [head, "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"]
    for c, r in results.items():
        cells = " | ".join(f"{r.get(k, float('nan')):>8.3f}" for k in kinds)
        lines.append(f"| {c:>5} | {'yes' if c in trained else 'no':>7} | {r['all']:>8.3f} | "
                     f"{cells} |")
    return "\n".join(lines)


def plot(results: dict[int, dict], trained: set[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = sorted(results)
    fig, ax = plt.subplots(figsize=(6, 4))
    kinds = sorted({k for r in results.values() for k in r if k != "n"})
    for kind in kinds:
        ax.plot(xs, [results[x].get(kind, float("nan")) for x in xs], marker="o",
                lw=2.5 if kind == "all" else 1, label=kind)
    for x in xs:
        if x in trained:
            ax.axvline(x, color="grey", alpha=0.25, lw=6)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    finish_accuracy_plot(fig, ax, "visual tokens N at inference (shaded: trained)", title, path)


def finish_accuracy_plot(fig, ax, xlabel: str, title: str, path: Path) -> None:
    """Shared axes of the accuracy plots (0..1, labelled, legend), then write and close."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
