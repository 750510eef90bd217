"""ArenaRL's tournament ranks as advantages [40]: brackets of 1, 2, 3 and 5 members by hand (N − 1 matches, byes),
the judge's noise, and the group-normalised advantages."""

from __future__ import annotations

import random

import pytest
import torch

from outrider.credit import CREDIT
from outrider.credit.arena import tournament


def test_tournaments_by_hand():
    assert tournament([0.3], random.Random(0)) == ([0], 0)  # a group of one: no match
    assert tournament([0.0, 1.0], random.Random(0)) == ([0, 1], 1)
    # three: one bye, N − 1 = 2 matches; the best survives 2 rounds (ceil(log2 3)), whatever the bracket
    for seed in range(8):
        s, m = tournament([0.1, 0.9, 0.5], random.Random(seed))
        assert m == 2 and s[1] == 2 and sorted(s) in ([0, 1, 2], [1, 1, 2])  # the bye's loser survived round 1
    # five: three byes, four matches, champion 3 rounds, the worst at most 1 (a bye)
    s, m = tournament([5.0, 4.0, 3.0, 2.0, 1.0], random.Random(3))
    assert m == 4 and s[0] == 3 and s[4] <= 1 and sum(s) == 4 + 3  # every match adds 1, every bye 1
    # ties are coins, a noise of 1 flips every verdict: the worst wins
    s, _ = tournament([2.0, 1.0], random.Random(0), noise=1.0)
    assert s == [0, 1]


def make_batch(scores, groups):
    b = type("B", (), {})()
    b.action_mask = torch.ones(len(scores), 3)
    b.token_rewards = torch.zeros(len(scores), 3)
    b.token_rewards[:, -1] = torch.tensor(scores)
    b.group_index = torch.tensor(groups)
    return b


def test_arena_advantages_by_hand():
    entry, cfg = CREDIT.build({"name": "arena"}, "credit")
    piece = entry.create(cfg)
    out = piece(make_batch([1.0, 0.0, 0.7], [0, 0, 1]))
    a = out.advantages[:, 0]
    # group 0: one match, survived (1, 0) -> mean 0.5, std 1/sqrt(2) -> ±1/sqrt(2); group 1 alone: 0
    assert a.tolist() == pytest.approx([2 ** -0.5, -(2 ** -0.5), 0.0], abs=1e-5)
    assert out.metrics["arena_matches"] == 1.0
    assert torch.equal(out.advantages[:, 0], out.advantages[:, 2])  # copied to every action token
    # equal rewards: the coin still picks a winner (ranks from a judge always differ)
    tied = piece(make_batch([0.5, 0.5], [0, 0])).advantages[:, 0]
    assert sorted(tied.tolist()) == pytest.approx([-(2 ** -0.5), 2 ** -0.5], abs=1e-5)
    # unnormalised: s − mean over a group of four: survived (2, 1, 0, 0) in some bracket -> sums to 0
    entry, cfg = CREDIT.build({"name": "arena", "std_normalize": False}, "credit")
    a = entry.create(cfg)(make_batch([4.0, 3.0, 2.0, 1.0], [0, 0, 0, 0])).advantages[:, 0]
    assert a.sum().item() == pytest.approx(0.0) and a[0].item() == pytest.approx(2 - 0.75)
