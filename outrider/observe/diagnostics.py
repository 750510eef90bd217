"""Exploration diagnostics measured at evaluation: token entropy, answer diversity, support change and the pass@k
crossover against the base (warm-started) model, and the effective rank of response representations.

Definitions follow `methods_exploration.md`, "Diagnostics": The Invisible Leash [37] for support shrinkage /
expansion and the pass@k crossover, [168] for forking tokens, [9] for the effective rank. All functions are pure
(lists and tensors in, floats out) so each is tested against hand-computed numbers.
"""

from __future__ import annotations

import math
from collections import Counter
from math import comb
from typing import Hashable, Sequence

import torch
from torch import Tensor

from outrider.stats import quantile

FORKING_THRESHOLD = 0.672  # nats; [168] reports 0.672 as the 80th percentile of token entropy of Qwen3 on math


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 − C(n−c, k) / C(n, k) [Chen et al. 2021, Codex]."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def token_entropy_stats(entropies: Sequence[float], forking_threshold: float = FORKING_THRESHOLD) -> dict[str, float]:
    """Mean, 80th and 95th percentiles of the per-token entropies H_t of sampled responses, and the forking
    fraction ``mean_t 1[H_t > τ]`` [168]. Empty input gives zeros."""
    if not entropies:
        return {"entropy_mean": 0.0, "entropy_p80": 0.0, "entropy_p95": 0.0, "forking_frac": 0.0}
    h = torch.tensor(entropies, dtype=torch.float64)
    return {"entropy_mean": float(h.mean()), "entropy_p80": float(quantile(h, 0.8)),
            "entropy_p95": float(quantile(h, 0.95)),
            "forking_frac": float((h > forking_threshold).double().mean())}


def answer_diversity(groups: Sequence[Sequence[tuple[Hashable | None, bool]]]) -> dict[str, float]:
    """Per prompt, from its n samples ``(canonical answer or None, correct)``, averaged over prompts:

    - ``distinct_answers`` D: distinct non-None canonical answers; ``distinct_correct`` D_c: distinct correct ones;
    - ``answer_entropy`` ``H_ans = −Σ_a p̂(a) log p̂(a)`` over the empirical answer frequencies (None counts as
      one more answer, "no answer");
    - ``repeat_rate`` ``mean_i (1/(n−1)) Σ_{j≠i} 1[a_i = a_j]`` (groups of one sample are skipped);
    - ``zero_variance_frac``: prompts whose samples are all correct or all wrong (a GRPO group with no signal).
    """
    if not groups:
        return {}
    d, dc, h, rep, zv = [], [], [], [], []
    for samples in groups:
        answers = [a for a, _ in samples]
        d.append(len({a for a in answers if a is not None}))
        dc.append(len({a for a, ok in samples if ok and a is not None}))
        counts = Counter(answers)
        n = len(answers)
        h.append(-sum(c / n * math.log(c / n) for c in counts.values()))
        if n > 1:
            rep.append(sum(c * (c - 1) for c in counts.values()) / (n * (n - 1)))
        correct = sum(ok for _, ok in samples)
        zv.append(float(correct in (0, n)))
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return {"distinct_answers": mean(d), "distinct_correct": mean(dc), "answer_entropy": mean(h),
            "repeat_rate": mean(rep), "zero_variance_frac": mean(zv)}


def correct_support(groups: Sequence[Sequence[tuple[Hashable | None, bool]]]) -> set[tuple[int, Hashable]]:
    """``S(π) = {(prompt, a) : a correct and sampled at least once}`` (ε = 1/n in [37]'s S_ε)."""
    return {(p, a) for p, samples in enumerate(groups) for a, ok in samples if ok and a is not None}


def support_change(base: set, current: set) -> dict[str, float]:
    """[37]: ``shrinkage = |S_base \\ S| / |S_base|`` (correct answers the base model found that the current one
    no longer does) and ``expansion = |S \\ S_base| / |S|`` (new ones). An empty denominator gives 0."""
    return {"support_shrinkage": len(base - current) / len(base) if base else 0.0,
            "support_expansion": len(current - base) / len(current) if current else 0.0,
            "support_size": float(len(current))}


def pass_at_k_curve(correct: Sequence[int], n: int) -> list[float]:
    """Mean unbiased pass@k over prompts for k = 1..n, given each prompt's correct count out of n."""
    return [sum(pass_at_k(n, c, k) for c in correct) / len(correct) for k in range(1, n + 1)]


def crossover_k(base_correct: Sequence[int], correct: Sequence[int], n: int) -> int | None:
    """The smallest k ≤ n at which the base model's pass@k is at least the current model's [37] (RL gains at small
    k, loses at large k); None if the current model stays ahead up to k = n. Both count n samples per prompt."""
    base, now = pass_at_k_curve(base_correct, n), pass_at_k_curve(correct, n)
    return next((k + 1 for k, (b, c) in enumerate(zip(base, now)) if b >= c - 1e-12), None)


def effective_rank(z: Tensor) -> float:
    """``ER(Z) = exp(−Σ_i p_i log p_i)`` with ``p_i = σ_i / Σ_j σ_j`` the normalised singular values of Z [9]
    (1 when all rows are parallel, up to min(rows, columns) when spread evenly); NaN when Z is not finite (a
    diverged model), where the SVD would fail."""
    if not bool(torch.isfinite(z).all()):
        return float("nan")
    s = torch.linalg.svdvals(z.double())
    s = s[s > s.max() * 1e-12] if s.numel() else s
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))
