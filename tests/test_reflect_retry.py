"""R³L reflect-then-retry [0]: pivots by each rule (degenerate cases included), the retry's start, pivotal credit
(only the retried suffix trains), the reflection left out of the trained sequence (an off-policy row), positive
amplification by hand, each part switched off, bad options, and kill -9 + --resume with its state."""

from __future__ import annotations


import numpy as np
import pytest
import torch

import yaml

from conftest import read_jsonl, tiny_recipe
from outrider.data import Episode, GroupIds, Turn, pack
from outrider.envs import ENVS
from outrider.envs.arithmetic import format_number
from outrider.errors import OutriderError
from outrider.explore import EXPLORE, ExploreContext
from outrider.explore.reflect_retry import ReflectRetry, ReflectRetryConfig, amplify_weights
from outrider.explore.rollout import rollout
from outrider.explore.step_check import after_last_progress, first_invalid, first_wrong_step, given_turn
from outrider.policy.model import Policy
from outrider.policy.sampler import SamplingParams
from outrider.registry import BuildContext
from test_resume import RESUME_OVERRIDES, STEPS, killed_run_resumes_like

CALC = {"name": "calculator", "digits": 2, "terms": 2, "ops": ["*"], "style": "expression", "format": "compact",
        "max_turns": 4, "eval_size": 16}


@pytest.fixture(scope="module")
def task():
    entry, cfg = ENVS.build(CALC, "task")
    return entry.fn(cfg)


@pytest.fixture(scope="module")
def policy():
    return Policy.tiny(hidden=32, layers=1, heads=2, seed=0)


def turns_of(**infos) -> list[Turn]:
    return [Turn("o", [1], "a", [2, 3], info=dict(i)) for i in infos.values()]


def played(task, policy, seed: int, actions: list[str], group: int = 0) -> Episode:
    """An episode of `actions` played in the calculator from `seed`, every turn with its snapshot (as first
    attempts are rolled out), each action encoded as the rollout encodes one."""
    env, turns, done, info = task.make_env("train"), [], False, {}
    obs = env.reset(seed)
    for a in actions:
        turn = given_turn(policy, obs, not turns, a)
        turn.snapshot = env.snapshot()
        obs, reward, done, info = env.step(a)
        turn.reward, turn.info = float(reward), dict(info)
        turns.append(turn)
        if done:
            break
    return Episode(group_id=group, seed=seed, turns=turns, done=done, success=bool(info.get("success")))


def answer(task, seed: int) -> tuple[str, str]:
    """The question's expression and the right final action."""
    env = task.make_env("train")
    env.reset(seed)
    return env.question["expr"], f"answer: {format_number(env.question['answer'])}"


# --- pivots -------------------------------------------------------------------------------------------------------
def test_first_invalid_by_hand():
    assert first_invalid(Episode(0, 0, turns_of(a={}, b={}, c={"invalid": True}, d={"invalid": True}))) == 2
    assert first_invalid(Episode(0, 0, turns_of(a={"invalid": True}, b={}))) == 0  # failure at turn 0
    assert first_invalid(Episode(0, 0, turns_of(a={}, b={}))) is None  # no invalid action


def test_after_last_progress_by_hand():
    ep = Episode(0, 0, turns_of(a={"events": ["key"]}, b={"events": ["door"]}, c={}, d={"events": ["bump_error"]}))
    assert after_last_progress(ep) == 2  # turns 0, 1 made progress; the error event is not progress
    assert after_last_progress(ep, ["key"]) == 1  # only 'key' counts
    assert after_last_progress(Episode(0, 0, turns_of(a={}, b={}))) == 0  # no progress at all: from the start
    assert after_last_progress(Episode(0, 0, turns_of(a={}, b={"events": ["key"]}))) is None  # the last turn progressed


def test_checker_pivot_on_the_calculator(task, policy):
    expr, final = answer(task, 3)
    wrong_answer = played(task, policy, 3, [f"calc: {expr}", "answer: 1"])
    assert first_wrong_step(task, wrong_answer) == (1, 1)  # the right call passes; one env step replayed
    assert first_wrong_step(task, played(task, policy, 3, ["calc: 1+1"]))[0] == 0  # wrong at turn 0
    assert first_wrong_step(task, played(task, policy, 3, [f"calc: {expr}", final]))[0] is None


