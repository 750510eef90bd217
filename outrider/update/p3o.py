"""P3O [45]: the pairwise proximal policy gradient, a trajectory-wise learner term on pairs of responses to a prompt.

Pairwise policy gradient (PPG, [45] §4): for two responses y₁, y₂ ~ π_θ(·|x),
``∇J = E[(R(y₁) − R(y₂)) · ∇(log π_θ(y₁|x) − log π_θ(y₂|x)) / 2]``. Only the reward *difference* enters, so a
reward shifted by any per-prompt δ(x) (a reward equivalent under Bradley–Terry) gives the same update, and equal
rewards give none. ``R`` is the row's summed reward on its trained tokens (`batch.token_rewards`): with the packed
`kl_penalty` component listed under `score` it is P3O's KL-regularised reward ``r(x, y) − β log π/π_ref``.

The update is proximal in the trajectory-level ratio ``ρ(y) = π_θ(y|x)/π_old(y|x) = exp Σ_t (log π_θ − log π_old)``
over the row's trained tokens, with δ = (R₁ − R₂)/2 and clip(·) = clip(·, 1 − ε, 1 + ε):

- ``separate`` (V1): each response is clipped on its own ratio, with advantage +δ and −δ,
  ``ℓ = max(−δ ρ₁, −δ clip(ρ₁)) + max(δ ρ₂, δ clip(ρ₂))``;
- ``joint`` (V2): the pair is clipped on one ratio ``ρ₁₂ = ρ₁/ρ₂ = π_θ(y₁)π_old(y₂) / (π_old(y₁)π_θ(y₂))``,
  ``ℓ = max(−δ ρ₁₂, −δ clip(ρ₁₂))``.

Both give the PPG at ρ = 1. The formulas follow our reading of [45] (the paper's full text was not reachable from
this machine; the clipped forms are the PPO-style reconstruction above, see docs/rewards.md). Pairs are formed
inside each group of the minibatch (`Needs(pairs=True)` keeps groups whole): every pair of its rows (``all``) or
disjoint neighbours (``adjacent``: rows 1–2, 3–4, …, the paper's two responses per prompt).

A noisy pairwise judge (``judge_noise`` p, a toy of noisy preference feedback, not part of [45]): the judge prefers the row with
the higher reward and its verdict on a pair is flipped with probability p, i.e. δ → −δ; a pair of equal rewards
gets no verdict (δ = 0). With ``verdict: sign`` the judge gives only the direction, δ = sign(R₁ − R₂)/2 (the same
as ``difference`` on a 0/1 reward). A flip is drawn once per pair from a hash of ``judge_seed`` and the two rows'
tokens and sampling log-probs, so every minibatch, epoch and resumed run sees the same verdict without state.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from outrider.data import Batch
from outrider.kl import LOG_RATIO_CLAMP
from outrider.registry import Needs, PieceConfig
from outrider.update import TERMS, TermOutput, TokenContext
from outrider.update.pairwise import no_pairs


class P3OConfig(PieceConfig):
    """Options of the `p3o` term."""

    clip: Literal["separate", "joint"] = Field("joint", description="separate (V1): each response's trajectory "
                                                                   "ratio clipped on its own; joint (V2): the "
                                                                   "pair's ratio ρ₁/ρ₂ clipped once.")
    epsilon: float = Field(0.2, gt=0.0, lt=1.0, description="ε: ratios are clipped to [1 − ε, 1 + ε].")
    pairing: Literal["all", "adjacent"] = Field("all", description="all: every pair of rows within a group; "
                                                                   "adjacent: disjoint neighbours (rows 1–2, 3–4, "
                                                                   "…; an odd last row is left out).")
    coef: float = Field(1.0, ge=0, description="Weight of the term in the learner's sum.")
    verdict: Literal["difference", "sign"] = Field("difference", description="difference: δ = (R₁ − R₂)/2; "
                                                   "sign: a pairwise judge's direction only, δ = sign(R₁ − R₂)/2.")
    judge_noise: float = Field(0.0, ge=0.0, le=1.0, description="Probability that the pairwise verdict is "
                                                                "flipped (δ → −δ; a noisy pairwise judge).")
    judge_seed: int = Field(0, description="Seed of the judge's flips (hashed with the pair's rows).")


def group_pairs(group_index: Tensor, pairing: str) -> tuple[Tensor, Tensor]:
    """Row indices ``(first, second)`` of the pairs inside each group, groups in order of first appearance."""
    first, second = [], []
    groups = group_index.tolist()
    for g in dict.fromkeys(groups):
        rows = [i for i, x in enumerate(groups) if x == g]
        if pairing == "all":
            pairs = [(a, b) for k, a in enumerate(rows) for b in rows[k + 1:]]
        else:
            pairs = list(zip(rows[0::2], rows[1::2]))
        first += [a for a, _ in pairs]
        second += [b for _, b in pairs]
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=group_index.device)  # noqa: E731
    return as_tensor(first), as_tensor(second)


def p3o_pair_loss(delta: Tensor, log_ratio_1: Tensor, log_ratio_2: Tensor, clip: str,
                  epsilon: float) -> tuple[Tensor, Tensor]:
    """Per pair: the negated clipped objective and whether a clip bound holds the loss (no gradient through it).

    ``delta`` = (R₁ − R₂)/2 (no gradient); ``log_ratio_k`` = log ρ(y_k), the summed token log-ratio of each side."""
    lo, hi = 1.0 - epsilon, 1.0 + epsilon

    def clipped(ratio: Tensor, adv: Tensor) -> tuple[Tensor, Tensor]:
        loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, lo, hi))
        held = ((adv > 0) & (ratio > hi)) | ((adv < 0) & (ratio < lo))
        return loss, held

    bound = lambda x: torch.clamp(x, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # noqa: E731
    if clip == "joint":
        return clipped(torch.exp(bound(log_ratio_1 - log_ratio_2)), delta)
    loss_1, held_1 = clipped(torch.exp(bound(log_ratio_1)), delta)
    loss_2, held_2 = clipped(torch.exp(bound(log_ratio_2)), -delta)
    return loss_1 + loss_2, held_1 | held_2


def _row_keys(batch: Batch) -> list[str]:
    """Each row's identity for the judge's coin: a digest of its tokens and the log-probs it was sampled with."""
    ids, real = batch.input_ids.cpu().numpy(), batch.attention_mask.cpu().numpy() > 0
    lps = None if batch.behaviour_logprobs is None else batch.behaviour_logprobs.cpu().numpy()
    act = batch.action_mask.cpu().numpy() > 0
    keys = []
    for i in range(ids.shape[0]):
        h = hashlib.sha256(ids[i][real[i]].tobytes())
        if lps is not None:
            h.update(lps[i][act[i]].tobytes())
        keys.append(h.hexdigest())
    return keys


def judge_flips(batch: Batch, first: Tensor, second: Tensor, noise: float, seed: int) -> Tensor:
    """``[P]`` bool: which pairs' verdicts the noisy judge flips; a coin per unordered pair from a hash (pairs of
    the same two texts sampled with the same log-probs, i.e. duplicates within a step, share it)."""
    if noise <= 0.0:
        return torch.zeros(first.shape, dtype=torch.bool, device=first.device)
    keys = _row_keys(batch)
    coins = []
    for a, b in zip(first.tolist(), second.tolist()):
        lo, hi = sorted((keys[a], keys[b]))
        digest = hashlib.sha256(f"p3o-judge:{seed}:{lo}:{hi}".encode()).digest()
        coins.append(int.from_bytes(digest[:8], "big") / 2.0 ** 64 < noise)
    return torch.tensor(coins, dtype=torch.bool, device=first.device)


@TERMS.register("p3o", config=P3OConfig, needs=Needs(pairs=True))
def p3o(ctx: TokenContext, cfg: P3OConfig) -> TermOutput:
    """P3O [45] on the minibatch's within-group pairs: the mean over pairs of the clipped pairwise objective
    (module docstring), times `coef`. A group of one row has no pair; no pair in the minibatch gives 0. Metrics:
    ``p3o/pairs``, ``p3o/reward_gap`` (mean |R₁ − R₂|), ``p3o/clip_frac`` (share of pairs a bound holds),
    ``p3o/ratio_mean`` (mean trajectory ratio of the paired rows), ``p3o/judge_flips`` (share of pairs with a
    verdict, δ ≠ 0, that the judge flipped; with ``judge_noise`` > 0)."""
    b, m = ctx.batch, ctx.mask
    first, second = group_pairs(b.group_index, cfg.pairing)
    if first.numel() == 0:
        return no_pairs(ctx)
    zero = torch.zeros_like(m)
    log_ratio = torch.where(m > 0, ctx.logprobs - ctx.old_logprobs, zero).sum(-1)
    reward = torch.where(m > 0, b.token_rewards * m, zero).sum(-1).detach()
    delta = (reward[first] - reward[second]) / 2
    if cfg.verdict == "sign":
        delta = torch.sign(delta) / 2
    flips = judge_flips(b, first, second, cfg.judge_noise, cfg.judge_seed)
    delta = torch.where(flips, -delta, delta)
    loss, held = p3o_pair_loss(delta, log_ratio[first], log_ratio[second], cfg.clip, cfg.epsilon)
    rows = torch.cat([first, second])
    metrics = {"pairs": float(first.numel()), "reward_gap": (2 * delta).abs().mean(),
               "clip_frac": held.float().mean(), "ratio_mean": torch.exp(log_ratio[rows].detach()).mean()}
    if cfg.judge_noise > 0:
        decided = delta != 0
        metrics["judge_flips"] = (flips & decided).sum() / decided.sum().clamp(min=1)
    return TermOutput(loss=cfg.coef * loss.mean(), metrics=metrics)
