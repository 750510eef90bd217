"""Rollouts that start anywhere: every env restores a snapshot (restore, then the same actions ⇒ the same
observations), the rollout continues a restored state or a response prefix, and the given prefix is in the
episode but never trained."""

from __future__ import annotations

import shutil

import pytest
import torch

from outrider.credit import CREDIT
from outrider.data import Start, Turn, pack
from outrider.envs import ENVS
from outrider.envs.base import close_env
from outrider.explore.rollout import rollout
from outrider.policy.model import Policy
from outrider.policy.sampler import SamplingParams
from outrider.registry import BuildContext
from outrider.update import LOSSES, TokenContext
from outrider.update.aggregate import aggregate


def build_task(section: dict):
    entry, cfg = ENVS.build(section, "task")
    return entry.fn(cfg)


def minigrid():
    return build_task({"name": "minigrid", "env_id": "MiniGrid-DoorKey-5x5-v0", "max_turns": 40})


def bandit():
    return build_task({"name": "bandit", "arms": 2, "pulls": 8})


def calculator():
    return build_task({"name": "calculator", "recovery_fraction": 1.0})


def spell_backward():
    return build_task({"name": "reasoning_gym", "dataset": "spell_backward", "eval_size": 16,
                       "config": {"min_word_len": 3, "max_word_len": 5}})


@pytest.fixture(scope="module")
def textworld(tmp_path_factory):
    pytest.importorskip("textworld", reason="textworld not installed (pip install 'outrider[agents]')")
    task = build_task({"name": "textworld", "level": 3, "train_games": 1, "eval_games": 1, "max_turns": 6,
                       "eval_size": 1, "cache_dir": str(tmp_path_factory.mktemp("tw_restart"))})
    yield task
    task.close()


@pytest.fixture(scope="module")
def scienceworld():
    pytest.importorskip("scienceworld", reason="scienceworld not installed (pip install 'outrider[agents]')")
    if shutil.which("java") is None:
        pytest.skip("ScienceWorld needs Java: no `java` on PATH")
    task = build_task({"name": "scienceworld", "task_name": "find-living-thing", "simplification": "easy",
                       "max_turns": 20, "max_simulators": 2})
    yield task
    task.close()


def replay_from_snapshot(task, seed: int, cut: int) -> None:
    """Play the seed's demonstration, snapshot after `cut` actions, play on; then restore the snapshot in a fresh
    env (twice) and play the same actions: the same observations, rewards and done flags each time."""
    actions = [a for _, a in task.demonstrations([seed])[0].turns]
    assert len(actions) > cut
    env = task.make_env("train")
    obs = env.reset(seed)
    for a in actions[:cut]:
        obs = env.step(a)[0]
    state, key = env.snapshot(), getattr(env, "state_key", lambda: None)()
    after = [env.step(a)[:3] for a in actions[cut:]]
    close_env(env)
    for _ in range(2):  # one snapshot, restored twice, in a fresh env
        fresh = task.make_env("train")
        fresh.reset(seed + 1)  # somewhere else first: restore must not depend on the env's current state
        assert fresh.restore(state) == obs
        assert getattr(fresh, "state_key", lambda: None)() == key
        assert [fresh.step(a)[:3] for a in actions[cut:]] == after
        close_env(fresh)


@pytest.mark.parametrize("make, seed, cut", [(minigrid, 7, 3), (bandit, 3, 4), (calculator, 5, 1),
                                             (spell_backward, 2, 0)])
def test_restore_then_the_same_actions_give_the_same_observations(make, seed, cut):
    replay_from_snapshot(make(), seed, cut)


def test_textworld_restores_by_replay(textworld):
    replay_from_snapshot(textworld, 0, 2)


def test_scienceworld_restores_by_replay(scienceworld):
    replay_from_snapshot(scienceworld, 0, 2)


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy.tiny(hidden=32, layers=1, heads=2, seed=0)


def prefix_turns(policy: Policy, task, seed: int, k: int) -> tuple[list[Turn], object]:
    """The first k demonstration turns of `seed` as given turns (ids as the rollout encodes them) and the env's
    snapshot after them."""
    env = task.make_env("train")
    obs, turns = env.reset(seed), []
    for j, (_, action) in enumerate(task.demonstrations([seed])[0].turns[:k]):
        ids = policy.encode(action) + [policy.eos_id]
        turns.append(Turn(obs, policy.encode_observation(obs, first=j == 0), action, ids))
        obs = env.step(action)[0]
    return turns, env.snapshot()


@pytest.mark.parametrize("by", ["snapshot", "replay"])
def test_a_restarted_episode_keeps_its_prefix_untrained(policy, by):
    task = minigrid()
    prefix, state = prefix_turns(policy, task, 7, 3)
    starts = [Start(seed=7, group_id=0, prefix=prefix, snapshot=state if by == "snapshot" else None,
                    origin="restart") for _ in range(4)]
    episodes = rollout(policy, lambda: task.make_env("train"), starts, SamplingParams(max_new_tokens=3),
                       torch.Generator().manual_seed(0), max_turns=6)
    given = sum(len(t.action_ids) for t in prefix)
    env = task.make_env("train")
    env.reset(7)
    for t in prefix:
        env.step(t.action)
    for e in episodes:
        assert e.origin == "restart" and e.prefix_tokens == given and not e.off_policy
        assert [t.action_ids for t in e.turns[:3]] == [t.action_ids for t in prefix]
        assert e.turns[3].observation == env.last_observation  # the new turn starts where the prefix ended
        assert len(e.turns) <= 6  # the horizon counts the prefix
    assert prefix[0].action_ids == policy.encode(prefix[0].action) + [policy.eos_id]  # the start was not mutated
    for e in episodes:
        e.rewards["trajectory"]["r"] = float(e.num_action_tokens % 2)
    batch = pack(episodes, policy.pad_id, policy.bos_id)
    trained = batch.action_mask.sum(-1)
    assert trained.tolist() == [float(e.num_action_tokens - given) for e in episodes]
    assert_untrained_positions_carry_nothing(batch, policy)


