"""The auto visual-token budget (tfx.model.router, tfx.auto): the pooling residual is the
variance pooling throws away, consistency labels are "the answer at this N and every larger N is
the top N's", `tfx router train` + `tfx eval --auto` run the chosen operating point for real
and get what the simulation read off the outcome table, and an export's
`generate(..., num_visual_tokens="auto")` in a fresh process without tfx picks the same N and
gives the same answers as `tfx eval --auto`."""

import json

import pytest
import torch
import yaml

from tfx.auto.fit import (
    calibration_curve,
    fit_router,
    out_of_fold,
    pick_threshold,
    train_and_calibrate,
)
from tfx.auto.outcomes import Outcomes
from tfx.data.decode import SkipCounter
from tfx.data.pipeline import read_eval_samples
from tfx.errors import ConfigError
from tfx.model.router import Router, choose, pooling_residuals, upgrade_state
from tfx.train.load import load_model

from conftest import last_line, run_tfx, set_train, tiny_config_yaml


def test_pooling_residuals_are_the_within_bin_variance_share():
    torch.manual_seed(0)
    side = 6
    x = torch.randn(3, side * side, 5, dtype=torch.float64) + 2.0
    got = pooling_residuals(x, side, [1, 2, 4, 5, 6])
    grid = x.transpose(1, 2).reshape(3, 5, side, side)
    total = grid.var(dim=(2, 3), unbiased=False).sum(1)
    for k, n in enumerate([1, 2, 4, 5, 6]):  # 4 and 5: overlapping adaptive bins
        want = []
        for b in range(3):
            per_bin = []
            for i in range(n):
                for j in range(n):
                    r0, r1 = (i * side) // n, -((-(i + 1) * side) // n)
                    c0, c1 = (j * side) // n, -((-(j + 1) * side) // n)
                    cell = grid[b, :, r0:r1, c0:c1].reshape(5, -1)
                    per_bin.append(cell.var(dim=1, unbiased=False).sum())
            want.append(torch.stack(per_bin).mean() / total[b])
        torch.testing.assert_close(got[:, k].double(), torch.stack(want), atol=1e-5, rtol=0)
    assert torch.allclose(got[:, 0], torch.ones(3, dtype=got.dtype))  # 1x1 keeps no detail
    assert got[:, -1].abs().max() < 1e-5  # the full grid keeps all of it
    # a constant-per-2x2-block grid loses nothing at n = 3 (each bin is one block)
    block = torch.randn(1, 5, 3, 3).repeat_interleave(2, 2).repeat_interleave(2, 3)
    flat = block.reshape(1, 5, 36).transpose(1, 2)
    assert pooling_residuals(flat, side, [3])[0, 0] < 1e-5


def test_consistency_labels_and_the_choice():
    answers = [["a", "b", "b", "b"],  # settles at rung 1
               ["x", "x", "y", "x"],  # equal at rung 0 but not at rung 2: only the top
               ["c", "c", "c", "c"]]
    t = Outcomes([1, 4, 9, 16], ["k0", "k1", "k2"], ["cell"] * 3, [1, 2, 3], answers,
                 torch.zeros(3, 4, dtype=torch.bool), torch.zeros(3, 2))
    assert t.stable_SK().tolist() == [[False, True, True, True], [False, False, False, True],
                                      [True, True, True, True]]
    assert t.oracle_rung().tolist() == [1, 3, 0]
    q = torch.tensor([[0.2, 0.7, 0.9, 1.0], [0.1, 0.1, 0.3, 1.0]])
    assert choose(q, [1, 4, 9, 16], 0.5) == [4, 16]
    assert choose(q, [1, 4, 9, 16], 0.05) == [1, 1]
    router = Router(2, 4)
    out = router(torch.randn(50, 2))
    assert (out.diff(dim=1) >= 0).all() and (out[:, -1] == 1).all()  # monotone in N
    with torch.no_grad():  # saturated: still below the top rung, so tau = 1 is "always N_max"
        router.b2.fill_(50.0)
        sure = router.eval()(torch.randn(5, 2))
    assert choose(sure, [1, 4, 9, 16], 1.0) == [16] * 5
    assert choose(sure, [1, 4, 9, 16], 0.99) == [1] * 5


