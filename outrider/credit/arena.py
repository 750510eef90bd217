"""ArenaRL's tournament ranks as advantages [40] (credit piece ``arena``).

Within each group a pairwise judge plays a single-elimination tournament: O(N) comparisons (N − 1 matches) instead
of the O(N²) of a round robin. A member's tournament score is the number of rounds it survived (``s_i``: 0 for a
first-round loser, ⌈log2 N⌉ for the champion); the advantage is the group-normalised score,
``A_i = (s_i − mean_g s)/(std_g s + ε)`` (or ``s_i − mean_g s``), copied to every action token.

The bracket: the group's members (sorted by reward, tokens and sampling statistics, so the rows' order in the batch
does not matter) in a seeded random order (the seed is the option ``seed``, the group's id and its members'
rewards, so a resumed run draws the same bracket without state), padded to the next power of two with
byes; the first ``2^⌈log2 N⌉ − N`` members of the order get a bye in round 1 (a bye counts as a round survived).
Each round pairs the survivors in order. The judge compares two members' summed rewards ``R_i`` (what the score
pieces composed: a pointwise reward read pairwise), the higher wins, a tie is a fair coin; with ``judge_noise`` p
its verdict is flipped with probability p (the toy of a noisy pairwise judge).

ArenaRL's details (its judge's prompt, how ranks map to rewards, its bracket seeding) are from the abstract only
(the paper's text and code were not reachable): the rounds-survived score and the random bracket are choices here.
A group of one plays no match (s = 0, A = 0); a group of two is one match (GRPO's normalisation gives ±1/√2).
"""

from __future__ import annotations

import hashlib
import random
from typing import Callable

import torch
from pydantic import Field
from torch import Tensor

from outrider.credit import CREDIT, CreditConfig, CreditOutput
from outrider.credit.outcome import broadcast_to_actions, episode_scores
from outrider.data import Batch
from outrider.stats import group_mean_std


class ArenaConfig(CreditConfig):
    """Options of `arena`."""

    std_normalize: bool = Field(True, description="Divide the centred tournament score by the group's std (as "
                                                  "GRPO); false: s − mean.")
    epsilon: float = Field(1e-6, ge=0.0, description="Added to the group std before dividing.")
    judge_noise: float = Field(0.0, ge=0.0, le=1.0, description="Probability that the judge's verdict on a match "
                                                                "is flipped (a noisy pairwise judge).")
    seed: int = Field(0, description="Seed of the brackets, the tie coins and the judge's noise.")


Judge = Callable[[int, int, random.Random], bool]


def tournament(values: list[float], rng: random.Random, noise: float = 0.0,
               judge: Judge | None = None) -> tuple[list[int], int]:
    """Rounds survived by each entrant of a single-elimination tournament, in the order of `values`, and the
    number of matches played. The bracket is a shuffle of the entrants; the first 2^⌈log2 n⌉ − n entrants of it
    get a bye; a match goes to the higher value (a tie: a coin), flipped with probability `noise`; or, given
    ``judge(a, b, rng) -> a wins``, to what it says (the arena toy's noisy judges)."""
    n = len(values)
    order = list(range(n))
    rng.shuffle(order)
    survived = [0] * n
    size = 1
    while size < n:
        size *= 2
    byes = size - n
    alive = order[:byes]  # a bye is a round survived
    for i in alive:
        survived[i] += 1
    playing = order[byes:]
    matches = 0
    while len(alive) + len(playing) > 1:
        winners = []
        for a, b in zip(playing[0::2], playing[1::2]):
            matches += 1
            if judge is not None:
                a_wins = judge(a, b, rng)
            else:
                a_wins = values[a] > values[b] or (values[a] == values[b] and rng.random() < 0.5)
            if noise and rng.random() < noise:
                a_wins = not a_wins
            w = a if a_wins else b
            survived[w] += 1
            winners.append(w)
        playing, alive = alive + winners, []
    return survived, matches


def _group_rng(seed: int, gid: int, values: list[float]) -> random.Random:
    digest = hashlib.sha256(f"arena:{seed}:{gid}:{values}".encode()).hexdigest()[:16]
    return random.Random(int(digest, 16))


def _row_key(batch: Batch, scores: Tensor, i: int) -> tuple:
    """A row's sort key: its reward, then its tokens, then the log-probs and entropies it was sampled with."""
    key: tuple = (float(scores[i]),)
    for name in ("input_ids", "behaviour_logprobs", "behaviour_entropy"):
        t = getattr(batch, name, None)
        if t is not None:
            key += (t[i][batch.action_mask[i] > 0].tolist(),)
    return key


@CREDIT.register("arena", config=ArenaConfig)
def arena(batch: Batch, cfg: ArenaConfig) -> CreditOutput:
    """ArenaRL tournament ranks as group-normalised advantages [40]; see the module docstring."""
    scores = episode_scores(batch)
    survived = torch.zeros_like(scores)
    matches = 0
    groups = batch.group_index.tolist()
    for gid in sorted(set(groups)):
        # members in a canonical order, so the bracket does not depend on where rows sit in the batch
        rows = sorted((i for i, g in enumerate(groups) if g == gid), key=lambda i: _row_key(batch, scores, i))
        values = [float(scores[i]) for i in rows]
        s, m = tournament(values, _group_rng(cfg.seed, int(gid), values), cfg.judge_noise)
        matches += m
        for i, v in zip(rows, s):
            survived[i] = float(v)
    mean, std = group_mean_std(survived, batch.group_index)
    adv = survived - mean
    adv = adv / (std + cfg.epsilon) if cfg.std_normalize else adv
    single = torch.tensor([groups.count(g) == 1 for g in groups], device=adv.device)
    adv = torch.where(single, torch.zeros_like(adv), adv)  # a lone member played no match
    return CreditOutput(advantages=broadcast_to_actions(adv, batch.action_mask),
                        metrics={"arena_matches": float(matches)})


def rank_advantages(values: Tensor, seed: int = 0, noise: float = 0.0) -> Tensor:
    """One group's tournament scores (rounds survived) for a `[N]` tensor of values: for analyses and tests."""
    vals = [float(v) for v in values]
    return torch.tensor(tournament(vals, _group_rng(seed, 0, vals), noise)[0], dtype=values.dtype)
