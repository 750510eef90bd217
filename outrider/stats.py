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


def group_ids(group_index: Tensor) -> tuple[Tensor, int]:
    """Dense ids 0 … k−1 (``[B]``) for any integer group ids, and k."""
    _, inverse = torch.unique(group_index, return_inverse=True)
    return inverse, int(inverse.max().item()) + 1 if inverse.numel() else 0


def group_moments(x: Tensor, inverse: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per group ``c`` of ``inverse`` (dense ids 0 … k−1, as from `group_ids`): its size n_c, mean μ_c and
    ``Σ_{j∈c} (x_j − μ_c)²``, each ``[k]`` and float64 (an empty group gets n = 0, μ = 0, Σ = 0).

    ``μ_c = s_c + Σ_{j∈c} (x_j − s_c) / n_c`` with ``s_c`` the group's first member, summed in float64: a group
    of equal values gets μ_c = s_c and Σ = 0 exactly, at any size and value (a float32 ``index_add_`` of
    64 × 0.7 is a few ulp off, which GRPO's division by std + 1e-6 turns into advantages of ±0.3).
    """
    n = x.numel()
    x64 = x.reshape(-1).to(torch.float64)
    first = torch.full((k,), n, dtype=torch.long, device=x.device).scatter_reduce_(
        0, inverse, torch.arange(n, device=x.device), "amin")
    shift = torch.where(first < n, x64[first.clamp(max=n - 1)], 0.0) if n else x64.new_zeros(k)
    dev = x64 - shift[inverse]
    count = torch.zeros(k, dtype=torch.float64, device=x.device).index_add_(0, inverse, torch.ones_like(dev))
    mean_dev = torch.zeros_like(count).index_add_(0, inverse, dev) / count.clamp(min=1.0)
    sq = torch.zeros_like(count).index_add_(0, inverse, (dev - mean_dev[inverse]) ** 2)
    return count, shift + mean_dev, sq


def group_mean_std(scores: Tensor, group_index: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row mean and unbiased standard deviation of ``scores`` [B] over the row's group (rows sharing
    ``group_index``), both ``[B]``.

    ``mean_g = Σ_{j∈g} R_j / |g|``, ``std_g = sqrt(Σ_{j∈g} (R_j − mean_g)² / (|g| − 1))`` (as ``torch.std``).
    A group of size 1 gets ``mean = 0, std = 1`` so that a normalised score equals the raw one (verl's
    convention for GRPO, DeepSeekMath, Shao et al. 2024, arXiv:2402.03300). Computed in float64 around one
    member of each group (`group_moments`) and cast back: a group of equal scores gets exactly their value as
    mean and exactly 0 as std, so ``R − mean_g`` is exactly 0 for every member.
    """
    inverse, k = group_ids(group_index)
    count, mean, sq = group_moments(scores, inverse, k)
    single = count < 2
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(sq), (sq / torch.clamp(count - 1, min=1.0)).sqrt())
    return mean[inverse].to(scores.dtype), std[inverse].to(scores.dtype)


def quantile(x: Tensor, q: float) -> Tensor:
    """Linear-interpolation quantile of all entries of ``x`` (as ``torch.quantile(x.flatten(), q)``), by sorting:
    ``torch.quantile`` refuses inputs above 2^24 elements, which a long-response batch can exceed."""
    s = torch.sort(x.flatten()).values
    pos = q * (s.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, s.numel() - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])