def test_correct_labels_ask_for_tokens_only_where_the_top_rung_is_right():
    hits = torch.tensor([[False, True, True, True],  # right from rung 1 up
                         [True, False, True, True],  # right at 0 by luck: only rung 2 up
                         [False, True, False, False],  # top wrong: nothing to lose anywhere
                         [False, False, False, True]])
    answers = [["a", "b", "b", "b"], ["x", "y", "x", "x"], ["c", "d", "e", "f"],
               ["g", "h", "i", "j"]]
    t = Outcomes([1, 4, 9, 16], ["k0", "k1", "k2", "k3"], ["cell"] * 4, [1] * 4, answers,
                 hits, torch.zeros(4, 2))
    assert t.correct_SK().tolist() == [[False, True, True, True], [False, False, True, True],
                                       [True, True, True, True], [False, False, False, True]]
    # consistency asks for the top rung on row 2, whose answer changes with N but is never right
    assert t.stable_SK()[2].tolist() == [False, False, False, True]
    assert torch.equal(t.labels_SK("consistency"), t.stable_SK())
    with pytest.raises(ConfigError, match="--labels 'any'"):
        t.labels_SK("any")


def noise_table(samples: int, seed: int) -> Outcomes:
    """Random features, and a rung-0 label that is a coin flip: nothing to learn, everything to
    memorise."""
    g = torch.Generator().manual_seed(seed)
    hits = torch.ones(samples, 3, dtype=torch.bool)
    hits[:, 0] = torch.rand(samples, generator=g) < 0.5
    return Outcomes([1, 4, 9], [f"k{seed}-{i}" for i in range(samples)], ["cell"] * samples,
                    [2] * samples, [["a", "a", "a"]] * samples, hits,
                    torch.randn(samples, 40, generator=g))


def test_out_of_fold_scores_come_from_routers_that_never_saw_the_sample():
    t = noise_table(200, 0)
    y = t.labels_SK("correct")[:, 0]
    router = fit_router(t)
    with torch.no_grad():
        seen = router(t.feats_SF)[:, 0] > 0.5
    unseen = out_of_fold(t)[:, 0] > 0.5
    assert (seen == y).float().mean() > 0.95  # fitted on the sample: it remembers the coin
    assert (unseen == y).float().mean() < 0.65  # not fitted on it: a guess


def test_outcome_rows_and_concat_keep_every_field_aligned():
    a, b = noise_table(5, 1), noise_table(3, 2)
    both = Outcomes.concat(a, b)
    assert both.keys == a.keys + b.keys and torch.equal(both.feats_SF[5:], b.feats_SF)
    picked = both.rows(torch.tensor([6, 0]))
    assert picked.keys == [b.keys[1], a.keys[0]]
    assert torch.equal(picked.hits_SK, torch.stack([b.hits_SK[1], a.hits_SK[0]]))
    assert torch.equal(picked.feats_SF[1], a.feats_SF[0])
    with pytest.raises(ConfigError, match="different ladders"):
        Outcomes.concat(a, Outcomes([1, 4], [], [], [], [], torch.zeros(0, 2, dtype=torch.bool),
                                    torch.zeros(0, 40)))


def test_crossfit_calibration_measures_the_threshold_on_both_splits():
    train, calib = noise_table(120, 3), noise_table(60, 4)
    _, split = train_and_calibrate(train, calib, calibrate="split")
    _, cross = train_and_calibrate(train, calib, calibrate="crossfit")
    assert (split["calib_samples"], split["train_samples"]) == (60, 120)
    assert (cross["calib_samples"], cross["train_samples"]) == (180, 180)
    assert cross["calibrate"] == "crossfit" and cross["folds"] == 5
    # a router fitted on noise: its in-sample scores would look sure; out of fold they do not,
    # so no cheap threshold keeps 99 % of the top rung's accuracy on the pooled questions
    assert cross["calib"]["point"]["tokens"] > 4
    with pytest.raises(ConfigError, match="--calibrate 'both'"):
        train_and_calibrate(train, calib, calibrate="both")


