"""Policy surrogates: ``fn(ctx: TokenContext, cfg) -> (loss [B, T], metrics)``.

The loss is per token and exactly 0 off the mask; the caller reduces it with `outrider.update.aggregate`.
Metrics are detached scalar tensors, means over the action tokens:

- ``clip_frac_low``: A < 0 and ratio < 1 − clip_low (the lower clip holds the loss, no gradient);
- ``clip_frac_high``: A > 0 and ratio > 1 + clip_high;
- ``ratio_mean``: the mean importance ratio;
- ``clip_frac_dual`` (``ppo`` with ``dual_clip`` only): A < 0 and the dual bound −A·c replaced the loss.

Log-ratios are set to 0 off the mask, so a padded position can never turn into ``inf·0 = NaN``. Each surrogate
bounds them as its reference implementation (verl ``core_algos``) does: ``ppo`` clamps the token log-ratio to
[−20, 20] before ``exp`` (verl's ``compute_policy_loss_vanilla``); ``gspo`` averages the raw token log-ratios and
caps the sequence log-ratio at +10 (``compute_policy_loss_gspo``); ``clip_cov`` / ``kl_cov`` use the raw ratio.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from outrider.stats import masked_mean
from outrider.registry import Needs, NoOptions, PieceConfig
from outrider.update import LOSSES, TokenContext
from outrider.kl import LOG_RATIO_CLAMP

# a row with zero advantages adds 0; every row's loss is its own (see `Needs`)
ROW_LOCAL = Needs(zero_at_zero_advantage=True, micro_batch="rows")


class PPOLossConfig(PieceConfig):
    """Options of the `ppo` surrogate."""

    clip_low: float = Field(0.2, ge=0.0, lt=1.0, description="ε_low: the ratio is clipped below at 1 − ε_low.")
    clip_high: float = Field(
        0.2, ge=0.0, description="ε_high: the ratio is clipped above at 1 + ε_high (DAPO clip-higher uses 0.28)."
    )
    dual_clip: float | None = Field(
        None,
        gt=1.0,
        description="Dual-clip constant c > 1 (e.g. 3.0): for A < 0 the loss is at most −A·c. None disables it.",
    )


class GSPOLossConfig(PieceConfig):
    """Options of the `gspo` surrogate (defaults: GSPO paper v2, §5.1, clipping ranges 3e-4 / 4e-4)."""

    clip_low: float = Field(3e-4, ge=0.0, lt=1.0, description="Sequence ratio clipped below at 1 − clip_low.")
    clip_high: float = Field(4e-4, ge=0.0, description="Sequence ratio clipped above at 1 + clip_high.")


GSPO_LOG_RATIO_MAX = 10.0  # verl compute_policy_loss_gspo: torch.clamp(log_seq_importance_ratio, max=10.0)


def raw_log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """``logp − old`` on the mask, 0 elsewhere (unclamped)."""
    return torch.where(mask > 0, logprobs - old_logprobs, torch.zeros_like(logprobs))


def log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """``clamp(logp − old, ±20)`` on the mask, 0 elsewhere."""
    return torch.clamp(raw_log_ratio(logprobs, old_logprobs, mask), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def clip_metrics(ratio: Tensor, advantages: Tensor, mask: Tensor, low: float, high: float) -> dict[str, Tensor]:
    ratio, advantages = ratio.detach(), advantages.detach()
    low_active = (advantages < 0) & (ratio < 1.0 - low)
    high_active = (advantages > 0) & (ratio > 1.0 + high)
    return {
        "clip_frac_low": masked_mean(low_active.to(ratio.dtype), mask),
        "clip_frac_high": masked_mean(high_active.to(ratio.dtype), mask),
        "ratio_mean": masked_mean(ratio, mask),
    }


def clipped_surrogate(ratio: Tensor, advantages: Tensor, low: float, high: float) -> Tensor:
    """``max(−A·r, −A·clip(r, 1 − low, 1 + high))`` per token (the negated PPO-clip objective)."""
    return torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - low, 1.0 + high))


@LOSSES.register("ppo", config=PPOLossConfig, needs=ROW_LOCAL)
def ppo(ctx: TokenContext, cfg: PPOLossConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip surrogate (Schulman et al. 2017, arXiv:1707.06347) with asymmetric clip-higher (DAPO, Yu et al.
    2025, arXiv:2503.14476) and optional dual clip (Ye et al. 2020, arXiv:1912.09729).

    ``r = exp(logp − old)``; ``ℓ = max(−A·r, −A·clip(r, 1 − ε_low, 1 + ε_high))``; with dual clip c > 1,
    ``ℓ = min(ℓ, −A·c)`` where A < 0, which bounds the loss of a negative-advantage token whose ratio has
    blown up (r > c) instead of letting it grow linearly in r. Used as GRPO's loss with group advantages.
    """
    logprobs, old_logprobs, advantages, mask = ctx.logprobs, ctx.old_logprobs, ctx.advantages, ctx.mask
    ratio = torch.exp(log_ratio(logprobs, old_logprobs, mask))
    loss = clipped_surrogate(ratio, advantages, cfg.clip_low, cfg.clip_high)
    metrics = clip_metrics(ratio, advantages, mask, cfg.clip_low, cfg.clip_high)
    if cfg.dual_clip is not None:
        bound = -advantages * cfg.dual_clip
        dual_active = (advantages < 0) & (loss > bound)
        loss = torch.where(advantages < 0, torch.minimum(loss, bound), loss)
        metrics["clip_frac_dual"] = masked_mean(dual_active.detach().to(ratio.dtype), mask)
    loss = torch.where(mask > 0, loss, torch.zeros_like(loss))
    return loss, metrics


