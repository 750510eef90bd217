"""Credit pieces against hand-computed numbers (no model)."""

from __future__ import annotations

import math

import pytest
import torch

from outrider.credit import CREDIT, CreditOutput
from outrider.stats import group_mean_std, masked_mean, masked_whiten
from outrider.data import Batch
from outrider.errors import OutriderError

EPS = 1e-6  # GRPO's default epsilon


def make_batch(rewards, mask, groups, values=None) -> Batch:
    """A Batch with only what credit reads filled in; the other fields are dummies of the right shape."""
    r = torch.tensor(rewards, dtype=torch.float32)
    B, T = r.shape
    return Batch(
        input_ids=torch.zeros(B, T, dtype=torch.long),
        attention_mask=torch.ones(B, T, dtype=torch.long),
        action_mask=torch.tensor(mask, dtype=torch.float32),
        token_rewards=r,
        step_index=torch.zeros(B, T, dtype=torch.long),
        group_index=torch.tensor(groups, dtype=torch.long),
        sample_weight=torch.ones(B),
        values=None if values is None else torch.tensor(values, dtype=torch.float32),
    )


def run(name: str, batch: Batch, **options) -> CreditOutput:
    entry, cfg = CREDIT.build({"name": name, **options})
    return entry.fn(batch, cfg)


def assert_per_row(adv: torch.Tensor, mask, expected_rows) -> None:
    """Every action token of row i carries expected_rows[i]; every other position is exactly 0."""
    m = torch.tensor(mask) > 0
    expected = torch.tensor(expected_rows, dtype=torch.float32)[:, None].expand_as(adv)
    torch.testing.assert_close(adv[m], expected[m], rtol=1e-5, atol=1e-6)
    assert torch.equal(adv[~m], torch.zeros_like(adv[~m]))
    assert torch.isfinite(adv).all()


# Rows (T = 4), group ids deliberately non-contiguous:
#   row 0, g7: rewards 0.5 + 0.5 on its two action tokens -> R = 1
#   row 1, g7: trajectory reward 2 on its last action token -> R = 2
#   row 2, g7: 3 on an action token, 100 on a MASKED token (must be ignored) -> R = 3
#   row 3, g3: alone in its group -> R = 5
#   rows 4, 5, g9: both R = 0.7 (all-equal group)
OUTCOME_REWARDS = [
    [0.0, 0.5, 0.5, 0.0],
    [0.0, 0.0, 0.0, 2.0],
    [0.0, 3.0, 100.0, 0.0],
    [0.0, 0.0, 5.0, 0.0],
    [0.0, 0.7, 0.0, 0.0],
    [0.0, 0.0, 0.0, 0.7],
]
OUTCOME_MASK = [
    [0, 1, 1, 0],
    [0, 1, 1, 1],
    [1, 1, 0, 0],
    [0, 1, 1, 0],
    [0, 1, 0, 0],
    [0, 0, 1, 1],
]
OUTCOME_GROUPS = [7, 7, 7, 3, 9, 9]


def outcome_batch() -> Batch:
    return make_batch(OUTCOME_REWARDS, OUTCOME_MASK, OUTCOME_GROUPS)


def test_grpo_std_normalised():
    # g7: R = 1, 2, 3 -> mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1 -> A = (-1, 0, 1) / (1 + eps)
    # g3: size 1 -> mean 0, std 1 -> A = 5 / (1 + eps)
    # g9: all equal -> 0 / (0 + eps) = 0, no NaN
    out = run("grpo", outcome_batch())
    assert out.returns is None
    assert_per_row(out.advantages, OUTCOME_MASK, [-1 / (1 + EPS), 0.0, 1 / (1 + EPS), 5 / (1 + EPS), 0.0, 0.0])


