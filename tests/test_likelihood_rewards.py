"""Likelihood rewards (log-p of a reference [46], RLPR [67], SAR [78]), the shared teacher-forced scoring pass, RLPR's
std filter and the sortlist task, against hand-computed numbers on a stub policy whose next-token probabilities are set
by hand (they depend on the previous token only)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from outrider.data import Episode, GroupIds, Turn, group_reward_std
from outrider.envs.base import ENVS
from outrider.errors import OutriderError
from outrider.explore import EXPLORE, ExploreContext
from outrider.explore.std_filter import ema
from outrider.policy.continuation import continuation_logprobs
from outrider.policy.model import Scores
from outrider.registry import BuildContext
from outrider.score import SCORE
from outrider.score.likelihood import aggregate, debiased, sar_reward, split_reasoning

VOCAB = ["<pad>", "<bos>", "<eos>", "a", "b", "#", "q"]
ID = {t: i for i, t in enumerate(VOCAB)}


class StubPolicy:
    """Next-token probabilities P[prev][next] set by hand: uniform over the 7 tokens except the rows below."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self):
        p = torch.full((7, 7), 1 / 7)
        p[ID["#"]] = torch.tensor([0, 0, 0.1, 0.5, 0.4, 0, 0])  # after '#': a 0.5, b 0.4, eos 0.1
        p[ID["a"]] = torch.tensor([0, 0, 0.2, 0.2, 0.6, 0, 0])  # after 'a': b 0.6, a 0.2, eos 0.2
        p[ID["b"]] = torch.tensor([0, 0, 0.8, 0.1, 0.1, 0, 0])  # after 'b': eos 0.8
        p[ID["q"]] = torch.tensor([0, 0, 0, 0.25, 0.25, 0.5, 0])  # after 'q': '#' 0.5
        self.table = p.log()
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        return [ID[c] for c in text]

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Scores:
        self.calls += 1
        lp = self.table[input_ids[:, :-1], input_ids[:, 1:]]
        return Scores(logprobs=torch.cat([torch.zeros_like(lp[:, :1]), lp], 1))


def episode(response: str, reference: str = "ab", group: int = 0, prompt: str = "q") -> Episode:
    e = Episode(group_id=group, seed=0)
    e.turns.append(Turn(prompt, [ID[c] for c in prompt], response, [ID[c] for c in response] + [ID["<eos>"]],
                        info={"reference": reference}))
    return e


def build(name: str, policy=None, **options):
    entry, cfg = SCORE.build({"name": name, **options}, "score[1]")
    return entry.create(cfg, BuildContext(policy=policy or StubPolicy(), where="score[1]"))


def test_aggregate_variants_by_hand():
    lps = [math.log(0.5), math.log(0.25)]
    assert aggregate(lps, "p") == pytest.approx(0.125)
    assert aggregate(lps, "mean_p") == pytest.approx(0.375)
    assert aggregate(lps, "log_p") == pytest.approx(math.log(0.125))
    assert aggregate(lps, "mean_log_p") == pytest.approx(math.log(0.125) / 2)
    one = [math.log(0.8)]  # a reference of one token: every probability variant is that token's probability
    assert aggregate(one, "p") == aggregate(one, "mean_p") == pytest.approx(0.8)
    assert aggregate([], "p") == 1.0 and aggregate([], "mean_p") == aggregate([], "log_p") == 0.0
    with pytest.raises(OutriderError, match="variant"):
        aggregate(lps, "max_p")


def test_debiasing_clips_probabilities_only():
    assert debiased(0.7, 0.2, "mean_p") == pytest.approx(0.5)
    assert debiased(0.2, 0.7, "p") == 0.0  # RLPR clips r − r_noCoT to [0, 1]
    assert debiased(-1.0, -3.0, "log_p") == pytest.approx(2.0) and debiased(-3.0, -1.0, "log_p") == -2.0


def test_sar_by_hand():
    # ppl(a|q) = exp(−log 0.5) = 2, ppl(a) = exp(−log 0.25) = 4: (4 − 2) / 4 = 0.5
    assert sar_reward([math.log(0.5)] * 2, [math.log(0.25)] * 2) == pytest.approx(0.5)
    # the query makes the answer less likely: (2 − 8) / 2 = −3, clipped to −1
    assert sar_reward([math.log(0.125)], [math.log(0.5)]) == -1.0
    assert sar_reward([], []) == 0.0


