"""`tfx experiment flex-vs-fixed`: every model x every count, mean +- std, plot, costs; a second
invocation reuses the finished runs."""

import json

import pytest
import yaml

from tfx.eval.experiment import eval_counts

from conftest import run_tfx, set_train, tiny_config_yaml

pytestmark = pytest.mark.multiproc


def test_eval_counts_cover_trained_between_and_beyond():
    assert eval_counts([4, 16, 36], side=8) == [1, 4, 9, 16, 25, 36, 49]
    assert eval_counts([64, 144, 256], side=27) == [49, 64, 81, 100, 121, 144, 169, 196, 225,
                                                    256, 289]


def test_flex_vs_fixed_runs_every_model_and_resumes(synth_dir, tmp_path):
    raw = yaml.safe_load(tiny_config_yaml(synth_dir, tmp_path / "unused"))
    raw["tokens"].update(counts=[4, 16], probs=[0.4, 0.6])
    set_train(raw, max_steps=3, save_every=3)
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "exp"
    result = run_tfx("experiment", "flex-vs-fixed", str(cfg), "--seeds", "2", "--out",
                     str(out), "--jobs", "2", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["eval_counts"] == [1, 4, 9, 16, 25]
    assert set(report["table"]) == {"fixed-4", "fixed-16", "flex"}
    for row in report["table"].values():
        assert all(0 <= row[str(n)]["mean"] <= 1 for n in report["eval_counts"])
        assert row["visual_tokens"] > 0 and row["wall_s"] > 0
    # fixed-4 sees 4 tokens per image, fixed-16 sees 16: 4x the visual tokens, same samples
    t = report["table"]
    assert t["fixed-16"]["visual_tokens"] == pytest.approx(4 * t["fixed-4"]["visual_tokens"])
    assert "| flex |" in (out / "results.md").read_text()
    assert (out / "accuracy.png").stat().st_size > 0
    again = run_tfx("experiment", "flex-vs-fixed", str(cfg), "--seeds", "2", "--out", str(out),
                    timeout=120)
    assert again.returncode == 0 and again.stderr.count("done before, skipped") == 6


def test_failed_training_stops_the_experiment_before_the_next_run(synth_dir, tmp_path):
    broken = tmp_path / "broken.model"
    broken.write_bytes(b"not a sentencepiece model")  # passes the path check, fails in training
    raw = yaml.safe_load(tiny_config_yaml(synth_dir, tmp_path / "unused"))
    raw["tokens"].update(counts=[4, 16], probs=[0.4, 0.6])
    raw["data"]["tokenizer"] = str(broken)
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "exp"
    result = run_tfx("experiment", "flex-vs-fixed", str(cfg), "--seeds", "2", "--out",
                     str(out), timeout=300)
    assert result.returncode != 0
    assert "training" in result.stderr and "failed" in result.stderr.strip().splitlines()[-1]
    started = [ln.split("] ", 1)[1].removesuffix(": training")
               for ln in result.stderr.splitlines() if ln.endswith(": training")]
    assert started == [str(out / "fixed-4" / "seed0")]
    assert not (out / "results.json").exists()
