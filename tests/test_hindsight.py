"""HeRL [12]: the task's feedback hook, the hindsight-guided resampling piece ``herl``, its bonus and selection,
the guided rows' training (context removed, behaviour log-probs under the context), and resume."""

from __future__ import annotations

import pytest

from outrider.envs.stepsum import StepSumConfig, StepSumTask


def stepsum_env():
    task = StepSumTask(StepSumConfig(min_terms=3, max_terms=3, instruction_fraction=0.0, long_fraction=0.0))
    env = task.make_env("train")
    env.reset(0)
    return task, env


def test_stepsum_feedback_names_the_unmet_criteria():
    task, env = stepsum_env()
    a, b, c = env.problem["metadata"]["terms"]
    s1, s2 = a + b, a + b + c
    assert task.feedback(env, f"{s1},{s2},#{s2}") == ""
    assert task.feedback(env, f"{a}+{b}={s1},{s1}+{c}={s2},#{s2}") == ""
    # a wrong second step carried to the answer: both criteria named, the step with what it must compute
    assert task.feedback(env, f"{s1},{s2 + 1},#{s2 + 1}") == f"step 2 must be {s1}+{c}; the answer must be the last sum"
    # only the answer wrong
    assert task.feedback(env, f"{s1},{s2},#{s2 + 1}") == "the answer must be the last sum"
    # an extra step (the answer right), and too few steps (only the answer criterion fails)
    assert task.feedback(env, f"{s1},{s2},{s2},#{s2}") == "step 3 is extra"
    assert task.feedback(env, f"#{s1}") == "the answer must be the last sum"
    # the env is left as it was
    assert env.problem["metadata"]["terms"] == [a, b, c]


# --- the bonus and the choice of guided rows -------------------------------------------------------------------------

import math  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from conftest import read_jsonl, tiny_recipe  # noqa: E402
from outrider.data import Episode, GroupIds, Turn, pack  # noqa: E402
from outrider.envs import ENVS  # noqa: E402
from outrider.errors import OutriderError  # noqa: E402
from outrider.explore import ExploreContext  # noqa: E402
from outrider.explore.hindsight import BONUS, Hindsight, HindsightConfig, bonus, experiences, pick  # noqa: E402
from outrider.explore.rollout import rollout  # noqa: E402
from outrider.policy.model import Policy  # noqa: E402
from outrider.policy.sampler import SamplingParams  # noqa: E402
from outrider.registry import BuildContext  # noqa: E402
from outrider.update import LOSSES, TERMS, TokenContext  # noqa: E402
from outrider.update.off_policy import OffPolicyConfig  # noqa: E402
from outrider.update.terms import PolicyTerm  # noqa: E402
from test_guidance import BEHAVIOUR, CURRENT, MASK, STEPSUM, guided_batch, stepsum  # noqa: E402
from test_resume import RESUME_OVERRIDES, killed_run_resumes_like  # noqa: E402



def test_the_bonus_moves_a_candidate_toward_its_best_guided_reward():
    assert bonus(0.0, [0.0, 1.0], 0.05) == pytest.approx(0.05)  # a failure whose guided retry succeeded
    assert bonus(0.0, [0.0], 0.05) == 0.0  # no improvement, no bonus
    assert bonus(0.6, [0.2], 0.05) == pytest.approx(-0.02)  # guidance made it worse: r + α(r' − r) < r
    assert bonus(0.4, [], 0.05) == 0.0 and bonus(0.0, [1.0], 0.0) == 0.0


def test_guided_rows_beating_the_group_come_first_then_ties():
    # (reward, id): above the group's best 0.5 best first, then equal ones, at most k
    assert pick([(0.5, 0), (1.0, 1), (0.2, 2), (0.7, 3)], 0.5, 1) == [1]
    assert pick([(0.5, 0), (1.0, 1), (0.2, 2), (0.7, 3)], 0.5, 3) == [1, 3, 0]
    assert pick([(0.2, 2)], 0.5, 2) == [] and pick([(1.0, 0)], 0.0, 0) == []
    group = [Episode(group_id=0, seed=0) for _ in range(4)]
    for e, r in zip(group, (0.0, 0.5, 0.5, 0.2)):
        e.rewards["trajectory"]["verifier"] = r
    assert experiences(group, 16) == [group[1], group[2]] and experiences(group, 1) == [group[1]]


