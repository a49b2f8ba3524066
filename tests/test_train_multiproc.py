"""Two DeepSpeed ranks under ZeRO-3 on CPU: sharding, checkpoint, exact resume, eval."""

import json
import shutil

import pytest
import yaml

from tfx.config.schema import TokensConfig
from tfx.data.schedule import TokenSchedule

from conftest import run_tfx

pytestmark = pytest.mark.multiproc


def read_trace(run, rank):
    lines = (run / "trace" / f"rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads,
                                                (run / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture
def trained(two_rank_run):
    return two_rank_run


def test_zero3_shards_parameters(trained):
    _, run = trained
    for rank in (0, 1):
        table = json.loads((run / f"params_rank{rank}.json").read_text())
        for part, row in table.items():
            assert row["on_rank"] < row["params"], (part, row)  # really partitioned
            assert abs(row["on_rank"] / row["params"] - 0.5) < 0.01


def test_no_shared_memory_left_behind(trained):
    """DeepSpeed's CPU all-reduce makes a 66 MB /dev/shm segment per rank and never removes
    it: every run used to leave them, until /dev/shm filled the RAM."""
    from tfx.train.dist import shm_segments

    _, run = trained
    port = (run.parent / "master_port").read_text()
    assert shm_segments(port) == []


def test_ranks_feed_the_scheduled_n_and_read_disjoint_samples(trained):
    """The <IMG_CONTEXT> ids counted in each rank's batches (not the loop's own N) follow the
    schedule, identical on both ranks."""
    _, run = trained
    t0, t1 = read_trace(run, 0), read_trace(run, 1)
    schedule = TokenSchedule(TokensConfig(mode="random", counts=(4, 16, 36),
                                          probs=(0.2, 0.3, 0.5), seed=3))
    expected = [schedule.n_at(s) for s in range(6)]
    assert len(set(expected)) > 1
    for trace in (t0, t1):
        assert [r["step"] for r in trace] == list(range(6))
        for row, n in zip(trace, expected):
            assert len(row["context_tokens"]) == len(row["keys"]) == 4
            assert set(row["context_tokens"]) == {n}  # every row of the synth set has an image
    assert not {k for r in t0 for k in r["keys"]} & {k for r in t1 for k in r["keys"]}
    assert not list(run.glob("rank*.pid"))  # removed when the ranks exited


def test_resume_continues_at_the_right_step_n_and_samples(trained, tmp_path):
    cfg, run = trained
    before = {r: read_trace(run, r) for r in (0, 1)}
    loss_before = losses(run)
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000003", "step_0000006"]
    # Lose the last checkpoint: --resume must pick step 3 and redo steps 3..5 identically.
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000006")
    shutil.rmtree(resumed / "trace")
    (resumed / "metrics.jsonl").unlink()
    result = run_tfx("train", str(cfg), f"train.output_dir={resumed}", "--nproc", "2",
                     "--resume", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step_0000003 at step 3" in result.stderr
    for r in (0, 1):
        after = read_trace(resumed, r)
        assert [a["step"] for a in after] == [3, 4, 5]
        assert after == before[r][3:]  # same N and the same sample keys in the same order
    loss_after = losses(resumed)
    for step in (4, 5, 6):
        assert loss_after[step] == pytest.approx(loss_before[step], rel=1e-5, abs=1e-6)


def test_eval_reports_every_count(trained, tmp_path):
    _, run = trained
    result = run_tfx("eval", str(run), "--counts", "1,4,9,16,64", "--out", str(tmp_path),
                     timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert sorted(map(int, report["results"])) == [1, 4, 9, 16, 64]
    assert report["samples"] == 64
    assert all(0.0 <= r["all"] <= 1.0 for r in report["results"].values())
    assert (tmp_path / "eval.png").stat().st_size > 5000
    assert "|    64 |      no |" in result.stdout


def test_eval_rejects_bad_count(trained):
    _, run = trained
    result = run_tfx("eval", str(run), "--counts", "4,80", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("ConfigError: --counts: 80")


def test_eval_every_checkpoint_draws_the_learning_curve(trained, tmp_path):
    _, run = trained
    result = run_tfx("eval", str(run), "--counts", "4,16", "--every-checkpoint", "--chance",
                     "0.2", "--out", str(tmp_path / "curve"), timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    curve = json.loads((tmp_path / "curve" / "curve.json").read_text())
    assert [p["step"] for p in curve["points"]] == [3, 6] and curve["chance"] == 0.2
    assert (tmp_path / "curve" / "curve.png").stat().st_size > 5000
    # the last point is the plain eval of the latest checkpoint
    single = run_tfx("eval", str(run), "--counts", "4,16", "--out", str(tmp_path / "one"),
                     timeout=120)
    assert single.returncode == 0, single.stderr[-2000:]
    last = json.loads((tmp_path / "one" / "eval.json").read_text())["results"]
    assert curve["points"][-1]["results"] == last


def test_eval_every_checkpoint_needs_checkpoints(tmp_path):
    result = run_tfx("eval", str(tmp_path), "--counts", "4", "--every-checkpoint", timeout=60)
    assert result.returncode == 2
    assert "no complete checkpoint under checkpoints/" in result.stderr.strip().splitlines()[-1]


def test_eval_on_two_ranks_equals_one_process(trained, tmp_path):
    _, run = trained
    outs = {}
    for nproc in ("1", "2"):
        result = run_tfx("eval", str(run), "--counts", "4,16,36", "--batch-size", "8", "--out",
                         str(tmp_path / nproc), "--nproc", nproc, timeout=180)
        assert result.returncode == 0, result.stderr[-3000:]
        outs[nproc] = (json.loads((tmp_path / nproc / "eval.json").read_text()), result.stdout)
    (one, one_out), (two, two_out) = outs["1"], outs["2"]
    assert (one["ranks"], two["ranks"]) == (1, 2)
    assert one["results"] == two["results"] and one["per_sample"] == two["per_sample"]
    assert len(two["per_sample"]["4"]) == 64
    assert one_out.splitlines()[:5] == two_out.splitlines()[:5]  # the same table


def test_eval_and_generate_take_device_and_dtype(trained, tmp_path):
    import webdataset as wds

    cfg, run = trained
    result = run_tfx("eval", str(run), "--counts", "16", "--device", "cpu", "--dtype", "bf16",
                     "--out", str(tmp_path), timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert (report["device"], report["dtype"]) == ("cpu", "bf16")
    eval_dir = yaml.safe_load(cfg.read_text())["data"]["eval"]
    sample = next(iter(wds.WebDataset(f"{eval_dir}/eval-00000.tar", shardshuffle=False)))
    image = tmp_path / "q.png"
    image.write_bytes(sample["png"])
    gen = run_tfx("generate", "--model", str(run), "--image", str(image), "--prompt",
                  "What color is the marked cell?", "--visual-tokens", "16", "--device", "cpu",
                  "--dtype", "bf16", "--max-new-tokens", "3", timeout=180)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.startswith("N=16 | ")
    bad = run_tfx("eval", str(run), "--counts", "16", "--dtype", "fp8", timeout=120)
    assert bad.returncode == 2 and "--dtype 'fp8': use fp32 or bf16" in bad.stderr
