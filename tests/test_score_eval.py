"""Reward components on hand-made episodes, `compose`, and unbiased pass@k."""

from __future__ import annotations

from itertools import combinations
import pytest
import torch

from outrider.data import Episode, Turn
from outrider.errors import OutriderError
from outrider.observe.evaluate import evaluate, pass_at_k
from outrider.observe.metrics import episode_metrics
from outrider.registry import Entry, Needs
from outrider.score import SCORE, Component, ComponentConfig, compose


def episode(response: str = "", answer: str | None = "", reference: str = "", n_tokens: int | None = None,
            rewards: tuple[float, ...] = (0.0,), group_id: int = 0) -> Episode:
    """A single- or multi-turn episode: one turn per entry of `rewards`, the last carries answer/reference."""
    ep = Episode(group_id=group_id, seed=0)
    n = len(response) if n_tokens is None else n_tokens
    for k, r in enumerate(rewards):
        last = k == len(rewards) - 1
        ep.turns.append(Turn(observation="q", observation_ids=[5], action=response if last else "",
                             action_ids=list(range(n)) if last else [7], reward=r,
                             info={"answer": answer, "reference": reference, "invalid": answer is None}
                             if last else {}))
    return ep


def score(name: str, episodes: list[Episode], **options) -> list[float]:
    entry, cfg = SCORE.build({"name": name, **options})
    return entry.fn(episodes, cfg)


def test_verifier_sums_the_env_reward_over_turns():
    eps = [episode(rewards=(1.0,)), episode(rewards=(0.0,)), episode(rewards=(0.5, 0.25, 1.0))]
    assert score("verifier", eps) == [1.0, 0.0, 1.75]


def test_exact_match():
    eps = [episode(answer="42", reference="42"), episode(answer=" 42 ", reference="42\n"),
           episode(answer="41", reference="42"), episode(answer=None, reference="42"),
           episode(answer="042", reference="42")]
    assert score("exact_match", eps) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_numeric_match():
    eps = [episode(answer="1,000", reference="1000"), episode(answer="3.0", reference="3"),
           episode(answer="2.5", reference="2.6"), episode(answer="abc", reference="3"),
           episode(answer=None, reference="3"), episode(answer="-7", reference=" -7 ")]
    assert score("numeric_match", eps) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    # the tolerance is an option
    near = [episode(answer="100.5", reference="100")]
    assert score("numeric_match", near) == [0.0]
    assert score("numeric_match", near, rel_tol=0.01) == [1.0]


def test_format_must_match_the_whole_response_across_lines():
    pattern = r"<think>.*</think><answer>.*</answer>"
    eps = [episode("<think>a\nb</think><answer>3</answer>"), episode("<think>a</think><answer>3</answer> extra"),
           episode("<answer>3</answer>"), episode("")]
    assert score("format", eps, pattern=pattern) == [1.0, 0.0, 0.0, 0.0]


def test_format_rejects_a_bad_regular_expression():
    with pytest.raises(OutriderError, match=r"score\.pattern.*not a valid regular expression"):
        SCORE.build({"name": "format", "pattern": "(unclosed"})


def test_length_penalty():
    eps = [episode(n_tokens=n) for n in (0, 3, 4, 10)]
    assert score("length", eps, target=4) == [0.0, 0.0, 0.0, -6.0]
    assert score("length", eps) == [0.0, -3.0, -4.0, -10.0]


def test_overlong_follows_dapo_at_the_boundaries():
    # L_max = 10, L_cache = 4: free up to 6 tokens, ramps to -1 at exactly 10, -1 beyond
    lengths = [0, 5, 6, 7, 8, 9, 10, 11, 50]
    expected = [0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0]
    got = score("overlong", [episode(n_tokens=n) for n in lengths], max_length=10, buffer=4)
    assert got == pytest.approx(expected, abs=1e-12)


def test_overlong_counts_action_tokens_of_every_turn():
    ep = episode(n_tokens=6, rewards=(0.0, 0.0, 0.0))  # 1 + 1 + 6 action tokens
    assert ep.num_action_tokens == 8
    assert score("overlong", [ep], max_length=10, buffer=4) == [pytest.approx(-0.5)]


def test_overlong_buffer_larger_than_budget_is_an_error():
    with pytest.raises(OutriderError, match=r"buffer.*must not exceed max_length"):
        SCORE.build({"name": "overlong", "max_length": 4, "buffer": 8}, "score[1]")


