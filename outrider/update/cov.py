"""Covariance-based entropy control as policy surrogates: Clip-Cov and KL-Cov [153].

[153] (Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models",
arXiv:2505.22617) shows that under softmax policy gradient the step change of entropy is driven by
``−Cov(log π(a|s), A(s, a))``: tokens that are both likely and advantaged lower entropy most. Both pieces
act on the few tokens with the largest centred product ``cov_t = (A_t − mean A)(logp_t − mean logp)`` over the
action tokens of the minibatch the loss sees (verl computes it per micro-batch; outrider per minibatch, so the
statistics and the number of selected tokens depend on the minibatch size).

Like verl, where they are ``policy_loss.loss_mode`` values (``compute_policy_loss_clip_cov`` /
``compute_policy_loss_kl_cov``), they are `LOSSES` pieces rather than entropy regulators: they change the
per-token surrogate itself.

Both use the raw ratio ``r = exp(logp − old)``, unclamped, as [153]'s code and verl do (outrider's ``ppo``
clamps the log-ratio to ±20, as verl's vanilla loss does). A log-ratio above about 88 overflows float32 to
``inf`` there as here; within one batch's epochs |logp − old| stays far below that (docs/conventions.md).
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import Tensor

from outrider.stats import masked_mean
from outrider.registry import PieceConfig
from outrider.update import LOSSES, TokenContext
from outrider.update.losses import clip_metrics, clipped_surrogate, raw_log_ratio


class ClipCovConfig(PieceConfig):
    """Options of `clip_cov` (defaults: verl ``PolicyLossConfig`` and its actor clip ratio)."""

    clip_low: float = Field(0.2, ge=0.0, lt=1.0, description="ε_low: the ratio is clipped below at 1 − ε_low.")
    clip_high: float = Field(0.2, ge=0.0, description="ε_high: the ratio is clipped above at 1 + ε_high ([153]'s "
                                                       "recipes use 0.28, verl's default actor uses 0.2).")
    clip_ratio: float = Field(2e-4, ge=0.0, le=1.0, description="Fraction r of the minibatch's action tokens whose "
                                                                "gradient is detached: n = max(int(r·N), 1).")
    clip_cov_lb: float = Field(1.0, description="Lower bound (strict) of the covariance band a token must fall in "
                                                "to be a candidate for detaching.")
    clip_cov_ub: float = Field(5.0, description="Upper bound (strict) of the covariance band.")

    @model_validator(mode="after")
    def _band_not_empty(self) -> "ClipCovConfig":
        if self.clip_cov_lb >= self.clip_cov_ub:
            raise ValueError(f"clip_cov_lb ({self.clip_cov_lb}) must be below clip_cov_ub ({self.clip_cov_ub})")
        return self


class KLCovConfig(PieceConfig):
    """Options of `kl_cov` (defaults: [153]'s recipe scripts; see the field notes for the alternatives)."""

    kl_cov_ratio: float = Field(2e-4, ge=0.0, le=1.0, description="Fraction r of the minibatch's action tokens "
                                "that get the KL penalty: the top k = max(1, int(r·N)) by covariance. [153] uses 2e-4 "
                                "for 32B and 2e-3 for 7B models; smaller models want the larger ratio.")
    ppo_kl_coef: float = Field(1.0, ge=0.0, description="β in β·|logp − logp_old| on the selected tokens. [153]'s "
                               "scripts use 1.0 (verl's fallback when unset); verl's config dataclass defaults to 0.1.")


def token_covariance(logprobs: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """``cov_t = (A_t − mean_M A)(logp_t − mean_M logp)`` per token, detached, with masked means over the action
    tokens: the entropy-dynamics covariance of [153] (``ΔH ≈ −η·mean_t cov_t`` under softmax policy gradient)."""
    lp, adv = logprobs.detach(), advantages.detach()
    return (adv - masked_mean(adv, mask)) * (lp - masked_mean(lp, mask))


def _flat_to_mask(index: Tensor, like: Tensor) -> Tensor:
    """A boolean ``[B, T]`` tensor shaped like ``like`` that is True at the flat positions ``index``."""
    out = torch.zeros(like.numel(), dtype=torch.bool, device=like.device)
    out[index] = True
    return out.view_as(like)


@LOSSES.register("clip_cov", config=ClipCovConfig)
def clip_cov(ctx: TokenContext, cfg: ClipCovConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """Clip-Cov [153]: PPO-clip whose gradient is detached at a few random high-covariance tokens.

    ``ℓ_t = max(−A·r, −A·clip(r, 1 − ε_low, 1 + ε_high))`` with ``r = exp(logp − old)``;
    ``cov_t = (A_t − mean_M A)(logp_t − mean_M logp)``; candidates are action tokens with
    ``lb < cov_t < ub`` (strict) that PPO does not already clip (``−A·clip(r) > −A·r``);
    ``n = max(int(ρ·N), 1)`` of them (N = action tokens) are drawn uniformly without replacement and get
    ``ℓ_t ← 0·ℓ_t`` (no gradient, still counted in the aggregation's denominator, as in verl). Detaching the
    tokens that push entropy down hardest slows entropy collapse. There is no dual clip, as in verl.
    Metrics: the PPO clip fractions, ``cov_detached_frac`` (detached / N) and ``cov_mean`` (mean cov_t).
    """
    logprobs, advantages, mask = ctx.logprobs, ctx.advantages, ctx.mask
    ratio = torch.exp(raw_log_ratio(logprobs, ctx.old_logprobs, mask))
    unclipped = -advantages * ratio
    loss = clipped_surrogate(ratio, advantages, cfg.clip_low, cfg.clip_high)
    valid = mask > 0
    ppo_clipped = (loss.detach() > unclipped.detach()) & valid  # the clamped branch wins: gradient already 0

    cov = token_covariance(logprobs, advantages, mask)
    candidates = valid & ~ppo_clipped & (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub)
    n_clip = max(int(cfg.clip_ratio * int(valid.sum())), 1)
    cand_index = candidates.flatten().nonzero().squeeze(1)
    # random, not top-k: [153] detaches a random subset of the band so no fixed token class is always frozen
    gen = ctx.generator if ctx.generator is not None else torch.Generator().manual_seed(0)
    perm = torch.randperm(cand_index.numel(), generator=gen, device=gen.device).to(cand_index.device)
    detached = _flat_to_mask(cand_index[perm[:n_clip]], mask)

    loss = torch.where(detached | ~valid, torch.zeros_like(loss), loss)
    metrics = clip_metrics(ratio, advantages, mask, cfg.clip_low, cfg.clip_high)
    metrics["cov_detached_frac"] = masked_mean(detached.to(ratio.dtype), mask)
    metrics["cov_mean"] = masked_mean(cov, mask)
    return loss, metrics


@LOSSES.register("kl_cov", config=KLCovConfig)
def kl_cov(ctx: TokenContext, cfg: KLCovConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """KL-Cov [153]: the unclipped surrogate plus a KL penalty on the top-k covariance tokens.

    ``ℓ_t = −A·r`` for every action token (no clipping at all), and for the ``k = max(1, int(ρ·N))`` action
    tokens with the largest ``cov_t = (A_t − mean A)(logp_t − mean logp)`` (plain means over the action tokens,
    ``torch.topk``): ``ℓ_t = −A·r + β·|logp_t − old_t|``. The penalty holds back exactly the updates that lower
    entropy most while the rest of the batch trains freely. On-policy (r = 1, e.g. one minibatch and one epoch
    per batch) the penalty and its gradient are both 0 and KL-Cov is exactly vanilla policy gradient: it acts
    only from the second minibatch or epoch of a batch on.
    Metrics: ``ratio_mean``, ``kl_abs_mean`` (mean |logp − old| over action tokens, verl's second output),
    ``kl_cov_frac`` (k / N) and ``cov_mean``.
    """
    logprobs, advantages, mask = ctx.logprobs, ctx.advantages, ctx.mask
    lr = raw_log_ratio(logprobs, ctx.old_logprobs, mask)
    ratio = torch.exp(lr)
    loss = -advantages * ratio

    cov = token_covariance(logprobs, advantages, mask)
    valid_index = (mask > 0).flatten().nonzero().squeeze(1)
    n_valid = valid_index.numel()
    selected = torch.zeros_like(mask, dtype=torch.bool)
    if n_valid > 0:
        k = min(max(1, int(n_valid * cfg.kl_cov_ratio)), n_valid)
        top = torch.topk(cov.flatten()[valid_index], k, largest=True).indices
        selected = _flat_to_mask(valid_index[top], mask)
        loss = loss + cfg.ppo_kl_coef * lr.abs() * selected.to(loss.dtype)

    loss = torch.where(mask > 0, loss, torch.zeros_like(loss))
    metrics = {
        "ratio_mean": masked_mean(ratio.detach(), mask),
        "kl_abs_mean": masked_mean(lr.detach().abs(), mask),
        "kl_cov_frac": masked_mean(selected.to(ratio.dtype), mask),
        "cov_mean": masked_mean(cov, mask),
    }
    return loss, metrics
