"""XRPO's novelty-aware advantage sharpening [134] (credit piece ``xrpo_sharpen``).

A correct response the policy found unlikely, relative to the other responses of its group, gets a larger positive
advantage, so the update reaches beyond the modes the policy already prefers:

- ``s_i = (1/|y_i|)·Σ_t log π(y_t | x, y_<t)``, the mean log-probability of episode i's action tokens (the
  sampler's behaviour log-probs, no extra forward);
- ``η_i = exp(s_i − s̄_g)``, s̄_g the mean of s over i's group (every member, correct or not): η < 1 for a
  response less likely than the group's average;
- ``A⁺_{i,t} = A_{i,t} + min(max(λ·(1 − η_i), 0), κ·A_{i,t})`` where ``A_{i,t} > 0`` (a correct response under
  an outcome baseline), ``A⁺ = A`` elsewhere. The boost is at most λ and at most κ·A (the sign never flips, the
  magnitude at most (1 + κ)×); a response at or above the group's likelihood gets nothing.

The formula is the one the paper's section on exploitation gives as restated by public re-implementations
(``s``, ``η``, ``min(max(λ(1−η), 0), κA)``); λ and κ default to 1.0 as there. The paper's own constants and
code were not reachable from here (the authors' repository UIUC-MLSys/XRPO has no stored copy), so λ, κ and
whether s̄ runs over the whole group or its correct members only are unverified. One re-implementation caps
with κ·|A| and boosts every row; here only rows with A > 0 are boosted, which is what "low-likelihood correct
responses" asks and what keeps ``min(·, κA)`` meaningful. Off-policy rows (seeded with exemplars, see
`outrider.explore.xrpo`) carry the log-probs they were sampled with, under their context.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor

from outrider.credit import CREDIT, CreditOutput
from outrider.credit.wrapped import WrappedCreditConfig
from outrider.data import Batch
from outrider.stats import group_ids, group_moments, masked_mean


class SharpenConfig(WrappedCreditConfig):
    piece: ClassVar[str] = "xrpo_sharpen"

    novelty: float = Field(1.0, ge=0.0, description="λ: the largest boost, λ·(1 − η) with η = exp(s_i − s̄) "
                                                    "(0 disables the sharpening).")
    clip: float = Field(1.0, ge=0.0, description="κ: the boost is at most κ·A, so a boosted advantage is at most "
                                                 "(1 + κ)·A.")


def novelty(logprobs: Tensor, mask: Tensor, group_index: Tensor) -> Tensor:
    """``η_i = exp(s_i − s̄_g)`` [134], ``[B]``: s_i the mean log-prob over row i's action tokens, s̄_g the mean
    of s over its group (a group of one: η = 1)."""
    s = masked_mean(logprobs.to(torch.float64), mask.to(torch.float64), dim=-1)
    inverse, k = group_ids(group_index)
    _, mean, _ = group_moments(s, inverse, k)
    return torch.exp(s - mean[inverse])


def sharpen(adv: Tensor, eta: Tensor, mask: Tensor, lam: float, kappa: float) -> Tensor:
    """``A + min(max(λ(1 − η), 0), κ·A)`` where ``A > 0`` (per token, η per row), A elsewhere; 0 off the mask."""
    boost = torch.clamp(lam * (1.0 - eta), min=0.0).to(adv.dtype)[:, None]
    out = torch.where(adv > 0, adv + torch.minimum(boost.expand_as(adv), kappa * adv), adv)
    return torch.where(mask > 0, out, torch.zeros_like(out))


@CREDIT.register("xrpo_sharpen", config=SharpenConfig)
def xrpo_sharpen(batch: Batch, cfg: SharpenConfig) -> CreditOutput:
    """XRPO's novelty-aware sharpening [134] of a base piece's advantages (module docstring for the formula)."""
    entry, base_cfg = CREDIT.build(cfg.base, "credit.base")
    base = entry.create(base_cfg)(batch)
    m = batch.action_mask
    lp = batch.behaviour_logprobs if batch.behaviour_logprobs is not None else torch.zeros_like(m)
    eta = novelty(lp, m, batch.group_index)
    adv = sharpen(base.advantages, eta, m, cfg.novelty, cfg.clip)
    boosted = ((adv != base.advantages) & (m > 0)).any(-1)
    metrics = dict(base.metrics)
    metrics.update({"sharpened_rows": float(boosted.float().mean()),
                    "sharpen_gain": float((adv - base.advantages)[boosted].abs().max()) if bool(boosted.any())
                    else 0.0})
    return CreditOutput(advantages=adv, returns=base.returns, metrics=metrics)
