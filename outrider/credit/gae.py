"""Generalised Advantage Estimation with a learned critic (PPO's credit), over action tokens only."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from outrider.credit import CREDIT, CreditConfig, CreditOutput
from outrider.stats import masked_whiten
from outrider.data import Batch
from outrider.registry import Needs


class GAEConfig(CreditConfig):
    """Options of `gae`; the policy gets a value head and the batch carries ``values``."""

    gamma: float = Field(1.0, ge=0.0, le=1.0, description="Discount per action token (observations do not count).")
    lam: float = Field(1.0, ge=0.0, le=1.0, description="GAE λ: 0 gives one-step TD, 1 gives Monte-Carlo − V.")
    whiten: bool = Field(True, description="Whiten the advantages over the batch's action tokens (not the returns).")


def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """GAE over each row's action tokens in sequence order; returns ``(advantages, returns)``, 0 off the mask.

    With ``t' `` the next action token after t (observation tokens are skipped: they are part of the next
    state, not a step) and ``V_{t'} = 0`` after the last action token:
    ``δ_t = r_t + γ·V_{t'} − V_t``, ``A_t = δ_t + γλ·A_{t'}``, and the value targets are ``returns_t = A_t + V_t``.
    ``values[:, t] = V(x_<t)`` is the value of the state in which action token t is chosen.
    """
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        act = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a_t = delta + gamma * lam * next_adv
        adv[:, t] = torch.where(act, a_t, torch.zeros_like(a_t))
        next_value = torch.where(act, values[:, t], next_value)
        next_adv = torch.where(act, a_t, next_adv)
    returns = torch.where(mask > 0, adv + values, torch.zeros_like(adv))
    return adv, returns


@CREDIT.register("gae", config=GAEConfig, needs=Needs(values=True))
def gae(batch: Batch, cfg: GAEConfig) -> CreditOutput:
    """GAE(γ, λ) advantages and value targets (Schulman et al. 2016, arXiv:1506.02438; PPO, arXiv:1707.06347).

    ``δ_t = r_t + γ V_{t'} − V_t``, ``A_t = Σ_l (γλ)^l δ_{t_l}`` over the row's action tokens ``t = t_0 < t_1 < …``
    (observation tokens between turns are transparent) with V = 0 after the last action token;
    ``returns = A + V`` before whitening; ``A`` is then whitened over the batch's action tokens if ``whiten``.
    """
    if batch.values is None:
        raise ValueError("credit 'gae' needs batch.values (a value head); none were computed")
    values = batch.values.detach().to(batch.token_rewards.dtype)
    rewards = torch.where(batch.action_mask > 0, batch.token_rewards, torch.zeros_like(batch.token_rewards))
    adv, returns = gae_advantages(rewards, values, batch.action_mask, cfg.gamma, cfg.lam)
    if cfg.whiten:
        adv = masked_whiten(adv, batch.action_mask)
    return CreditOutput(advantages=adv, returns=returns)
