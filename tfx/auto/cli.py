"""`tfx router train RUN` and `tfx router check EXPORT RUN`: the command-line face of
`tfx.auto.fit` and `tfx.auto.check` (`tfx eval RUN --auto` and `tfx generate --visual-tokens
auto` use the router `train` writes)."""

from __future__ import annotations

import argparse

from tfx.auto.fit import CALIBRATE, MEMBERS, SHRINK
from tfx.auto.outcomes import LABELS
from tfx.errors import ConfigError
from tfx.model.router import POLICIES


def router_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tfx router", description="The auto visual-token budget.")
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train", help="fit the router on the flex model's own answers at each N")
    t.add_argument("run", help="run folder (its latest checkpoint) or a checkpoint folder")
    t.add_argument("--router-data", default=None,
                   help="held-out shards for the router's labels (default: router/ beside the "
                        "run's eval data)")
    t.add_argument("--calib-data", default=None,
                   help="held-out shards for the threshold (default: calib/ beside them)")
    t.add_argument("--ladder", default=None,
                   help="the counts the router picks from (default: every n*n up to the "
                        "largest trained N)")
    t.add_argument("--keep", type=float, default=0.99,
                   help="the threshold is the cheapest keeping this share of the top N's "
                        "accuracy on the calib split")
    t.add_argument("--labels", choices=LABELS, default=LABELS[0],
                   help="'N_k suffices' when no larger rung is wrong where the top rung is "
                        "right (correct, default), or when every larger rung gives the top "
                        "rung's answer (consistency: no answer key)")
    t.add_argument("--calibrate", choices=CALIBRATE, default=CALIBRATE[0],
                   help="where the threshold's accuracy is measured: the router and calib "
                        "splits pooled, each question scored by a router fitted without it "
                        "(crossfit, default), or the calib split alone (split)")
    t.add_argument("--confidence", type=float, default=0.5,
                   help="how sure the threshold must be of keeping --keep: a one-sided lower "
                        "bound at this confidence must clear it (0.5, default: the estimate "
                        "itself; 0.9: costs tokens, misses less often)")
    t.add_argument("--policy", choices=POLICIES, default=POLICIES[0],
                   help="sufficiency (default): P(N suffices) per N, the smallest N above a "
                        "threshold; accuracy: P(right at N) per N, the N with the best "
                        "probability less a price per token")
    t.add_argument("--budget", type=float, default=None,
                   help="instead of --keep: the knob at which the router spends the most "
                        "within this share of the top N's tokens (e.g. 0.45)")
    t.add_argument("--hidden", type=int, default=32, help="router MLP width")
    t.add_argument("--members", type=int, default=MEMBERS,
                   help=f"MLPs averaged in the router, each from its own initialisation "
                        f"(default {MEMBERS}; 1: a single MLP)")
    t.add_argument("--shrink", type=float, default=None,
                   help="accuracy policy: how far each P(right at N) is pulled toward N's mean "
                        f"accuracy over the training questions (default {SHRINK}; 0: none)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--device", default=None)
    t.add_argument("--dtype", default=None)
    r = sub.add_parser("reliability", help="how often the threshold rule keeps --keep on "
                       "questions it did not see, from the router and calib splits alone")
    r.add_argument("run", help="a run folder `tfx router train` has written router/ in")
    r.add_argument("--keep", type=float, default=0.99)
    r.add_argument("--confidence", default="0.5,0.8,0.9,0.95",
                   help="comma list of the confidences to compare")
    r.add_argument("--halves", type=int, default=200, help="random half splits")
    r.add_argument("--goal-share", type=float, default=0.45,
                   help="the token share the goal allows (of the top N's)")
    r.add_argument("--labels", choices=LABELS, default=LABELS[0])
    r.add_argument("--policy", choices=POLICIES, default=POLICIES[0])
    r.add_argument("--budget", type=float, default=None,
                   help="also measure the --budget rule at this token share")
    r.add_argument("--members", type=int, default=MEMBERS)
    r.add_argument("--shrink", type=float, default=None)
    c = sub.add_parser("check", help="an export's num_visual_tokens='auto', in a fresh "
                       "process without tfx, against tfx eval RUN --auto")
    c.add_argument("export", help="the folder `tfx convert RUN` wrote")
    c.add_argument("run", help="the run folder `tfx eval --auto` wrote eval-auto/ in")
    c.add_argument("--samples", type=int, default=64)
    c.add_argument("--report", default=None,
                   help="the auto.json (or its folder) to check against, when `tfx eval --auto` "
                        "wrote it with --out (default: RUN/eval-auto/)")
    return p


def main(argv: list[str]) -> None:
    args = router_parser().parse_args(argv)
    if args.what == "check":
        from tfx.auto.check import AutoMismatch, run_router_check

        result = run_router_check(args.export, args.run, args.samples, report=args.report)
        print(result["line"])
        if not result["ok"]:
            bad = [r for r in result["rows"] if (r["want"]["n"], r["want"]["answer"])
                   != (r["got"]["n"], r["got"]["answer"])][:3]
            raise AutoMismatch(f"the export routes or answers differently: {bad}")
        return
    if args.what == "reliability":
        from tfx.auto.reliability import run_reliability

        try:
            confidences = tuple(float(x) for x in args.confidence.split(",") if x.strip())
        except ValueError:
            raise ConfigError(f"--confidence {args.confidence!r}: a comma list such as "
                              "0.5,0.9") from None
        print(run_reliability(args.run, args.keep, confidences, args.halves, args.goal_share,
                              args.labels, policy=args.policy, budget=args.budget,
                              members=args.members, shrink=args.shrink)["table"])
        return
    from tfx.auto.fit import run_router_train

    result = run_router_train(args.run, args.router_data, args.calib_data, args.ladder,
                              args.keep, args.batch_size, args.hidden, args.seed, args.device,
                              args.dtype, args.labels, args.calibrate, args.confidence,
                              policy=args.policy, budget=args.budget, members=args.members,
                              shrink=args.shrink)
    print(result["line"])