def test_a_confident_threshold_pays_for_the_doubt_the_estimate_ignores():
    hits = torch.ones(100, 2, dtype=torch.bool)
    hits[7, 0] = False  # N = 1 keeps exactly 99 % of N = 4's accuracy on these 100
    t = Outcomes([1, 4], [f"k{i}" for i in range(100)], ["cell"] * 100, [2] * 100,
                 [["a", "a"]] * 100, hits, torch.zeros(100, 1))
    q = torch.tensor([[0.9, 1.0]]).repeat(100, 1)  # every sample: N = 1 while tau <= 0.9
    estimate = pick_threshold(calibration_curve(q, t, keep=0.99))
    assert estimate["tokens"] == 1.0 and estimate["accuracy"] == pytest.approx(0.99)
    sure = pick_threshold(calibration_curve(q, t, keep=0.99, confidence=0.9))
    assert sure["tokens"] == 4.0 and sure["tau"] > 0.9  # one miss in 100 could be 2 in 100
    assert pick_threshold(calibration_curve(q, t, keep=1.0, confidence=0.9))["tokens"] == 4.0
    with pytest.raises(ConfigError, match="--confidence 1.0"):
        train_and_calibrate(t, t, confidence=1.0)


def test_the_accuracy_policy_buys_the_likeliest_right_rung_at_a_price():
    p = torch.tensor([[0.5, 0.6, 0.6, 0.61], [0.3, 0.3, 0.3, 0.3]])
    ladder = [1, 4, 9, 16]
    assert choose(p, ladder, 0.0, "accuracy") == [16, 1]  # equal chances: the cheapest
    assert choose(p, ladder, 0.01, "accuracy") == [16, 1]  # +0.01 is worth 12 more tokens
    assert choose(p, ladder, 0.1, "accuracy") == [4, 1]  # not at this price
    assert choose(p, ladder, 2.0, "accuracy") == [1, 1]
    router = Router(3, 4, policy="accuracy")
    out = router(torch.randn(20, 3))
    assert out.shape == (20, 4) and (out[:, -1] < 1).all()  # no rung is sure of being right
    with pytest.raises(ValueError, match="router policy 'cheapest'"):
        Router(3, 4, policy="cheapest")
    hits = torch.tensor([[False, True, True], [True, False, True]])
    t = Outcomes([1, 4, 9], ["a", "b"], ["cell"] * 2, [2, 2], [["x", "y", "y"], ["z", "z", "w"]],
                 hits, torch.zeros(2, 1))
    assert torch.equal(t.targets_SK("accuracy", "correct"), hits)
    assert t.targets_SK("accuracy", "consistency").tolist() == [[False, True, True],
                                                                [False, False, True]]
    assert t.targets_SK("sufficiency", "correct").tolist() == [[False, True], [False, False]]


def test_an_ensemble_router_averages_its_members_and_reads_a_single_mlp_file():
    torch.manual_seed(0)
    router = Router(3, 4, policy="accuracy", members=3).eval()
    x = torch.randn(7, 3)
    alone = []
    for m in range(3):  # each member on its own: one MLP in nn.Linear's layout
        h = torch.nn.functional.gelu(x @ router.w1[m].T + router.b1[m])
        alone.append(torch.sigmoid(h @ router.w2[m].T + router.b2[m]))
    assert torch.allclose(router(x), torch.stack(alone).mean(0), atol=1e-6)
    assert not torch.allclose(alone[0], alone[1])  # members start apart
    assert router.macs() == 3 * (3 * 32 + 32 * 4)
    with pytest.raises(ValueError, match="router members 0"):
        Router(3, 4, members=0)
    # a router.safetensors written before --members: one nn.Sequential under net.*
    old = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.GELU(), torch.nn.Dropout(0.1),
                              torch.nn.Linear(32, 3)).eval()
    state = {"shift": torch.zeros(3), "scale": torch.ones(3)} | {
        f"net.{k}": v for k, v in old.state_dict().items()}
    single = Router(3, 4)
    single.load_state_dict(upgrade_state(state))
    q = torch.sigmoid(old(x)).clamp_max(1 - 1e-6).cummax(dim=1).values
    assert torch.allclose(single.eval()(x)[:, :-1], q, atol=1e-6)