def test_pivot_rules_in_order_and_no_pivot(task, policy):
    expr, _ = answer(task, 3)
    piece = ReflectRetry(ReflectRetryConfig(pivot=["invalid", "checker"]), BuildContext(task=task, policy=policy))
    ep = played(task, policy, 3, [f"calc: {expr}", "calc: 1x", "answer: 5"])
    assert piece.pivot(task, ep) == (1, 0)  # the invalid rule finds turn 1; the checker is not asked
    ep = played(task, policy, 3, [f"calc: {expr}", "answer: 5"])
    assert piece.pivot(task, ep) == (1, 1)  # no invalid action: the checker finds the wrong answer
    only_invalid = ReflectRetry(ReflectRetryConfig(pivot=["invalid"]), BuildContext(task=task, policy=policy))
    assert only_invalid.pivot(task, ep) == (0, 0)  # no rule finds one: retry from the start (no_pivot: start)
    skip = ReflectRetry(ReflectRetryConfig(pivot=["invalid"], no_pivot="skip"), BuildContext(task=task, policy=policy))
    assert skip.pivot(task, ep) == (None, 0)


# --- amplification ------------------------------------------------------------------------------------------------
def scored(reward: float, group: int = 0, origin: str = "on_policy", success: bool | None = None) -> Episode:
    e = Episode(group_id=group, seed=0, origin=origin, success=reward > 0 if success is None else success)
    e.rewards["trajectory"]["r"] = reward
    return e


def test_amplify_weights_by_hand():
    # group 0: rewards 1, 0, 0, 1 (a retry): mean 0.5, the two 1s are above it; group 1 all equal: no advantage
    eps = [scored(1.0), scored(0.0), scored(0.0), scored(1.0, origin="retry"), scored(1.0, 1), scored(1.0, 1)]
    assert amplify_weights(eps, 3.0) == 2
    assert [e.weight for e in eps] == [3.0, 1.0, 1.0, 3.0, 1.0, 1.0]
    eps = [scored(1.0), scored(0.0), scored(0.0), scored(1.0, origin="retry"), scored(0.0, origin="retry")]
    assert amplify_weights(eps, 3.0, "successful_retries") == 1
    assert [e.weight for e in eps] == [1.0, 1.0, 1.0, 3.0, 1.0]
    eps = [scored(1.0), scored(0.0)]
    assert amplify_weights(eps, 1.0) == 0 and [e.weight for e in eps] == [1.0, 1.0]  # factor 1: off


# --- one step ------------------------------------------------------------------------------------------------------
def step_with(task, policy, first: list[Episode], **options):
    """One call of the piece whose first attempts are `first` (hand-made) and whose retries are real rollouts of
    the tiny policy; returns (episodes, metrics, the retry starts)."""
    cfg = ReflectRetryConfig(prompts_per_step=1, group_size=2 * len(first), max_new_tokens=6, **options)
    piece = ReflectRetry(cfg, BuildContext(task=task, policy=policy))
    seen = []

    def fake_rollout(starts, snapshots=False):
        if not seen:
            seen.append(starts)
            assert snapshots and len(starts) == len(first)
            return first
        seen.append(starts)
        return rollout(policy, lambda: task.make_env("train"), starts, SamplingParams(max_new_tokens=6),
                       torch.Generator().manual_seed(0), max_turns=task.max_turns)

    def score(episodes):
        for e in episodes:
            e.rewards["trajectory"]["verifier"] = float(e.success)

    groups = GroupIds()
    ctx = ExploreContext(rollout=fake_rollout, score=score, next_seeds=lambda n: [3] * n, groups=groups,
                         rng=np.random.default_rng(0), task=task)
    episodes, metrics = piece(ctx)
    return episodes, metrics, seen[1] if len(seen) > 1 else []


def first_attempts(task, policy):
    expr, final = answer(task, 3)
    return [played(task, policy, 3, [f"calc: {expr}", "calc: 1x", "answer: 5"]),  # invalid at turn 1
            played(task, policy, 3, [f"calc: {expr}", final]),  # success: no retry
            played(task, policy, 3, ["hello", "answer: 7"])]  # invalid at turn 0


