"""`make device-check [DRY=1]`: every GPU measurement of the project in one time-boxed run.

Started by `launchers/device-check.sh` (which makes the carried wheels importable) as
`python -m tfx.bench.device --out DIR [--dry]`. Each step runs in its own subprocess with its
own time box, so a hang or a crash costs that step only, and writes `DIR/<step>.md` (and CSV)
as soon as it has numbers; `DIR/device-check.md` collects them with each step's status:
1. environment: the GPU and the versions found (the machine's and the carried ones);
2. gpu-tests: `pytest -m gpu` (kernel forward and every gradient against float64 at the paper's
   shapes in bf16, `kernel: auto` choosing Triton, a bf16 training step and eval on the GPU);
3. kernel: `tfx bench kernel` at the paper's SigLIP shapes, B 64, N 64 and 256 (torch.compile
   compiles each shape twice, so N 144 is left out to stay inside the time box);
4. training: `configs/device-2b.yaml` (about 2.1B parameters, random weights) under ZeRO-3 on
   one GPU (world 1, NCCL), `steps` steps at each of fixed N = 256, 64, 144 and the 2:3:5 mix:
   median step time, tokens/s, TFLOP/s, MFU and peak memory per N; flex's mean step time
   against fixed-256's; tfx's step against a bare DeepSpeed loop on the same model and batch;
5. eval: a small model trained on the GPU for a few steps, then `tfx eval` and `tfx generate`
   (bf16 on the GPU by default).
`--dry` runs the same steps on a CPU at tiny sizes (CI runs it, so the script cannot rot).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# (name, time box in seconds on a GPU, on a CPU with --dry); the GPU boxes sum to 550 s
STEPS = (("environment", 20, 60), ("gpu-tests", 90, 240), ("kernel", 130, 240),
         ("training", 230, 400), ("eval", 70, 240))
WARMUP = 5  # steps left out of the medians (allocator, autotune, first batches)


def sh(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `cmd`; a timeout is reported like a failure (rc 124), never raised."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1),
                              cwd=ROOT, env=dict(os.environ, **(env or {})))
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        return subprocess.CompletedProcess(cmd, 124, out, err + f"\n(timed out after "
                                                               f"{timeout:.0f} s)")


def tfx(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "tfx.cli", *args], timeout)


def table(rows: list[dict], cols: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)"
    cols = cols or list(rows[0])
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                     + ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows])


def write_csv(rows: list[dict], path: Path) -> None:
    if rows:
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list({k: 0 for r in rows for k in r}))
            w.writeheader()
            w.writerows(rows)


def tail(result: subprocess.CompletedProcess, n: int = 15) -> str:
    lines = (result.stdout + "\n" + result.stderr).strip().splitlines()
    return "\n".join(lines[-n:])


# ---- step 1 ------------------------------------------------------------------------------

def step_environment(out: Path, dry: bool, budget: float) -> str:
    import importlib

    site = os.environ.get("TFX_DEVICE_SITE")
    rows = []
    for name in ("torch", "triton", "transformers", "tokenizers", "huggingface_hub",
                 "safetensors", "numpy", "PIL", "tensorboard", "deepspeed", "webdataset",
                 "sentencepiece", "accelerate", "yaml", "pytest", "flash_attn", "liger_kernel",
                 "matplotlib"):
        try:
            module = importlib.import_module(name)
            where = "carried" if site and str(getattr(module, "__file__", "")).startswith(site) \
                else "machine"
            rows.append({"package": name, "version": getattr(module, "__version__", "?"),
                         "from": where})
        except Exception as e:  # a missing optional package is a row, not a failure
            rows.append({"package": name, "version": f"missing ({type(e).__name__})",
                         "from": ""})
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    facts = [f"- device: {gpu}", f"- python: {platform.python_version()}",
             f"- CUDA (torch): {torch.version.cuda}", f"- CPU cores: {os.cpu_count()}",
             f"- dry run: {dry}"]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.append(f"- GPU memory: {props.total_memory / 2**30:.1f} GiB, "
                     f"compute capability {props.major}.{props.minor}")
    return "\n".join(facts) + "\n\n" + table(rows)


# ---- step 2 ------------------------------------------------------------------------------

def step_gpu_tests(out: Path, dry: bool, budget: float) -> str:
    result = sh([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p",
                 "no:cacheprovider", "tests/test_gpu.py", "tests/test_kernels.py"], budget - 5)
    summary = tail(result, 12)
    if result.returncode not in (0,):
        raise StepFailed(f"pytest -m gpu exited {result.returncode}\n```\n{summary}\n```")
    return f"`pytest -m gpu tests/test_gpu.py tests/test_kernels.py`:\n```\n{summary}\n```"


# ---- step 3 ------------------------------------------------------------------------------

def step_kernel(out: Path, dry: bool, budget: float) -> str:
    args = ["bench", "kernel", "--out", str(out / "kernel")]
    args += ["--small", "--reps", "1", "--no-compile"] if dry else \
        ["--encoders", "siglip", "--batches", "64", "--counts", "64,256", "--reps", "20"]
    result = tfx(*args, timeout=budget - 5)
    if result.returncode != 0:
        raise StepFailed(f"tfx bench kernel exited {result.returncode}\n```\n{tail(result)}\n```")
    with (out / "kernel" / "projector.csv").open() as f:
        rows = list(csv.DictReader(f))
    cols = ["N", "mode", "provider", "median_ms", "p20_ms", "p80_ms", "tflops", "pct_floor",
            "saved_mb", "speedup_vs_eager"]
    return f"`tfx {' '.join(args)}` on {rows[0]['device']} ({rows[0]['dtype']}):\n\n" + \
        table(rows, cols)


# ---- step 4 ------------------------------------------------------------------------------

def tiny_config(work: Path) -> Path:
    """The dry run's stand-in for configs/device-2b.yaml: the test suite's tiny model."""
    import yaml

    raw = yaml.safe_load((ROOT / "configs" / "device-2b.yaml").read_text())
    raw["model"]["vision"] = {"family": "siglip", "image_size": 32, "patch_size": 4,
                              "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                              "intermediate_size": 64}
    raw["model"]["llm"] = {"family": "qwen2", "hidden_size": 32, "num_layers": 1,
                           "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64,
                           "max_position_embeddings": 256}
    raw["model"]["default_visual_tokens"] = 16
    raw["tokens"]["counts"] = [4, 16, 36]
    raw["data"].update(micro_batch_size=4, num_workers=0)
    raw["train"]["precision"] = "auto"
    raw["deepspeed"]["param_persistence_threshold"] = 0
    path = work / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def summarise_run(rows: list[dict], label: str) -> list[dict]:
    """One row per N (and one for all steps) from a run's metrics, warm-up steps left out."""
    timed = [r for r in rows if r["step"] > WARMUP] or rows
    out = []
    for n in sorted({r["n_visual"] for r in timed}) + ["all"]:
        sel = [r for r in timed if n == "all" or r["n_visual"] == n]
        if not sel or (n == "all" and len({r["n_visual"] for r in timed}) == 1):
            continue
        mfu = [r["mfu"] for r in sel if r.get("mfu") is not None]
        out.append({"run": label, "N": n, "steps": len(sel),
                    "median_step_s": statistics.median(r["step_time_s"] for r in sel),
                    "mean_step_s": statistics.mean(r["step_time_s"] for r in sel),
                    "tokens_per_s": statistics.median(r["tokens_per_s"] for r in sel),
                    "tflops": statistics.median(r["tflops"] for r in sel),
                    "mfu": statistics.median(mfu) if mfu else None,
                    "peak_mem_gib": max(r["peak_mem_mb"] or 0 for r in sel) / 1024})
    return out