def test_ensemble_members_start_apart_and_refit_identically():
    """Members from their own initialisations end apart on noise; the same seed gives the same
    router (the export and `tfx eval --auto` must route alike)."""
    g = torch.Generator().manual_seed(3)
    hits = torch.rand(300, 3, generator=g) < torch.tensor([0.2, 0.5, 0.5])
    t = Outcomes([1, 4, 9], [f"n{i}" for i in range(300)], ["cell"] * 300, [2] * 300,
                 [["a"] * 3] * 300, hits, torch.randn(300, 8, generator=g))
    a, b = (fit_router(t, steps=30, seed=4, policy="accuracy", members=3) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values()))
    with torch.no_grad():
        p_MSK = torch.sigmoid(a.logits(t.feats_SF))
    assert (p_MSK[0] - p_MSK[1]).abs().mean() > 0.01
    assert torch.allclose(a(t.feats_SF), p_MSK.mean(0))


def test_shrink_keeps_the_choice_off_a_rung_that_is_worse_for_everyone():
    """N = 9 is right less often than N = 4 or 16 on every question and the features are noise:
    out of fold, an unshrunk router still buys it for some questions at price 0 (its noise);
    pulled 0.3 toward each rung's mean accuracy, it buys it for fewer."""
    g = torch.Generator().manual_seed(5)
    hits = torch.rand(800, 4, generator=g) < torch.tensor([0.2, 0.5, 0.3, 0.5])
    t = Outcomes([1, 4, 9, 16], [f"w{i}" for i in range(800)], ["cell"] * 800, [2] * 800,
                 [["a"] * 4] * 800, hits, torch.randn(800, 8, generator=g))
    bought = {}
    for shrink in (0.0, 0.3):
        q = out_of_fold(t, policy="accuracy", members=1, shrink=shrink)
        bought[shrink] = (torch.tensor(choose(q, t.ladder, 0.0, "accuracy")) == 9).float().mean()
    assert bought[0.3] < 0.5 * bought[0.0], bought
    router = fit_router(t, steps=20, policy="accuracy", members=2, shrink=0.3)
    assert torch.allclose(router.prior, hits.float().mean(0))
    with torch.no_grad():
        p = torch.sigmoid(router.logits(t.feats_SF)).mean(0)
    assert torch.allclose(router(t.feats_SF), 0.7 * p + 0.3 * router.prior)
    with pytest.raises(ValueError, match="router shrink 0.3"):
        Router(3, 4, policy="sufficiency", shrink=0.3)
    with pytest.raises(ConfigError, match="--shrink 0.3: the accuracy policy's"):
        train_and_calibrate(t, t, policy="sufficiency", shrink=0.3)


def test_the_budget_rule_spends_the_budget_instead_of_chasing_a_cheap_noise_peak():
    """A flat curve whose best point within 15 tokens is a cheap one by a hair: the rule takes
    the point spending the most within the budget (the more accurate of equal spends)."""
    curve = [{"tau": 0.3, "accuracy": 0.500, "tokens": 5.0},
             {"tau": 0.1, "accuracy": 0.497, "tokens": 10.0},
             {"tau": 0.05, "accuracy": 0.498, "tokens": 14.0},
             {"tau": 0.04, "accuracy": 0.499, "tokens": 14.0},
             {"tau": 0.0, "accuracy": 0.510, "tokens": 30.0}]
    assert pick_threshold(curve, 15.0)["tau"] == 0.04
    assert pick_threshold(curve, 4.0) is None


