"""The model card `tfx convert` writes into an export (README.md): what the model is, how it
was trained, how well it does at each N, and a snippet that runs as printed.

Data flow position: run folder (config, run.json, eval.json) -> **card** -> export. For a stage
of a recipe, the sibling stages' configs give the training history.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from tfx.config.schema import RunConfig


def _tower(cfg: RunConfig) -> str:
    v = cfg.model.vision
    base = f"`{v.path}`" if v.path else f"built from its config ({v.hidden_size} wide, " \
                                         f"{_layers(v.num_layers)})"
    return f"{v.family}, {v.image_size} px, patch {v.patch_size} (a {v.grid_side} x " \
           f"{v.grid_side} grid): {base}"


def _projector(cfg: RunConfig) -> str:
    p = cfg.model.projector
    where = "" if p.position == "none" else \
        ", plus a learned map of each token's (row, column) centre (Fourier features)"
    return f"pool the grid to n x n ({p.pool} bins), LayerNorm, SwiGLU (width " \
           f"{p.hidden_ratio} x the tower's), Linear{where}"


def _llm(cfg: RunConfig) -> str:
    m = cfg.model.llm
    return f"{m.family}: " + (f"`{m.path}`" if m.path else
                              f"built from its config ({m.hidden_size} wide, "
                              f"{_layers(m.num_layers)})")


def _layers(n: int) -> str:
    return f"{n} layer" + "s" * (n != 1)


def stages_of(run_dir: Path, cfg: RunConfig) -> list[dict]:
    """This run and, for a recipe stage, the stages next to it that came before, in order."""
    rows = []
    record = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() \
        else {}
    recipe = record.get("recipe")  # {"stages": [names], "index": i} for a recipe's stage
    runs = [run_dir.parent / name for name in recipe["stages"][:recipe["index"] + 1]] \
        if recipe else [run_dir]
    for p in runs:
        if not (p / "config.yaml").is_file():
            continue
        raw = yaml.safe_load((p / "config.yaml").read_text())
        t = raw["tokens"]
        schedule = f"{t['mode']} {t['counts']}" + (f" at {t['probs']}" if t["mode"] == "random"
                                                   else "")
        rows.append({"stage": p.name, "freeze": raw["train"]["freeze"],
                     "steps": raw["train"]["max_steps"], "tokens": schedule})
    return rows


def accuracy_table(run_dir: Path) -> tuple[str, Path | None]:
    path = run_dir / "eval.json"
    if not path.is_file():
        return "", None
    report = json.loads(path.read_text())
    lines = [f"Exact-match accuracy on {report['samples']} held-out samples "
             f"({report['tag']}; `tfx eval`):", "", "| N | trained | accuracy |",
             "|---|---|---|"]
    for n, r in sorted(report["results"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {n} | {'yes' if int(n) in report['trained_counts'] else 'no'} | "
                     f"{r['all']:.3f} |")
    png = run_dir / "eval.png"
    return "\n".join(lines), png if png.is_file() else None


def rule(router: dict) -> str:
    """How the exported router picks N and how its knob was chosen, in words."""
    ladder = router["ladder"]
    if router.get("budget"):
        chosen = (f"the one spending the most on held-out questions within "
                  f"{100 * router['budget']:.3g} % of N = {ladder[-1]}'s tokens")
    else:
        chosen = (f"the cheapest keeping {100 * router.get('keep', 0.99):.3g} % of "
                  f"N = {ladder[-1]}'s accuracy on held-out questions")
    if router.get("policy", "sufficiency") == "accuracy":
        return (f"the N with the largest predicted probability of a right answer less price x "
                f"N / {ladder[-1]}, price = {router['tau']:.3g} ({chosen})")
    return (f"the smallest N whose predicted probability of losing nothing against "
            f"N = {ladder[-1]} is at least tau = {router['tau']:.3g} ({chosen})")


def ensemble(router: dict) -> str:
    members, shrink = router.get("members", 1), router.get("shrink", 0.0)
    text = "a small MLP" if members == 1 else f"the mean of {members} small MLPs from " \
        "different initialisations"
    return text + (f"; each probability is pulled {shrink:g} of the way toward that N's mean "
                   "accuracy" if shrink else "")


def router_section(router: dict | None) -> str:
    """What `num_visual_tokens="auto"` does in this export (empty without a router)."""
    if router is None:
        return ""
    ladder = list(router["ladder"])
    return f"""
## Automatic N (router)

This export carries a router (`tfx router train`, `tfx/model/router.py`):
`model.generate(**inputs, num_visual_tokens="auto")` picks N per image from {ladder}:
{rule(router)}. Its inputs are the share of the tower grid's variance each pooling throws away
and the prompt's mean input embedding ({ensemble(router)}).
`model.last_num_visual_tokens` says what it chose. One image per
row; the tower runs once for the choice and again in the pass at the chosen N. The processor's
N for an `auto` call does not matter: the model rebuilds the image block at its choice.
"""


def write_card(folder: Path, cfg: RunConfig, run_dir: Path, tag: str,
               final: Path | None = None, router: dict | None = None) -> None:
    """README.md (and eval.png) into `folder`; the snippet loads from `final` (where the folder
    will be once written; default: `folder`). `router`: the exported router's config."""
    final = final or folder
    side, size = cfg.model.vision.grid_side, cfg.model.vision.image_size
    trained = sorted(cfg.tokens.counts)
    table, png = accuracy_table(run_dir)
    if png is not None:
        shutil.copy2(png, folder / "eval.png")
    stage_rows = stages_of(run_dir, cfg)
    history = "\n".join(["| stage | trains | steps | visual tokens |", "|---|---|---|---|"] +
                        [f"| {r['stage']} | {r['freeze']} | {r['steps']} | {r['tokens']} |"
                         for r in stage_rows])
    text = f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [tokenflex, tfx, visual-tokens]
---

# {run_dir.name}: a TokenFLEX vision-language model

One set of weights that answers about an image at any number of visual tokens N = n x n, from
1 to {side * side} (n up to {side}), chosen per call: TokenFLEX's token-adaptive projector
(arXiv 2504.03154), trained with tfx at N in {trained}; checkpoint `{tag}`.

## Model

| part | what |
|---|---|
| vision tower | {_tower(cfg)} |
| projector | {_projector(cfg)} |
| language model | {_llm(cfg)} |
| default N | {cfg.model.default_visual_tokens} |

## Training

{history}

{table or "No `tfx eval` results were found next to the checkpoint."}
{"" if png is None else chr(10) + "![accuracy at each N](eval.png)" + chr(10)}
## Use

```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

folder = "{final.resolve()}"
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
image = Image.new("RGB", ({size}, {size}), "white")  # your image here
messages = [{{"role": "user", "content": [{{"type": "image", "image": image}},
                                         {{"type": "text", "text": "What is in the picture?"}}]}}]
for n in ({", ".join(str(n) for n in trained)}):  # any n*n up to {side * side}
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, num_visual_tokens=n)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    print(n, processor.batch_decode(out[:, inputs["input_ids"].shape[1]:])[0])
```

The same through `pipeline("image-text-to-text", model=folder, trust_remote_code=True)` with
`num_visual_tokens=n` as a keyword. One N per batch; fewer tokens answer faster.
{router_section(router)}"""
    (folder / "README.md").write_text(text)
