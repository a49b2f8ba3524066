"""The auto-budget router: per image and question, the smallest N that loses nothing against
the largest N (labels: `tfx.auto.outcomes`). Torch only; `tfx convert` copies it into exports
beside `projector.py`, so training (`tfx router train`), `tfx eval --auto` and the exported model's
`num_visual_tokens="auto"` read the same features through the same code.

Its inputs cost nothing extra in a pooled-projector model: the tower's patch grid, computed
for any N before N is chosen, and the LLM's input embeddings of the prompt.
- Pooling residuals: for each rung n x n of the ladder, the share of the grid's feature
  variance that n x n adaptive average pooling throws away (mean within-bin variance over
  the total; 0 at n = grid side). Large where detail is lost.
- The mean input embedding of the prompt's text tokens: what is asked.
The grid's own mean and standard deviation (2 x the tower width) were inputs too until they
were found to let the router memorise its few thousand labels: with them it found no threshold
keeping 99 % of the top rung's calibration accuracy below N_max; without them it does, far
below (docs/results/auto-budget.md).
Two policies (`POLICIES`), the same MLPs on the same features:
- `sufficiency`: one logit per rung below the top, q_n = P(N_n suffices); q is made monotone in
  N (a cummax: if a smaller N suffices, a larger one does), and the choice is the smallest rung
  with q_n >= tau, else the top rung. The knob tau is a threshold in (0, 1].
- `accuracy`: one logit per rung, p_n = P(the answer at N_n is right), and the choice is the
  rung with the largest p_n - price * N_n / N_max: the knob is the price, in accuracy, of the
  whole grid. It needs no "suffices" rule; where no rung is likelier right than another
  (a question no N answers), it goes to the cheapest.
Shape legend: B images, T patches, C tower width, D LLM width, K rungs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def bin_means(side: int, n: int) -> torch.Tensor:
    """(n*n, side*side): row b averages the patches of adaptive-pooling bin b (the bins of
    `F.adaptive_avg_pool2d`, overlapping where n does not divide the side)."""
    eye = torch.eye(side * side).reshape(side * side, 1, side, side)
    return F.adaptive_avg_pool2d(eye, n).reshape(side * side, n * n).T.contiguous()


def pooling_residuals(feats_BTC: torch.Tensor, side: int, sides: list[int]) -> torch.Tensor:
    """(B, T, C) grid -> (B, K) residual share at each rung n in `sides`. Through the patches'
    (T, T) Gram matrix G: a bin's summed within-bin variance is mean_p G_pp - P G P^T (P its
    averaging row), so the cost is one (T x C x T) product per image, whatever the rungs."""
    x = feats_BTC.float()
    G = x @ x.transpose(1, 2)  # (B, T, T)
    sq = G.diagonal(dim1=1, dim2=2)  # (B, T): sum over channels of x^2
    T = x.shape[1]
    total = (sq.mean(1) - G.sum(dim=(1, 2)) / (T * T)).clamp_min(1e-12)
    out = []
    for n in sides:
        P = bin_means(side, n).to(x.device)  # (n*n, T)
        within = sq @ P.T - ((P @ G) * P).sum(-1)  # (B, n*n)
        out.append(within.mean(1) / total)
    return torch.stack(out, dim=1).clamp(0, 1)


def prompt_embedding(embeds_BTD: torch.Tensor, text_BT: torch.Tensor) -> torch.Tensor:
    """Mean input embedding over the prompt's text tokens (`text_BT`: not image, not pad)."""
    w = text_BT.to(embeds_BTD.dtype).unsqueeze(-1)
    return ((embeds_BTD * w).sum(1) / w.sum(1).clamp_min(1)).float()


FEATURES_VERSION = 3  # bump when the features change: cached outcome tables are then rebuilt


def router_features(feats_BTC: torch.Tensor, side: int, sides: list[int],
                    question_BD: torch.Tensor) -> torch.Tensor:
    """(B, K' + D): residuals at the rungs strictly between 1 x 1 and the full grid (those two
    are 1 and 0 for every image: constants that rounding would turn into noise once
    standardised), then the question."""
    sides = [n for n in sides if 1 < n < side]
    return torch.cat([pooling_residuals(feats_BTC.float(), side, sides), question_BD.float()],
                     dim=1)


POLICIES = ("sufficiency", "accuracy")  # the first is the default