def two_kinds_table(samples: int, seed: int) -> Outcomes:
    """Feature 0 says which half a sample is in: easy ones are right at every rung, hard ones
    only at the top. The best policy: N = 1 for easy, N = 9 for hard (5 tokens, accuracy 1)."""
    g = torch.Generator().manual_seed(seed)
    easy = torch.rand(samples, generator=g) < 0.5
    hits = torch.ones(samples, 3, dtype=torch.bool)
    hits[:, :2] = easy[:, None]
    feats = torch.randn(samples, 4, generator=g)
    feats[:, 0] = easy.float() * 2 - 1
    return Outcomes([1, 4, 9], [f"k{seed}-{i}" for i in range(samples)], ["cell"] * samples,
                    [2] * samples, [["a", "a", "a"]] * samples, hits, feats)


@pytest.mark.parametrize("policy", ["sufficiency", "accuracy"])
def test_both_policies_learn_who_needs_tokens_and_the_budget_rule_spends_within_it(policy):
    train, calib = two_kinds_table(300, 5), two_kinds_table(200, 6)
    _, meta = train_and_calibrate(train, calib, policy=policy)
    point = meta["calib"]["point"]
    assert meta["policy"] == policy and meta["budget"] is None
    assert point["accuracy"] >= 0.99 and point["tokens"] < 5.5  # fixed N = 9: 9 tokens
    served, within = train_and_calibrate(train, calib, policy=policy, budget=0.6)
    assert within["budget"] == 0.6 and within["calib"]["point"]["served_tokens"] <= 5.4
    pool = Outcomes.concat(train, calib)  # crossfit: both splits are scored
    with torch.no_grad():
        spent = choose(served(pool.feats_SF), pool.ladder, within["tau"], policy)
    assert sum(spent) / len(spent) == pytest.approx(within["calib"]["point"]["served_tokens"])
    # the budget rule takes the point of the curve at which the served router spends the most
    # within 5.4 tokens
    curve = [p for p in within["calib"]["curve"] if p["served_tokens"] <= 5.4]
    assert within["calib"]["point"]["served_tokens"] == max(p["served_tokens"] for p in curve)
    assert within["calib"]["point"]["accuracy"] >= 0.99
    # 4.5 tokens cannot reach every hard sample: the accuracy policy trades some of them away
    # at a higher price; the confident sufficiency router sends them all to N = 9 at any tau,
    # and then the cheapest point it has stands (with a warning), not the top rung
    _, tight = train_and_calibrate(train, calib, policy=policy, budget=0.5)
    point, curve = tight["calib"]["point"], tight["calib"]["curve"]
    if policy == "accuracy":
        assert point["served_tokens"] <= 4.5 and point["accuracy"] < 0.99
    else:
        assert point["served_tokens"] == min(p["served_tokens"] for p in curve) < 9
    with pytest.raises(ConfigError, match="--budget 0"):
        train_and_calibrate(train, calib, budget=0.0)
    with pytest.raises(ConfigError, match="--policy 'price'"):
        train_and_calibrate(train, calib, policy="price")