# --- the piece on a real policy: context removed, μ under the context ---------------------------------------------


def real_ctx(task, policy, step: int = 1):
    seeds = iter(range(1000, 1100))
    params = SamplingParams(temperature=1.0, max_new_tokens=12)
    gen = torch.Generator().manual_seed(step)

    def play(starts, snapshots=False):
        return rollout(policy, lambda: task.make_env("train"), starts, params, gen, task.max_turns)

    def score(episodes):
        for e in episodes:
            e.rewards["trajectory"]["verifier"] = float(e.success)

    return ExploreContext(rollout=play, score=score, next_seeds=lambda n: [next(seeds) for _ in range(n)],
                          groups=GroupIds(), rng=np.random.default_rng([0, step]), step=step, task=task)


def herl(policy, task, **options) -> Hindsight:
    cfg = HindsightConfig(prompts_per_step=2, group_size=3, max_new_tokens=12, **options)
    return Hindsight(cfg, BuildContext(task=task, policy=policy))


def test_guided_rows_train_without_the_experience_and_keep_mu_from_under_it():
    task, policy = stepsum(), Policy.tiny(hidden=32, layers=1, heads=2)
    piece = herl(policy, task, replace=1, guided_temperature=0.3)
    ctx = real_ctx(task, policy)
    shown = []
    sample = piece.sample
    piece.sample = lambda c, starts: shown.extend(starts) or sample(c, starts)  # keep the starts to check them
    episodes, metrics = piece(ctx)
    # an untrained policy fails everything: both groups are guided, every member is an experience
    assert metrics["explore/herl_groups"] == 1.0 and metrics["explore/guided_sampled"] == 6 and len(shown) == 6
    guided = [e for e in episodes if e.origin == "guided"]
    assert len(episodes) == 6 and len(guided) == 2  # a failed guided row ties the group's best: one per group
    env = task.make_env("train")
    for e in guided:
        start = next(s for s in shown if s.group_id == e.group_id)
        prompt = env.reset(e.seed)
        assert start.context.startswith("Failed: ") and "\nUnmet: " in start.context
        assert "the answer must be the last sum" in start.context  # the task's feedback on the failed response
        turn = e.turns[0]
        # the trained row: the plain prompt, then the action; the experience is nowhere in it
        assert turn.observation == prompt and turn.observation_ids == policy.encode_observation(prompt, first=True)
        assert e.off_policy and e.weight == 0.0 and e.prefix_tokens == 0
        batch = pack([e], policy.pad_id, policy.bos_id)
        n_obs, n_act = 1 + len(turn.observation_ids), len(turn.action_ids)
        assert batch.input_ids[0, :n_obs + n_act].tolist() == [policy.bos_id] + turn.observation_ids + turn.action_ids
        assert batch.action_mask[0].tolist()[:n_obs + n_act] == [0.0] * n_obs + [1.0] * n_act
        # μ: the log-probs of the action under the experience + prompt, at the guided temperature
        seen = [policy.bos_id] + policy.encode_observation(start.context + prompt, first=True)
        ids = torch.tensor([seen + turn.action_ids])
        with torch.no_grad():
            lp = policy.score(ids, torch.ones_like(ids), 0.3).logprobs[0, len(seen):]
        torch.testing.assert_close(torch.tensor(turn.behaviour_logprobs), lp, rtol=1e-4, atol=1e-4)
    assert metrics["explore/guided_tokens"] > 0 and metrics["time/guidance_s"] >= 0