def test_split_reasoning():
    assert split_reasoning("ab#ab", "#") == "ab" and split_reasoning("a#b#c", "#") == "a#b"
    assert split_reasoning("ab", "#") == "ab" and split_reasoning("ab#ab", "") == ""


def test_continuation_logprobs_reads_the_target_tokens_only():
    stub = StubPolicy()
    q, h, a, b, eos = (ID[c] for c in ("q", "#", "a", "b", "<eos>"))
    out = continuation_logprobs(stub, [([1, q, h], [a, b, eos]), ([1, q], [h]), ([1], [])])
    assert out[0] == pytest.approx([math.log(0.5), math.log(0.6), math.log(0.8)])
    assert out[1] == pytest.approx([math.log(0.5)]) and out[2] == []
    assert stub.calls == 1  # one forward for the three pairs
    assert len(continuation_logprobs(stub, [([1], [a])] * 5, chunk=2)) == 5 and stub.calls == 4
    with pytest.raises(OutriderError, match="context"):
        continuation_logprobs(stub, [([], [a])])


def test_likelihood_scores_the_reference_after_the_reasoning():
    # prompt "q", responses "a#b" (reasoning "a"), "#ba" (empty reasoning); reference "ab" + EOS
    eps = [episode("a#b"), episode("#ba")]
    # after "q a #": a|# 0.5, b|a 0.6, eos|b 0.8; the stub's next token depends on the previous one only
    p = 0.5 * 0.6 * 0.8
    assert build("likelihood", variant="p")(eps) == pytest.approx([p, p])
    assert build("likelihood", variant="mean_p")(eps) == pytest.approx([(0.5 + 0.6 + 0.8) / 3] * 2)
    assert build("likelihood", variant="log_p")(eps) == pytest.approx([math.log(p)] * 2)
    assert build("likelihood", variant="mean_log_p", end_token=False)(eps) == pytest.approx([math.log(0.3) / 2] * 2)
    # empty reasoning scores exactly what the no-CoT pass scores: RLPR's debiased reward is 0
    piece = build("likelihood", variant="mean_p", debias=True)
    assert piece([episode("#ba")]) == [0.0]
    assert piece.step_metrics()["likelihood/no_cot"] == pytest.approx((0.5 + 0.6 + 0.8) / 3)


def test_likelihood_reasoning_changes_the_score_and_a_one_token_reference():
    # a response without '#' is all reasoning: the context ends "... b #"; a one-token reference "b" without EOS
    piece = build("likelihood", variant="p", end_token=False)
    assert piece([episode("ab", reference="b"), episode("#", reference="b")]) == pytest.approx([0.4, 0.4])
    # with no answer mark the reference follows the prompt itself: b|q = 0.25
    assert build("likelihood", variant="p", end_token=False, answer_mark="")([episode("a", "b")]) == \
        pytest.approx([0.25])
    metrics = piece.step_metrics()
    assert metrics["likelihood/tokens"] == 2.0 and metrics["time/score/likelihood_s"] >= 0.0
    with pytest.raises(OutriderError, match="reference"):
        piece([Episode(group_id=0, seed=0, turns=[Turn("q", [ID["q"]], "a", [ID["a"]])])])


def test_sar_component_by_hand():
    # response "b" + EOS: given q: b|q 0.25, eos|b 0.8; alone (after BOS, uniform): b 1/7, eos|b 0.8
    ppl_q = math.exp(-(math.log(0.25) + math.log(0.8)) / 2)
    ppl_a = math.exp(-(math.log(1 / 7) + math.log(0.8)) / 2)
    piece = build("sar")
    assert piece([episode("b")]) == pytest.approx([(ppl_a - ppl_q) / ppl_a])
    assert piece.step_metrics()["sar/tokens"] == 4.0


class FakeContext:
    """An ExploreContext whose groups' rewards are set by hand (one per episode, as its verifier reward)."""

    def __init__(self, rewards: list[list[float]]):
        self.rewards, self.groups = rewards, GroupIds()

    def context(self) -> ExploreContext:
        def rollout(starts):
            out = []
            for s in starts:
                e = Episode(group_id=s.group_id, seed=s.seed)
                e.rewards["trajectory"]["verifier"] = self.rewards[s.seed].pop(0)
                out.append(e)
            return out

        seeds = iter(range(100))
        return ExploreContext(rollout=rollout, score=lambda eps: None, next_seeds=lambda n: [next(seeds) for _ in
                                                                                           range(n)],
                              groups=self.groups, rng=np.random.default_rng(0))


