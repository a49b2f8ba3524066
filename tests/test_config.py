"""Config loading: overrides, types, and one-line exit-2 errors before any rank starts."""

import pytest
import yaml
from conftest import run_tfx, tiny_config_yaml

from tfx.config.load import load_config
from tfx.errors import ConfigError


@pytest.fixture
def cfg_file(tmp_path, synth_dir):
    path = tmp_path / "run.yaml"
    path.write_text(tiny_config_yaml(synth_dir, tmp_path / "out"))
    return path


def test_overrides_are_typed(cfg_file):
    cfg = load_config(cfg_file, ["train.lr=3e-4", "tokens.counts=[16,36]",
                                 "tokens.probs=[0.5,0.5]", "train.max_steps=7"])
    assert cfg.train.lr == 3e-4 and cfg.tokens.counts == (16, 36) and cfg.train.max_steps == 7


@pytest.mark.parametrize("override, message", [
    (["train.lrr=1"], "train.lrr: unknown key; did you mean train.lr?"),
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
