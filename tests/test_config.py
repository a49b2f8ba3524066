"""Config loading: overrides, types, and one-line exit-2 errors before any rank starts."""

from pathlib import Path

import pytest
import yaml

from tfx.config.load import load_config
from tfx.errors import ConfigError

from conftest import run_tfx, tiny_config_yaml


@pytest.fixture
def cfg_file(tmp_path, synth_dir):
    path = tmp_path / "run.yaml"
    path.write_text(tiny_config_yaml(synth_dir, tmp_path / "out"))
    return path


def test_overrides_are_typed(cfg_file):
    cfg = load_config(cfg_file, ["optim.lr=3e-4", "tokens.counts=[16,36]",
                                 "tokens.probs=[0.5,0.5]", "train.max_steps=7",
                                 "optim.betas=[0.9,0.99]"])
    assert cfg.optim.lr == 3e-4 and cfg.tokens.counts == (16, 36) and cfg.train.max_steps == 7
    assert cfg.optim.betas == (0.9, 0.99)


@pytest.mark.parametrize("override, message", [
    (["optim.lrr=1"], "optim.lrr: unknown key; did you mean optim.lr?"),
    (["train.lr=1"], "train.lr: unknown key; it is optim.lr now"),  # a key of another section
    (["train.save_every=5"], "train.save_every: unknown key; it is checkpoint.save_every now"),
    (["train.stage=align"], "train.stage: unknown key; it is train.freeze now"),
    (["train.freeze=frozen"], "train.freeze: 'frozen' is not one of align, enhance, instruct"),
    (["model.vision.family=vit"], "model.vision.family: 'vit' is not one of siglip, clip, "
                                  "efficientnet"),
    (["optim.betas=[0.9]"], "optim.betas: expected 2 values, got [0.9]"),
    (["model.projector.kernel=triton", "model.projector.pool=interp"],
     "model.projector.kernel: the Triton kernel pools with adaptive bins only"),
    (["tokens.counts=[90]", "tokens.probs=[1.0]"],
     "tokens.counts: 90 is not n*n; use e.g. 36, 49, 64"),
    (["tokens.counts=[4,16,81]"], "tokens.counts: 81 is 9x9 but n exceeds the vision grid side 8"),
    (["tokens.probs=[0.2,0.3,0.6]"], "must be >= 0 and sum to 1"),
    (["train.max_steps=ten"], "train.max_steps: expected int, got 'ten'"),
    (["data.train=/nonexistent/shards"], "data.train: shard /nonexistent/shards not found"),
    (["tokens.mode=sometimes"], "tokens.mode: 'sometimes' is not one of fixed, random"),
])
def test_bad_config_raises_one_line(cfg_file, override, message):
    with pytest.raises(ConfigError) as err:
        load_config(cfg_file, override)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_required_key(tmp_path, synth_dir):
    raw = yaml.safe_load(tiny_config_yaml(synth_dir, tmp_path / "o"))
    del raw["train"]["output_dir"]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="train.output_dir: required key is missing"):
        load_config(path)


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_cli_exits_2_with_one_line_before_ranks_start(cfg_file, nproc):
    result = run_tfx("train", str(cfg_file), "tokens.counts=[4,15,36]", "--nproc", nproc,
                     timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == ["ConfigError: tokens.counts: 15 is not n*n; use e.g. 9, 16, 25"]
    assert "deepspeed" not in result.stdout.lower()  # no launcher, no rank was started


def test_cli_bad_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {vision: [\n")
    result = run_tfx("train", str(bad), timeout=60)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("ConfigError:")


def recipe(tmp_path, synth_dir, stages) -> Path:
    raw = yaml.safe_load(tiny_config_yaml(synth_dir, tmp_path / "recipe"))
    raw["stages"] = stages
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_stages_inherit_and_chain(tmp_path, synth_dir):
    from tfx.config.load import load_recipe

    path = recipe(tmp_path, synth_dir, [
        {"name": "align", "train": {"freeze": "align", "max_steps": 4},
         "optim": {"lr": 2e-3}},
        {"name": "enhance", "train": {"freeze": "enhance"}, "tokens": {"mode": "all"}}])
    a, e = load_recipe(path, ["optim.llm_lr=7e-4", "stages.enhance.train.max_steps=9"])
    assert (a.name, a.cfg.train.freeze, a.cfg.train.max_steps, a.cfg.optim.lr) == \
        ("align", "align", 4, 2e-3)
    assert (e.cfg.train.freeze, e.cfg.train.max_steps, e.cfg.optim.lr) == ("enhance", 9, 1e-3)
    assert a.cfg.optim.llm_lr == e.cfg.optim.llm_lr == 7e-4  # a top-level override: inherited
    assert a.cfg.train.output_dir == str(tmp_path / "recipe" / "align")
    assert e.cfg.train.init_from == a.cfg.train.output_dir and a.cfg.train.init_from is None
    assert e.cfg.tokens.mode == "all" and a.cfg.tokens.mode == "random"


@pytest.mark.parametrize("stages, message", [
    ([{"name": "a", "optim": {"lr": "fast"}}], "stages[0] (a): optim.lr: expected float"),
    ([{"name": "a", "model": {"llm": {"hidden_size": 64}}}], "stages[0].model: every stage "
                                                              "trains the same model"),
    ([{"name": "a"}, {"name": "a"}], "stages[1].name: 'a' must be unique"),
    ([{"name": "a", "checkpoint": {"save_at_end": False}}, {"name": "b"}],
     "stages[0].checkpoint.save_at_end: stage a must save at its end"),
    ([{"name": "a", "train": {"stage": "align"}}], "stages[0] (a): train.stage: unknown key"),
])
def test_bad_stages_are_one_line(tmp_path, synth_dir, stages, message):
    from tfx.config.load import load_recipe

    with pytest.raises(ConfigError) as err:
        load_recipe(recipe(tmp_path, synth_dir, stages))
    assert message in str(err.value) and "\n" not in str(err.value)