def test_grpo_without_std_and_nontrivial_std():
    out = run("grpo", outcome_batch(), std_normalize=False)
    assert_per_row(out.advantages, OUTCOME_MASK, [-1.0, 0.0, 1.0, 5.0, 0.0, 0.0])
    # R = 0, 4 in one group: mean 2, unbiased std sqrt((4 + 4) / 1) = 2*sqrt(2) -> A = -+2 / (2.8284271 + eps)
    mask = [[1, 1], [0, 1]]
    out = run("grpo", make_batch([[0.0, 0.0], [0.0, 4.0]], mask, [0, 0]))
    s = 2 * math.sqrt(2)
    assert_per_row(out.advantages, mask, [-2 / (s + EPS), 2 / (s + EPS)])


def test_dr_grpo():
    # same rows as above: no std division at all
    assert_per_row(run("dr_grpo", outcome_batch()).advantages, OUTCOME_MASK, [-1.0, 0.0, 1.0, 5.0, 0.0, 0.0])
    # R = 0, 4 (g0) and R = 3 alone (g1): A = -2, +2, 3
    mask = [[1, 1], [0, 1], [1, 0]]
    out = run("dr_grpo", make_batch([[0.0, 0.0], [0.0, 4.0], [3.0, 0.0]], mask, [0, 0, 1]))
    assert_per_row(out.advantages, mask, [-2.0, 2.0, 3.0])


def test_rloo():
    # g0: R = 1, 2, 3, 6; leave-one-out baselines (2+3+6)/3 = 11/3, (1+3+6)/3 = 10/3, (1+2+6)/3 = 3, (1+2+3)/3 = 2
    #     -> A = 1 - 11/3 = -8/3, 2 - 10/3 = -4/3, 0, 4
    # g1: R = 5 alone -> baseline 0 -> A = 5
    rewards = [[0.0, 1.0], [2.0, 0.0], [0.0, 3.0], [0.0, 6.0], [0.0, 5.0]]
    mask = [[1, 1], [1, 0], [0, 1], [1, 1], [1, 1]]
    out = run("rloo", make_batch(rewards, mask, [0, 0, 0, 0, 1]))
    assert_per_row(out.advantages, mask, [-8 / 3, -4 / 3, 0.0, 4.0, 5.0])


def test_rloo_all_equal_group_is_zero():
    mask = [[1, 1], [1, 1]]
    out = run("rloo", make_batch([[0.0, 0.3], [0.0, 0.3]], mask, [4, 4]))
    assert_per_row(out.advantages, mask, [0.0, 0.0])


# Multi-turn layout: [obs, act, act, obs, obs, act, act]; a step reward 1 ends turn 1, the trajectory reward 2
# sits on the last action token. Row 1 is single-turn with padding, and a stray 9 on a masked position.
MT_REWARDS = [
    [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 2.0],
    [0.0, 0.0, 0.0, 1.0, 9.0, 0.0, 0.0],
]
MT_MASK = [
    [0, 1, 1, 0, 0, 1, 1],
    [0, 1, 1, 1, 0, 0, 0],
]


def test_reinforce_pp_multi_turn_gamma():
    # gamma = 0.5, observations transparent (no discount step):
    #   row 0: G6 = 2; G5 = 0 + .5*2 = 1; G2 = 1 + .5*1 = 1.5; G1 = 0 + .5*1.5 = 0.75
    #   row 1: G3 = 1; G2 = .5; G1 = .25
    # batch action tokens: .75, 1.5, 1, 2, .25, .5, 1 -> sum 7, mean 1
    # deviations: -.25, .5, 0, 1, -.75, -.5, 0; squares sum 2.125; unbiased var = 2.125 / 6
    out = run("reinforce_pp", make_batch(MT_REWARDS, MT_MASK, [0, 1]), gamma=0.5)
    std = math.sqrt(2.125 / 6 + 1e-8)
    expected = torch.tensor(
        [[0, -0.25, 0.5, 0, 0, 0.0, 1.0], [0, -0.75, -0.5, 0.0, 0, 0, 0]], dtype=torch.float32
    ) / std
    torch.testing.assert_close(out.advantages, expected, rtol=1e-5, atol=1e-6)
    m = torch.tensor(MT_MASK) == 0
    assert torch.equal(out.advantages[m], torch.zeros(int(m.sum())))


