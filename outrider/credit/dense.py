"""Outcome advantage plus dense per-token rewards, kept where they are (PAV's RL objective [139]).

[139] trains with ``Σ_h ∇ log π(a_h|s_h) · (Q^π(s_h, a_h) + α A^μ(s_h, a_h))``: each step's tokens get the outcome's
advantage plus that step's own progress, not a return summed over later steps. `batch.token_rewards` holds the
composed sum, so the two sources are told apart by place (as `prime` does): the row's last trained token holds
the outcome (the verifier's reward lands there; dense components such as `pav` leave that token alone), every
earlier token a dense reward.
"""

from __future__ import annotations

import torch
from pydantic import Field

from outrider.credit import CREDIT, CreditConfig, CreditOutput
from outrider.credit.outcome import broadcast_to_actions
from outrider.data import Batch
from outrider.stats import group_mean_std


class OutcomePlusDenseConfig(CreditConfig):
    """Options of `outcome_plus_dense`."""

    std_normalize: bool = Field(True, description="Divide the centred outcome by its group's std (GRPO); false: "
                                                  "R − mean_g R (Dr.GRPO).")
    epsilon: float = Field(1e-6, ge=0.0, description="Added to the group std before dividing.")


def last_token(mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: 1 on each row's last trained token (rows without one stay 0)."""
    pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask > 0, pos, torch.full_like(pos, -1)).max(-1).values
    return ((pos == last[:, None]) & (mask > 0)).to(mask.dtype)


@CREDIT.register("outcome_plus_dense", config=OutcomePlusDenseConfig)
def outcome_plus_dense(batch: Batch, cfg: OutcomePlusDenseConfig) -> CreditOutput:
    """``A_{i,t} = (o_i − mean_g o) / (std_g o + ε) + d_{i,t}``, with ``o_i`` the reward on row i's last trained
    token (the outcome) and ``d_{i,t}`` the reward on each earlier trained token (0 on the last one). A group of
    size 1 uses mean 0 and std 1, as `grpo`. Metric: ``credit/dense_abs`` (mean |d| over trained tokens)."""
    m = batch.action_mask
    last = last_token(m)
    r = torch.where(m > 0, batch.token_rewards, torch.zeros_like(batch.token_rewards))
    outcome = (r * last).sum(-1)
    dense = r * (1 - last)
    mean, std = group_mean_std(outcome, batch.group_index)
    adv = outcome - mean
    adv = adv / (std + cfg.epsilon) if cfg.std_normalize else adv
    metrics = {"dense_abs": float(dense.abs().sum() / m.sum().clamp(min=1))}
    return CreditOutput(advantages=broadcast_to_actions(adv, m) + dense * m, metrics=metrics)