def step_training(out: Path, dry: bool, budget: float) -> str:
    from tfx.data.builders.synth import build_synth

    end = time.time() + budget - 10
    work = Path(tempfile.mkdtemp(prefix="tfx-device-"))
    data = work / "data"
    size = 32 if dry else 384
    build_synth(data, train=256 if dry else 1024, eval=16, per_shard=32 if dry else 64,
                image_size=size)
    config = tiny_config(work) if dry else ROOT / "configs" / "device-2b.yaml"
    steps = 8 if dry else 40
    common = [f"data.train={data / 'train'}", f"data.eval={data / 'eval'}",
              f"data.tokenizer={data / 'tokenizer.model'}", f"train.max_steps={steps}"]
    counts = (4, 16, 36) if dry else (64, 144, 256)
    runs = [(f"fixed-{counts[-1]}", [f"tokens.counts=[{counts[-1]}]"]), ("flex 2:3:5", []),
            (f"fixed-{counts[0]}", [f"tokens.counts=[{counts[0]}]"]),
            (f"fixed-{counts[1]}", [f"tokens.counts=[{counts[1]}]"])]
    rows, notes = [], []
    for label, extra in runs:
        fixed = ["tokens.mode=fixed", "tokens.probs=[1.0]"] if extra else []
        run_dir = work / label.split()[0]
        result = tfx("train", str(config), *common, *fixed, *extra,
                     f"train.output_dir={run_dir}", "--overwrite", timeout=end - time.time())
        if result.returncode != 0:
            notes.append(f"- {label}: exit {result.returncode}\n```\n{tail(result)}\n```")
            if result.returncode == 124:
                break
            continue
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rows += summarise_run(metrics, label)
        write_csv(rows, out / "training.csv")
    bare = sh([sys.executable, "-m", "tfx.bench.bare", str(config), *common,
               f"tokens.counts=[{counts[-1]}]", "tokens.mode=fixed", "tokens.probs=[1.0]",
               "--n", str(counts[-1]), "--steps", str(steps - WARMUP), "--warmup",
               str(WARMUP)], end - time.time())
    text = [f"Model: `{config.name}`, {size} px images, micro-batch from the config, "
            f"{steps} steps per run, the first {WARMUP} left out.", "", table(rows)]
    fixed_big = next((r for r in rows if r["run"] == f"fixed-{counts[-1]}"), None)
    flex_all = next((r for r in rows if r["run"] == "flex 2:3:5" and r["N"] == "all"), None)
    if fixed_big and flex_all:
        text.append(f"\nflex 2:3:5 / fixed-{counts[-1]} mean step time: "
                    f"{flex_all['mean_step_s'] / fixed_big['mean_step_s']:.3f} "
                    f"(goal <= 0.85; the paper: 0.87)")
    if bare.returncode == 0 and fixed_big:
        b = json.loads(bare.stdout.strip().splitlines()[-1])
        text.append(f"tfx step / bare DeepSpeed loop at N={counts[-1]}: "
                    f"{fixed_big['median_step_s']:.4f} s / {b['median_step_s']:.4f} s = "
                    f"{fixed_big['median_step_s'] / b['median_step_s']:.3f} (goal <= 1.05)")
        write_csv(rows + [{"run": "bare loop", "N": counts[-1], **b}], out / "training.csv")
    elif bare.returncode != 0:
        notes.append(f"- bare loop: exit {bare.returncode}\n```\n{tail(bare)}\n```")
    big_mfu = fixed_big["mfu"] if fixed_big else None
    if big_mfu is not None:
        text.append(f"MFU at N={counts[-1]}: {big_mfu:.1%} (goal >= 45%)")
    if notes:
        text += ["", "Problems:"] + notes
    report = "\n".join(text)
    if not rows:
        raise StepFailed(report)
    return report


