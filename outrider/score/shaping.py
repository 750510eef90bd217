"""Reward levels and their composition: step segmentation, broadcast of step rewards to tokens, gating by the
outcome, Clip / Delta on step sequences [42] and Preference-As-Reward [51]. Small pure functions that score
components (a PRM's step rewards, a proxy reward) compose; each is tested against hand-computed numbers.

Spans are half-open ``(start, end)`` index ranges, over characters of a response or over its action tokens (with
the tiny model's character tokenizer the two coincide).
"""

from __future__ import annotations

import math
import re
from typing import Literal, Sequence

from outrider.errors import OutriderError

Span = tuple[int, int]
Broadcast = Literal["last", "uniform", "return_to_go"]


def segment_delimiter(text: str, delimiter: str = ",", regex: bool = False) -> list[Span]:
    """Steps of `text` ending after each occurrence of `delimiter` (a literal, or a regex with ``regex``); the
    text after the last one is the final step (left out when empty). Concatenated, the spans cover the text."""
    if not delimiter:
        raise OutriderError("segment: delimiter must be a non-empty string")
    pattern = re.compile(delimiter if regex else re.escape(delimiter))
    spans, start = [], 0
    for m in pattern.finditer(text):
        if m.end() > start:
            spans.append((start, m.end()))
            start = m.end()
    if start < len(text) or not spans:
        spans.append((start, len(text)))
    return spans


def segment_fixed(n: int, length: int) -> list[Span]:
    """Fixed-length steps of `length` tokens over `n` tokens, the last one shorter (PRL's chunks [162])."""
    if length < 1:
        raise OutriderError(f"segment: length must be >= 1, got {length}")
    return [(s, min(s + length, n)) for s in range(0, n, length)] or [(0, 0)]


def segment_turns(tokens_per_turn: Sequence[int]) -> list[Span]:
    """One step per turn of a multi-turn episode: the spans of each turn's action tokens, laid end to end."""
    spans, start = [], 0
    for n in tokens_per_turn:
        spans.append((start, start + n))
        start += n
    return spans


def broadcast(step_rewards: Sequence[float], spans: Sequence[Span], n: int, rule: Broadcast = "last") -> list[float]:
    """Step rewards as `n` token rewards: ``last`` puts r_k on step k's last token; ``uniform`` spreads r_k/|k|
    over its tokens (both keep the episode's sum); ``return_to_go`` gives every token of step k the remaining
    return ``Σ_{j≥k} r_j`` (a value-like per-token signal; the sum is not kept). A step without tokens (or past
    the `n` tokens) is dropped: no token can carry it."""
    if len(step_rewards) != len(spans):
        raise OutriderError(f"broadcast: {len(step_rewards)} step rewards for {len(spans)} steps")
    if rule not in ("last", "uniform", "return_to_go"):
        raise OutriderError(f"broadcast: rule must be last, uniform or return_to_go, got {rule!r}")
    out = [0.0] * n
    togo = [sum(step_rewards[k:]) for k in range(len(step_rewards))]
    for k, ((s, e), r) in enumerate(zip(spans, step_rewards)):
        e = min(e, n)
        if e <= s:
            continue
        if rule == "last":
            out[e - 1] += r
        elif rule == "uniform":
            for t in range(s, e):
                out[t] += r / (e - s)
        else:
            for t in range(s, e):
                out[t] += togo[k]
    return out


def gate_by_outcome(process: Sequence[float], outcome: float, threshold: float = 1.0) -> list[float]:
    """Process rewards kept only when the outcome passes: ``r_k·1[r_o ≥ τ]`` (Posterior-GRPO [62] with τ = 1 on
    a 0/1 outcome; G-RA's gated accumulation [60] with its threshold τ). The outcome itself is added apart."""
    keep = outcome >= threshold
    return [float(r) if keep else 0.0 for r in process]


def clip_steps(step_rewards: Sequence[float], eta: float = 0.0) -> list[float]:
    """Clip [42]: ``r_k ← min(r_k − η, 0)``: every step reward ≤ 0, so more steps never add reward."""
    return [min(float(r) - eta, 0.0) for r in step_rewards]


def delta_steps(step_rewards: Sequence[float]) -> list[float]:
    """Delta [42]: ``r_k ← r_k − r_{k+1}`` for k < K, the last step keeps ``r_K``: the sum telescopes to ``r_1``,
    whatever the number of steps."""
    r = [float(x) for x in step_rewards]
    return [r[k] - r[k + 1] for k in range(len(r) - 1)] + r[-1:]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def par(reward: float, reference_rewards: Sequence[float]) -> float:
    """Preference As Reward [51]: ``(1/K)·Σ_k σ(r − r_ref,k)`` with the rewards of K reference responses to the
    same prompt (sampled once from the initial policy): bounded in (0, 1), 0.5 at the references' level, flat
    far above them, so a reward model's overshoot is worth little."""
    if not reference_rewards:
        raise OutriderError("par: needs at least one reference reward")
    return sum(sigmoid(float(reward) - float(r)) for r in reference_rewards) / len(reference_rewards)
