"""Loss aggregation: how a per-token loss ``[B, T]`` becomes the scalar that is back-propagated.

The four modes are verl's ``loss_agg_mode`` values. They differ in how sequences of different lengths weigh:
``token-mean`` weighs every token equally (DAPO, Yu et al. 2025, arXiv:2503.14476, "token-level policy gradient
loss"); ``seq-mean-token-mean`` weighs every sequence equally (the GRPO paper's 1/G Σ_i 1/|o_i| Σ_t, DeepSeekMath,
arXiv:2402.03300); ``seq-mean-token-sum`` sums tokens per sequence; ``seq-mean-token-sum-norm`` divides by a
constant (Dr.GRPO, Liu et al. 2025, arXiv:2503.20783), which removes the length bias of the per-sequence mean.
"""

from __future__ import annotations

import torch
from torch import Tensor

from outrider.errors import OutriderError

AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den > 0``, else 0 (and no NaN gradient through the unused branch)."""
    den = den.to(num.dtype)
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, num / safe, torch.zeros_like(num))


def aggregate(loss: Tensor, mask: Tensor, mode: str, norm_length: int | None = None) -> Tensor:
    """Reduce a per-token ``loss`` [B, T] over the tokens with ``mask`` > 0 to a scalar.

    - ``token-mean``: ``Σ_{i,t} ℓ·m / Σ_{i,t} m``.
    - ``seq-mean-token-sum``: ``mean_{i∈S} Σ_t ℓ_{i,t}·m_{i,t}`` with S the rows that have at least one token.
    - ``seq-mean-token-mean``: ``mean_{i∈S} (Σ_t ℓ_{i,t}·m_{i,t} / Σ_t m_{i,t})``.
    - ``seq-mean-token-sum-norm``: ``Σ_{i,t} ℓ·m / (B · L)`` with B = ``mask.shape[0]`` (every row: the
      normaliser must not depend on the data) and L = ``norm_length`` (default ``mask.shape[1]``), Dr.GRPO's
      constant generation budget.

    Nothing to average over (an all-zero mask, or an empty batch) gives 0, never NaN. Masked positions never
    contribute, even where ``loss`` is inf or NaN.
    """
    if mode not in AGGREGATIONS:
        raise OutriderError(f"unknown loss aggregation '{mode}'; valid: {', '.join(AGGREGATIONS)}")
    m = mask.to(loss.dtype)
    weighted = torch.where(mask > 0, loss * m, torch.zeros_like(loss))
    if mode == "token-mean":
        return _safe_div(weighted.sum(), m.sum())
    if mode == "seq-mean-token-sum-norm":
        length = mask.shape[-1] if norm_length is None else norm_length
        if length <= 0:
            raise OutriderError(f"loss aggregation: norm_length must be positive (got {length})")
        return _safe_div(weighted.sum(), torch.tensor(float(mask.shape[0] * length), device=loss.device))
    seq_sum = weighted.sum(-1)
    tokens = m.sum(-1)
    has_tokens = (tokens > 0).to(loss.dtype)
    per_seq = seq_sum if mode == "seq-mean-token-sum" else _safe_div(seq_sum, tokens)
    return _safe_div((per_seq * has_tokens).sum(), has_tokens.sum())