# ---- step 5 ------------------------------------------------------------------------------

def step_eval(out: Path, dry: bool, budget: float) -> str:
    import webdataset as wds

    from tfx.data.builders.synth import build_synth

    end = time.time() + budget - 5
    work = Path(tempfile.mkdtemp(prefix="tfx-device-eval-"))
    build_synth(work / "data", train=256, eval=64, per_shard=64, grid=4, image_size=64)
    run = work / "run"
    train = tfx("train", str(ROOT / "configs" / "demo.yaml"), f"data.train={work}/data/train",
                f"data.eval={work}/data/eval", f"data.tokenizer={work}/data/tokenizer.model",
                f"train.output_dir={run}", "train.max_steps=20", "checkpoint.save_every=0",
                "data.micro_batch_size=8", timeout=end - time.time())
    if train.returncode != 0:
        raise StepFailed(f"training the small model failed\n```\n{tail(train)}\n```")
    t0 = time.time()
    ev = tfx("eval", str(run), "--counts", "4,16,36", "--out", str(out / "eval"),
             timeout=end - time.time())
    eval_s = time.time() - t0
    if ev.returncode != 0:
        raise StepFailed(f"tfx eval failed\n```\n{tail(ev)}\n```")
    report = json.loads((out / "eval" / "eval.json").read_text())
    sample = next(iter(wds.WebDataset(f"{work}/data/eval/eval-00000.tar", shardshuffle=False)))
    image = work / "q.png"
    image.write_bytes(sample["png"])
    question = json.loads(sample["json"])["conversations"][0]["value"].replace("<image>\n", "")
    t0 = time.time()
    gen = tfx("generate", "--model", str(run), "--image", str(image), "--prompt", question,
              "--visual-tokens", "4,16,36", "--max-new-tokens", "4", timeout=end - time.time())
    gen_s = time.time() - t0
    if gen.returncode != 0:
        raise StepFailed(f"tfx generate failed\n```\n{tail(gen)}\n```")
    rows = [{"N": n, "accuracy": r["all"]} for n, r in report["results"].items()]
    return (f"`tfx eval` ran on {report['device']} in {report['dtype']} ({eval_s:.1f} s with "
            f"start-up, {report['samples']} samples, after 20 training steps: accuracies say "
            f"only that it runs):\n\n{table(rows)}\n\n`tfx generate` ({gen_s:.1f} s):\n```\n"
            f"{gen.stdout.strip()}\n```")


