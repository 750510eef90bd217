"""Critic-free outcome credit: group baselines (GRPO, Dr.GRPO, RLOO) and REINFORCE++ returns.

Notation: ``m`` is ``batch.action_mask``, ``r`` is ``batch.token_rewards`` and ``R_i = Σ_t r_{i,t}·m_{i,t}`` is
episode i's summed reward (the trajectory reward sits on its last action token, step and token rewards earlier).
A group ``g`` is the set of episodes sharing ``batch.group_index`` (same prompt / seed), ``|g|`` its size.
Every advantage is exactly 0 outside the action mask.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from outrider.credit import CREDIT, CreditConfig, CreditOutput
from outrider.stats import group_ids, group_mean_std, group_moments, masked_whiten
from outrider.data import Batch


def episode_scores(batch: Batch) -> Tensor:
    """``R_i = Σ_t token_rewards[i, t] · action_mask[i, t]``, shape ``[B]``."""
    m = batch.action_mask
    return torch.where(m > 0, batch.token_rewards * m, torch.zeros_like(batch.token_rewards)).sum(-1)


def broadcast_to_actions(per_episode: Tensor, mask: Tensor) -> Tensor:
    """Copy a ``[B]`` value onto every action token of its row: ``A_{i,t} = a_i`` where ``m_{i,t} > 0``, else 0."""
    values = per_episode[:, None].to(mask.dtype).expand_as(mask)
    return torch.where(mask > 0, values, torch.zeros_like(values))


def discounted_action_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Reward-to-go over action tokens only: ``G_t = r_t + γ·G_{t'}`` with ``t'`` the row's next action token.

    Observation tokens between turns are transparent: they neither add reward nor a discount step, so
    ``G_t = Σ_k γ^k r_{t_k}`` over the action tokens ``t = t_0 < t_1 < …`` of the row. 0 outside the mask.
    """
    B, T = rewards.shape
    out = torch.zeros_like(rewards)
    running = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        act = mask[:, t] > 0
        running = torch.where(act, rewards[:, t] + gamma * running, running)
        out[:, t] = torch.where(act, running, torch.zeros_like(running))
    return out


class GRPOConfig(CreditConfig):
    """Options of `grpo`."""

    std_normalize: bool = Field(
        True,
        description="Divide the centred score by the group's std (GRPO). False gives Dr.GRPO's R_i − mean_g R.",
    )
    epsilon: float = Field(1e-6, ge=0.0, description="Added to the group std before dividing (zero-variance guard).")


class ReinforcePPConfig(CreditConfig):
    """Options of `reinforce_pp`."""

    gamma: float = Field(1.0, ge=0.0, le=1.0, description="Discount per action token (observations do not count).")


@CREDIT.register("grpo", config=GRPOConfig)
def grpo(batch: Batch, cfg: GRPOConfig) -> CreditOutput:
    """GRPO group-normalised outcome advantage (DeepSeekMath, Shao et al. 2024, arXiv:2402.03300).

    ``A_i = (R_i − mean_g R) / (std_g R + ε)`` with the unbiased std (``torch.std``), or ``A_i = R_i − mean_g R``
    when ``std_normalize`` is false; copied to every action token of episode i. A group whose rewards are all
    equal gets exactly A = 0 at any size and dtype (`group_mean_std`; the ε keeps it finite). A group of size 1
    uses mean 0 and std 1 as verl does, so ``A = R/(1+ε) ≈ R`` (or exactly R without std normalisation): the
    lone episode is not baselined at all.
    """
    adv = grpo_episode_advantages(batch, cfg.std_normalize, cfg.epsilon)
    return CreditOutput(advantages=broadcast_to_actions(adv, batch.action_mask))


def grpo_episode_advantages(batch: Batch, std_normalize: bool, epsilon: float) -> Tensor:
    """GRPO's per-episode advantage ``[B]``: ``R_i − mean_g R`` (``/ (std_g R + ε)`` when ``std_normalize``); a
    lone episode uses mean 0, std 1. Shared by `grpo` and the step-level pieces that build on it."""
    scores = episode_scores(batch)
    mean, std = group_mean_std(scores, batch.group_index)
    adv = scores - mean
    return adv / (std + epsilon) if std_normalize else adv


@CREDIT.register("dr_grpo", config=CreditConfig)
def dr_grpo(batch: Batch, cfg: CreditConfig) -> CreditOutput:
    """Dr.GRPO advantage ("Understanding R1-Zero-Like Training", Liu et al. 2025, arXiv:2503.20783).

    ``A_i = R_i − mean_g R`` (no std division, which biases toward too-easy/too-hard prompts); a group of size 1
    has mean 0, so A = R. Pair it with the ``seq-mean-token-sum-norm`` loss aggregation for the full method.
    """
    return grpo(batch, GRPOConfig(std_normalize=False))


@CREDIT.register("rloo", config=CreditConfig)
def rloo(batch: Batch, cfg: CreditConfig) -> CreditOutput:
    """REINFORCE leave-one-out baseline (Kool et al. 2019; "Back to Basics", Ahmadian et al. 2024,
    arXiv:2402.14740).

    ``A_i = R_i − mean_{j∈g, j≠i} R_j = R_i − (Σ_g R − R_i)/(|g| − 1) = |g|/(|g|−1)·(R_i − mean_g R)``, computed
    in the last form (as verl does) in float64 with `group_moments`' exact mean, so a group of equal rewards gets
    exactly 0. A group of size 1 has no other member: baseline 0, A = R.
    """
    scores = episode_scores(batch)
    inverse, k = group_ids(batch.group_index)
    count, mean, _ = group_moments(scores, inverse, k)
    n, centred = count[inverse], scores.to(torch.float64) - mean[inverse]
    adv = torch.where(n > 1, centred * n / torch.clamp(n - 1, min=1.0), scores.to(torch.float64))
    return CreditOutput(advantages=broadcast_to_actions(adv.to(scores.dtype), batch.action_mask))


@CREDIT.register("reinforce_pp", config=ReinforcePPConfig)
def reinforce_pp(batch: Batch, cfg: ReinforcePPConfig) -> CreditOutput:
    """REINFORCE++ (Hu 2025, arXiv:2501.03262): discounted token returns, whitened over the whole batch.

    ``G_t = Σ_k γ^k r_{t_k}`` over the row's action tokens from t on (observation tokens are skipped, not
    discounted), then ``A_t = (G_t − μ) / sqrt(σ² + 1e-8)`` with μ, σ² the masked mean and unbiased variance over
    every action token of the batch. A per-token KL penalty, if wanted, is part of the composed ``token_rewards``.
    """
    m = batch.action_mask
    returns = discounted_action_returns(batch.token_rewards, m, cfg.gamma)
    return CreditOutput(advantages=masked_whiten(returns, m))


@CREDIT.register("reinforce_pp_baseline", config=CreditConfig)
def reinforce_pp_baseline(batch: Batch, cfg: CreditConfig) -> CreditOutput:
    """REINFORCE++-baseline (Hu 2025, arXiv:2501.03262): group-mean baseline, then batch whitening.

    ``a_i = R_i − mean_g R`` (a group of size 1 has mean 0), copied to the action tokens, then
    ``A = (a − μ) / sqrt(σ² + 1e-8)`` with μ, σ² the masked mean and unbiased variance over all the batch's
    action tokens (so long episodes weigh more in μ, σ², as in the token-level reference).
    """
    scores = episode_scores(batch)
    mean, _ = group_mean_std(scores, batch.group_index)
    centred = broadcast_to_actions(scores - mean, batch.action_mask)
    return CreditOutput(advantages=masked_whiten(centred, batch.action_mask))
