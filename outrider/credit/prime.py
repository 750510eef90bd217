"""PRIME's credit [159]: returns-to-go of the composed token rewards (outcome plus implicit process rewards),
baselined leave-one-out within the group and whitened over the batch."""

from __future__ import annotations

import torch

from outrider.credit import CREDIT, CreditConfig, CreditOutput
from outrider.credit.outcome import discounted_action_returns, episode_scores
from outrider.data import Batch
from outrider.stats import group_ids, group_moments, masked_whiten


@CREDIT.register("prime", config=CreditConfig)
def prime(batch: Batch, cfg: CreditConfig) -> CreditOutput:
    """PRIME's advantage [159], as verl's ``recipe/prime`` builds it, with one baseline for the summed rewards.

    ``G_{i,t} = Σ_{s≥t} r_{i,s}`` over the row's action tokens (the outcome reward sits on the last one, the
    implicit PRM's ``β·log πφ/πref`` on each), ``b_i = mean_{j∈g, j≠i} R_j`` with ``R_j = Σ_t r_{j,t}`` (0 for a
    group of one), then ``A = whiten(G − b)`` over every action token of the batch. On the outcome reward alone
    this is RLOO, whitened. PRIME baselines its two sources apart (the outcome by RLOO, each implicit token reward
    by the group's mean per-token reward, scaled |g|/(|g|−1)) before the same return and whitening; here the
    return is baselined by the others' summed return, which needs no separation of the sources in
    ``token_rewards`` and leaves the expected gradient unbiased the same way (a baseline independent of row i).
    """
    m = batch.action_mask
    returns = discounted_action_returns(batch.token_rewards, m, 1.0)
    scores = episode_scores(batch).to(torch.float64)
    inverse, k = group_ids(batch.group_index)
    count, mean, _ = group_moments(scores, inverse, k)
    n = count[inverse]
    baseline = torch.where(n > 1, (mean[inverse] * n - scores) / torch.clamp(n - 1, min=1.0), torch.zeros_like(scores))
    centred = torch.where(m > 0, returns - baseline[:, None].to(returns.dtype), torch.zeros_like(returns))
    return CreditOutput(advantages=masked_whiten(centred, m))
