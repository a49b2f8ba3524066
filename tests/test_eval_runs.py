"""`tfx eval` on a run that was moved: outputs beside what was evaluated, relative paths of the
config resolved as when the run was trained (or an error naming the flag to pass), an earlier
eval kept, and one-line errors for paths that do not exist."""

import json
import os
import shutil

import yaml

from conftest import last_line, run_tfx, set_train, tiny_config_yaml


def test_eval_of_a_moved_run(synth_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    os.symlink(synth_dir, work / "data")
    raw = yaml.safe_load(tiny_config_yaml(synth_dir, tmp_path))
    raw["data"].update(train="data/train", eval="data/eval", tokenizer="data/tokenizer.model")
    set_train(raw, output_dir="runs/a", max_steps=2, save_every=2)
    (work / "run.yaml").write_text(yaml.safe_dump(raw))
    result = run_tfx("train", "run.yaml", cwd=work)
    assert result.returncode == 0, result.stderr[-2000:]
    original = work / "runs" / "a"
    moved = tmp_path / "elsewhere" / "a"
    shutil.copytree(original, moved)

    first = run_tfx("eval", str(moved), "--counts", "4,16")  # from another working directory
    assert first.returncode == 0, first.stderr[-2000:]
    assert (moved / "eval.json").is_file() and not (original / "eval.json").exists()
    again = run_tfx("eval", str(moved), "--counts", "16")
    assert again.returncode == 0, again.stderr[-2000:]
    kept = list((moved / "eval-history").glob("eval-step_0000002-N4-16-*.json"))
    assert len(kept) == 1 and f"kept the previous eval as {kept[0]}" in again.stdout
    assert json.loads(kept[0].read_text())["results"].keys() == {"4", "16"}
    assert json.loads((moved / "eval.json").read_text())["results"].keys() == {"16"}

    os.unlink(work / "data")  # the training's data is gone: say which path, and what to pass
    gone = run_tfx("eval", str(moved), "--counts", "4")
    assert gone.returncode == 2
    assert last_line(gone) == (f"ConfigError: data.eval: data/eval (relative to {work}, where "
                               f"the run was trained) does not exist; pass --data DIR")
    given = run_tfx("eval", str(moved), "--counts", "4", "--data", str(synth_dir / "eval"),
                    "--out", str(tmp_path / "out"))  # the tokenizer comes from the run itself
    assert given.returncode == 0, given.stderr[-2000:]
    assert (tmp_path / "out" / "eval.json").is_file()


def test_a_path_that_does_not_exist_is_one_line(tmp_path):
    missing = tmp_path / "nope"
    for args, kind in ((("eval", str(missing), "--counts", "4"), "CheckpointError"),
                       (("convert", str(missing), str(tmp_path / "hf")), "CheckpointError"),
                       (("eval", str(missing), "--counts", "4", "--every-checkpoint"),
                        "ConfigError")):
        result = run_tfx(*args, timeout=60)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert last_line(result).startswith(f"{kind}: {missing} does not exist"), args


def test_the_eval_plot_names_question_types_and_draws_chance(tmp_path):
    from tfx.eval.runner import plot

    results = {4: {"all": 0.5, "marked": 0.4, "majority": 0.6, "n": 10},
               16: {"all": 0.7, "marked": 0.8, "majority": 0.6, "n": 10}}
    labels = plot(results, {4}, tmp_path / "p.png", title="t", chance=0.2)
    assert labels == ["all questions", "question type: majority", "question type: marked",
                      "chance (0.20)"]
    assert (tmp_path / "p.png").stat().st_size > 5000
