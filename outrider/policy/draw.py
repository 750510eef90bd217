"""The token draw shared by the eager sampler loop and the compiled decoding step (which fuses it into its graph).

Inverse CDF with one uniform per row: ``u ~ U[0, total)`` and the first token whose cumulative probability exceeds
it. (``torch.multinomial`` draws a vocab-sized exponential per row, and costs more than a small model's whole
decoding step on CPU.) A zero-probability token is never drawn: ``u`` stays strictly below the total mass and the
CDF does not rise at such a token.
"""

from __future__ import annotations

import torch
from torch import Tensor


def inverse_cdf(probs: Tensor, uniform: Tensor) -> Tensor:
    """`probs` [B, V] (unnormalised is fine), `uniform` [B, 1] in [0, 1): one token id per row [B]."""
    cdf = probs.cumsum(-1)
    # u·(1 − 1e-6) < 1, so the product with the total stays strictly below it despite rounding
    u = uniform.mul(1 - 1e-6).mul_(cdf[:, -1:])
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


def draw_with_stats(logits: Tensor, temperature: float, uniform: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Token, its log-prob and the distribution's entropy, all at `temperature` (no top-k/top-p)."""
    logits = logits.float()
    log_p = torch.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)
    probs = log_p.exp()
    token = inverse_cdf(probs, uniform)
    logprob = log_p.gather(-1, token.unsqueeze(-1)).squeeze(-1)
    return token, logprob, torch.special.entr(probs).sum(-1)  # entr(p) = −p·ln p, and 0 at p = 0


def truncation_mask(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """``[..., V]`` bool: the tokens that top-k then top-p sampling keeps from ``logits`` (any shift of the
    temperature-scaled logits, e.g. their log-softmax).

    top-k keeps the k largest (ties at the k-th value included); top-p then keeps, in descending order of the
    top-k renormalised probabilities, every token whose preceding mass is ≤ top_p (so the token that crosses
    top_p stays). ``top_k = 0`` and ``top_p = 1`` are off; with both off every token is kept."""
    keep = torch.ones_like(logits, dtype=torch.bool)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        keep = logits >= kth
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits.masked_fill(~keep, float("-inf")), descending=True, dim=-1)
        p = torch.softmax(sorted_logits, dim=-1)
        drop_sorted = p.cumsum(-1) - p > top_p
        keep = keep & ~torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return keep


def truncate_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """``logits`` with −inf outside `truncation_mask`."""
    if not (top_k or top_p < 1.0):
        return logits
    return logits.masked_fill(~truncation_mask(logits, top_k, top_p), float("-inf"))
