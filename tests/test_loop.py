"""The training loop through the real CLI, one process: what a run folder may be reused for,
what a resumed run logs, the LRs and visual tokens it reports, weight decay under ZeRO-3, and
the files it leaves behind."""

import json

import pytest
import torch
import yaml

from tfx.config.load import load_config
from tfx.train import checkpoint
from tfx.train.engine import lr_factor

from conftest import last_line, run_tfx, set_train, tiny_config_yaml, tiny_run_config


def rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_folder_is_never_reused_silently(synth_dir, tmp_path):
    cfg, run = tiny_run_config(synth_dir, tmp_path, max_steps=4, save_every=2)
    assert run_tfx("train", str(cfg)).returncode == 0
    again = run_tfx("train", str(cfg))
    assert again.returncode == 2
    assert last_line(again) == (
        f"ConfigError: train.output_dir: {run} already holds a run (checkpoint step_0000004, "
        f"4 metric rows); pass --resume to continue it or --overwrite to start again "
        f"(deletes it)")
    assert len(rows(run)) == 4  # untouched
    (run / "mine.txt").write_text("keep")
    fresh = run_tfx("train", str(cfg), "--overwrite")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert [r["step"] for r in rows(run)] == [1, 2, 3, 4]
    assert len(list((run / "tb").iterdir())) == 1  # the old event file went with the old run
    assert (run / "mine.txt").read_text() == "keep"  # only what tfx wrote is removed


def test_resume_replaces_the_rows_of_redone_steps(synth_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, run = tiny_run_config(synth_dir, tmp_path, max_steps=6, save_every=3)
    assert run_tfx("train", str(cfg)).returncode == 0
    first = rows(run)
    import shutil

    shutil.rmtree(run / "checkpoints" / "step_0000006")  # steps 4..6 must be redone
    done = run_tfx("train", str(cfg), "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    again = rows(run)
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in first], rel=1e-5)
    steps = []
    for f in sorted((run / "tb").iterdir()):
        acc = EventAccumulator(str(f))
        acc.Reload()
        steps += [e.step for e in acc.Scalars("train/loss")]
    # TensorBoard purges the redone steps of the first file when it reads them in order
    assert sorted(set(steps)) == [1, 2, 3, 4, 5, 6]
    trace = [json.loads(x)["step"] for x in (run / "trace" / "rank0.jsonl").read_text()
             .splitlines()]
    assert trace == [0, 1, 2, 3, 4, 5]


def test_overrides_come_in_any_order(synth_dir, tmp_path):
    cfg, run = tiny_run_config(synth_dir, tmp_path, max_steps=2)
    result = run_tfx("train", str(cfg), "--resume", "train.max_steps=1", "--nproc", "1",
                     "tokens.seed=5")
    assert result.returncode == 0, result.stderr[-2000:]
    assert [r["step"] for r in rows(run)] == [1]
    bad = run_tfx("train", str(cfg), "--overwrite", "tokens.counts=[4,15,36]")
    assert bad.returncode == 2
    assert last_line(bad) == "ConfigError: tokens.counts: 15 is not n*n; use e.g. 9, 16, 25"


def test_logged_lr_is_what_each_part_used_in_the_step(synth_dir, tmp_path):
    cfg, run = tiny_run_config(synth_dir, tmp_path, max_steps=6, warmup_ratio=0.5, lr=1e-3,
                               llm_lr=2e-4, vision_lr=5e-5, min_lr_ratio=0.1)
    result = run_tfx("train", str(cfg))
    assert result.returncode == 0, result.stderr[-2000:]
    c = load_config(cfg)
    for r in rows(run):
        f = lr_factor(r["step"] - 1, c)  # row `step` reports the step just done
        assert r["lr"] == pytest.approx({"vision": 5e-5 * f, "projector": 1e-3 * f,
                                         "llm": 2e-4 * f}, rel=1e-9)
    assert rows(run)[0]["lr"]["projector"] == pytest.approx(1e-3 / 3)  # warmup: 1 of 3


def text_only_shards(synth_dir, folder):
    """Image samples of the synth set mixed with text-only ones (keys `text*`)."""
    import webdataset as wds

    folder.mkdir()
    src = wds.DataPipeline(wds.SimpleShardList([str(p) for p in
                                                sorted((synth_dir / "train").glob("*.tar"))[:2]]),
                           wds.tarfile_to_samples())
    with wds.ShardWriter(str(folder / "mixed-%03d.tar"), maxcount=24, verbose=0) as sink:
        for i, s in enumerate(src):
            sink.write({"__key__": s["__key__"], "png": s["png"], "json": s["json"]})
            if i % 3 == 0:
                conv = {"conversations": [{"from": "human", "value": "Name a colour."},
                                          {"from": "gpt", "value": "red"}]}
                sink.write({"__key__": f"text{i:05d}", "json": json.dumps(conv).encode()})