class Router(nn.Module):
    """Features -> (B, K) scores: P(N_k suffices), monotone in k and 1 at the top rung
    (`sufficiency`), or P(right at N_k) (`accuracy`).
    Where the accuracy curve is flat, a single MLP's p_k differ between near-equal rungs by its
    own noise, and the choice follows that noise. Two things damp it:
    - `members` MLPs of the same shape from different initialisations and dropout masks
      (`tfx.auto.fit.fit_router`), their probabilities averaged;
    - `shrink` s (accuracy policy): p_k <- (1 - s) p_k + s prior_k, prior_k the rung's accuracy
      over the training samples, so a rung that is worse for everyone (N = 25 on a 6 x 6 grid,
      whose pooling bins overlap) is not bought on a per-sample whim.
    Weights stacked member-first, each member's in `nn.Linear`'s layout (`w1` (M, H, F), `w2`
    (M, K', H))."""

    def __init__(self, in_dim: int, rungs: int, hidden: int = 32,
                 policy: str = POLICIES[0], members: int = 1, shrink: float = 0.0):
        super().__init__()
        if policy not in POLICIES:
            raise ValueError(f"router policy {policy!r}: one of {', '.join(POLICIES)}")
        if members < 1:
            raise ValueError(f"router members {members}: at least 1")
        if not 0 <= shrink < 1 or (shrink and policy != "accuracy"):
            raise ValueError(f"router shrink {shrink}: in [0, 1), and 0 unless the policy is "
                             "accuracy")
        self.policy, self.members, self.shrink = policy, members, shrink
        self.register_buffer("shift", torch.zeros(in_dim))
        self.register_buffer("scale", torch.ones(in_dim))
        outputs = rungs - 1 if policy == "sufficiency" else rungs
        self.register_buffer("prior", torch.zeros(outputs))
        layers = [nn.Linear(in_dim, hidden), nn.Linear(hidden, outputs)]
        for i, layer in enumerate(layers, 1):  # each member: PyTorch's Linear init
            self.register_parameter(f"w{i}", nn.Parameter(torch.stack(
                [nn.Linear(layer.in_features, layer.out_features).weight.detach()
                 for _ in range(members)])))
            self.register_parameter(f"b{i}", nn.Parameter(torch.stack(
                [nn.Linear(layer.in_features, layer.out_features).bias.detach()
                 for _ in range(members)])))
        self.dropout = nn.Dropout(0.1)

    def macs(self) -> int:
        """Multiply-adds per sample."""
        return self.w1[0].numel() * self.members + self.w2[0].numel() * self.members

    def logits(self, feats_BF: torch.Tensor) -> torch.Tensor:
        """(M, B, K') every member's logits."""
        x = (feats_BF.float() - self.shift) / self.scale
        h = self.dropout(F.gelu(torch.einsum("bf,mhf->mbh", x, self.w1) + self.b1[:, None]))
        return torch.einsum("mbh,mkh->mbk", h, self.w2) + self.b2[:, None]

    def forward(self, feats_BF: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(self.logits(feats_BF)).mean(0)
        if self.policy == "accuracy":
            return (1 - self.shrink) * p + self.shrink * self.prior
        # below 1 at every lower rung, so tau = 1 always means the top rung
        q = p.clamp_max(1 - 1e-6).cummax(dim=1).values
        return torch.cat([q, torch.ones_like(q[:, :1])], dim=1)


def upgrade_state(state: dict) -> dict:
    """A router saved before `members` and `shrink` (one nn.Sequential under `net.0.*`,
    `net.3.*`; no prior) in today's layout: one member, a zero prior (unused at shrink 0)."""
    if "net.0.weight" not in state:
        return state
    names = {"net.0.weight": "w1", "net.0.bias": "b1", "net.3.weight": "w2", "net.3.bias": "b2"}
    out = {names.get(k, k): v[None] if k in names else v for k, v in state.items()}
    return out | {"prior": torch.zeros_like(out["b2"][0])}


def choose_index(s_BK: torch.Tensor, knob: float, ladder: list[int],
                 policy: str = POLICIES[0]) -> torch.Tensor:
    """(B,) the chosen rung's index: the smallest whose q reaches tau = `knob` (sufficiency;
    the top rung's q is 1), or the largest p - price * N / N_max, price = `knob` (accuracy;
    ties go to the smaller N)."""
    if policy == "sufficiency":
        return (s_BK >= knob).int().argmax(dim=1)
    cost_K = torch.tensor(ladder, dtype=s_BK.dtype, device=s_BK.device) / ladder[-1]
    return (s_BK - knob * cost_K).argmax(dim=1)  # argmax takes the first of equal values


def choose(s_BK: torch.Tensor, ladder: list[int], knob: float,
           policy: str = POLICIES[0]) -> list[int]:
    """The N of `ladder` the policy picks at `knob` for each row."""
    return [ladder[i] for i in choose_index(s_BK, knob, ladder, policy).tolist()]
