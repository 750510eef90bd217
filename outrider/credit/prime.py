"""PRIME's credit [159]: leave-one-out baselines applied to the implicit token rewards and to the outcome apart,
then returns-to-go, whitened over the batch (verl ``recipe/prime``, ``compute_rloo_advantage_return``)."""

from __future__ import annotations

import torch
from torch import Tensor

from outrider.credit import CREDIT, CreditConfig, CreditOutput
from outrider.credit.outcome import discounted_action_returns
from outrider.data import Batch
from outrider.stats import group_ids, masked_whiten


def last_action_token(mask: Tensor) -> Tensor:
    """[B, T] with 1 on each row's last trained token (0 for a row without one)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask > 0, positions, torch.full_like(positions, -1)).amax(-1, keepdim=True)
    return ((positions == last) & (mask > 0)).to(mask.dtype)


def masked_rloo(rewards: Tensor, mask: Tensor, group_index: Tensor) -> Tensor:
    """PRIME's ``masked_rloo``: within a group of n rows, every masked reward becomes
    ``r_t·n/(n−1) − (Σ_{j∈g} r̄_j)/(n−1)`` with r̄_j the mean of row j's masked rewards (0 when it has none);
    a group of one keeps its rewards. 0 outside the mask."""
    r = torch.where(mask > 0, rewards, torch.zeros_like(rewards)).to(torch.float64)
    count = mask.sum(-1).to(torch.float64)
    row_mean = torch.where(count > 0, r.sum(-1) / count.clamp(min=1), torch.zeros_like(count))
    inverse, k = group_ids(group_index)
    n = torch.zeros(k, dtype=torch.float64, device=r.device).index_add_(0, inverse, torch.ones_like(row_mean))[inverse]
    total = torch.zeros(k, dtype=torch.float64, device=r.device).index_add_(0, inverse, row_mean)[inverse]
    scale = torch.where(n > 1, n / (n - 1).clamp(min=1), torch.ones_like(n))
    base = torch.where(n > 1, total / (n - 1).clamp(min=1), torch.zeros_like(n))
    out = r * scale[:, None] - base[:, None]
    return torch.where(mask > 0, out, torch.zeros_like(out)).to(rewards.dtype)


@CREDIT.register("prime", config=CreditConfig)
def prime(batch: Batch, cfg: CreditConfig) -> CreditOutput:
    """PRIME's advantage [159] as verl's ``recipe/prime`` computes it, the two reward sources told apart by place.

    The composed reward on each row's last trained token is the outcome source (the verifier's reward lands
    there), every earlier trained token's reward the implicit source (the implicit PRM's ``β·log πφ/πref``). Each
    source goes through `masked_rloo` on its own tokens (the outcome's: RLOO over the group), they are summed,
    turned into returns-to-go ``G_t = Σ_{s≥t} r'_s`` over the action tokens and whitened over every action token
    of the batch. Deviation from verl: the last token's own implicit reward is baselined with the outcome (verl
    keeps all implicit rewards in one source). Per-token centring matters: a baseline on the summed return alone
    leaves ``G_t − b`` growing with t wherever the implicit rewards have a non-zero mean, which pays for length.
    """
    m = batch.action_mask
    last = last_action_token(m)
    inner = m - last
    shaped = masked_rloo(batch.token_rewards, inner, batch.group_index) + \
        masked_rloo(batch.token_rewards, last, batch.group_index)
    returns = discounted_action_returns(shaped, m, 1.0)
    return CreditOutput(advantages=masked_whiten(returns, m))
