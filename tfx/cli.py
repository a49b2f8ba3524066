"""The `tfx` command: train and eval here, every other command in `tfx.commands`. With
`tfx.commands`, the only modules with process-wide side effects.

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


NAMES = ("train", "eval", "data", "bench", "convert", "generate", "plan", "experiment",
         "backbones", "lmms-task", "router")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in NAMES:
        print(f"usage: tfx {{{','.join(NAMES)}}} ... (tfx COMMAND --help)", file=sys.stderr)
        sys.exit(2)
    if argv[0] in ("train", "eval"):
        {"train": cmd_train, "eval": cmd_eval}[argv[0]](argv[1:])
        return
    from tfx import commands

    getattr(commands, "cmd_" + argv[0].replace("-", "_"))(argv[1:])


if __name__ == "__main__":
    main()