@LOSSES.register("gspo", config=GSPOLossConfig, needs=ROW_LOCAL)
def gspo(ctx: TokenContext, cfg: GSPOLossConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO-token surrogate (Group Sequence Policy Optimization, Zheng et al. 2025, arXiv:2507.18071).

    Sequence ratio ``s_i = exp(mean_{t∈y_i} (logp_t − old_t))`` (length-normalised, the geometric mean of the
    token ratios); per token ``s_{i,t} = sg(s_i) · exp(logp_t − sg(logp_t))``, whose value is s_i and whose gradient
    is ``s_i · ∇logp_t``; ``ℓ = max(−A·s_{i,t}, −A·clip(s_{i,t}, 1 − ε_low, 1 + ε_high))``. With advantages
    constant along a sequence and ``seq-mean-token-mean`` aggregation this is the paper's sequence-level GSPO
    objective. The default clipping ranges 3e-4 / 4e-4 are the paper's (v2, §5.1); they are tiny because s_i
    is a per-token geometric mean. Clip fractions are measured on s_i, counted over action tokens.

    Extremes follow verl's ``compute_policy_loss_gspo``: the mean is over the RAW token log-ratios (no per-token
    clamp, so s_i is the true geometric mean however far one token moved), and the per-token log-ratio
    ``sg(log s_i) + logp_t − sg(logp_t)`` is clamped at +10 only: a sequence with log s_i > 10 has
    ``s_{i,t} = e^10`` and no gradient (the paper has no clamp; e^10 keeps −A·s finite), one with a very negative
    log s_i has s_i → 0, which is harmless.
    """
    logprobs, old_logprobs, advantages, mask = ctx.logprobs, ctx.old_logprobs, ctx.advantages, ctx.mask
    seq_log_ratio = masked_mean(raw_log_ratio(logprobs.detach(), old_logprobs, mask), mask, dim=-1)  # [B]
    token_grad = torch.where(mask > 0, logprobs - logprobs.detach(), torch.zeros_like(logprobs))
    ratio = torch.exp(torch.clamp(seq_log_ratio[:, None] + token_grad, max=GSPO_LOG_RATIO_MAX))
    seq_ratio = torch.exp(torch.clamp(seq_log_ratio, max=GSPO_LOG_RATIO_MAX))
    loss = clipped_surrogate(ratio, advantages, cfg.clip_low, cfg.clip_high)
    metrics = clip_metrics(seq_ratio[:, None].expand_as(mask), advantages, mask, cfg.clip_low, cfg.clip_high)
    loss = torch.where(mask > 0, loss, torch.zeros_like(loss))
    return loss, metrics


@LOSSES.register("none", config=NoOptions, needs=ROW_LOCAL)
def no_policy_loss(ctx: TokenContext, cfg: NoOptions) -> tuple[Tensor, dict[str, Tensor]]:
    """No policy-gradient surrogate: 0 on every token. For runs whose loss is another term's alone (DPO on stored
    pairs through ``update.terms``)."""
    return torch.zeros_like(ctx.logprobs), {}