def test_std_filter_drops_flat_groups_and_follows_an_ema():
    assert group_reward_std([Episode(0, 0)]) == 0.0
    assert ema(0.0, [0.5, 0.1], 0.9) == pytest.approx(0.03) and ema(0.2, [], 0.9) == 0.2
    entry, cfg = EXPLORE.build({"name": "std_filter", "prompts_per_step": 3, "group_size": 2, "momentum": 0.5,
                                "initial_threshold": 0.1}, "explore")
    piece = entry.create(cfg, BuildContext(where="explore"))
    # group stds: 0.5, 0 (flat), 0.05
    episodes, metrics = piece(FakeContext([[0.0, 1.0], [0.3, 0.3], [0.4, 0.5]]).context())
    assert [e.seed for e in episodes] == [0, 0]  # only the first group's std reaches β = 0.1
    assert metrics["explore/groups_kept"] == 1.0 and metrics["explore/std_threshold"] == 0.1
    assert piece.threshold == pytest.approx(0.5 * 0.1 + 0.5 * (0.5 + 0.0 + 0.05) / 3)
    # no group passes: the step keeps them all
    episodes, _ = piece(FakeContext([[0.2, 0.2], [0.0, 0.0], [0.1, 0.1]]).context())
    assert len(episodes) == 6
    state = piece.state_dict()
    fresh = entry.create(cfg, BuildContext(where="explore"))
    fresh.load_state_dict(state)
    assert fresh.threshold == piece.threshold and fresh.steps == 2


def test_sortlist_splits_are_disjoint_and_answers_sorted():
    entry, cfg = ENVS.build({"name": "sortlist", "min_len": 2, "max_len": 3, "alphabet": "abcd"}, "task")
    task = entry.fn(cfg)
    train = {task.problem("train", i)["question"] for i in range(300)}
    test = {task.problem("eval", i)["question"] for i in range(100)}
    assert train and test and not train & test
    p = task.problem("eval", 0)
    assert p["answer"] == "".join(sorted(p["question"])) and 2 <= len(p["answer"]) <= 3
    assert task.demonstration_text(p) == f"{p['answer']}#{p['answer']}"
    env = task.make_env("eval")
    env.reset(0)
    _, r, done, info = env.step(f"zz#{p['answer']}")
    assert r == 1.0 and done and info["reference"] == p["answer"]
    assert env.step(p["answer"])[1] == 0.0  # no '#': no answer
    entry, cfg = ENVS.build({"name": "sortlist", "reasoning": "none", "alphabet": "ba"}, "task")
    plain = entry.fn(cfg)
    q = plain.problem("eval", 1)
    assert q["answer"] == "".join(sorted(q["question"], reverse=True))  # the alphabet's order, not ASCII
    assert plain.verify(q, plain.parse(plain.demonstration_text(q))) == 1.0
    with pytest.raises(OutriderError, match="min_len"):
        ENVS.build({"name": "sortlist", "min_len": 5, "max_len": 3}, "task")


@pytest.mark.slow  # two runs of a few tiny steps and a killed one
def test_killed_rlpr_run_resumes_to_identical_metrics(tmp_path):
    import yaml
    from conftest import tiny_recipe
    from outrider.recipe import load_recipe
    from outrider.trainer import Trainer
    from test_resume import RESUME_OVERRIDES, killed_run_resumes_like

    spec = tiny_recipe(**dict(RESUME_OVERRIDES, explore={"name": "std_filter", "prompts_per_step": 4, "group_size": 2,
                                                         "momentum": 0.5, "max_new_tokens": 8},
                              score=[{"name": "verifier", "weight": 0.0},
                                     {"name": "likelihood", "weight": 1.0, "variant": "mean_p", "debias": True}]))
    spec["task"] = {"name": "sortlist", "min_len": 2, "max_len": 3, "alphabet": "abcd", "eval_size": 8}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(spec, sort_keys=False))
    Trainer(load_recipe(recipe), tmp_path / "A", quiet=True).run()
    killed_run_resumes_like(tmp_path / "A", recipe, tmp_path)
