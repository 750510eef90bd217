"""Goal-conditioned contrastive representations for a reward model [87] (Nath et al. 2024; checked against the
authors' `openrlhf/models/loss.py` `ContrastiveGoalLoss`, `rm_trainer.py` and `filter_and_eval.py`).

**The loss.** For a batch of preference pairs, h_t is the RM's last-layer hidden state (the value head's input) at
response position t (the response's tokens and the EOS after it: the prefix ending at t). For each chosen
response, S source/goal pairs of positions are drawn uniformly over the response, the source never after the goal
(two uniform draws, sorted); S more source positions of the chosen response and S positions of the rejected one
are drawn for the negatives. With s, g, s', n the hidden states at those positions:

    ℓ_gc = −log( mean_{b,i,j} σ(cos(s_bi, g_bj)) ) − log( 1 − mean_{b,i,j} σ(cos(s'_bi, n_bj)) )

(i, j over the S×S grid of each row, b over the batch: a prefix of a preferred response is pulled toward its own
future states and pushed from states of the dispreferred one). The RM's objective is ``BT + λ·ℓ_gc`` with λ = 0.5
and S = 16 in the authors' runs. σ(cos) lies in [σ(−1), σ(1)] = [0.269, 0.731], so ℓ_gc ∈ [0.627, 2.627].

**Q(prefix, goal).** After training, the goal g is the mean final hidden state (the EOS position) of the preferred
responses it was trained on; ``Q(prefix) = cos(h_prefix, g)``. Scoring partial solutions and dropping samples in
majority voting once Q falls below a threshold (the authors' filter: a sample is kept only if Q stays above the
threshold at every token; its tokens saved are those after the first token below it) use that Q.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def goal_contrastive_loss(source: Tensor, goal: Tensor, neg_source: Tensor, negative: Tensor) -> Tensor:
    """``ℓ_gc`` of the module docstring from gathered hidden states, each of shape (batch, S, hidden):
    ``−log mean σ(cos(source_i, goal_j)) − log(1 − mean σ(cos(neg_source_i, negative_j)))`` over every row's
    S×S grid and the batch [87]."""
    pos = torch.sigmoid(F.cosine_similarity(source.unsqueeze(2), goal.unsqueeze(1), dim=-1)).mean()
    neg = torch.sigmoid(F.cosine_similarity(neg_source.unsqueeze(2), negative.unsqueeze(1), dim=-1)).mean()
    return -torch.log(pos) - torch.log(1 - neg)


def sample_offsets(n_actions: Tensor, samples: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(source, goal) offsets from each row's last position, shape (batch, samples): ``floor(u·n)`` for a uniform u,
    so an offset lies in [0, n − 1] (0 is the last position), the source's u the larger of two draws, so the source
    is never after the goal."""
    u = torch.rand(len(n_actions), 2, samples, generator=generator).sort(dim=1).values
    n = n_actions.to(u.dtype).unsqueeze(1)
    source = (u[:, 1] * n).floor().long().clamp(max=n_actions.unsqueeze(1) - 1)
    goal = (u[:, 0] * n).floor().long().clamp(max=n_actions.unsqueeze(1) - 1)
    return source, goal


def uniform_offsets(n_actions: Tensor, samples: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform offsets from each row's last position, shape (batch, samples), in [0, n − 1]."""
    u = torch.rand(len(n_actions), samples, generator=generator)
    return (u * n_actions.to(u.dtype).unsqueeze(1)).floor().long().clamp(max=n_actions.unsqueeze(1) - 1)


def gather(hidden: Tensor, last: Tensor, offsets: Tensor) -> Tensor:
    """Hidden states at positions ``last − offset`` of each row: (batch, samples, hidden)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(1)
    return hidden[rows, last.unsqueeze(1) - offsets]


def contrastive_term(h_chosen: Tensor, last_chosen: Tensor, n_chosen: Tensor, h_rejected: Tensor,
                     last_rejected: Tensor, n_rejected: Tensor, samples: int,
                     generator: torch.Generator | None = None) -> Tensor:
    """``ℓ_gc`` on a batch of pairs: hidden states (batch, length, hidden) of the chosen and rejected sequences,
    their last positions and their numbers of response positions, positions drawn as in [87]."""
    source, goal = sample_offsets(n_chosen, samples, generator)
    neg_source = uniform_offsets(n_chosen, samples, generator)
    negative = uniform_offsets(n_rejected, samples, generator)
    return goal_contrastive_loss(gather(h_chosen, last_chosen, source), gather(h_chosen, last_chosen, goal),
                                 gather(h_chosen, last_chosen, neg_source),
                                 gather(h_rejected, last_rejected, negative))


def q_values(hidden: Tensor, goal: Tensor) -> Tensor:
    """``Q = cos(h, g)`` for hidden states of any leading shape (…, hidden) against one goal vector."""
    return F.cosine_similarity(hidden, goal.expand_as(hidden), dim=-1)


def first_below(q: Sequence[float], threshold: float) -> int | None:
    """The first position whose Q is below `threshold` (None when none is): where an early abort cuts."""
    return next((t for t, v in enumerate(q) if v < threshold), None)


def majority_vote(answers: Sequence[str | None], keep: Sequence[bool]) -> str | None:
    """The most common answer among the kept samples (all samples when none is kept; the first seen among ties;
    None answers, unparsed ones, never win over a parsed one)."""
    pool = [a for a, k in zip(answers, keep) if k] or list(answers)
    counts = Counter(a for a in pool if a is not None)
    return max(counts, key=lambda a: (counts[a], -pool.index(a))) if counts else None


def early_abort_vote(answers: Sequence[str | None], q: Sequence[Sequence[float]], threshold: float,
                     check_upto: Sequence[int]) -> tuple[str | None, int, int]:
    """Majority vote with early abort [87]: sample i is dropped when its Q falls below `threshold` at a position
    before ``check_upto[i]`` (the positions the filter sees: a few steps, or the whole response); a dropped
    sample's tokens from that position on are saved. Returns (the vote, tokens saved, tokens in all samples)."""
    keep, saved = [], 0
    for qi, upto in zip(q, check_upto):
        cut = first_below(list(qi)[:upto], threshold)
        keep.append(cut is None)
        saved += 0 if cut is None else len(qi) - cut
    if not any(keep):
        saved = 0  # nothing kept: the vote falls back to every sample, which had to be generated whole
    return majority_vote(answers, keep), saved, sum(len(qi) for qi in q)