def test_visual_tokens_count_image_rows_only(synth_dir, tmp_path):
    data = tmp_path / "mixed"
    text_only_shards(synth_dir, data)
    raw = yaml.safe_load(tiny_config_yaml(synth_dir, tmp_path / "run"))
    raw["data"]["train"] = str(data)
    set_train(raw, max_steps=8, save_every=0)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    result = run_tfx("train", str(cfg))
    assert result.returncode == 0, result.stderr[-2000:]
    trace = [json.loads(x) for x in (tmp_path / "run" / "trace" / "rank0.jsonl").read_text()
             .splitlines()]
    metrics = rows(tmp_path / "run")
    total, expected = 0, []
    for t, r in zip(trace, metrics):
        total += sum(not k.startswith("text") for k in t["keys"]) * r["n_visual"]
        expected.append(total)
    assert [r["visual_tokens"] for r in metrics] == expected
    assert sum(k.startswith("text") for t in trace for k in t["keys"]) > 0
    for t, r in zip(trace, metrics):  # what the model got: N context ids per image row
        assert t["context_tokens"] == [0 if k.startswith("text") else r["n_visual"]
                                       for k in t["keys"]]


def matrices_and_vectors(state):
    return ({k: v for k, v in state.items() if v.ndim >= 2},
            {k: v for k, v in state.items() if v.ndim < 2 and v.is_floating_point()})


def test_weight_decay_applies_to_matrices_under_zero3(synth_dir, tmp_path):
    """One AdamW step with and without decay: decoupled decay changes every matrix by
    -lr * wd * w and nothing else; ZeRO-3 partitions are 1-D, so the full shape decides."""
    finals = {}
    for wd in (0.0, 0.5):
        cfg, run = tiny_run_config(synth_dir, tmp_path, f"wd{wd}", max_steps=1, save_every=1,
                                   weight_decay=wd)
        result = run_tfx("train", str(cfg))
        assert result.returncode == 0, result.stderr[-2000:]
        finals[wd] = checkpoint.load_consolidated(*checkpoint.resolve(run))
    (m0, v0), (m1, v1) = matrices_and_vectors(finals[0.0]), matrices_and_vectors(finals[0.5])
    assert all(not torch.equal(m0[k], m1[k]) for k in m0), "a matrix was not decayed"
    assert all(torch.equal(v0[k], v1[k]) for k in v0), "a bias or norm weight was decayed"


def test_mfu_is_logged_with_a_known_peak_and_pid_files_go(synth_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, run = tiny_run_config(synth_dir, tmp_path, max_steps=2, peak_tflops=0.5)
    assert run_tfx("train", str(cfg)).returncode == 0
    for r in rows(run):
        assert r["tflops"] > 0 and r["mfu"] == pytest.approx(r["tflops"] / 0.5)
    acc = EventAccumulator(str(next((run / "tb").iterdir())))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/mfu")] == pytest.approx(
        [r["mfu"] for r in rows(run)])
    assert not list(run.glob("rank*.pid"))


@pytest.mark.parametrize("section, message", [
    ({"bf16": {"enabled": True}}, "bf16.enabled=True in {} disagrees with train.precision=auto"),
    ({"fp16": {"enabled": True}}, "fp16 is enabled in {}; tfx trains in bf16 or fp32 "
     "(train.precision)"),
])
def test_deepspeed_precision_keys_must_agree(synth_dir, tmp_path, section, message):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, **section}))
    cfg, run = tiny_run_config(synth_dir, tmp_path, max_steps=1)
    for nproc in ("1", "2"):
        result = run_tfx("train", str(cfg), f"deepspeed.config={ds}", "--nproc", nproc)
        assert result.returncode == 2
        assert last_line(result) == f"ConfigError: deepspeed.config: {message.format(ds)}" + (
            "; remove the fp16 section" if "fp16" in section else
            " (bf16 off); remove it or set it to \"auto\"")
        assert not run.exists()  # refused before any rank started


def test_zero3_offload_config_trains(synth_dir, tmp_path):
    from conftest import ROOT

    cfg, run = tiny_run_config(synth_dir, tmp_path, max_steps=2, save_every=2)
    result = run_tfx("train", str(cfg),
                     f"deepspeed.config={ROOT / 'configs/deepspeed/zero3_offload.json'}",
                     timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in rows(run)] == [1, 2]
    assert all(r["loss"] > 0 for r in rows(run))