def test_reinforce_pp_gamma_one_is_reward_to_go():
    # gamma = 1: row 0 returns 3, 3, 2, 2; row 1 returns 1, 1, 1 -> mean 13/7
    out = run("reinforce_pp", make_batch(MT_REWARDS, MT_MASK, [0, 1]))
    g = torch.tensor([3.0, 3.0, 2.0, 2.0, 1.0, 1.0, 1.0])
    mean = 13 / 7
    var = float(((g - mean) ** 2).sum()) / 6
    expected = (g - mean) / math.sqrt(var + 1e-8)
    torch.testing.assert_close(out.advantages[torch.tensor(MT_MASK) > 0], expected, rtol=1e-5, atol=1e-6)


def test_reinforce_pp_baseline():
    # g0: R = 1 (three action tokens: 0.5 + 0.5 + 0), R = 3 (one token) -> mean 2 -> -1, +1
    # g1: R = 2 alone -> mean 0 -> 2 on its two tokens
    # tokens: -1, -1, -1, 1, 2, 2 -> mean 2/6 = 1/3
    # deviations: -4/3 (x3), 2/3, 5/3 (x2); squares sum 48/9 + 4/9 + 50/9 = 102/9; unbiased var = 102/45
    rewards = [[0.5, 0.5, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]]
    mask = [[1, 1, 1, 0], [0, 1, 0, 0], [0, 0, 1, 1]]
    out = run("reinforce_pp_baseline", make_batch(rewards, mask, [0, 0, 1]))
    std = math.sqrt(102 / 45 + 1e-8)
    assert_per_row(out.advantages, mask, [(-4 / 3) / std, (2 / 3) / std, (5 / 3) / std])


def test_gae_multi_turn_no_whiten():
    # [obs, act, act, obs, act, pad]; action tokens t1, t2, t4 with r = 0, .5, 1 and V = .2, .4, .6
    # (the 9s sit on observation / padding positions and must not be used). gamma = .9, lam = .5
    #   t4: d = 1 + .9*0 - .6 = .4                 A = .4
    #   t2: d = .5 + .9*.6 - .4 = .64              A = .64 + .45*.4 = .82
    #   t1: d = 0 + .9*.4 - .2 = .16               A = .16 + .45*.82 = .529
    #   returns = A + V = .729, 1.22, 1.0
    # row 1 has no action token at all: everything 0
    rewards = [[0.0, 0.0, 0.5, 0.0, 1.0, 0.0], [0.0] * 6]
    mask = [[0, 1, 1, 0, 1, 0], [0] * 6]
    values = [[9.0, 0.2, 0.4, 9.0, 0.6, 9.0], [1.0] * 6]
    out = run("gae", make_batch(rewards, mask, [0, 1], values), gamma=0.9, lam=0.5, whiten=False)
    exp_adv = torch.tensor([[0, 0.529, 0.82, 0, 0.4, 0], [0.0] * 6])
    exp_ret = torch.tensor([[0, 0.729, 1.22, 0, 1.0, 0], [0.0] * 6])
    torch.testing.assert_close(out.advantages, exp_adv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.returns, exp_ret, rtol=1e-5, atol=1e-6)