def test_without_the_experience_the_failures_are_resampled_from_the_plain_prompt():
    task, policy = stepsum(), Policy.tiny(hidden=32, layers=1, heads=2)
    piece = herl(policy, task, replace=1, guided_temperature=0.3, experience=False)
    piece.feedback_text = None  # the task's feedback is never asked for
    shown = []
    sample = piece.sample
    piece.sample = lambda c, starts: shown.extend(starts) or sample(c, starts)
    episodes, metrics = piece(real_ctx(task, policy))
    assert len(shown) == 6 and all(s.context is None and s.origin == "guided" for s in shown)
    assert metrics["explore/context_chars"] == 0.0 and metrics["explore/guided_sampled"] == 6
    env = task.make_env("train")
    for e in (e for e in episodes if e.origin == "guided"):
        turn = e.turns[0]
        assert e.off_policy and e.weight == 0.0 and turn.observation == env.reset(e.seed)
        # μ: the plain prompt's log-probs at the guided temperature
        ids = torch.tensor([[policy.bos_id] + turn.observation_ids + turn.action_ids])
        with torch.no_grad():
            lp = policy.score(ids, torch.ones_like(ids), 0.3).logprobs[0, 1 + len(turn.observation_ids):]
        torch.testing.assert_close(torch.tensor(turn.behaviour_logprobs), lp, rtol=1e-4, atol=1e-4)
    entry, cfg = ENVS.build({"name": "multisol"}, "task")  # a task without the feedback hook is fine here
    Hindsight(HindsightConfig(experience=False), BuildContext(task=entry.fn(cfg), where="explore"))


def test_a_successful_guided_retry_replaces_a_member_and_its_experience_gets_the_bonus():
    task = stepsum()
    piece = herl(None, task, replace=1, alpha=0.05, shaping=False)

    def fake_sample(ctx, starts):  # the first experience of group 0 is fixed by its guided retry; the rest fail
        out = []
        for n, s in enumerate(starts):
            e = Episode(group_id=s.group_id, seed=s.seed, origin="guided", off_policy=True, success=n == 0)
            e.turns = [Turn("o", [5], "x", [6, 7], behaviour_logprobs=[-1.0, -1.0])]
            out.append(e)
        return out

    piece.sample = fake_sample
    ctx = real_ctx(task, Policy.tiny(hidden=32, layers=1, heads=2))
    episodes, metrics = piece(ctx)
    g0 = [e for e in episodes if e.group_id == 0]
    assert [e.success for e in g0 if e.origin == "guided"] == [True] and len(g0) == 3
    with_bonus = [e for e in episodes if BONUS in e.rewards["trajectory"]]
    assert len(with_bonus) <= 1 and metrics["explore/bonus_rows"] == 1  # (the bonus row may have been replaced)
    assert metrics["explore/bonus_mean"] == pytest.approx(0.05) and metrics["explore/guided_success"] == 1 / 6
    assert all(e.weight == 1.0 for e in episodes if e.origin == "guided")  # shaping: false, the surrogate's


# --- the term and the per-origin importance weights, by hand --------------------------------------------------------

# the two rows of test_guidance: an on-policy row and a guided one, log π_θ(y | x) = CURRENT and
# log μ(y | x, experience) = BEHAVIOUR on its two trained tokens


def test_guided_shaping_on_the_importance_ratio_by_hand():
    term = TERMS.create({"name": "guided_shaping", "gamma": 1.0, "ratio": "behaviour"})
    adv = torch.tensor([[0.0, -0.5, -0.5], [0.0, 1.5, 1.5]])
    logprobs = CURRENT.clone().requires_grad_(True)
    out = term(TokenContext(logprobs, logprobs.detach(), adv, MASK, batch=guided_batch()))
    # row 1: r = π/μ = e^−0.25, e^1; f = r/(r+1); −A·f summed, token-mean over the 4 trained tokens
    r = [math.exp(-0.25), math.e]
    f = [x / (x + 1) for x in r]
    assert float(out.loss) == pytest.approx(-1.5 * sum(f) / 4)
    assert float(out.metrics["prob_mean"]) == pytest.approx(sum(r) / 2)
    out.loss.backward()
    # ∂(−A·r/(r+γ))/∂log π = −A·γ·r/(r+γ)², unclipped
    torch.testing.assert_close(logprobs.grad[1], torch.tensor([0.0] + [-1.5 * x / (x + 1) ** 2 / 4 for x in r]))
    assert torch.all(logprobs.grad[0] == 0)


