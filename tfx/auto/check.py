"""`tfx router check EXPORT RUN [--report DIR]`: the export's `num_visual_tokens="auto"`, in a
fresh process without tfx, must pick the N and give the answer `tfx eval RUN --auto` recorded,
sample by sample (up to `samples` of them, taken evenly from every chosen N). The record is
RUN/eval-auto/auto.json, or the auto.json in (or at) `report`: `tfx eval --auto --out DIR`.

Data flow position: `tfx eval --auto`'s auto.json + the exported folder -> **a plain
transformers process** (AutoModelForImageTextToText + AutoProcessor, trust_remote_code) ->
the per-sample comparison. A mismatch is a TfxError (exit 2) after the table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tfx.errors import ConfigError, TfxError

FRESH = """
import json, sys
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
folder, cases, max_new = sys.argv[1], json.load(open(sys.argv[2])), int(sys.argv[3])
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
out = {}
for key, path, question in cases:
    chat = [{"role": "user", "content": [{"type": "image", "image": Image.open(path)},
                                         {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                           return_dict=True)
    inputs.pop("num_visual_tokens", None)
    ids = model.generate(**inputs, num_visual_tokens="auto", max_new_tokens=max_new,
                         do_sample=False)
    text = processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:])[0].strip()
    out[key] = {"n": model.last_num_visual_tokens[0], "answer": text}
print(json.dumps({"out": out, "tfx": any(m == "tfx" or m.startswith("tfx.")
                                         for m in sys.modules)}))
"""


class AutoMismatch(TfxError):
    """The export's auto choices or answers differ from tfx eval --auto's."""


def pick(samples, per_sample: dict, count: int) -> list:
    """Up to `count` samples, round-robin over the chosen N (so every N is checked)."""
    by_n: dict[int, list] = {}
    for s in samples:
        by_n.setdefault(per_sample[s.key]["n"], []).append(s)
    groups = [by_n[n] for n in sorted(by_n)]
    out = []
    while len(out) < count and any(groups):
        for g in groups:
            if g and len(out) < count:
                out.append(g.pop(0))
    return out


def report_file(run: str, report: str | None) -> Path:
    """The auto.json to check against: `report` (the file, or a folder holding it), else
    RUN/eval-auto/auto.json, where `tfx eval RUN --auto` writes it without --out."""
    path = Path(report) if report else Path(run) / "eval-auto"
    path = path / "auto.json" if path.is_dir() or not path.suffix else path
    if not path.is_file():
        hint = (f"`tfx eval {run} --auto --out {report}`" if report
                else f"`tfx eval {run} --auto` (or pass --report DIR after --out DIR)")
        raise ConfigError(f"{path} not found: run {hint} first")
    return path


def run_router_check(export: str, run: str, samples: int = 64, timeout: int = 1800,
                     report: str | None = None) -> dict:
    from PIL import Image

    from tfx.eval.runner import eval_samples
    from tfx.train.load import load_model

    report_path = report_file(run, report)
    if not (Path(export) / "config.json").is_file():
        raise ConfigError(f"{export}: not an exported folder (tfx convert)")
    report = json.loads(report_path.read_text())
    loaded = load_model(report["checkpoint"])
    held_out, _ = eval_samples(loaded, None)
    chosen = pick([s for s in held_out if s.key in report["per_sample"]],
                  report["per_sample"], samples)
    with tempfile.TemporaryDirectory(prefix="tfx-router-check-") as tmp:
        cases = []
        for s in chosen:
            path = Path(tmp) / f"{len(cases)}.png"
            Image.fromarray(s.pixels[0].permute(1, 2, 0).numpy()).save(path)
            question = s.meta["conversations"][0]["value"].replace("<image>\n", "")
            cases.append([s.key, str(path), question])
        (Path(tmp) / "cases.json").write_text(json.dumps(cases))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        proc = subprocess.run([sys.executable, "-c", FRESH, str(Path(export).resolve()),
                               str(Path(tmp) / "cases.json"), "8"], capture_output=True,
                              text=True, cwd=tmp, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise TfxError(f"the fresh transformers process failed: "
                       f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = [{"key": key, "want": report["per_sample"][key], "got": got["out"][key]}
            for key, _, _ in cases]
    same_n = sum(r["want"]["n"] == r["got"]["n"] for r in rows)
    same_answer = sum(r["want"]["answer"] == r["got"]["answer"] for r in rows)
    ns = sorted({r["want"]["n"] for r in rows})
    return {"rows": rows, "same_n": same_n, "same_answer": same_answer, "checked": len(rows),
            "tfx_imported": got["tfx"], "counts": ns,
            "ok": same_n == same_answer == len(rows) and not got["tfx"],
            "line": f"{len(rows)} samples (chosen N {ns}) in a fresh transformers process "
                    f"{'with' if got['tfx'] else 'without'} tfx: N equal for {same_n}, "
                    f"answers equal for {same_answer}"}