def test_retry_starts_at_the_pivot_with_the_hint_and_only_its_suffix_trains(task, policy):
    first = first_attempts(task, policy)
    expr, _ = answer(task, 3)
    episodes, metrics, starts = step_with(task, policy, first, pivot=["invalid"], reflection="hint")
    assert [s.metadata["pivot"] for s in starts] == [1, 0]
    s1, s0 = starts
    assert [t.action for t in s1.prefix] == [f"calc: {expr}"] and s1.snapshot is first[0].turns[1].snapshot
    assert s0.prefix == [] and s0.snapshot is None  # failure at turn 0: a retry from the reset state
    assert s1.context.startswith("Hint: answer: ") and s0.context == f"Hint: calc: {expr}\n"
    assert all(s.origin == "retry" and s.group_id == 0 and s.context_at == "before_observation" for s in starts)
    retries = episodes[3:]
    assert len(episodes) == 5 and [r.origin for r in retries] == ["retry", "retry"]
    r1 = retries[0]
    prefix_len = len(first[0].turns[0].action_ids)
    # pivotal credit: the retry's shared prefix is given; the parent's turns before the pivot are untrained too
    assert r1.prefix_tokens == prefix_len and first[0].prefix_tokens == prefix_len
    assert first[2].prefix_tokens == 0 and first[1].prefix_tokens == 0  # pivot 0 / no retry: nothing masked
    mask = pack([r1], policy.pad_id, policy.bos_id).action_mask[0]
    assert int(mask.sum()) == r1.num_action_tokens - prefix_len  # only the retried suffix
    # the reflection was shown while sampling, and is not in the trained sequence: an off-policy row
    assert r1.off_policy and retries[1].off_policy
    assert "Hint" not in r1.turns[1].observation
    assert r1.turns[1].observation_ids == policy.encode_observation(first[0].turns[1].observation, first=False)
    assert metrics["explore/retries"] == 2 and metrics["explore/pivot_found_frac"] == 1.0
    assert metrics["explore/pivot_mean"] == 0.5
    # positive amplification: the one success (reward 1 > group mean) is weighted 3, failures stay 1
    assert first[1].weight == 3.0 and first[0].weight == 1.0 and first[2].weight == 1.0


def test_the_three_parts_switched_off(task, policy):
    first = first_attempts(task, policy)
    episodes, metrics, starts = step_with(task, policy, first, reflection="none", pivot_mask=False, amplify=1.0)
    assert all(s.context is None for s in starts)
    retries = episodes[3:]
    assert not any(r.off_policy for r in retries)  # no reflection: an on-policy restart
    assert all(e.prefix_tokens == 0 for e in episodes)  # no pivot mask: every action trains
    assert all(e.weight == 1.0 for e in episodes) and metrics["explore/amplified"] == 0
    episodes, _, _ = step_with(task, policy, first_attempts(task, policy), retry_ratio="current")
    assert not any(r.off_policy for r in episodes[3:])  # the hint shown, trained as on-policy (ratio 1)


def test_feedback_reflection_names_the_action_and_the_error(task, policy):
    _, _, starts = step_with(task, policy, first_attempts(task, policy), reflection="feedback")
    assert starts[0].context == "Previous attempt at this step: calc: 1x\nFeedback: error: invalid syntax\n"


# --- bad options ------------------------------------------------------------------------------------------------------
class NoHooks:
    max_turns = 4


@pytest.mark.parametrize("options, field", [({"pivot": ["checker"]}, "explore.pivot: checker"),
                                            ({"reflection": "hint"}, "explore.reflection: hint")])
def test_a_hook_the_task_lacks_is_one_line(options, field, policy):
    with pytest.raises(OutriderError) as e:
        ReflectRetry(ReflectRetryConfig(**options), BuildContext(task=NoHooks(), policy=policy))
    assert str(e.value).startswith(field) and "\n" not in str(e.value)


def test_model_reflection_on_the_tiny_model_is_one_line(task, policy):
    with pytest.raises(OutriderError, match="^explore.reflection: 'model' needs a pretrained model"):
        ReflectRetry(ReflectRetryConfig(reflection="model"), BuildContext(task=task, policy=policy))


@pytest.mark.parametrize("options", [{"pivot": ["first_error"]}, {"amplify": 0.5}, {"template": "{oops"},
                                     {"pivot": []}])
def test_bad_options_are_rejected(options):
    with pytest.raises(OutriderError):
        EXPLORE.build({"name": "reflect_retry", **options}, "explore")


# --- kill -9 + --resume -------------------------------------------------------------------------------------------
R3L_OVERRIDES = dict(RESUME_OVERRIDES,
                     policy={"warm_start": {"steps": 20, "batch_size": 16, "lr": 5.0e-3, "hint_fraction": 0.2}},
                     explore={"name": "reflect_retry", "prompts_per_step": 2, "group_size": 4, "max_new_tokens": 8,
                              "pivot": ["invalid", "checker"], "reflection": "hint"},
                     score=[{"name": "verifier", "weight": 1.0}])


@pytest.mark.slow  # three runs of 40 small steps, ~1 min
def test_killed_r3l_run_resumes_to_identical_metrics(tmp_path):
    from outrider.recipe import load_recipe
    from outrider.trainer import Trainer

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(dict(tiny_recipe(**R3L_OVERRIDES), task=CALC), sort_keys=False))
    reference = tmp_path / "A"
    Trainer(load_recipe(recipe), reference, quiet=True).run()
    rows = read_jsonl(reference / "metrics.jsonl")
    assert sum(r.get("explore/retries", 0) for r in rows) > STEPS  # retries happen every step
    assert rows[-1]["explore/retries_total"] == sum(r.get("explore/retries", 0) for r in rows)
    killed_run_resumes_like(reference, recipe, tmp_path)


