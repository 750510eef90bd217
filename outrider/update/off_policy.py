"""Importance correction for off-policy rows, in one place.

A row is off-policy (``batch.off_policy``) when the log-probs its tokens were drawn with, ``μ`` (the recorded
behaviour log-probs), are not the current policy's on the trained sequence: a replayed episode (an older policy),
or one sampled with context that training removes (a hint, a reflection: ``μ`` was taken under the guided
context, the learner scores the unguided one). On-policy rows are untouched: their ratio's old log-probs stay
the recomputed (or current, detached) ones, so a single-epoch update has ratio exactly 1.

With ``π_old`` the old log-probs the learner has for the row (recomputed when the update needs them, else the
current ones, detached) and ``ρ_t = π_old(x_t)/μ(x_t)`` the importance weight of a token:

- ``none``: no separate weight; the surrogate's ratio is ``π_θ/μ`` itself (old ← μ on off-policy rows), clipped by
  the loss's own range (plain off-policy PPO, as self-imitation on a replay buffer does [113]).
- ``token_clip``: ratio ``π_θ/π_old`` and a per-token weight ``min(ρ_t, c)``, detached (truncated importance
  sampling, per token).
- ``sequence_truncation``: ratio ``π_θ/π_old`` and one weight per row, ``min(Π_t ρ_t, c)`` over its trained
  tokens, detached (truncated sequence-level importance sampling).

Log-ratios are clamped to ±20 before ``exp``. Metrics, per origin present when some row is not on-policy:
``origin/<origin>/iw_mean`` and ``iw_max`` (ρ over the origin's trained tokens, or Π ρ per row in the sequence
mode, before truncation) and ``iw_clipped_frac`` (the share the truncation bound).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from outrider.data import ORIGINS
from outrider.kl import LOG_RATIO_CLAMP
from outrider.registry import Options
from outrider.stats import masked_mean


class OffPolicyConfig(Options):
    """How rows whose behaviour log-probs are not the current policy's are corrected."""

    correction: Literal["none", "token_clip", "sequence_truncation"] = Field(
        "none", description="none: ratio π_θ/μ under the loss's own clip; token_clip: ratio π_θ/π_old times "
                            "min(π_old/μ, clip) per token; sequence_truncation: times min(Π_t π_old/μ, clip) per "
                            "row. μ: the recorded behaviour log-probs.")
    clip: float = Field(2.0, gt=0, description="c, the bound of the truncated importance weight.")


def correct(old: Tensor, behaviour: Tensor, mask: Tensor, off_policy: Tensor, cfg: OffPolicyConfig
            ) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(old for the ratio, per-token weight or None, ρ)`` for a minibatch (see the module docstring). ``ρ`` is
    the untruncated weight, per token (``[B, T]``) or per row broadcast over its tokens (sequence mode)."""
    rows = off_policy[:, None] & (mask > 0)
    log_rho = torch.where(rows, old - behaviour, torch.zeros_like(old)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if cfg.correction == "sequence_truncation":
        log_rho = log_rho.sum(-1, keepdim=True).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).expand_as(old)
    rho = torch.exp(log_rho)
    if cfg.correction == "none":
        return torch.where(off_policy[:, None], behaviour, old), None, rho
    weight = torch.where(rows, torch.clamp(rho, max=cfg.clip), torch.ones_like(rho))
    return old, weight, rho


def origin_metrics(rho: Tensor, mask: Tensor, origin: Tensor, off_policy: Tensor, cfg: OffPolicyConfig
                   ) -> dict[str, Tensor]:
    """``origin/<origin>/iw_mean``, ``iw_max`` and (when a truncation applies) ``iw_clipped_frac`` over the
    trained tokens of each origin's off-policy rows."""
    out: dict[str, Tensor] = {}
    for code in torch.unique(origin[off_policy]).tolist():
        rows = (origin == code) & off_policy
        m = mask * rows[:, None].to(mask.dtype)
        if not bool((m > 0).any()):
            continue
        name = f"origin/{ORIGINS[code]}"
        out[f"{name}/iw_mean"] = masked_mean(rho, m)
        out[f"{name}/iw_max"] = rho[m > 0].max()
        if cfg.correction != "none":
            out[f"{name}/iw_clipped_frac"] = masked_mean((rho > cfg.clip).to(rho.dtype), m)
    return out