def test_the_rl_loop_counts_env_calls_of_restarts_and_replays(policy):
    """`explore/env_steps` counts actions sent to envs (not the given prefix), `restores` the starts reached by a
    snapshot and `replayed_steps` the prefix actions replayed for the others."""
    from outrider.loops.rl import count_env_calls

    task = minigrid()
    prefix, state = prefix_turns(policy, task, 7, 3)
    starts = [Start(seed=7, group_id=0, prefix=prefix, snapshot=state, origin="restart"),
              Start(seed=7, group_id=0, prefix=prefix, origin="restart"), Start(seed=7, group_id=1)]
    episodes = rollout(policy, lambda: task.make_env("train"), starts, SamplingParams(max_new_tokens=3),
                       torch.Generator().manual_seed(0), max_turns=6)
    timers = {"env_steps": 0.0, "restores": 0.0, "replayed_steps": 0.0}
    count_env_calls(starts, episodes, timers)
    new = [sum(bool(t.action_ids) for t in e.turns) - len(s.prefix) for s, e in zip(starts, episodes)]
    assert new[:2] == [3, 3] and 1 <= new[2] <= 6  # restarts have 6 - 3 turns left (the horizon counts the prefix)
    assert timers == {"env_steps": float(sum(new)), "restores": 1.0, "replayed_steps": 3.0}


def test_a_response_prefix_is_continued_and_not_trained(policy):
    task = spell_backward()
    head = policy.encode("ab")
    starts = [Start(seed=4, group_id=0, action_prefix=head) for _ in range(3)]
    episodes = rollout(policy, lambda: task.make_env("train"), starts, SamplingParams(max_new_tokens=4),
                       torch.Generator().manual_seed(0))
    for e in episodes:
        (turn,) = e.turns
        assert turn.action_ids[:2] == head and turn.action.startswith("ab") and e.prefix_tokens == 2
        assert turn.behaviour_logprobs[:2] == [0.0, 0.0] and len(turn.behaviour_logprobs) == len(turn.action_ids)
    batch = pack(episodes, policy.pad_id, policy.bos_id)
    assert batch.action_mask.sum(-1).tolist() == [float(e.num_action_tokens - 2) for e in episodes]


def test_context_for_the_sampler_alone_makes_the_episode_off_policy(policy):
    """A hint shown while sampling and removed for training: the trained observation is the plain one, the
    sampler's context had the hint (different log-probs), and the episode is marked off-policy; a kept hint stays
    in the observation and the episode is on-policy."""
    task = spell_backward()
    params, obs = SamplingParams(max_new_tokens=4), task.make_env("train").reset(4)
    removed = rollout(policy, lambda: task.make_env("train"), [Start(seed=4, group_id=0, context=" hint: cba",
                                                                     origin="guided")],
                      params, torch.Generator().manual_seed(0))[0]
    kept = rollout(policy, lambda: task.make_env("train"), [Start(seed=4, group_id=0, context=" hint: cba",
                                                                  keep_context=True, origin="guided")],
                   params, torch.Generator().manual_seed(0))[0]
    plain = rollout(policy, lambda: task.make_env("train"), [Start(seed=4, group_id=0)], params,
                    torch.Generator().manual_seed(0))[0]
    assert removed.off_policy and not kept.off_policy and not plain.off_policy
    assert removed.turns[0].observation == obs and removed.turns[0].observation_ids == policy.encode(obs)
    assert kept.turns[0].observation == obs + " hint: cba"
    # the same uniforms under another context give other behaviour log-probs
    assert removed.turns[0].behaviour_logprobs != plain.turns[0].behaviour_logprobs
    assert removed.turns[0].behaviour_logprobs == kept.turns[0].behaviour_logprobs


def assert_untrained_positions_carry_nothing(batch, policy: Policy) -> None:
    """Every credit piece gives 0 advantage and every loss 0 gradient where ``action_mask`` is 0 (pieces built as
    a run builds them, with its policy: oprl copies it as its PRM)."""
    batch.values = torch.zeros_like(batch.token_rewards)
    batch.old_logprobs = torch.full_like(batch.token_rewards, -0.5)  # what the run fills for prl
    batch.ref_logprobs = torch.full_like(batch.token_rewards, -1.0)
    for entry in CREDIT.entries():
        adv = entry.create(entry.config(), BuildContext(None, policy, torch.device("cpu"), 0))(batch).advantages
        assert adv[batch.action_mask == 0].abs().sum() == 0, entry.name
    logprobs = torch.randn(batch.input_ids.shape, requires_grad=True)
    ctx = TokenContext(logprobs, logprobs.detach() + 0.1, torch.randn(batch.input_ids.shape), batch.action_mask,
                       generator=torch.Generator().manual_seed(0))
    for entry in LOSSES.entries():
        per_token, _ = entry.fn(ctx, entry.config())
        for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
            logprobs.grad = None
            loss = aggregate(per_token, batch.action_mask, mode, 16)
            if loss.requires_grad:
                loss.backward(retain_graph=True)
                assert logprobs.grad[batch.action_mask == 0].abs().sum() == 0, (entry.name, mode)