def test_gae_lambda_one_is_monte_carlo_minus_value():
    # gamma = lam = 1: A_t = (sum of later rewards) - V_t: 1.5 - .2 = 1.3, 1.5 - .4 = 1.1, 1 - .6 = .4
    rewards = [[0.0, 0.0, 0.5, 0.0, 1.0, 0.0]]
    mask = [[0, 1, 1, 0, 1, 0]]
    values = [[9.0, 0.2, 0.4, 9.0, 0.6, 9.0]]
    out = run("gae", make_batch(rewards, mask, [0], values), whiten=False)
    torch.testing.assert_close(out.advantages, torch.tensor([[0, 1.3, 1.1, 0, 0.4, 0]]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.returns, torch.tensor([[0, 1.5, 1.5, 0, 1.0, 0]]), rtol=1e-5, atol=1e-6)


def test_gae_whitened_advantages_returns_unwhitened():
    # same numbers as the no-whiten test: A = .529, .82, .4 -> mean 1.749/3 = .583
    # deviations -.054, .237, -.183; squares .002916 + .056169 + .033489 = .092574; unbiased var .046287
    rewards = [[0.0, 0.0, 0.5, 0.0, 1.0, 0.0]]
    mask = [[0, 1, 1, 0, 1, 0]]
    values = [[9.0, 0.2, 0.4, 9.0, 0.6, 9.0]]
    out = run("gae", make_batch(rewards, mask, [0], values), gamma=0.9, lam=0.5)
    std = math.sqrt(0.046287 + 1e-8)
    exp_adv = torch.tensor([[0, -0.054 / std, 0.237 / std, 0, -0.183 / std, 0]])
    torch.testing.assert_close(out.advantages, exp_adv, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.returns, torch.tensor([[0, 0.729, 1.22, 0, 1.0, 0]]), rtol=1e-5, atol=1e-6)


def test_gae_requires_values():
    entry, cfg = CREDIT.build({"name": "gae"})
    assert entry.needs.values is True
    assert CREDIT.build({"name": "grpo"})[0].needs.values is False
    with pytest.raises(ValueError, match="values"):
        entry.fn(make_batch([[1.0]], [[1]], [0]), cfg)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gae"])
def test_unknown_option_and_empty_mask(name):
    with pytest.raises(OutriderError, match="bogus"):
        CREDIT.build({"name": name, "bogus": 1})
    # a batch with no action token at all gives all-zero advantages, not NaN
    batch = make_batch([[1.0, 2.0], [3.0, 4.0]], [[0, 0], [0, 0]], [0, 0], values=[[0.5, 0.5], [0.5, 0.5]])
    out = run(name, batch)
    assert torch.equal(out.advantages, torch.zeros(2, 2))


def test_unknown_name_and_bad_value():
    with pytest.raises(OutriderError, match="valid: (.*, )?canon, dr_grpo, empg, gae, gigpo, grpo, (.*, )?ppl_position"):
        CREDIT.build({"name": "nope"})
    with pytest.raises(OutriderError, match="gamma"):
        CREDIT.build({"name": "reinforce_pp", "gamma": 1.5})


def test_stats_helpers():
    x = torch.tensor([[1.0, 2.0, float("inf")], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # (1 + 2 + 4) / 3; the inf is masked out
    torch.testing.assert_close(masked_mean(x, m), torch.tensor(7 / 3))
    torch.testing.assert_close(masked_mean(x, m, dim=-1), torch.tensor([1.5, 4.0]))
    assert masked_mean(x, torch.zeros_like(m)) == 0
    # whiten 1, 2, 4: mean 7/3, deviations -4/3, -1/3, 5/3, unbiased var (16 + 1 + 25) / 9 / 2 = 7/3
    w = masked_whiten(x, m)
    s = math.sqrt(7 / 3 + 1e-8)
    torch.testing.assert_close(w, torch.tensor([[-4 / 3 / s, -1 / 3 / s, 0.0], [5 / 3 / s, 0.0, 0.0]]))
    # groups: {1, 3} -> mean 2, std sqrt(2); {10} -> mean 0, std 1
    mean, std = group_mean_std(torch.tensor([1.0, 10.0, 3.0]), torch.tensor([5, 2, 5]))
    torch.testing.assert_close(mean, torch.tensor([2.0, 0.0, 2.0]))
    torch.testing.assert_close(std, torch.tensor([math.sqrt(2), 1.0, math.sqrt(2)]))
