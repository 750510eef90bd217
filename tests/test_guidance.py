"""AMPO guidance on demand [121] and the always-mix baseline: which groups are guided, how many members are
replaced and by which teacher paths (comprehension-based selection), the guided rows' marks, GRPO's advantages
over the mixed group, the guided_shaping term and the guided rows' importance weights by hand, teacher errors,
and kill -9 + --resume with two teachers (demonstrations and a checkpoint)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

from conftest import read_jsonl, tiny_recipe
from outrider.credit import CREDIT
from outrider.data import Episode, GroupIds, Turn, pack
from outrider.envs import ENVS
from outrider.errors import OutriderError
from outrider.explore import EXPLORE, ExploreContext
from outrider.explore.guidance import (Guidance, GuidanceConfig, choose, comprehension, load_teacher,
                                       slots_to_replace, student_logprobs)
from outrider.policy.model import Policy
from outrider.registry import BuildContext
from outrider.update import LOSSES, TERMS, TokenContext
from outrider.update.guided import shaped
from outrider.update.off_policy import OffPolicyConfig
from outrider.update.terms import PolicyTerm
from test_resume import RESUME_OVERRIDES, killed_run_resumes_like

STEPSUM = {"name": "stepsum", "min_terms": 3, "max_terms": 3, "max_digit": 9, "long_fraction": 0.0,
           "instruction_fraction": 0.0, "eval_size": 8}


def stepsum():
    entry, cfg = ENVS.build(STEPSUM, "task")
    return entry.fn(cfg)


# --- selection and replacement ------------------------------------------------------------------------------------


def test_comprehension_is_the_mean_loglikelihood_per_token_and_the_top_k_are_kept():
    assert comprehension([-1.0, -2.0, -3.0]) == pytest.approx(-2.0)
    assert comprehension([]) == 0.0
    rng = np.random.default_rng(0)
    assert choose([-2.0, -0.5, -1.0, -0.5], 2, "comprehension", rng) == [1, 3]  # ties: the earlier first
    assert choose([-2.0, -0.5], 5, "comprehension", rng) == [1, 0]  # k beyond the candidates: all, best first
    picked = choose([-2.0, -0.5, -1.0, -0.5], 2, "random", rng)
    assert len(picked) == 2 and len(set(picked)) == 2


def test_failed_members_are_replaced_first():
    group = [Episode(group_id=0, seed=0, success=s) for s in (True, False, True, False)]
    rng = np.random.default_rng(0)
    assert sorted(slots_to_replace(group, 2, rng)) == [1, 3]
    three = slots_to_replace(group, 3, rng)
    assert sorted(three[:2]) == [1, 3] and three[2] in (0, 2)


def fake_ctx(task, successes: list[list[bool]], step: int = 1):
    """A context whose rollout gives groups with the given success pattern (one list per group)."""
    ids = GroupIds()
    seeds = iter(range(100))
    pattern = iter(successes)

    def rollout(starts, snapshots=False):
        out, flags, last = [], None, None
        for s in starts:
            if s.group_id != last:
                flags, last, k = next(pattern), s.group_id, 0
            e = Episode(group_id=s.group_id, seed=s.seed, success=flags[k])
            e.turns = [Turn("o", [5], "x", [6, 7], behaviour_logprobs=[-1.0, -1.0])]
            out.append(e)
            k += 1
        return out

    def score(episodes):
        for e in episodes:
            e.rewards["trajectory"]["verifier"] = float(e.success)

    return ExploreContext(rollout=rollout, score=score, next_seeds=lambda n: [next(seeds) for _ in range(n)],
                          groups=ids, rng=np.random.default_rng([0, step]), step=step, task=task)


def piece(policy, task, **options) -> Guidance:
    cfg = GuidanceConfig(prompts_per_step=3, group_size=4, max_new_tokens=24, **options)
    return Guidance(cfg, BuildContext(task=task, policy=policy))


def test_on_fail_guides_only_all_fail_groups_with_k_verified_teacher_paths():
    task, policy = stepsum(), Policy.tiny(hidden=32, layers=1, heads=2)
    ampo = piece(policy, task, replace=2)
    episodes, metrics = ampo(fake_ctx(task, [[False] * 4, [True, False, False, False], [False] * 4]))
    assert len(episodes) == 12
    guided = [e for e in episodes if e.origin == "guided"]
    # the two all-fail groups (0 and 2) get the demonstration (one distinct path: k is capped at 1 here)
    assert sorted(e.group_id for e in guided) == [0, 2]
    assert all(e.success and e.off_policy and e.weight == 0.0 and e.prefix_tokens == 0 for e in guided)
    assert metrics["explore/all_fail_groups"] == pytest.approx(2 / 3) and metrics["explore/guided_rows"] == 2
    assert [e.success for e in episodes if e.group_id == 1] == [True, False, False, False]  # untouched
    # the recorded behaviour log-probs are the student's own on the teacher's path
    g = guided[0]
    recorded = [x for t in g.turns for x in t.behaviour_logprobs]
    assert recorded == pytest.approx(student_logprobs(policy, [g])[0], abs=1e-5)
    assert g.metadata["comprehension"] == pytest.approx(comprehension(recorded), abs=1e-5)
    assert ampo.state_dict()["counts"] == {"teacher/demonstrations": 2.0, "injections": 2.0, "guided_groups": 2.0}


def test_always_mix_guides_every_group_and_replaces_a_failed_member():
    task, policy = stepsum(), Policy.tiny(hidden=32, layers=1, heads=2)
    mix = piece(policy, task, inject="always", shaping=False)
    episodes, _ = mix(fake_ctx(task, [[True, True, False, True], [True] * 4, [False] * 4]))
    guided = [e for e in episodes if e.origin == "guided"]
    assert sorted(e.group_id for e in guided) == [0, 1, 2] and all(e.weight == 1.0 for e in guided)
    first = [e for e in episodes if e.group_id == 0]
    assert [e.origin for e in first] == ["on_policy", "on_policy", "guided", "on_policy"]  # the failed one went


def test_grpo_advantages_over_the_mixed_group_by_hand():
    """An all-fail group of 8 with 2 teacher paths in it: mean 1/4, std (n − 1) √(1.5/7): the six failures get
    −0.25/std, the teacher paths +0.75/std."""
    episodes = []
    for i in range(8):
        e = Episode(group_id=0, seed=0, success=i >= 6, origin="guided" if i >= 6 else "on_policy")
        e.turns = [Turn("o", [5], "x", [6, 7], behaviour_logprobs=[-1.0, -1.0])]
        e.rewards["trajectory"]["verifier"] = float(e.success)
        episodes.append(e)
    batch = pack(episodes, pad_id=0)
    credit = CREDIT.create({"name": "grpo", "std_normalize": True})
    adv = credit(batch).advantages
    last = adv[:, -1]
    std = math.sqrt(1.5 / 7)
    torch.testing.assert_close(last[:6], torch.full((6,), -0.25 / std), atol=1e-4, rtol=0)
    torch.testing.assert_close(last[6:], torch.full((2,), 0.75 / std), atol=1e-4, rtol=0)


# --- the learner's side -----------------------------------------------------------------------------------------

MASK = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
CURRENT = torch.tensor([[0.0, -1.0, -2.0], [0.0, math.log(0.05), math.log(0.5)]])  # log π_θ
BEHAVIOUR = torch.tensor([[0.0, -1.1, -2.2], [0.0, math.log(0.05) + 0.25, math.log(0.5) - 1.0]])  # μ


def guided_batch():
    on = Episode(group_id=0, seed=0)
    teacher = Episode(group_id=0, seed=0, origin="guided", off_policy=True, weight=0.0, success=True)
    for e in (on, teacher):
        e.turns = [Turn("o", [5], "ab", [6, 7], behaviour_logprobs=[-0.5, -1.0])]
    batch = pack([on, teacher], pad_id=0)
    batch.behaviour_logprobs = BEHAVIOUR.clone()
    return batch


def term_ctx(batch, advantages):
    logprobs = CURRENT.clone().requires_grad_(True)
    return TokenContext(logprobs, logprobs.detach(), advantages, MASK, batch=batch), logprobs


def test_guided_shaping_by_hand():
    term = TERMS.create({"name": "guided_shaping", "coef": 2.0, "gamma": 0.1})
    adv = torch.tensor([[0.0, -0.5, -0.5], [0.0, 1.5, 1.5]])
    ctx, leaf = term_ctx(guided_batch(), adv)
    out = term(ctx)
    # row 1 only: f(0.05) = 0.05/0.15 = 1/3, f(0.5) = 0.5/0.6 = 5/6; −A·f summed over its 2 tokens, token-mean
    # over the minibatch's 4 trained tokens
    assert shaped(torch.tensor(0.05), 0.1) == pytest.approx(1 / 3)
    assert float(out.loss) == pytest.approx(2.0 * (-1.5 * (1 / 3 + 5 / 6)) / 4)
    assert float(out.metrics["prob_mean"]) == pytest.approx(0.275)
    assert float(out.metrics["shaped_mean"]) == pytest.approx((1 / 3 + 5 / 6) / 2)
    assert float(out.metrics["advantage_mean"]) == pytest.approx(1.5) and out.metrics["rows"] == 0.5
    out.loss.backward()
    assert torch.all(leaf.grad[0] == 0)  # the on-policy row is the surrogate's
    # ∂(−A·p/(p+γ))/∂log p = −A·γ·p/(p+γ)²: the unlikely token (p = 0.05) gets 2/3 of the likely one's push
    # although the plain −A·p would give it a tenth
    expect = [-1.5 * 0.1 * p / (p + 0.1) ** 2 * 2.0 / 4 for p in (0.05, 0.5)]
    torch.testing.assert_close(leaf.grad[1], torch.tensor([0.0, *expect]), rtol=1e-5, atol=1e-7)


def test_guided_shaping_is_zero_without_guided_rows_or_advantage():
    term = TERMS.create({"name": "guided_shaping"})
    assert term.entry.needs.zero_at_zero_advantage
    out = term(term_ctx(guided_batch(), torch.zeros(2, 3))[0])
    assert float(out.loss) == 0.0
    batch = guided_batch()
    batch.origin = torch.zeros(2, dtype=torch.long)
    assert term(term_ctx(batch, torch.ones(2, 3))[0]).loss is None


def test_guided_shaping_leaves_guided_rows_the_surrogate_trains():
    """A guided row with weight 1 (``shaping: false``, HeRL's ``keep_context: true``) is the surrogate's: the term
    does not train it a second time."""
    term = TERMS.create({"name": "guided_shaping"})
    batch = guided_batch()
    batch.sample_weight = torch.ones(2)
    out = term(term_ctx(batch, torch.ones(2, 3))[0])
    assert out.loss is None and out.metrics["rows"] == 0.0


def test_the_guided_rows_importance_weights_per_origin_by_hand():
    """The policy term's per-origin metrics on a guided row: ρ = π_old/μ with π_old the current log-probs."""
    batch = guided_batch()
    term = PolicyTerm(LOSSES.create({"name": "ppo"}), OffPolicyConfig(correction="token_clip", clip=2.0))
    out = term(term_ctx(batch, torch.zeros(2, 3))[0])
    # row 1: ρ = exp(−0.25), exp(1.0); e > 2 is truncated
    assert float(out.metrics["origin/guided/iw_mean"]) == pytest.approx((math.exp(-0.25) + math.e) / 2)
    assert float(out.metrics["origin/guided/iw_max"]) == pytest.approx(math.e)
    assert float(out.metrics["origin/guided/iw_clipped_frac"]) == 0.5
    assert float(batch.sample_weight[1]) == 0.0


# --- teachers and options -------------------------------------------------------------------------------------------


def test_a_missing_teacher_checkpoint_is_one_line_naming_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(OutriderError, match=r"explore\.teachers\[1\]: no checkpoint directory .*nope") as e:
        Guidance(GuidanceConfig(teachers=["demonstrations", str(missing)]),
                 BuildContext(task=stepsum(), policy=Policy.tiny(hidden=32, layers=1, heads=2), where="explore"))
    assert "\n" not in str(e.value)


def test_a_teacher_with_another_tokenizer_is_one_line_naming_the_path(tmp_path):
    other = Policy.tiny(hidden=32, layers=1, heads=2)
    other.tokenizer.add_tokens(["<teacher-only>"])
    other.model.resize_token_embeddings(len(other.tokenizer))
    other.save(tmp_path / "other")
    with pytest.raises(OutriderError, match=r"explore\.teachers\[0\]: the model in .*other.* another tokenizer"):
        load_teacher(str(tmp_path / "other"), Policy.tiny(hidden=32, layers=1, heads=2), "explore.teachers[0]")


def test_shaping_needs_its_term_and_teachers_are_required():
    from outrider.recipe import Recipe

    recipe = Recipe.model_validate({**tiny_recipe(explore={"name": "ampo"}), "task": STEPSUM})
    with pytest.raises(OutriderError, match="guided_shaping"):
        Guidance(GuidanceConfig(), BuildContext(task=stepsum(), policy=None, recipe=recipe, where="explore"))
    with pytest.raises(OutriderError):
        EXPLORE.build({"name": "ampo", "teachers": []}, "explore")
    with pytest.raises(OutriderError):
        EXPLORE.build({"name": "ampo", "inject": "sometimes"}, "explore")


# --- kill -9 + --resume, two teachers ------------------------------------------------------------------------------

AMPO_OVERRIDES = dict(RESUME_OVERRIDES,
                      policy={"warm_start": {"steps": 20, "batch_size": 16, "lr": 5.0e-3}},
                      explore={"name": "ampo", "prompts_per_step": 2, "group_size": 4, "max_new_tokens": 24,
                               "replace": 2, "teacher_samples": 2},
                      update={"lr": 3.0e-3, "terms": [{"name": "guided_shaping"}]},
                      score=[{"name": "verifier", "weight": 1.0}])


@pytest.mark.slow  # three runs of small steps, ~1 min
def test_killed_ampo_run_resumes_to_identical_metrics(tmp_path):
    from outrider.recipe import load_recipe
    from outrider.trainer import Trainer

    teacher = tmp_path / "teacher"
    Policy.tiny(hidden=32, layers=1, heads=2).save(teacher)
    overrides = dict(AMPO_OVERRIDES, explore=dict(AMPO_OVERRIDES["explore"],
                                                  teachers=["demonstrations", str(teacher)]))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**tiny_recipe(**overrides), "task": STEPSUM}, sort_keys=False))
    Trainer(load_recipe(recipe), tmp_path / "A", quiet=True).run()
    rows = read_jsonl(tmp_path / "A" / "metrics.jsonl")
    assert sum(r.get("explore/guided_rows", 0) for r in rows) > 0 and "guided_shaping/loss" in rows[-1]
    assert rows[-1]["explore/injections_total"] == sum(r.get("explore/guided_rows", 0) for r in rows)
    killed_run_resumes_like(tmp_path / "A", recipe, tmp_path)
