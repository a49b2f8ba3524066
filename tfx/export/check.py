"""`tfx convert --check`: the export must be the checkpoint, bitwise and in behaviour.

Data flow position: checkpoint + exported folder -> **parity gate**. Two checks:
- weights: every exported tensor equals the consolidated checkpoint's (cast to the export's
  dtype), bitwise, and none is missing or extra;
- behaviour: the next-token distributions of the training model and of the export, loaded
  from the folder's own code, on held-out prompts at every trained N plus one N never
  trained: the largest KL divergence per N (and how often the argmax agrees). fp32 exports
  must stay under 1e-6 nats, bf16 under 5e-2.
A failed check is a TfxError (exit 2) after the table is printed.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from tfx.errors import TfxError

KL_LIMIT = {torch.float32: 1e-6, torch.bfloat16: 5e-2}


class ExportMismatch(TfxError):
    """The exported folder does not reproduce the checkpoint."""


def exported_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(folder.glob("model*.safetensors")):
        state.update(load_file(str(f)))
    return state


def unseen_count(trained: list[int], side: int) -> int:
    """One N the model never trained at: the square between the two largest trained counts,
    else the next one above the largest, else below the smallest."""
    ns = sorted(math.isqrt(c) for c in trained)
    between = [n for n in range(ns[0] + 1, ns[-1]) if n * n not in trained]
    if between:
        return between[-1] ** 2
    return (ns[-1] + 1) ** 2 if ns[-1] < side else max(1, ns[0] - 1) ** 2


def check_weights(model, folder: Path, dtype: torch.dtype,
                  extra: dict[str, torch.Tensor] | None = None) -> dict:
    """`extra`: exported tensors that are not the training model's (the router's)."""
    from tfx.model import export_names

    theirs = exported_state(folder)
    ours = {export_names.to_hf(k): v for k, v in model.state_dict().items()} | (extra or {})
    missing = sorted(set(ours) - set(theirs))
    extra = sorted(set(theirs) - set(ours))
    differ = [k for k in sorted(set(ours) & set(theirs))
              if not torch.equal(ours[k].to(dtype), theirs[k])]
    return {"tensors": len(ours), "missing": missing, "extra": extra, "differ": differ}


@torch.no_grad()
def check_logits(loaded, folder: Path, counts: list[int], samples: int = 16) -> list[dict]:
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from tfx.data.collate import collate
    from tfx.data.decode import SkipCounter
    from tfx.data.pipeline import read_eval_samples
    from tfx.eval.runner import eval_samples

    model_cls = get_class_from_dynamic_module(
        "modeling_tokenflex.TokenFlexForConditionalGeneration", str(folder))
    export = model_cls.from_pretrained(str(folder)).eval()  # the folder's own code
    try:
        held_out = eval_samples(loaded, None)[0][:samples]
    except TfxError:  # no eval set: the training set will do
        held_out = read_eval_samples(loaded.cfg.data.train, loaded.cfg, loaded.tok,
                                     SkipCounter(100, False))[:samples]
    rows = []
    for n in counts:
        b = collate(held_out, n, loaded.tok)
        ours = loaded.model(b["input_ids"], b["pixel_values"], n, b["attention_mask"])
        theirs = export(input_ids=b["input_ids"], pixel_values=b["pixel_values"],
                        attention_mask=b["attention_mask"], num_visual_tokens=n).logits
        mask = b["attention_mask"].bool()
        p_log = F.log_softmax(ours[mask].double(), -1)
        q_log = F.log_softmax(theirs[mask].double(), -1)
        kl = (p_log.exp() * (p_log - q_log)).sum(-1)
        agree = (ours[mask].argmax(-1) == theirs[mask].argmax(-1)).double().mean()
        rows.append({"N": n, "trained": n in loaded.cfg.tokens.counts, "max_kl": kl.max().item(),
                     "mean_kl": kl.mean().item(), "argmax_agree": agree.item(),
                     "positions": int(mask.sum())})
    return rows


def run_check(src: str | Path, folder: str | Path) -> tuple[str, bool]:
    """(the report, whether both checks passed)."""
    import json

    from tfx.train.load import load_model

    folder = Path(folder)
    loaded = load_model(src)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[
        json.loads((folder / "config.json").read_text()).get("dtype", "float32")]
    from tfx.export.convert import run_router

    weights = check_weights(loaded.model, folder, dtype, run_router(loaded)[1])
    trained = sorted(loaded.cfg.tokens.counts)
    counts = trained + [unseen_count(trained, loaded.cfg.model.vision.grid_side)]
    rows = check_logits(loaded, folder, sorted(set(counts)))
    limit = KL_LIMIT[dtype]
    ok_weights = not (weights["missing"] or weights["extra"] or weights["differ"])
    ok_logits = all(r["max_kl"] <= limit for r in rows)
    lines = [f"weights: {weights['tensors']} tensors, {len(weights['differ'])} differ, "
             f"{len(weights['missing'])} missing, {len(weights['extra'])} extra "
             f"({'bitwise equal' if ok_weights else 'MISMATCH'}; export dtype "
             f"{str(dtype).removeprefix('torch.')})", "",
             "| N | trained | max KL (nats) | mean KL | argmax agrees | positions |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['N']} | {'yes' if r['trained'] else 'no'} | {r['max_kl']:.3g} | "
              f"{r['mean_kl']:.3g} | {r['argmax_agree']:.1%} | {r['positions']} |"
              for r in rows]
    lines.append(f"\nparity {'passed' if ok_weights and ok_logits else 'FAILED'}: max KL "
                 f"{max(r['max_kl'] for r in rows):.3g} (limit {limit:g} for this dtype)")
    if weights["differ"]:
        lines.append(f"first differing tensors: {weights['differ'][:3]}")
    return "\n".join(lines), ok_weights and ok_logits
