"""Masked and grouped tensor statistics, shared by every stage (credit normalisation, loss metrics, diagnostics).

Every helper here is safe on degenerate input: an all-zero mask gives 0 (never NaN), and a group of one episode
gets the verl convention ``mean = 0, std = 1``.
"""

from __future__ import annotations

import torch
from torch import Tensor

WHITEN_EPS = 1e-8  # the variance floor of `masked_whiten`, as in REINFORCE++ / verl


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ x·m over ``dim`` (over everything when ``dim`` is None). Positions with m = 0 never contribute, even if
    ``x`` is inf or NaN there."""
    xm = torch.where(mask > 0, x * mask, torch.zeros_like(x))
    return xm.sum() if dim is None else xm.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Masked mean ``Σ x·m / Σ m`` over ``dim`` (everything when ``dim`` is None); 0 where ``Σ m = 0``."""
    num = masked_sum(x, mask, dim)
    den = mask.sum() if dim is None else mask.sum(dim)
    den = den.to(num.dtype)
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, num / safe, torch.zeros_like(num))


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked entries of ``x`` (all dimensions pooled).

    ``var = Σ m (x − μ)² / (Σ m − 1)`` when ``unbiased`` (Bessel's correction, as ``torch.var``), else
    ``/ Σ m``. With fewer than two masked entries the unbiased form is undefined; the biased one (0) is returned.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum().to(var.dtype)
        var = torch.where(n > 1, var * n / torch.clamp(n - 1, min=1.0), var)
    return var


def masked_whiten(x: Tensor, mask: Tensor, eps: float = WHITEN_EPS) -> Tensor:
    """Whiten ``x`` over all its masked entries: ``(x − μ_m) / sqrt(σ²_m + eps)``, and 0 outside the mask.

    μ_m is the masked mean and σ²_m the masked *unbiased* variance (REINFORCE++, Hu 2025, arXiv:2501.03262:
    "global batch normalisation" of the token returns). A single masked entry whitens to 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    return torch.where(mask > 0, out, torch.zeros_like(out))


def group_sum_count(scores: Tensor, group_index: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row sum of ``scores`` over the row's group and the group's size, both ``[B]``.

    ``sum_i = Σ_{j: g_j = g_i} scores_j`` and ``count_i = |{j: g_j = g_i}|``. Group ids can be any integers.
    """
    _, inverse = torch.unique(group_index, return_inverse=True)
    k = int(inverse.max().item()) + 1 if inverse.numel() else 0
    sums = torch.zeros(k, dtype=scores.dtype, device=scores.device).index_add_(0, inverse, scores)
    counts = torch.zeros(k, dtype=scores.dtype, device=scores.device).index_add_(
        0, inverse, torch.ones_like(scores)
    )
    return sums[inverse], counts[inverse]


def group_mean_std(scores: Tensor, group_index: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row mean and unbiased standard deviation of ``scores`` [B] over the row's group (rows sharing
    ``group_index``), both ``[B]``.

    ``mean_g = Σ_{j∈g} R_j / |g|``, ``std_g = sqrt(Σ_{j∈g} (R_j − mean_g)² / (|g| − 1))`` (as ``torch.std``).
    A group of size 1 gets ``mean = 0, std = 1`` so that a normalised score equals the raw one (verl's
    convention for GRPO, DeepSeekMath, Shao et al. 2024, arXiv:2402.03300).
    """
    sums, counts = group_sum_count(scores, group_index)
    single = counts < 2
    mean = torch.where(single, torch.zeros_like(sums), sums / counts)
    sq, _ = group_sum_count((scores - mean) ** 2, group_index)
    var = sq / torch.clamp(counts - 1, min=1.0)
    std = torch.where(single, torch.ones_like(var), var.sqrt())
    return mean, std


def quantile(x: Tensor, q: float) -> Tensor:
    """Linear-interpolation quantile of all entries of ``x`` (as ``torch.quantile(x.flatten(), q)``), by sorting:
    ``torch.quantile`` refuses inputs above 2^24 elements, which a long-response batch can exceed."""
    s = torch.sort(x.flatten()).values
    pos = q * (s.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, s.numel() - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])