@pytest.fixture(scope="module")
def routed(synth_dir, tmp_path_factory):
    """A tiny flex run, its router, `tfx eval --auto`, and its export. Trained briefly (40
    steps): its answers still depend on N, so the router's choices differ between samples
    (longer, it collapses onto the majority answer, the same at every N)."""
    folder = tmp_path_factory.mktemp("auto")
    raw = yaml.safe_load(tiny_config_yaml(synth_dir, folder / "run"))
    set_train(raw, max_steps=40, save_every=0, trace_samples=False)
    (folder / "run.yaml").write_text(yaml.safe_dump(raw))
    run = folder / "run"
    result = run_tfx("train", str(folder / "run.yaml"), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    missing = run_tfx("eval", str(run), "--auto", timeout=120)
    assert missing.returncode == 2 and "tfx router train" in last_line(missing)
    # consistency labels: this barely trained model is wrong at every N on most samples, so
    # the default correctness labels would send all of them to N = 1, and the export checks
    # below need a router that picks several N
    result = run_tfx("router", "train", str(run), "--router-data", str(synth_dir / "train"),
                     "--calib-data", str(synth_dir / "eval"), "--labels", "consistency",
                     timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "router for N in [1, 4, 9, 16, 25, 36]" in result.stdout
    meta = json.loads((run / "router" / "router.json").read_text())
    assert meta["labels"] == "consistency" and meta["calibrate"] == "crossfit"
    counts = [len(torch.load(run / "router" / f"outcomes-{split}.pt")["table"]["keys"])
              for split in ("router", "calib")]
    assert meta["calib_samples"] == sum(counts)  # the threshold saw both splits' questions
    ev = run_tfx("eval", str(run), "--auto", timeout=300)
    assert ev.returncode == 0, ev.stderr[-2000:]
    out = folder / "export"
    conv = run_tfx("convert", str(run), str(out), "--check", timeout=300)
    assert conv.returncode == 0, conv.stderr[-2000:]  # the router's weights count too
    assert "parity passed" in conv.stdout
    card = (out / "README.md").read_text()  # the model card says how auto works here
    assert "## Automatic N (router)" in card and "[1, 4, 9, 16, 25, 36]" in card
    assert 'num_visual_tokens="auto"' in card
    return run, out, ev.stdout


def test_eval_auto_runs_the_operating_point_as_simulated(routed):
    run, _, stdout = routed
    report = json.loads((run / "eval-auto" / "auto.json").read_text())
    meta = json.loads((run / "router" / "router.json").read_text())
    assert report["tau"] == meta["tau"] and report["ladder"] == [1, 4, 9, 16, 25, 36]
    op, live = report["operating_point"], report["live"]
    assert live["accuracy"] == pytest.approx(op["accuracy"])
    assert live["tokens"] == pytest.approx(op["tokens"])
    per = report["per_sample"]
    assert len(per) == report["samples"] == 64
    assert live["tokens"] == pytest.approx(sum(v["n"] for v in per.values()) / len(per))
    assert report["oracle"]["accuracy"] == pytest.approx(report["fixed"][-1]["accuracy"])
    assert report["oracle"]["tokens"] <= 36
    assert {p["tau"] for p in report["router"]} >= {0.5, 0.9}
    assert 0 < report["cost"]["router_s_per_image"] and report["cost"]["router_mlp_macs"] > 0
    assert "consistency oracle" in stdout and (run / "eval-auto" / "auto.png").is_file()
    for kind in report["by_type"].values():
        assert 0 <= kind["accuracy"] <= 1 and kind["samples"] > 0


def test_router_reliability_measures_the_rule_on_halves_it_did_not_pick_on(routed, tmp_path):
    run, _, _ = routed
    result = run_tfx("router", "reliability", str(run), "--halves", "20",
                     "--confidence", "0.5,0.95", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((run / "router" / "reliability.json").read_text())
    low, high = report["rows"]
    assert (low["confidence"], high["confidence"]) == (0.5, 0.95) and report["halves"] == 20
    for r in report["rows"]:
        assert 0 <= r["kept_within_goal"] <= r["kept"] <= 1 and 0 < r["token_share"] <= 1
    assert high["token_share"] >= low["token_share"]  # surer costs tokens, never saves them
    assert "| confidence 0.95 |" in result.stdout and "20 halves" in result.stdout
    empty = tmp_path / "no-router"
    empty.mkdir()
    missing = run_tfx("router", "reliability", str(empty), timeout=60)
    assert missing.returncode == 2 and "tfx router train" in last_line(missing)
    bad = run_tfx("router", "reliability", str(run), "--confidence", "0.5,x", timeout=60)
    assert bad.returncode == 2 and "--confidence '0.5,x'" in last_line(bad)


def test_router_train_again_keeps_the_previous_router(routed, synth_dir):
    run, _, _ = routed
    before = (run / "router" / "router.json").read_text()
    result = run_tfx("router", "train", str(run), "--router-data", str(synth_dir / "eval"),
                     "--calib-data", str(synth_dir / "eval"), "--ladder", "4,16,36",
                     timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    kept = list((run / "router" / "history").glob("*/router.json"))
    assert len(kept) == 1 and kept[0].read_text() == before
    assert json.loads((run / "router" / "router.json").read_text())["ladder"] == [4, 16, 36]
    # put the first router back for the other tests of this module
    for name in ("router.json", "router.safetensors"):
        (kept[0].parent / name).replace(run / "router" / name)
    kept[0].parent.rmdir()


def test_export_auto_in_a_fresh_process_matches_eval_auto(routed, tmp_path):
    run, out, _ = routed
    config = json.loads((out / "config.json").read_text())
    assert config["router"]["ladder"] == [1, 4, 9, 16, 25, 36]
    assert (out / "router.py").is_file()
    report = json.loads((run / "eval-auto" / "auto.json").read_text())
    result = run_tfx("router", "check", str(out), str(run), "--samples", "12", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = sorted({v["n"] for v in report["per_sample"].values()})
    assert len(counts) >= 2, f"the router chose one N for every sample: {counts}"
    assert (f"12 samples (chosen N {counts}) in a fresh transformers process without tfx: "
            f"N equal for 12, answers equal for 12") in result.stdout
    # the same through the command line, on one sample of the eval set
    loaded = load_model(run)
    s = read_eval_samples(loaded.cfg.data.eval, loaded.cfg, loaded.tok,
                          SkipCounter(10, False))[0]
    from PIL import Image

    path = tmp_path / "one.png"
    Image.fromarray(s.pixels[0].permute(1, 2, 0).numpy()).save(path)
    question = s.meta["conversations"][0]["value"].replace("<image>\n", "")
    cli = run_tfx("generate", "--model", str(out), "--image", str(path), "--prompt", question,
                  "--visual-tokens", "auto", "--max-new-tokens", "8", timeout=120)
    assert cli.returncode == 0, cli.stderr[-2000:]
    want = report["per_sample"][s.key]
    assert f"N=auto | (chose N={want['n']}) {want['answer']}".strip() in cli.stdout


def test_router_check_catches_a_different_router(routed, tmp_path):
    """A router whose threshold differs from the one eval --auto ran: the check fails."""
    run, out, _ = routed
    import shutil

    other = tmp_path / "other"
    shutil.copytree(out, other)
    config = json.loads((other / "config.json").read_text())
    config["router"]["tau"] = 1.0  # always the top rung
    (other / "config.json").write_text(json.dumps(config))
    result = run_tfx("router", "check", str(other), str(run), "--samples", "8", timeout=300)
    assert result.returncode == 2
    assert "AutoMismatch" in last_line(result)


def test_accuracy_policy_within_a_budget_serves_the_same_in_the_export(routed, synth_dir,
                                                                     tmp_path):
    """`--policy accuracy --budget`: router train, eval --auto, convert and the export's
    "auto" in a fresh process, on a copy of the routed run (its outcome tables are reused)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(routed[0], run)
    result = run_tfx("router", "train", str(run), "--router-data", str(synth_dir / "train"),
                     "--calib-data", str(synth_dir / "eval"), "--labels", "consistency",
                     "--policy", "accuracy", "--budget", "0.5", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "accuracy router for N in [1, 4, 9, 16, 25, 36]: price" in result.stdout
    meta = json.loads((run / "router" / "router.json").read_text())
    assert (meta["policy"], meta["budget"]) == ("accuracy", 0.5)
    assert meta["calib"]["point"]["served_tokens"] <= 18
    assert (meta["members"], meta["shrink"]) == (5, 0.3)  # the accuracy policy's defaults
    ev = run_tfx("eval", str(run), "--auto", "--out", str(tmp_path / "auto-b50"), timeout=300)
    assert ev.returncode == 0, ev.stderr[-2000:]
    report = json.loads((tmp_path / "auto-b50" / "auto.json").read_text())
    assert (report["policy"], report["knob"], report["tau"]) == ("accuracy", "price", meta["tau"])
    assert report["live"]["accuracy"] == pytest.approx(report["operating_point"]["accuracy"])
    assert report["live"]["tokens"] == pytest.approx(report["operating_point"]["tokens"])
    assert "router, price = 0 |" in ev.stdout
    assert "most spent within 50 % of the tokens" in ev.stdout
    out = tmp_path / "export"
    conv = run_tfx("convert", str(run), str(out), "--check", timeout=300)
    assert conv.returncode == 0, conv.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())
    assert (config["router"]["policy"], config["router"]["budget"]) == ("accuracy", 0.5)
    assert (config["router"]["members"], config["router"]["shrink"]) == (5, 0.3)
    card = (out / "README.md").read_text()
    assert "less price x N / 36" in card and "the mean of 5 small MLPs" in card
    nowhere = run_tfx("router", "check", str(out), str(run), "--report", str(tmp_path / "no"),
                      timeout=120)
    assert nowhere.returncode == 2 and "--out" in last_line(nowhere)
    # eval --auto wrote its record with --out: --report points the check at it
    check = run_tfx("router", "check", str(out), str(run), "--samples", "12", "--report",
                    str(tmp_path / "auto-b50"), timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    assert "N equal for 12, answers equal for 12" in check.stdout


def test_auto_without_a_router_is_a_clear_error(two_rank_run, tmp_path):
    _, run = two_rank_run
    out = tmp_path / "plain"
    assert run_tfx("convert", str(run), str(out), timeout=180).returncode == 0
    assert "Automatic N" not in (out / "README.md").read_text()
    png = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(png)
    result = run_tfx("generate", "--model", str(out), "--image", str(png), "--prompt", "hi",
                     "--visual-tokens", "auto", timeout=120)
    assert result.returncode == 2
    assert "has no router" in last_line(result)


def test_residual_features_do_not_depend_on_the_batch():
    """The export routes one image at a time and tfx eval a batch: same features."""
    torch.manual_seed(1)
    x = torch.randn(8, 36, 16)
    whole = pooling_residuals(x, 6, [1, 2, 3, 4, 5, 6])
    alone = torch.cat([pooling_residuals(x[i:i + 1], 6, [1, 2, 3, 4, 5, 6]) for i in range(8)])
    torch.testing.assert_close(whole, alone, atol=1e-6, rtol=0)


def test_router_choice_is_stable_under_rounding_noise():
    """The exported model routes one image at a time and tfx eval a batch, so their tower
    outputs differ by rounding (~1e-6). The router's features must not amplify that: the two
    rungs whose residual is the same for every image (1 x 1 and the full grid) are left out,
    and no feature is scaled up by more than 1e3 when standardised."""
    from tfx.auto.fit import fit_router
    from tfx.model.router import router_features

    torch.manual_seed(0)
    grids = torch.rand(200, 36, 8) * 3
    q = torch.randn(200, 4)
    feats = router_features(grids, 6, [1, 2, 3, 4, 5, 6], q)
    # residuals at n = 2..5 only, then the question; not the grid's mean and std, whose
    # 2 x tower-width inputs let the router memorise its labels
    assert feats.shape == (200, 4 + 4)
    answers = [["a" if (i + k) % 3 else "b" for k in range(5)] + ["a"] for i in range(200)]
    table = Outcomes([1, 4, 9, 16, 25, 36], [str(i) for i in range(200)], ["cell"] * 200,
                     [0] * 200, answers, torch.zeros(200, 6, dtype=torch.bool), feats)
    router = fit_router(table)
    noisy = router_features(grids + 1e-6 * torch.randn_like(grids), 6, [1, 2, 3, 4, 5, 6], q)
    with torch.no_grad():
        assert (router(noisy) - router(feats)).abs().max() < 1e-3