RETRY_FAMILY = {
    "fission": {"name": "fission", "prompts_per_step": 2, "group_size": 4, "max_new_tokens": 8,
                "recovery_group_size": 2, "max_fissions": 2, "feedback": "hint"},
    "step_correction": {"name": "step_correction", "prompts_per_step": 2, "group_size": 4, "max_new_tokens": 8,
                        "near_miss": 0, "max_corrections": 2},
}


@pytest.mark.slow  # three runs of 40 small steps each, ~15 s per piece
@pytest.mark.parametrize("piece", sorted(RETRY_FAMILY))
def test_killed_fission_and_scope_runs_resume_to_identical_metrics(tmp_path, piece):
    """The retry family's other pieces (their counts and cost totals in checkpoints) survive kill -9 + --resume."""
    from outrider.recipe import load_recipe
    from outrider.trainer import Trainer

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(dict(tiny_recipe(**dict(R3L_OVERRIDES, explore=RETRY_FAMILY[piece])),
                                          task=CALC), sort_keys=False))
    reference = tmp_path / "A"
    Trainer(load_recipe(recipe), reference, quiet=True).run()
    total = {"fission": "explore/fissions_total", "step_correction": "explore/corrections_total"}[piece]
    assert read_jsonl(reference / "metrics.jsonl")[-1][total] > 0  # the piece acted, so its state matters
    killed_run_resumes_like(reference, recipe, tmp_path)


def test_warm_start_hints_name_the_demonstrated_action():
    import random

    from outrider.envs.base import Demonstration
    from outrider.policy.sft import add_hints

    demos = [Demonstration([("q1\n", "calc: 1*2"), ("= 2\n", "answer: 2")]), Demonstration([("q2\n", "calc: 3*4")])]
    hinted = add_hints(demos, 1.0, "Hint: {hint}\n", random.Random(0))
    for d, h in zip(demos, hinted):
        changed = [(a, b) for a, b in zip(d.turns, h.turns) if a != b]
        assert len(changed) == 1  # one turn per demonstration
        (obs, action), (new_obs, new_action) = changed[0]
        assert new_action == action and new_obs == f"Hint: {action}\n" + obs
    assert add_hints(demos, 0.0, "Hint: {hint}\n", random.Random(0)) == demos


def test_warm_start_decoy_hints_name_another_demonstrations_action_and_end_there():
    """A decoy: the hinted turn's action is another demonstration's at that turn (its last if shorter), named by
    the hint, and nothing follows; the hints' own draws (which turn) are those of a run without decoys."""
    import random

    from outrider.envs.base import Demonstration
    from outrider.policy.sft import add_hints

    demos = [Demonstration([("q1\n", "calc: 1*2"), ("= 2\n", "answer: 2")]), Demonstration([("q2\n", "calc: 3*4")])]
    plain = add_hints(demos, 1.0, "H {hint}\n", random.Random(0))
    decoyed = add_hints(demos, 1.0, "H {hint}\n", random.Random(0), decoy=1.0, decoy_rng=random.Random(0))
    for d, p, h, donor in zip(demos, plain, decoyed, demos[::-1]):
        j = next(k for k, (a, b) in enumerate(zip(d.turns, p.turns)) if a != b)  # the plain run's hinted turn
        action = donor.turns[min(j, len(donor.turns) - 1)][1]
        assert h.turns == d.turns[:j] + [(f"H {action}\n" + d.turns[j][0], action)]
    # decoy 0 (or no decoy stream) leaves the hints as they were
    assert add_hints(demos, 1.0, "H {hint}\n", random.Random(0), decoy=0.0, decoy_rng=random.Random(0)) == plain


def test_warm_start_decoys_need_hints():
    from outrider.errors import OutriderError
    from outrider.policy.sft import WarmStartConfig, warm_start

    with pytest.raises(OutriderError, match="hint_decoy_fraction: needs hint_fraction"):
        warm_start(None, None, WarmStartConfig(steps=1, hint_decoy_fraction=0.5))  # type: ignore[arg-type]


def test_fill_fresh_replaces_a_first_attempt_without_retry(task, policy):
    """The authors' workflow keeps every group at 2 x first attempts: a success gets a fresh rollout instead."""
    episodes, metrics, starts = step_with(task, policy, first_attempts(task, policy), fill="fresh")
    assert len(starts) == 3 and len(episodes) == 6
    fresh = starts[2]
    assert fresh.prefix == [] and fresh.context is None and fresh.origin == "on_policy" and fresh.group_id == 0
    assert metrics["explore/retries"] == 2 and metrics["explore/fresh"] == 1
    assert not episodes[5].off_policy and episodes[5].origin == "on_policy"
