"""`tfx router train RUN`: the auto-budget router, trained on the flex model's own answers.

Data flow position: checkpoint -> outcome tables of the `router` and `calib` splits
(`tfx.auto.outcomes`) -> **router fit (router split) -> threshold (calib split)** -> router/
beside the run's checkpoints: `router.safetensors` (weights) and `router.json` (ladder,
threshold, features, the calibration curve). Labels come from the model's own answers at each
rung: by default "N_k suffices" when no rung from N_k up is wrong where the top rung is right
(`--labels correct`, from the router split's answer key); `--labels consistency` needs no
answer key: the answer at N_k and at every larger rung equals the top rung's. The threshold is the
cheapest one whose calibration accuracy keeps `keep` (default 99%) of the top rung's. By default
(`--calibrate crossfit`) that accuracy is measured on the router and calib splits pooled, each
sample scored by a router fitted without it (`FOLDS` folds), and the router served is then
fitted on all of them; `--calibrate split` fits on the router split and measures on calib only
(a third of the questions: the threshold it picks is noisier). `--confidence c` asks that a
one-sided c lower bound of the kept share clear `keep`, not just its estimate (0.5, default).
`--budget s` is the other rule: the calibration point spending the most, at most s of the top
rung's tokens (more tokens are worth more in expectation; the most accurate point there chased
noise where the curve is flat). `--policy accuracy` (`tfx.model.router`) learns P(right at
N_k) at every rung instead of "N_k suffices", and its knob is a price per token, not a
threshold: the same calibration rules pick it (points and router.json call either knob "tau").
The router is `--members` MLPs from different initialisations, averaged; the accuracy
policy's probabilities are pulled `--shrink` of the way toward each rung's mean (`Router`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import NormalDist

import torch
import torch.nn.functional as F

from tfx.auto.outcomes import (
    LABELS,
    Outcomes,
    build_outcomes,
    cached_outcomes,
    check_labels,
    default_ladder,
    parse_ladder,
    table_key,
)
from tfx.errors import ConfigError
from tfx.log import get_logger
from tfx.model.router import POLICIES, Router, choose_index, upgrade_state

log = get_logger(__name__)
TAUS = [round(0.02 * i, 2) for i in range(1, 50)] + [0.99, 0.995, 0.999, 0.9995, 0.9999]
# the accuracy policy's prices of the whole grid: 0 (the likeliest-right rung), 1e-3 .. 1.02 in
# steps of x1.2, and 2 (always the cheapest rung)
PRICES = [0.0] + [round(1e-3 * 1.2 ** i, 6) for i in range(39)] + [2.0]
KNOBS = {"sufficiency": TAUS, "accuracy": PRICES}
CALIBRATE = ("crossfit", "split")  # how the threshold is measured; the first is the default
FOLDS = 5
MEMBERS = 5  # MLPs averaged in one router (`Router`)
SHRINK = 0.3  # the accuracy policy's pull toward each rung's mean accuracy (`Router`)


def check_calibrate(kind: str) -> None:
    if kind not in CALIBRATE:
        raise ConfigError(f"--calibrate {kind!r}: one of {', '.join(CALIBRATE)}")


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ConfigError(f"--policy {policy!r}: one of {', '.join(POLICIES)}")


def knob_name(policy: str) -> str:
    return "tau" if policy == "sufficiency" else "price"


def check_budget(budget: float | None) -> None:
    if budget is not None and not 0 < budget <= 1:
        raise ConfigError(f"--budget {budget}: a share of the top rung's tokens in (0, 1]")


def check_confidence(confidence: float) -> None:
    if not 0.5 <= confidence < 1:
        raise ConfigError(f"--confidence {confidence}: in [0.5, 1) (0.5: the point estimate)")


def check_members(members: int) -> None:
    if members < 1:
        raise ConfigError(f"--members {members}: at least 1")


def check_shrink(shrink: float, policy: str) -> None:
    if not 0 <= shrink < 1:
        raise ConfigError(f"--shrink {shrink}: in [0, 1)")
    if shrink and policy != "accuracy":
        raise ConfigError(f"--shrink {shrink}: the accuracy policy's (give --shrink 0 with "
                          f"--policy {policy})")


def default_shrink(shrink: float | None, policy: str) -> float:
    """`shrink` as given, else SHRINK for the accuracy policy and 0 for sufficiency."""
    return (SHRINK if policy == "accuracy" else 0.0) if shrink is None else shrink


def fit_router(table: Outcomes, hidden: int = 32, steps: int = 300, lr: float = 3e-3,
               weight_decay: float = 1e-2, seed: int = 0,
               labels: str = LABELS[0], policy: str = POLICIES[0],
               members: int = MEMBERS, shrink: float = 0.0) -> Router:
    """BCE per rung on the table's targets for `policy` and `labels` (`Outcomes.targets_SK`),
    every member on all of them from its own initialisation and dropout (bootstraps were
    tried: members on fewer samples each vary more, and their mean did worse out of fold);
    features standardised on the training set; the prior `shrink` pulls toward is the
    training set's mean target per rung."""
    torch.manual_seed(seed)
    x = table.feats_SF.float()
    y = table.targets_SK(policy, labels).float()
    router = Router(x.shape[1], len(table.ladder), hidden, policy, members, shrink)
    router.prior.copy_(y.mean(0))
    router.shift.copy_(x.mean(0))
    router.scale.copy_(x.std(0).clamp_min(1e-3))  # a near-constant feature stays near 0
    opt = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=weight_decay)
    router.train()
    for step in range(steps):
        loss = F.binary_cross_entropy_with_logits(router.logits(x), y.expand(members, -1, -1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    log.info(f"router fit: {members} x {steps} full-batch steps, final BCE {loss.item():.4f} "
             f"on {len(x)} samples")
    return router.eval()


def policy_point(table: Outcomes, choices: list[int]) -> dict:
    """Accuracy and mean visual tokens when each sample runs once at its chosen N."""
    index = {n: k for k, n in enumerate(table.ladder)}
    picked = torch.tensor([index[n] for n in choices])
    hits = table.hits_SK[torch.arange(len(choices)), picked]
    return {"accuracy": hits.float().mean().item(), "tokens": sum(choices) / len(choices)}


def calibration_curve(q_SK: torch.Tensor, table: Outcomes, keep: float | None = None,
                      confidence: float = 0.5, policy: str = POLICIES[0]) -> list[dict]:
    """The policy point (accuracy, mean tokens) at every knob of KNOBS[policy] (stored as
    "tau"), for per-sample router scores `q_SK`. Given `keep`, each point also has `bound`: a
    one-sided `confidence` lower bound on (accuracy - keep x the top rung's accuracy), from the
    paired per-sample difference (its mean less z standard errors; z = 0 at confidence 0.5, the
    point estimate). A point keeps `keep` when its bound is >= 0."""
    z = NormalDist().inv_cdf(confidence)
    top_S = table.hits_SK[:, -1].double()
    ladder_K = torch.tensor(table.ladder, dtype=torch.float64)
    rows_S = torch.arange(len(top_S))
    out = []
    for tau in KNOBS[policy]:
        k_S = choose_index(q_SK, tau, table.ladder, policy)
        hit_S = table.hits_SK[rows_S, k_S].double()
        point = {"tau": tau, "accuracy": hit_S.mean().item(),
                 "tokens": ladder_K[k_S].mean().item()}
        if keep is not None:
            d = hit_S - keep * top_S
            se = d.std().item() / math.sqrt(len(d)) if len(d) > 1 else 0.0
            point["bound"] = d.mean().item() - z * se
        out.append(point)
    return out


@torch.no_grad()
def threshold_curve(router: Router, table: Outcomes) -> list[dict]:
    return calibration_curve(router(table.feats_SF), table, policy=router.policy)


def out_of_fold(table: Outcomes, folds: int = FOLDS, hidden: int = 32, seed: int = 0,
                labels: str = LABELS[0], policy: str = POLICIES[0],
                members: int = MEMBERS, shrink: float = 0.0) -> torch.Tensor:
    """(S, K) every sample's q from a router fitted on the other folds (a random split into
    `folds` parts): scores as unseen as a held-out split's, for all S samples."""
    order = torch.randperm(len(table.keys), generator=torch.Generator().manual_seed(seed))
    parts = [order[f::folds] for f in range(folds)]
    q_SK = torch.empty(len(table.keys), len(table.ladder))
    for f, held in enumerate(parts):
        rest = torch.cat([p for g, p in enumerate(parts) if g != f])
        router = fit_router(table.rows(rest), hidden=hidden, seed=seed + 1 + f, labels=labels,
                            policy=policy, members=members, shrink=shrink)
        with torch.no_grad():
            q_SK[held] = router(table.feats_SF[held])
    return q_SK


def pick_threshold(curve: list[dict], budget_tokens: float | None = None,
                   spend: str = "tokens") -> dict | None:
    """The cheapest point of a `calibration_curve` that keeps its share (bound >= 0), or, given
    `budget_tokens`, the point spending the most within that many by its `spend` entry (the more
    accurate of equals): on calibration halves of five models this kept 99 % as often or more
    often than taking the most accurate point within the budget, which is often a cheap one by a
    question or two of noise (docs/results/auto-budget.md). None when no point qualifies."""
    if budget_tokens is not None:
        ok = [p for p in curve if p[spend] <= budget_tokens + 1e-9]
        return max(ok, key=lambda p: (p[spend], p["accuracy"])) if ok else None
    ok = [p for p in curve if p["bound"] >= -1e-12]  # float dust at an exact tie
    return min(ok, key=lambda p: (p["tokens"], -p["accuracy"])) if ok else None


def operating_point(curve: list[dict], policy: str, budget_tokens: float | None = None,
                    spend: str = "tokens") -> dict | None:
    """`pick_threshold`, with the fallbacks `router train` uses where no point qualifies: within
    a budget, the cheapest point (a confident router's curve can stop short of it); for the
    accuracy policy, price 0 (the most it spends); for sufficiency None, meaning tau 1 (always
    the top rung)."""
    point = pick_threshold(curve, budget_tokens, spend)
    if point is None and budget_tokens is not None:
        return min(curve, key=lambda p: (p[spend], -p["accuracy"]))
    if point is None and policy != "sufficiency":
        return curve[0]
    return point


def save_router(router: Router, folder: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "router.json").is_file():  # never overwritten: the old one moves aside
        import time

        old = folder / "history" / time.strftime(
            "%Y%m%d-%H%M%S", time.localtime((folder / "router.json").stat().st_mtime))
        old.mkdir(parents=True, exist_ok=True)
        for name in ("router.json", "router.safetensors"):
            if (folder / name).is_file():
                (folder / name).replace(old / name)
        log.info(f"kept the previous router in {old}")
    tmp = folder / "router.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in router.state_dict().items()}, str(tmp))
    tmp.replace(folder / "router.safetensors")
    (folder / "router.json.tmp").write_text(json.dumps(meta, indent=2))
    (folder / "router.json.tmp").replace(folder / "router.json")


def load_router(folder: Path) -> tuple[Router, dict]:
    from safetensors.torch import load_file

    meta = json.loads((folder / "router.json").read_text())
    router = Router(meta["in_dim"], len(meta["ladder"]), meta["hidden"],
                    meta.get("policy", POLICIES[0]),  # routers before --policy: sufficiency
                    meta.get("members", 1), meta.get("shrink", 0.0))  # before: 1 MLP, 0
    router.load_state_dict(upgrade_state(load_file(str(folder / "router.safetensors"))))
    return router.eval(), meta


@torch.no_grad()
def served_spend(router: Router, table: Outcomes, curve: list[dict]) -> None:
    """Adds `served_tokens` to every point: the mean N the router that is served picks on the
    table's questions at that knob. Out-of-fold scores come from routers fitted on 4/5 of the
    data, and the one fitted on all of it spends differently at the same knob (-1.1 to +2.4
    tokens of 36 on the mixed benchmark, seen as eval splits overshooting the budget); the spend
    needs no labels, so measuring it in sample is fair, where accuracy is not."""
    s_SK = router(table.feats_SF)
    ladder_K = torch.tensor(table.ladder, dtype=torch.float64)
    for point in curve:
        k_S = choose_index(s_SK, point["tau"], table.ladder, router.policy)
        point["served_tokens"] = ladder_K[k_S].mean().item()


def train_and_calibrate(train: Outcomes, calib: Outcomes, keep: float = 0.99,
                        hidden: int = 32, seed: int = 0, labels: str = LABELS[0],
                        calibrate: str = CALIBRATE[0], confidence: float = 0.5, *,
                        policy: str = POLICIES[0], budget: float | None = None,
                        members: int = MEMBERS, shrink: float | None = None
                        ) -> tuple[Router, dict]:
    check_calibrate(calibrate)
    check_members(members)
    shrink = default_shrink(shrink, policy)
    check_shrink(shrink, policy)
    check_confidence(confidence)
    check_policy(policy)
    check_budget(budget)
    if calibrate == "split":
        router = fit_router(train, hidden=hidden, seed=seed, labels=labels, policy=policy,
                            members=members, shrink=shrink)
        scored, fitted_on = calib, train
        with torch.no_grad():
            q_SK = router(calib.feats_SF)
    else:
        shared = len(set(train.keys) & set(calib.keys))
        if shared:  # the same question in two folds is not out of fold
            log.warning(f"{shared} samples are in both the router and the calib data: their "
                        "crossfit scores are not held out; give disjoint splits")
        scored = fitted_on = Outcomes.concat(train, calib)
        q_SK = out_of_fold(scored, FOLDS, hidden, seed, labels, policy, members, shrink)
        router = fit_router(scored, hidden=hidden, seed=seed, labels=labels, policy=policy,
                            members=members, shrink=shrink)
    curve = calibration_curve(q_SK, scored, keep, confidence, policy)
    served_spend(router, scored, curve)
    top = scored.hits_SK[:, -1].float().mean().item()
    budget_tokens = None if budget is None else budget * scored.ladder[-1]
    point = operating_point(curve, policy, budget_tokens, "served_tokens")
    if point is None:  # sufficiency: no threshold keeps enough, so always the top rung
        point = {"tau": 1.0, "accuracy": top, "tokens": float(scored.ladder[-1]),
                 "served_tokens": float(scored.ladder[-1])}
    if budget_tokens is not None and point["served_tokens"] > budget_tokens + 1e-9:
        log.warning(f"no {knob_name(policy)} spends within --budget {budget}; the cheapest "
                    f"point spends {point['served_tokens']:.2f} of {scored.ladder[-1]} tokens")
    meta = {"ladder": train.ladder, "policy": policy, "tau": point["tau"], "keep": keep,
            "budget": budget, "hidden": hidden, "members": members,
            "shrink": shrink,
            "in_dim": train.feats_SF.shape[1], "seed": seed, "labels": labels,
            "calibrate": calibrate, "folds": FOLDS if calibrate == "crossfit" else None,
            "confidence": confidence,
            "features": "pooling residuals at each rung, prompt embedding "
                        "(tfx/model/router.py)",
            "train_samples": len(fitted_on.keys), "calib_samples": len(scored.keys),
            "calib": {"top_accuracy": top, "point": point, "curve": curve}}
    return router, meta


def split_data(loaded, given: str | None, split: str) -> str:
    """`given`, else the `split` folder beside the run's eval data (`tfx data fashion-mnist
    --mixed` writes train/, router/, calib/ and eval/ side by side)."""
    if given:
        return given
    from tfx.train import runfolder

    spec = loaded.cfg.data.eval
    if not isinstance(spec, str):
        raise ConfigError(f"no --{split}-data given and data.eval is not one folder")
    folder = Path(runfolder.resolve_path(spec, loaded.run_dir, "data.eval", f"--{split}-data"))
    guess = folder.parent / split
    if not guess.is_dir():
        raise ConfigError(f"{guess} not found: pass --{split}-data DIR (held-out samples the "
                          "model was not trained on)")
    return str(guess)


def run_router_train(path: str, router_data: str | None = None, calib_data: str | None = None,
                     ladder: str | None = None, keep: float = 0.99, batch_size: int = 64,
                     hidden: int = 32, seed: int = 0, device: str | None = None,
                     dtype: str | None = None, labels: str = LABELS[0],
                     calibrate: str = CALIBRATE[0], confidence: float = 0.5, *,
                     policy: str = POLICIES[0], budget: float | None = None,
                     members: int = MEMBERS, shrink: float | None = None) -> dict:
    from tfx.eval.runner import default_device, default_dtype, eval_samples
    from tfx.train.load import load_model

    check_labels(labels)  # before the model loads and the tables are built
    check_calibrate(calibrate)
    check_confidence(confidence)
    check_policy(policy)
    check_budget(budget)
    check_members(members)
    check_shrink(default_shrink(shrink, policy), policy)
    if not 0 < keep <= 1:
        raise ConfigError(f"--keep {keep}: a share of the top rung's accuracy in (0, 1]")
    device = default_device(device)
    loaded = load_model(path, device=device, dtype=default_dtype(dtype, device))
    side = loaded.cfg.model.vision.grid_side
    rungs = parse_ladder(ladder, side) if ladder else default_ladder(
        list(loaded.cfg.tokens.counts), side)
    tables = {}
    for split, given in (("router", router_data), ("calib", calib_data)):
        data = split_data(loaded, given, split)
        samples, _ = eval_samples(loaded, data)
        key = table_key(loaded.tag, rungs, str(Path(data).resolve()), len(samples))
        tables[split] = cached_outcomes(
            loaded.run_dir / "router", split, key,
            lambda: build_outcomes(loaded.model, samples, loaded.tok, rungs, batch_size,
                                   what=f"({split})"))
    router, meta = train_and_calibrate(tables["router"], tables["calib"], keep, hidden, seed,
                                       labels, calibrate, confidence, policy=policy,
                                       budget=budget, members=members, shrink=shrink)
    meta |= {"checkpoint": str(path), "tag": loaded.tag,
             "grid_side": side, "oracle_calib_tokens": policy_point(
                 tables["calib"], [rungs[k] for k in tables["calib"].oracle_rung().tolist()])}
    folder = loaded.run_dir / "router"
    save_router(router, folder, meta)
    point = meta["calib"]["point"]
    return {"folder": str(folder), "meta": meta,
            "line": f"{policy} router for N in {rungs}: {knob_name(policy)} {point['tau']} "
                    f"{'gives' if budget else 'keeps'} "
                    f"{point['accuracy']:.3f} (top rung {meta['calib']['top_accuracy']:.3f}) "
                    f"at {point['tokens']:.1f} mean visual tokens (the served router: "
                    f"{point['served_tokens']:.1f}) on "
                    f"{meta['calib_samples']} calibration questions ({calibrate}); wrote "
                    f"{folder}/router.safetensors and router.json"}
