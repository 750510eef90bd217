"""A group whose rewards are all equal gets advantage exactly 0 from every group-based credit piece, in float32,
at any group size and reward value (issue 32): `skip_zero_advantage` and the docstrings rely on it."""

from __future__ import annotations

import pytest
import torch

from outrider.credit import CREDIT
from outrider.data import Batch
from outrider.stats import group_mean_std

# (group size, reward): a float32 index_add_ of these is a few ulp off the reward
CASES = [(64, 0.7), (64, 0.9), (128, 0.1), (1000, 1 / 3)]
# every credit piece that baselines within a group, with the options that make an equal group's advantage 0
PIECES = [
    ("grpo", {}), ("dr_grpo", {}), ("rloo", {}), ("reinforce_pp_baseline", {}),
    ("gigpo", {}), ("gigpo", {"mode": "mean_std_norm"}), ("salt", {}), ("salt", {"node": "prefix"}),
    ("canon", {}), ("canon", {"metric": "length"}), ("riskpo", {}), ("riskpo", {"credit": "std"}),
    ("empg", {"zeta": 0.0}), ("ppl_position", {}), ("ppl_position", {"mode": "penalty"}),
]


def two_turn_batch(rewards: list[float], groups: list[int], dtype: torch.dtype = torch.float32) -> Batch:
    """Rows of two turns (obs, act, act | obs, act, act), the trajectory reward on the last action token, the same
    anchor states and actions in every row (so GiGPO/SALT step groups span the whole prompt group), and random
    behaviour entropies and log-probs (so EMPG, CANON and PPL shaping see non-degenerate inputs)."""
    n, T = len(rewards), 6
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([0, 1, 1, 0, 1, 1], dtype=dtype).repeat(n, 1)
    r = torch.zeros(n, T, dtype=dtype)
    r[:, -1] = torch.tensor(rewards, dtype=dtype)
    return Batch(
        input_ids=torch.zeros(n, T, dtype=torch.long), attention_mask=torch.ones(n, T, dtype=torch.long),
        action_mask=mask, token_rewards=r, step_index=torch.tensor([0, 0, 0, 1, 1, 1]).repeat(n, 1),
        group_index=torch.tensor(groups), sample_weight=torch.ones(n, dtype=dtype),
        behaviour_entropy=torch.rand(n, T, generator=g, dtype=dtype) * mask,
        behaviour_logprobs=-torch.rand(n, T, generator=g, dtype=dtype) * mask,
        turn_state_ids=torch.tensor([[0, 1]]).repeat(n, 1), turn_action_ids=torch.tensor([[0, 1]]).repeat(n, 1),
    )


def advantages(name: str, options: dict, batch: Batch) -> torch.Tensor:
    entry, cfg = CREDIT.build({"name": name, **options})
    return entry.fn(batch, cfg).advantages


@pytest.mark.parametrize("size,reward", CASES)
@pytest.mark.parametrize("name,options", PIECES)
def test_equal_group_gets_exactly_zero_in_float32(name, options, size, reward):
    adv = advantages(name, options, two_turn_batch([reward] * size, [7] * size))
    assert adv.dtype == torch.float32
    assert torch.equal(adv, torch.zeros_like(adv)), f"max |A| = {float(adv.abs().max()):.3g}"


@pytest.mark.parametrize("name,options", [p for p in PIECES if p[0] in ("grpo", "dr_grpo", "rloo", "gigpo", "salt",
                                                                          "canon")])
def test_equal_group_is_zero_next_to_other_groups(name, options):
    """The equal group's rows stay exactly 0 when other groups (one with spread rewards, one lone row) share the
    batch and the group ids are interleaved."""
    rewards = [0.7, 0.0, 0.7, 1.0, 0.7, 0.5] + [0.7] * 60 + [0.3]
    groups = [4, 9, 4, 9, 4, 9] + [4] * 60 + [2]
    adv = advantages(name, options, two_turn_batch(rewards, groups))
    rows = torch.tensor(groups) == 4
    assert torch.equal(adv[rows], torch.zeros_like(adv[rows]))
    assert adv[~rows].abs().sum() > 0


@pytest.mark.parametrize("name,options", [("grpo", {}), ("rloo", {}), ("gigpo", {"mode": "mean_std_norm"})])
def test_equal_group_is_zero_in_float64(name, options):
    adv = advantages(name, options, two_turn_batch([0.1] * 1000, [0] * 1000, torch.float64))
    assert adv.dtype == torch.float64 and torch.equal(adv, torch.zeros_like(adv))


def test_empg_bonus_is_the_only_advantage_of_an_equal_group():
    """With its next-step clarity bonus on, EMPG gives an equal group non-zero advantages by design; the g·A_i
    term is exactly 0, so they equal those of a group whose rewards are all 0."""
    equal = advantages("empg", {}, two_turn_batch([0.7] * 64, [1] * 64))
    zero = advantages("empg", {}, two_turn_batch([0.0] * 64, [1] * 64))
    assert equal.abs().max() > 0
    assert torch.equal(equal, zero)


def test_group_statistics_match_torch_on_ordinary_groups():
    """Ordinary groups: the float64 statistics agree with torch.mean / torch.std to float32 rounding."""
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(300, generator=g) * 10 - 5
    groups = torch.randint(0, 17, (300,), generator=g)
    mean, std = group_mean_std(scores, groups)
    for gid in groups.unique():
        rows = groups == gid
        if int(rows.sum()) > 1:
            torch.testing.assert_close(mean[rows], scores[rows].mean().expand(int(rows.sum())), rtol=0, atol=1e-6)
            torch.testing.assert_close(std[rows], scores[rows].std().expand(int(rows.sum())), rtol=0, atol=1e-6)


def test_group_moments_of_a_lone_row_and_of_equal_rows():
    """`group_moments` has no size-1 convention (CANON's halves use it): a lone row's mean is its value; equal
    rows' mean is their value and their squared deviations sum to exactly 0. `group_mean_std` applies verl's
    mean 0, std 1 to the lone row."""
    from outrider.stats import group_ids, group_moments  # new in issue 32: keeps the module importable on old code

    scores, groups = torch.tensor([2.5, 0.7, 0.7, 0.7]), torch.tensor([8, 5, 5, 5])
    inverse, k = group_ids(groups)
    count, mean, sq = group_moments(scores, inverse, k)
    assert count.tolist() == [3.0, 1.0]
    assert mean.tolist() == [float(torch.tensor(0.7)), 2.5] and sq.tolist() == [0.0, 0.0]
    mean, std = group_mean_std(scores, groups)
    assert mean.tolist() == [0.0] + [float(torch.tensor(0.7))] * 3
    assert std.tolist() == [1.0, 0.0, 0.0, 0.0]