class StepFailed(Exception):
    """A step that ran but did not produce what it should; its message is the report."""


STEP_FUNCTIONS = {"environment": step_environment, "gpu-tests": step_gpu_tests,
                  "kernel": step_kernel, "training": step_training, "eval": step_eval}


def run_step(name: str, out: Path, dry: bool, budget: float) -> int:
    try:
        text, code = STEP_FUNCTIONS[name](out, dry, budget), 0
    except StepFailed as e:
        text, code = str(e), 1
    (out / f"{name}.md").write_text(text + "\n")
    return code


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tfx.bench.device")
    p.add_argument("--out", default=str(ROOT / "bench_out" / "device"))
    p.add_argument("--dry", action="store_true", help="a CPU at tiny sizes")
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)  # one step, in a child
    p.add_argument("--budget", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--only", default="", help="comma list of steps to run (default: all)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.step:
        return run_step(args.step, out, args.dry, args.budget)
    wanted = set(filter(None, args.only.split(",")))
    status, started = [], time.time()
    for name, gpu_box, cpu_box in STEPS:
        if wanted and name not in wanted:
            continue
        box = cpu_box if args.dry else gpu_box
        (out / f"{name}.md").unlink(missing_ok=True)
        t0 = time.time()
        child = sh([sys.executable, "-m", "tfx.bench.device", "--step", name, "--out",
                    str(out), "--budget", str(box)] + ["--dry"] * args.dry, box)
        seconds = time.time() - t0
        (out / "logs").mkdir(exist_ok=True)
        (out / "logs" / f"{name}.log").write_text(child.stdout + "\n" + child.stderr)
        state = {0: "ok", 124: "timed out"}.get(child.returncode, f"failed ({child.returncode})")
        status.append({"step": name, "status": state, "seconds": round(seconds, 1),
                       "time box s": box})
        print(f"device-check: {name}: {state} in {seconds:.0f} s", flush=True)
    sections = [f"# Device check ({'dry run, CPU' if args.dry else 'GPU'}), "
                f"{time.strftime('%Y-%m-%d %H:%M')}, {time.time() - started:.0f} s", "",
                table(status)]
    for row in status:
        md = out / f"{row['step']}.md"
        body = md.read_text() if md.is_file() else f"(no report; the log is " \
                                                     f"logs/{row['step']}.log)\n```\n" + \
            "\n".join((out / "logs" / f"{row['step']}.log").read_text().splitlines()[-15:]) + \
            "\n```"
        sections += ["", f"## {row['step']}", "", body.strip()]
    (out / "device-check.md").write_text("\n".join(sections) + "\n")
    write_csv(status, out / "steps.csv")
    print(f"device-check: wrote {out / 'device-check.md'}", flush=True)
    return 0 if all(r["status"] == "ok" for r in status) else 1


if __name__ == "__main__":
    sys.exit(main())
