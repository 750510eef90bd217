"""The step hooks (calculator's partial results, MiniGrid's BFS expert), Fission-GRPO's recovery groups [17] and
SCOPE / InT first-error correction [7, 33] (and whole-trajectory replacement) on hand-made episodes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from outrider.data import Episode, GroupIds
from outrider.envs import ENVS
from outrider.errors import OutriderError
from outrider.explore import EXPLORE, ExploreContext
from outrider.explore.fission import Fission, FissionConfig, first_error
from outrider.explore.rollout import rollout
from outrider.explore.step_correction import StepCorrection, StepCorrectionConfig
from outrider.envs.arithmetic import partial_results
from outrider.policy.sampler import SamplingParams
from outrider.registry import BuildContext
from test_reflect_retry import NoHooks, answer, played, policy, task  # noqa: F401 (fixtures)


# --- the hooks ------------------------------------------------------------------------------------------------------
def test_partial_results_by_hand():
    assert partial_results("12*34+56") == {408, 464}
    assert partial_results("(2+3)*4") == {5, 20}
    assert partial_results("7") == frozenset()


def test_calculator_step_checker_and_oracle(task):
    env = task.make_env("train")
    env.reset(3)
    expr, final = answer(task, 3)
    assert task.step_ok(env, f"calc: {expr}") and task.step_ok(env, final)
    assert not task.step_ok(env, "calc: 1x") and not task.step_ok(env, "answer: -1") and not task.step_ok(env, "hi")
    assert task.oracle_step(env) == f"calc: {expr}" == task.hint(env)
    env.step(f"calc: {expr}")
    assert task.oracle_step(env) == final  # the tool has shown the value: answer it


def test_minigrid_step_checker_follows_the_bfs_expert():
    entry, cfg = ENVS.build({"name": "minigrid", "env_id": "MiniGrid-DoorKey-5x5-v0", "max_turns": 16}, "task")
    mg = entry.fn(cfg)
    env = mg.make_env("train")
    env.reset(5)
    before = env.state_key()
    expert = mg.oracle_step(env)
    assert mg.step_ok(env, expert) and env.state_key() == before  # tried on a copy: the env is unchanged
    assert not mg.step_ok(env, "jump")  # invalid
    assert not mg.step_ok(env, "d")  # dropping nothing: the plan is no shorter
    for _ in range(30):  # the expert's own steps are right all the way to the goal
        action = mg.oracle_step(env)
        assert mg.step_ok(env, action)
        if env.step(action)[2]:
            break
    assert env.env.unwrapped.step_count < 30


# --- Fission-GRPO -----------------------------------------------------------------------------------------------------
def fake_ctx(task, policy, normal, seen, score=None):
    def fake_rollout(starts, snapshots=False):
        seen.append(starts)
        if len(seen) == 1:
            return normal
        return rollout(policy, lambda: task.make_env("train"), starts, SamplingParams(max_new_tokens=6),
                       torch.Generator().manual_seed(0), max_turns=task.max_turns)

    def default_score(episodes):
        for e in episodes:
            e.rewards["trajectory"]["verifier"] = float(e.success)

    return ExploreContext(rollout=fake_rollout, score=score or default_score, next_seeds=lambda n: [3] * n,
                          groups=GroupIds(), rng=np.random.default_rng(0), task=task)


def normal_groups(task, policy):
    expr, final = answer(task, 3)
    return [played(task, policy, 3, [f"calc: {expr}", "calc: 1x", "answer: 5"]),  # invalid at 1: a candidate
            played(task, policy, 3, [f"calc: {expr}", final]),  # success
            played(task, policy, 3, ["hello", "answer: 7"]),  # invalid at 0: a candidate
            played(task, policy, 3, [f"calc: {expr}", "answer: 5"])]  # no invalid action (a wrong answer)


def test_first_error_by_rule(task, policy):
    eps = normal_groups(task, policy)
    assert [first_error(task, e, "invalid")[0] for e in eps] == [1, None, 0, None]
    assert [first_error(task, e, "checker")[0] for e in eps] == [1, None, 0, 1]


def test_fission_cuts_after_the_first_error_into_new_groups(task, policy):
    normal, seen = normal_groups(task, policy), []
    piece = Fission(FissionConfig(prompts_per_step=1, group_size=4, recovery_group_size=3, max_fissions=4),
                    BuildContext(task=task, policy=policy))
    episodes, metrics = piece(fake_ctx(task, policy, normal, seen))
    starts = seen[1]
    assert metrics["explore/fission_candidates"] == 2 and metrics["explore/fissions"] == 2
    assert len(starts) == 6 and len(episodes) == 4 + 6
    by_group = {}
    for s in starts:
        by_group.setdefault(s.group_id, []).append(s)
    assert sorted(by_group) == [1, 2] and all(len(g) == 3 for g in by_group.values())  # new groups, G each
    a, b = by_group[1][0], by_group[2][0]
    # the prefix keeps the error; the recovery starts from the state after it (the error text is its observation)
    assert [t.action for t in a.prefix] == [normal[0].turns[0].action, "calc: 1x"]
    assert a.snapshot is normal[0].turns[2].snapshot and [t.action for t in b.prefix] == ["hello"]
    assert all(s.context is None and s.keep_context and s.origin == "retry" for s in starts)
    recoveries = episodes[4:]
    assert not any(r.off_policy for r in recoveries)  # on-policy recovery rollouts
    assert recoveries[0].turns[2].observation.startswith("error:")
    assert recoveries[0].prefix_tokens == sum(len(t.action_ids) for t in normal[0].turns[:2])
    assert metrics["explore/env_steps"] == 9 + metrics["explore/recovery_env_steps"]  # 3 + 2 + 2 + 2 turns first
    state = piece.state_dict()
    assert state["counts"]["fissions"] == 2 and state["cost_totals"]["env_steps"] == metrics["explore/env_steps"]
    again = Fission(FissionConfig(), BuildContext(task=task, policy=policy))
    again.load_state_dict(state)
    assert again.state_dict() == state


def test_fission_hint_feedback_and_the_cap(task, policy):
    normal, seen = normal_groups(task, policy), []
    piece = Fission(FissionConfig(prompts_per_step=1, group_size=4, recovery_group_size=2, max_fissions=1,
                                  feedback="hint"), BuildContext(task=task, policy=policy))
    episodes, metrics = piece(fake_ctx(task, policy, normal, seen))
    assert metrics["explore/fissions"] == 1 and len(seen[1]) == 2
    start = seen[1][0]
    expr, final = answer(task, 3)
    # the hint for the state after the error: after "calc: 1x" the tool showed no value, so the oracle calls
    assert start.context in (f"Hint: calc: {expr}\n",)
    assert all(start.context in r.turns[len(start.prefix)].observation for r in episodes[4:])  # kept in context


def test_fission_bad_options_are_one_line(policy):
    for options, field in (({"cut": "checker"}, "explore.cut: checker"), ({"feedback": "hint"}, "explore.feedback")):
        with pytest.raises(OutriderError) as e:
            Fission(FissionConfig(**options), BuildContext(task=NoHooks(), policy=policy))
        assert str(e.value).startswith(field) and "\n" not in str(e.value)
    with pytest.raises(OutriderError):
        EXPLORE.build({"name": "fission", "cut": "later"}, "explore")


# --- SCOPE / InT first-error correction --------------------------------------------------------------------------------
def correction_step(task, policy, normal, **options):
    seen = []
    cfg = StepCorrectionConfig(prompts_per_step=1, group_size=len(normal), max_new_tokens=6, **options)
    piece = StepCorrection(cfg, BuildContext(task=task, policy=policy))
    episodes, metrics = piece(fake_ctx(task, policy, normal, seen))
    return piece, episodes, metrics, seen[1] if len(seen) > 1 else []


def test_scope_rewrites_only_the_first_wrong_step(task, policy):
    normal = normal_groups(task, policy)
    expr, final = answer(task, 3)
    piece, episodes, metrics, starts = correction_step(task, policy, normal)
    # near misses (>= 1 right step before the first wrong one): episodes 0 and 3 (wrong at turn 1); 2 is wrong at 0
    assert metrics["explore/near_miss_frac"] == 2 / 3 and metrics["explore/first_wrong_mean"] == 1.0
    # both wrong after the right call: the oracle answers from the tool's value and the episode ends, all given
    for i in (0, 3):
        fixed = episodes[i]
        assert fixed is not normal[i] and fixed.origin == "guided" and fixed.success
        assert [t.action for t in fixed.turns] == [normal[i].turns[0].action, final]
        assert fixed.prefix_tokens == 0  # train_given: the whole corrected episode trains (ratio 1)
        assert fixed.turns[1].behaviour_logprobs == [0.0] * len(fixed.turns[1].action_ids)  # given, not drawn
    assert starts == [] and len(episodes) == 4
    assert episodes[2] is normal[2] and episodes[1] is normal[1]
    assert metrics["explore/corrections"] == 2 and piece.state_dict()["counts"]["corrections"] == 2


def test_scope_options(task, policy):
    _, episodes, _, _ = correction_step(task, policy, normal_groups(task, policy), train_given=False)
    assert episodes[3].prefix_tokens == episodes[3].num_action_tokens  # only sampled tokens would train: none
    normal = normal_groups(task, policy)
    expr, _ = answer(task, 3)
    _, episodes, metrics, starts = correction_step(task, policy, normal, near_miss=0, keep_failed=True)
    assert metrics["explore/corrections"] == 3 and len(episodes) == 7 and episodes[:4] == normal
    # wrong at turn 0 ("hello"): the oracle's call, then an on-policy continuation from the state it reached
    assert len(starts) == 1 and starts[0].metadata == {"corrected_at": 0} and starts[0].snapshot is not None
    assert [t.action for t in starts[0].prefix] == [f"calc: {expr}"]
    continued = [e for e in episodes[4:] if e.metadata.get("corrected_at") == 0][0]
    assert continued.turns[0].action == f"calc: {expr}" and continued.turns[1].observation.startswith("= ")
    assert len(continued.turns) >= 2 and continued.prefix_tokens == 0
    _, episodes, _, _ = correction_step(task, policy, normal_groups(task, policy), near_miss=0, max_corrections=1)
    assert sum(e.origin == "guided" for e in episodes) == 1


def test_whole_trajectory_replacement(task, policy):
    expr, final = answer(task, 3)
    _, episodes, metrics, starts = correction_step(task, policy, normal_groups(task, policy), replace="trajectory")
    assert starts == [] and metrics["explore/corrections"] == 2
    for i in (0, 3):
        assert [t.action for t in episodes[i].turns] == [f"calc: {expr}", final] and episodes[i].success
        assert episodes[i].metadata == {"oracle_trajectory": True}


def test_scope_needs_the_hooks(policy):
    with pytest.raises(OutriderError, match="^explore.name: step_correction: needs the task's step_ok"):
        StepCorrection(StepCorrectionConfig(), BuildContext(task=NoHooks(), policy=policy))
