"""OPRL [72] (credit/oprl.py): the step log-ratios, DPO pairs and loss, the group step advantage against
hand-computed numbers; the piece training φ on pairs and leaving it untouched without pairs; its state surviving a
checkpoint round trip and kill -9 + --resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import read_jsonl, write_recipe
from outrider.checkpoint import STATE_FILE, list_checkpoints
from outrider.credit import CREDIT
from outrider.credit.oprl import (dpo_pair_loss, group_step_advantages, preference_pairs, trajectory_scores,
                                  turn_log_ratios)
from outrider.credit.outcome import broadcast_to_actions, grpo_episode_advantages
from outrider.credit.step_level import broadcast_turns
from outrider.data import Batch, Episode, Turn, pack
from outrider.errors import OutriderError
from outrider.policy.model import Policy
from outrider.recipe import load_recipe
from outrider.registry import BuildContext
from outrider.trainer import Trainer
from test_resume import RESUME_OVERRIDES, killed_run_resumes_like

EPS = 1e-6


def ep(group: int, reward: float, actions: list[list[int]]) -> Episode:
    """One observation token (5) and the given action tokens per turn."""
    turns = [Turn(observation="o", observation_ids=[5], action="a", action_ids=list(a)) for a in actions]
    e = Episode(group_id=group, seed=0, turns=turns)
    e.rewards["trajectory"]["verifier"] = reward
    return e


# --------------------------------------------------------------------------------------------------- formulas
def test_turn_log_ratios_sum_each_turns_action_tokens():
    # row 0: [o a a | o a a], row 1: [o a a | pad pad pad]
    b = pack([ep(0, 1.0, [[7, 7], [8, 8]]), ep(0, 0.0, [[7, 7]])], pad_id=0)
    phi = torch.tensor([[3.0, -1.0, -2.0, 9.0, -0.5, -0.5], [0.0, -1.0, -1.0, 4.0, 4.0, 4.0]])
    old = torch.tensor([[0.0, -2.0, -2.0, 0.0, -1.0, -1.5], [0.0, -0.5, -1.5, 0.0, 0.0, 0.0]])
    q, valid = turn_log_ratios(phi, old, b, beta=0.5)
    # observation and padding tokens are ignored:
    # row 0 turn 0: (1 + 0)·.5, turn 1: (.5 + 1)·.5; row 1: (−.5 + .5)·.5
    torch.testing.assert_close(q, torch.tensor([[0.5, 0.75], [0.0, 0.0]]))
    assert valid.tolist() == [[True, True], [True, False]]
    torch.testing.assert_close(trajectory_scores(q, valid, "sum"), torch.tensor([1.25, 0.0]))
    torch.testing.assert_close(trajectory_scores(q, valid, "mean"), torch.tensor([0.625, 0.0]))


def test_preference_pairs_stay_inside_groups():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.2])
    groups = torch.tensor([0, 0, 0, 1, 1])
    c, r = preference_pairs(rewards, groups, "label", 0.0)  # successes (R > 0) against failures
    assert list(zip(c.tolist(), r.tolist())) == [(0, 1), (2, 1), (4, 3)]
    c, r = preference_pairs(rewards, groups, "order", 0.0)  # every strictly better episode
    assert list(zip(c.tolist(), r.tolist())) == [(0, 1), (0, 2), (2, 1), (4, 3)]
    c, r = preference_pairs(rewards, groups, "label", 0.6)  # only row 0 clears 0.6
    assert list(zip(c.tolist(), r.tolist())) == [(0, 1), (0, 2)]
    # a group of equal outcomes (all fail, all succeed) has no pair
    c, _ = preference_pairs(torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1]), "label", 0.0)
    assert c.numel() == 0


def test_dpo_pair_loss_by_hand():
    scores = torch.tensor([1.0, -1.0, 0.5])
    loss = dpo_pair_loss(scores, torch.tensor([0, 2]), torch.tensor([1, 1]))  # margins 2 and 1.5
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.5))) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(dpo_pair_loss(torch.zeros(2), torch.tensor([0]), torch.tensor([1]))) == pytest.approx(math.log(2))


def test_group_step_advantages_by_hand():
    r = torch.tensor([[1.0, 3.0], [2.0, 9.0], [5.0, 0.0]])
    valid = torch.tensor([[True, True], [True, False], [True, False]])
    groups = torch.tensor([0, 0, 1])
    # group 0's steps 1, 3, 2: mean 2, unbiased std 1; group 1 has one step: 0; non-steps 0 (the 9 is ignored)
    a = group_step_advantages(r, valid, groups, std_norm=False, epsilon=EPS)
    torch.testing.assert_close(a, torch.tensor([[-1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))
    a = group_step_advantages(r, valid, groups, std_norm=True, epsilon=EPS)
    torch.testing.assert_close(a, torch.tensor([[-1 / (1 + EPS), 1 / (1 + EPS)], [0.0, 0.0], [0.0, 0.0]]))
    # equal rewards: exactly 0, not 0/ε noise
    a = group_step_advantages(torch.full((2, 2), 0.7), torch.ones(2, 2, dtype=torch.bool), torch.tensor([0, 0]),
                              std_norm=True, epsilon=EPS)
    assert torch.equal(a, torch.zeros(2, 2))


def test_bad_options_name_the_field():
    with pytest.raises(OutriderError, match="pairing"):
        CREDIT.build({"name": "oprl", "pairing": "best"})
    with pytest.raises(OutriderError, match="beta"):
        CREDIT.build({"name": "oprl", "beta": 0})
    with pytest.raises(OutriderError, match="bogus"):
        CREDIT.build({"name": "oprl", "bogus": 1})
    entry, cfg = CREDIT.build({"name": "oprl"})
    with pytest.raises(OutriderError, match="needs the run's policy"):
        entry.create(cfg)(piece_batch())  # built outside a run: no policy to copy


# ------------------------------------------------------------------------------------------------------ piece
def piece_batch(rewards=(1.0, 0.0, 1.0, 0.0)) -> Batch:
    """Two groups of two 2-turn episodes; successes act 10 11 / 12 13, failures 14 15 / 16 17."""
    eps = []
    for i, r in enumerate(rewards):
        acts = [[10, 11], [12, 13]] if r > 0 else [[14, 15], [16, 17]]
        eps.append(ep(i // 2, r, acts))
    return pack(eps, pad_id=0)


def make_piece(seed: int = 0, **options):
    policy = Policy.tiny(hidden=32, layers=1, seed=seed)
    entry, cfg = CREDIT.build({"name": "oprl", "beta": 0.5, "lr": 1e-2, **options})
    return entry.create(cfg, BuildContext(None, policy, torch.device("cpu"), 0)), policy


def test_first_call_is_grpo_and_phi_learns_the_pairs():
    piece, policy = make_piece()
    batch = piece_batch()
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    out = piece(batch)
    # φ = πθold at the first call: every step reward is exactly 0, so A = GRPO's episode advantage
    grpo = broadcast_to_actions(grpo_episode_advantages(batch, True, EPS), batch.action_mask)
    assert torch.equal(out.advantages, grpo)
    assert out.metrics["prm_pairs"] == 2 and out.metrics["prm_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert out.metrics["step_reward_abs"] == 0.0
    for _ in range(5):
        out = piece(batch)
    assert out.metrics["prm_loss"] < math.log(2) and out.metrics["prm_pair_accuracy"] == 1.0
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in before.items())  # the policy is untouched
    # the successes' steps now earn more than the failures', so A_step > 0 on them, < 0 on the failures
    act = batch.action_mask > 0
    step_part = out.advantages - grpo
    assert float(step_part[0][act[0]].min()) > 0 > float(step_part[1][act[1]].max())
    assert torch.equal(out.advantages[~act], torch.zeros_like(out.advantages[~act]))


def test_no_pairs_leave_phi_and_its_optimiser_untouched():
    piece, _ = make_piece()
    piece(piece_batch())  # one update on pairs
    state = {k: v.clone() for k, v in piece.phi.state_dict().items()}
    adam = piece.optimizer.state_dict()
    out = piece(piece_batch(rewards=(0.0, 0.0, 1.0, 1.0)))  # every group all-fail or all-succeed
    assert out.metrics["prm_pairs"] == 0 and "prm_loss" not in out.metrics
    assert all(torch.equal(v, piece.phi.state_dict()[k]) for k, v in state.items())
    after = piece.optimizer.state_dict()
    assert all(after["state"][i]["step"] == adam["state"][i]["step"] for i in adam["state"])
    # the step advantages still come from φ's (now non-zero) rewards; the episode part is 0 in equal groups
    assert float(out.advantages.abs().sum()) > 0


def test_state_round_trip_continues_identically():
    piece, _ = make_piece()
    batch = piece_batch()
    piece(batch)
    state = copy.deepcopy(piece.state_dict())  # as a checkpoint stores it (no tensor shared with the live piece)
    assert set(state) == {"phi", "optimizer"}
    fresh, _ = make_piece()  # the same policy (θold), a fresh φ
    fresh.load_state_dict(state)
    a, b = piece(batch), fresh(batch)
    assert torch.equal(a.advantages, b.advantages) and a.metrics["prm_loss"] == b.metrics["prm_loss"]
    assert all(torch.equal(v, fresh.phi.state_dict()[k]) for k, v in piece.phi.state_dict().items())


def test_step_mode_centres_the_step_rewards_without_std():
    # the authors' code: step rewards minus the group's mean (no std), the episode part still GRPO's
    piece, policy = make_piece(step_mode="mean_norm", step_scale="none")
    batch = piece_batch()
    piece(batch)  # φ moves off θold
    with torch.no_grad():
        phi = piece.phi.score(batch.input_ids, batch.attention_mask, groups=batch.group_index).logprobs
        old = policy.score(batch.input_ids, batch.attention_mask, groups=batch.group_index).logprobs
    q, valid = turn_log_ratios(phi, old, batch, 0.5)
    expected = broadcast_to_actions(grpo_episode_advantages(batch, True, EPS), batch.action_mask) + \
        broadcast_turns(group_step_advantages(q, valid, batch.group_index, False, EPS), batch)
    torch.testing.assert_close(piece(batch).advantages, expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------- runs
OPRL_OVERRIDES = dict(RESUME_OVERRIDES, credit={"name": "oprl", "beta": 0.5, "lr": 1e-3})


@pytest.fixture(scope="module")
def oprl_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("oprl")
    run = root / "A"
    Trainer(load_recipe(write_recipe(root, **OPRL_OVERRIDES)), run, quiet=True).run()
    return run


def test_oprl_run_logs_the_prm_and_checkpoints_it(oprl_reference):
    rows = [r for r in read_jsonl(oprl_reference / "metrics.jsonl") if r["step"] > 0]
    assert all("credit/prm_time_s" in r and "credit/prm_pairs" in r for r in rows)
    assert any(r.get("credit/step_reward_abs", 0) > 0 for r in rows[1:])
    assert any("credit/prm_loss" in r for r in rows)
    state = torch.load(list_checkpoints(oprl_reference)[-1] / STATE_FILE, weights_only=False)
    assert set(state["pieces"]["credit"]) == {"phi", "optimizer"}


@pytest.mark.slow  # two real processes, ~25 s
def test_killed_oprl_run_resumes_to_identical_metrics(oprl_reference, tmp_path):
    killed_run_resumes_like(oprl_reference, write_recipe(tmp_path, **OPRL_OVERRIDES), tmp_path)