def test_compose_applies_weights_per_component():
    eps = [episode(answer="3", reference="3", rewards=(1.0,), n_tokens=12),
           episode(answer="4", reference="3", rewards=(0.0,), n_tokens=2)]
    comps = []
    for name, weight, opts in [("verifier", 2.0, {}), ("exact_match", 0.5, {}), ("length", 0.1, {"target": 2})]:
        entry, cfg = SCORE.build({"name": name, **opts})
        comps.append(Component(name, entry.create(cfg), weight))
    compose(eps, comps)
    assert eps[0].rewards["trajectory"] == pytest.approx({"verifier": 2.0, "exact_match": 0.5, "length": -1.0})
    assert eps[1].rewards["trajectory"] == pytest.approx({"verifier": 0.0, "exact_match": 0.0, "length": 0.0})
    assert eps[0].total_reward() == pytest.approx(1.5)
    metrics = episode_metrics(eps)
    assert metrics["reward/verifier"] == pytest.approx(1.0)
    assert metrics["reward/length"] == pytest.approx(-0.5)
    assert metrics["reward/total"] == pytest.approx(0.75)


def test_compose_places_step_and_token_levels():
    def per_turn(episodes, cfg):
        return [[float(k + 1) for k in range(len(e.turns))] for e in episodes]

    def per_token(episodes, cfg):
        return [[1.0] * e.num_action_tokens for e in episodes]

    eps = [episode(n_tokens=2, rewards=(0.0, 0.0))]
    progress = Entry("progress", per_turn, ComponentConfig, Needs(level="step")).create(ComponentConfig())
    shaping = Entry("shaping", per_token, ComponentConfig, Needs(level="token")).create(ComponentConfig())
    compose(eps, [Component("progress", progress, 3.0), Component("shaping", shaping, -0.5)])
    assert eps[0].rewards["step"] == {"progress": [3.0, 6.0]}
    assert eps[0].rewards["token"] == {"shaping": [-0.5, -0.5, -0.5]}
    assert eps[0].rewards["trajectory"] == {}
    assert eps[0].total_reward() == pytest.approx(9.0 - 1.5)


def test_invalid_answers_are_counted_in_metrics():
    eps = [episode(answer=None, group_id=0), episode(answer="3", group_id=0), episode(answer=None, group_id=1),
           episode(answer="1", group_id=1)]
    assert episode_metrics(eps)["episode/invalid_frac"] == pytest.approx(0.5)


def test_group_reward_std_is_the_mean_within_group_std():
    eps = [episode(group_id=0), episode(group_id=0), episode(group_id=1), episode(group_id=1)]
    for e, r in zip(eps, (0.0, 1.0, 0.5, 0.5)):
        e.rewards["trajectory"]["verifier"] = r
    metrics = episode_metrics(eps)
    assert metrics["episode/group_reward_std"] == pytest.approx((0.5 + 0.0) / 2)
    assert metrics["episode/zero_variance_group_frac"] == pytest.approx(0.5)


# ---------------------------------------------------------------- pass@k


@pytest.mark.parametrize("n,c,k,expected", [
    (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (4, 0, 2, 0.0),
    (4, 0, 1, 0.0),
    (4, 3, 2, 1.0),  # n - c = 1 < k: every pair holds a correct sample
    (4, 4, 4, 1.0),
    (4, 2, 1, 0.5),  # pass@1 is the accuracy
    (16, 4, 4, 1 - 495 / 1820),  # C(12,4) = 495, C(16,4) = 1820
    (5, 2, 5, 1.0),
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_the_mean_over_all_k_subsets():
    for n in range(1, 7):
        for c in range(n + 1):
            outcomes = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(combinations(outcomes, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_larger_than_n_is_an_error():
    with pytest.raises(ValueError, match=r"pass@5 needs at least 5 samples, got 4"):
        pass_at_k(4, 1, 5)


def test_evaluate_reports_pass_at_k_consistent_with_accuracy():
    from outrider.policy.model import Policy
    from outrider.policy.sampler import SamplingParams

    class Task:
        """Held-out problem p is solved when the response starts with an even character code (about half)."""

        max_turns, eval_size = 1, 3

        def make_env(self, split):
            assert split == "eval"
            return Env()

    class Env:
        def reset(self, seed):
            return f"{seed}:"

        def step(self, action):
            ok = bool(action) and ord(action[0]) % 2 == 0
            return "", float(ok), True, {"success": ok, "invalid": not action}

    torch.set_num_threads(1)
    policy = Policy.tiny(hidden=32, layers=1, heads=2)
    params = SamplingParams(temperature=1.0, max_new_tokens=3)
    a = evaluate(policy, Task(), prompts=10, samples=4, ks=[1, 2, 4], params=params, seed=0)
    b = evaluate(policy, Task(), prompts=10, samples=4, ks=[1, 2, 4], params=params, seed=0)
    assert a == b  # same seed, same draws
    assert set(a) == {"pass@1", "pass@2", "pass@4", "accuracy", "invalid_rate", "response_length"}
    assert a["pass@1"] == pytest.approx(a["accuracy"])
    assert 0 < a["accuracy"] < 1
    assert a["pass@1"] <= a["pass@2"] <= a["pass@4"] <= 1
    assert 0 < a["response_length"] <= 3
    # pass@k is a mean over the 3 held-out problems (prompts is capped at eval_size): multiples of 1/3 for k = n
    assert a["pass@4"] * 3 == pytest.approx(round(a["pass@4"] * 3))
