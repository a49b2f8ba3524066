"""Shared fixtures: a small synthetic dataset, tiny model configs, and a runner for `tfx`.

The environment is fixed before torch, deepspeed or triton are imported: CPU accelerator for
DeepSpeed, the Triton interpreter when there is no GPU, no hub access.
"""

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
try:
    import torch

    if not torch.cuda.is_available():  # on a GPU machine DeepSpeed and Triton use the GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from tfx.data.builders.synth import build_synth

    out = tmp_path_factory.mktemp("synth")
    build_synth(out, train=384, eval=64, per_shard=48, grid=4, image_size=32)
    return out


@pytest.fixture(scope="session")
def mixed_len_dir(synth_dir, tmp_path_factory) -> Path:
    """Shards with a realistic spread of lengths: 1-3 turns of 2-12 word questions and 1-6
    word answers, on the synth images (the synth task itself has only two lengths)."""
    import json
    import random

    import webdataset as wds

    pngs = [s["png"] for s in wds.DataPipeline(
        wds.SimpleShardList([str(synth_dir / "train" / "train-00000.tar")]),
        wds.tarfile_to_samples())][:16]
    words = "which color has the most cells what is marked red green blue yellow white".split()
    rng = random.Random(0)
    out = tmp_path_factory.mktemp("mixed")
    with wds.ShardWriter(str(out / "mixed-%03d.tar"), maxcount=64, verbose=0) as sink:
        for i in range(256):
            turns = []
            for t in range(rng.randint(1, 3)):
                q = " ".join(rng.choices(words, k=rng.randint(2, 12)))
                turns += [{"from": "human", "value": ("<image>\n" if t == 0 else "") + q},
                          {"from": "gpt",
                           "value": " ".join(rng.choices(words, k=rng.randint(1, 6)))}]
            sink.write({"__key__": f"mixed{i:05d}", "png": pngs[i % len(pngs)],
                        "json": json.dumps({"conversations": turns}).encode()})
    return out


def tiny_config_yaml(synth: Path, out_dir: Path, **sections) -> str:
    """A tiny run config as YAML text; `sections` replace whole top-level sections."""
    import yaml

    cfg = {
        "model": {"vision": {"family": "siglip", "image_size": 32, "patch_size": 4,
                             "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                             "intermediate_size": 64},
                  "llm": {"family": "qwen2", "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                          "num_kv_heads": 1, "intermediate_size": 64,
                          "max_position_embeddings": 256},
                  "default_visual_tokens": 16},
        "tokens": {"mode": "random", "counts": [4, 16, 36], "probs": [0.2, 0.3, 0.5], "seed": 3},
        "data": {"train": str(synth / "train"), "eval": str(synth / "eval"),
                 "tokenizer": str(synth / "tokenizer.model"), "max_text_tokens": 64,
                 "micro_batch_size": 4, "bucket_batches": 4},
        "train": {"max_steps": 6, "output_dir": str(out_dir), "freeze": "enhance"},
        "optim": {"lr": 1e-3, "llm_lr": 1e-3, "vision_lr": 1e-3},
        "checkpoint": {"save_every": 3, "keep_last": 3},
        "logging": {"trace_samples": True},
        "dist": {"timeout_s": 60},
        "deepspeed": {"config": str(ROOT / "configs/deepspeed/zero3.json"),
                      "param_persistence_threshold": 0},
    }
    cfg.update(sections)
    return yaml.safe_dump(cfg)


def run_tfx(*args: str, timeout: int = 240, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    if cwd is not None:  # `python -m tfx.cli` from elsewhere still imports this checkout
        full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "kernels")]
                                                 + [full_env.get("PYTHONPATH", "")])
    return subprocess.run(["timeout", "-k", "10", str(timeout), sys.executable, "-m", "tfx.cli",
                           *args], capture_output=True, text=True, env=full_env,
                          cwd=cwd or ROOT)


def last_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def set_train(raw: dict, **keys) -> dict:
    """Set keys of the train-related sections by name: `max_steps` goes to train, `lr` to
    optim, `save_every` to checkpoint, ... (`stage` is train.freeze, `dist_timeout_s`
    dist.timeout_s)."""
    import dataclasses

    from tfx.config import schema

    sections = {"train": schema.TrainConfig, "optim": schema.OptimConfig,
                "lr_schedule": schema.LRScheduleConfig, "checkpoint": schema.CheckpointConfig,
                "logging": schema.LoggingConfig, "dist": schema.DistConfig,
                "slurm": schema.SlurmConfig, "debug": schema.DebugConfig}
    aliases = {"stage": ("train", "freeze"), "dist_timeout_s": ("dist", "timeout_s")}
    for key, value in keys.items():
        section, name = aliases.get(key, (None, key))
        section = section or next(s for s, cls in sections.items()
                                  if name in {f.name for f in dataclasses.fields(cls)})
        raw.setdefault(section, {})[name] = value
    return raw


def tiny_run_config(synth: Path, tmp_path: Path, name: str = "run", **train) -> tuple[Path, Path]:
    """(config file, run folder) of the tiny config with train-related keys replaced
    (`set_train`)."""
    import yaml

    raw = yaml.safe_load(tiny_config_yaml(synth, tmp_path / name))
    set_train(raw, **train)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, tmp_path / name


@pytest.fixture(scope="session")
def two_rank_run(tmp_path_factory, synth_dir) -> tuple[Path, Path]:
    """(config, run folder) of a 6-step ZeRO-3 run of the tiny SigLIP + Qwen2 model on 2 ranks,
    each reading through 2 DataLoader workers, started the way a cluster script does: the
    `deepspeed` launcher itself, no `tfx train --nproc` parent. Its master port is in
    `master_port` beside the run folder."""
    import yaml

    from tfx.train.dist import free_port

    tmp = tmp_path_factory.mktemp("mp")
    run = tmp / "run"
    cfg = tmp / "run.yaml"
    raw = yaml.safe_load(tiny_config_yaml(synth_dir, run))
    raw["data"]["num_workers"] = 2
    cfg.write_text(yaml.safe_dump(raw))
    port = free_port()
    (tmp / "master_port").write_text(str(port))
    result = subprocess.run(
        ["timeout", "-k", "10", "300", sys.executable, "-m", "deepspeed.launcher.runner",
         "--num_gpus", "2", "--master_port", str(port), "--module", "tfx.train", str(cfg)],
        capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return cfg, run


def pytest_sessionstart(session):
    """Build DeepSpeed's CPU comm op once, before any test (and before xdist starts its
    workers): otherwise the first 2-rank test of a clean clone pays the 25-130 s JIT build
    inside its own time limits."""
    if hasattr(session.config, "workerinput") or os.environ.get("DS_ACCELERATOR") != "cpu":
        return
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    ShareMemCommBuilder().load(verbose=False)
