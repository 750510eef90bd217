"""Loss aggregation: how a per-token loss ``[B, T]`` becomes the scalar that is back-propagated.

The four modes are verl's ``loss_agg_mode`` values. They differ in how sequences of different lengths weigh:
``token-mean`` weighs every token equally (DAPO, Yu et al. 2025, arXiv:2503.14476, "token-level policy gradient
loss"); ``seq-mean-token-mean`` weighs every sequence equally (the GRPO paper's 1/G Σ_i 1/|o_i| Σ_t, DeepSeekMath,
arXiv:2402.03300); ``seq-mean-token-sum`` sums tokens per sequence; ``seq-mean-token-sum-norm`` divides by a
constant (Dr.GRPO, Liu et al. 2025, arXiv:2503.20783), which removes the length bias of the per-sequence mean.

One convention for every mode: the loss is ``numerator / D`` where the numerator is a sum over rows and D, the
`denominator`, is computed once over the whole batch of an optimiser step. The sequence modes count EVERY row
of that batch in D, rows with no trainable token included (verl's trainer passes ``global_batch_size`` = the
mini-batch's row count; its ``agg_loss`` fallback, the non-empty rows of each micro-batch, is not used). So:

- a step's gradient does not depend on how its batch is split into micro-batches: each chunk aggregated with
  the step's D sums to the whole, and in the sequence modes D is the row count, known before any forward;
- every row weighs 1/B whatever the other rows hold: a row without trainable tokens (an episode whose action is
  all replayed prefix, a row a filter masked out) counts exactly like a zero-advantage row, which
  ``skip_zero_advantage`` also keeps in D; the step size does not jump with the fraction of such rows. To take
  rows out of D, leave them out of the batch instead of masking them.

``token-mean``'s D is the step's number of action tokens, where an empty row adds nothing.
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


def _check_mode(mode: str) -> None:
    if mode not in AGGREGATIONS:
        raise OutriderError(f"unknown loss aggregation '{mode}'; valid: {', '.join(AGGREGATIONS)}")


def denominator(mask: Tensor, mode: str, norm_length: int | None = None) -> Tensor:
    """D of `aggregate` for the whole batch of one optimiser step (``mask`` [B, T]): ``Σ_{i,t} m`` for
    ``token-mean``; B (every row) for ``seq-mean-token-sum`` and ``seq-mean-token-mean``; ``B · L`` for
    ``seq-mean-token-sum-norm`` with L = ``norm_length`` (default ``mask.shape[1]``)."""
    _check_mode(mode)
    if mode == "token-mean":
        return mask.to(torch.float64).sum()
    rows = float(mask.shape[0])
    if mode == "seq-mean-token-sum-norm":
        length = mask.shape[-1] if norm_length is None else norm_length
        if length <= 0:
            raise OutriderError(f"loss aggregation: norm_length must be positive (got {length})")
        rows *= length
    return torch.tensor(rows, dtype=torch.float64, device=mask.device)


def aggregate(loss: Tensor, mask: Tensor, mode: str, norm_length: int | None = None,
              total: Tensor | float | None = None) -> Tensor:
    """Reduce a per-token ``loss`` [B, T] over the tokens with ``mask`` > 0 to a scalar: ``N / D``.

    - ``token-mean``: ``Σ_{i,t} ℓ·m / Σ_{i,t} m``.
    - ``seq-mean-token-sum``: ``Σ_i Σ_t ℓ_{i,t}·m_{i,t} / B``.
    - ``seq-mean-token-mean``: ``Σ_i (Σ_t ℓ_{i,t}·m_{i,t} / Σ_t m_{i,t}) / B`` (a row with no token adds 0).
    - ``seq-mean-token-sum-norm``: ``Σ_{i,t} ℓ·m / (B · L)`` with L = ``norm_length`` (default
      ``mask.shape[1]``), Dr.GRPO's constant generation budget.

    B counts every row, empty ones included (see the module docstring). ``total`` is D when ``loss`` is one
    micro-batch of a larger step (`denominator` of the step's whole mask): the micro-batches' results then sum
    to the step's. Default: D of this ``mask``. Nothing to average over (D = 0) gives 0, never NaN. Masked
    positions never contribute, even where ``loss`` is inf or NaN.
    """
    _check_mode(mode)
    den = denominator(mask, mode, norm_length) if total is None else torch.as_tensor(total, device=loss.device)
    m = mask.to(loss.dtype)
    weighted = torch.where(mask > 0, loss * m, torch.zeros_like(loss))
    if mode == "seq-mean-token-mean":
        num = _safe_div(weighted.sum(-1), m.sum(-1)).sum()
    else:
        num = weighted.sum()
    return _safe_div(num, den)
