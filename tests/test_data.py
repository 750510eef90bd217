"""`pack`: episodes of turns -> one right-padded Batch (masks, turn indices, reward placement), and `Batch.select`."""

from __future__ import annotations

import torch

from outrider.data import Batch, Episode, Turn, pack, sequence_ids

PAD, BOS = 0, 1


def two_turn_episode() -> Episode:
    """obs [10, 11] act [20, 21, 22] | obs [12] act [23, 24]; with BOS the sequence is 9 tokens long."""
    ep = Episode(group_id=5, seed=3, weight=0.5)
    ep.turns = [
        Turn(observation="ab", observation_ids=[10, 11], action="xyz", action_ids=[20, 21, 22]),
        Turn(observation="c", observation_ids=[12], action="uv", action_ids=[23, 24]),
    ]
    ep.rewards = {
        "trajectory": {"verifier": 1.0, "format": 0.25},
        "step": {"progress": [0.5, -2.0]},
        "token": {"shaping": [0.1, 0.2, 0.3, 0.4, 0.5]},
    }
    return ep


def one_turn_episode(group_id: int = 7, reward: float = 3.0) -> Episode:
    ep = Episode(group_id=group_id, seed=0)
    ep.turns = [Turn(observation="q", observation_ids=[13], action="a", action_ids=[25, 26])]
    ep.rewards["trajectory"]["verifier"] = reward
    return ep


def test_sequence_ids_flattens_turns_in_order():
    ids, is_action, step = sequence_ids(two_turn_episode(), bos_id=BOS)
    assert ids == [BOS, 10, 11, 20, 21, 22, 12, 23, 24]
    assert is_action == [0, 0, 0, 1, 1, 1, 0, 1, 1]
    assert step == [0, 0, 0, 0, 0, 0, 1, 1, 1]


def test_pack_right_pads_and_masks():
    batch = pack([two_turn_episode(), one_turn_episode()], pad_id=PAD, bos_id=BOS)
    assert batch.input_ids.shape == (2, 9) and batch.size == 2
    assert batch.input_ids[0].tolist() == [BOS, 10, 11, 20, 21, 22, 12, 23, 24]
    # the short row: real tokens first, then padding on the right
    assert batch.input_ids[1].tolist() == [BOS, 13, 25, 26, PAD, PAD, PAD, PAD, PAD]
    assert batch.attention_mask[1].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0]
    assert batch.attention_mask[0].tolist() == [1] * 9
    assert batch.attention_mask.dtype == torch.long and batch.input_ids.dtype == torch.long


def test_action_mask_is_only_on_action_tokens_of_every_turn():
    batch = pack([two_turn_episode(), one_turn_episode()], pad_id=PAD, bos_id=BOS)
    assert batch.action_mask[0].tolist() == [0, 0, 0, 1, 1, 1, 0, 1, 1]
    assert batch.action_mask[1].tolist() == [0, 0, 1, 1, 0, 0, 0, 0, 0]
    # the second turn's observation token (12) is inside the episode but never trained
    obs_positions = (batch.input_ids == 12) | (batch.input_ids == 10) | (batch.input_ids == 11)
    assert obs_positions.any()
    assert (batch.action_mask[obs_positions] == 0).all()
    assert (batch.action_mask[batch.attention_mask == 0] == 0).all()
    assert batch.action_mask.dtype == torch.float32


def test_step_index_per_turn_and_minus_one_on_padding():
    batch = pack([two_turn_episode(), one_turn_episode()], pad_id=PAD, bos_id=BOS)
    assert batch.step_index[0].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1]
    assert batch.step_index[1].tolist() == [0, 0, 0, 0, -1, -1, -1, -1, -1]


def test_reward_placement_trajectory_step_and_token_levels():
    batch = pack([two_turn_episode(), one_turn_episode()], pad_id=PAD, bos_id=BOS)
    r = batch.token_rewards[0]
    # positions: 3,4,5 = turn 0 actions; 7,8 = turn 1 actions
    expected = torch.zeros(9)
    expected[[3, 4, 5, 7, 8]] = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])  # token level, in order
    expected[5] += 0.5  # step reward of turn 0 on turn 0's last action token
    expected[8] += -2.0  # step reward of turn 1 on turn 1's last action token
    expected[8] += 1.0 + 0.25  # every trajectory component on the episode's last action token
    torch.testing.assert_close(r, expected)
    # row 1: only a trajectory reward, on its last action token, nothing on padding
    assert batch.token_rewards[1].tolist() == [0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    # the total reward packed equals the episode's own total
    assert abs(float(r.sum()) - two_turn_episode().total_reward()) < 1e-6


def test_rewards_never_land_on_observation_tokens():
    batch = pack([two_turn_episode()], pad_id=PAD, bos_id=BOS)
    assert (batch.token_rewards[batch.action_mask == 0] == 0).all()


def test_group_index_and_sample_weight():
    batch = pack([two_turn_episode(), one_turn_episode(group_id=7), one_turn_episode(group_id=5)], PAD, BOS)
    assert batch.group_index.tolist() == [5, 7, 5]
    assert batch.group_index.dtype == torch.long
    torch.testing.assert_close(batch.sample_weight, torch.tensor([0.5, 1.0, 1.0]))


def test_pack_without_bos():
    batch = pack([one_turn_episode()], pad_id=PAD, bos_id=None)
    assert batch.input_ids[0].tolist() == [13, 25, 26]
    assert batch.action_mask[0].tolist() == [0, 1, 1]
    assert batch.token_rewards[0].tolist() == [0.0, 0.0, 3.0]


def test_episode_without_action_tokens_gets_no_reward():
    ep = Episode(group_id=0, seed=0, turns=[Turn(observation="q", observation_ids=[13])])
    ep.rewards["trajectory"]["verifier"] = 1.0
    batch = pack([ep, one_turn_episode()], PAD, BOS)
    assert batch.action_mask[0].sum() == 0
    assert batch.token_rewards[0].abs().sum() == 0


def test_batch_select_takes_rows_of_every_tensor():
    episodes = [two_turn_episode(), one_turn_episode(group_id=7, reward=2.0), one_turn_episode(group_id=9)]
    batch = pack(episodes, PAD, BOS)
    batch.advantages = torch.arange(27, dtype=torch.float).reshape(3, 9)
    rows = torch.tensor([2, 0])
    sub = batch.select(rows)
    assert isinstance(sub, Batch) and sub.size == 2
    for name in ("input_ids", "attention_mask", "action_mask", "token_rewards", "step_index", "advantages"):
        assert torch.equal(getattr(sub, name), getattr(batch, name)[rows]), name
    assert sub.group_index.tolist() == [9, 5]
    torch.testing.assert_close(sub.sample_weight, torch.tensor([1.0, 0.5]))
    assert sub.old_logprobs is None and sub.values is None and sub.returns is None
    # the original is untouched
    assert batch.size == 3 and batch.group_index.tolist() == [5, 7, 9]


def test_pack_carries_each_episodes_fixed_advantage_nan_where_none():
    fixed = one_turn_episode()
    fixed.advantage = -0.75
    batch = pack([one_turn_episode(), fixed], pad_id=PAD)
    assert torch.isnan(batch.row_advantage[0]) and float(batch.row_advantage[1]) == -0.75
    assert float(batch.select(torch.tensor([1])).row_advantage[0]) == -0.75