def test_the_guided_rows_importance_weights_per_origin_by_hand():
    """ρ = π_old/μ on the guided row (π_old: the unguided log-probs, μ: under the experience)."""
    term = PolicyTerm(LOSSES.create({"name": "ppo"}), OffPolicyConfig(correction="none"))
    logprobs = CURRENT.clone().requires_grad_(True)
    out = term(TokenContext(logprobs, logprobs.detach(), torch.zeros(2, 3), MASK, batch=guided_batch()))
    assert float(out.metrics["origin/guided/iw_mean"]) == pytest.approx((math.exp(-0.25) + math.e) / 2)
    assert float(out.metrics["origin/guided/iw_max"]) == pytest.approx(math.e)


# --- errors --------------------------------------------------------------------------------------------------------


def test_a_task_without_feedback_and_a_missing_term_are_one_line_errors():
    from outrider.recipe import Recipe

    entry, cfg = ENVS.build({"name": "multisol"}, "task")
    task = entry.fn(cfg)
    with pytest.raises(OutriderError, match=r"explore: herl needs the task's feedback\(env, action\) hook") as e:
        Hindsight(HindsightConfig(), BuildContext(task=task, where="explore"))
    assert "\n" not in str(e.value)
    recipe = Recipe.model_validate({**tiny_recipe(explore={"name": "herl"}), "task": STEPSUM})
    with pytest.raises(OutriderError, match=r"explore\.shaping: true needs update\.terms"):
        Hindsight(HindsightConfig(), BuildContext(task=stepsum(), recipe=recipe, where="explore"))
    from outrider.policy.sft import WarmStartConfig, warm_start
    with pytest.raises(OutriderError, match="feedback_fraction: needs the task's feedback"):
        warm_start(Policy.tiny(hidden=32, layers=1, heads=2), task, WarmStartConfig(steps=1, feedback_fraction=0.5))


def test_the_warm_start_shows_hindsight_experiences():
    import random

    from outrider.policy.sft import add_feedback

    task = stepsum()
    seeds = [10, 11, 12, 13]
    demos = task.demonstrations(seeds)
    out = add_feedback(task, demos, seeds, 1.0, "Failed: {response}\nUnmet: {feedback}\n", random.Random(0))
    changed = [(d, o) for d, o in zip(demos, out) if d is not o]
    assert changed  # a donor that happens to be right leaves its demonstration as it was
    for d, o in changed:
        obs, action = o.turns[0]
        assert obs.startswith("Failed: ") and obs.endswith("\n" + d.turns[0][0]) and action == d.turns[0][1]
    assert add_feedback(task, demos, seeds, 0.0, "{response}{feedback}", random.Random(0)) == demos


# --- kill -9 + --resume ----------------------------------------------------------------------------------------------

HERL_OVERRIDES = dict(RESUME_OVERRIDES,
                      policy={"warm_start": {"steps": 20, "batch_size": 16, "lr": 5.0e-3, "feedback_fraction": 0.5}},
                      explore={"name": "herl", "prompts_per_step": 2, "group_size": 4, "max_new_tokens": 24},
                      update={"lr": 3.0e-3, "terms": [{"name": "guided_shaping", "gamma": 1.0, "ratio": "behaviour"}]},
                      score=[{"name": "verifier", "weight": 1.0}])


@pytest.mark.slow  # three runs of small steps, ~1 min
def test_killed_herl_run_resumes_to_identical_metrics(tmp_path):
    from outrider.recipe import load_recipe
    from outrider.trainer import Trainer

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**tiny_recipe(**HERL_OVERRIDES), "task": STEPSUM}, sort_keys=False))
    Trainer(load_recipe(recipe), tmp_path / "A", quiet=True).run()
    rows = read_jsonl(tmp_path / "A" / "metrics.jsonl")
    assert sum(r.get("explore/guided_sampled", 0) for r in rows) > 0
    assert rows[-1]["explore/guided_rows_total"] == sum(r.get("explore/guided_rows", 0) for r in rows)
    killed_run_resumes_like(tmp_path / "A", recipe, tmp_path)
