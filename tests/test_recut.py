"""ReCUT [108] (loops/recut.py) and its stepwise task (envs/stepsum.py): the trial reward, switched stepwise trials
against a scripted policy (pools and chosen steps by hand), accuracy and brevity pairs, the validation choice of
the merge weight, the task's traces and disjoint splits, and a killed run resuming on the same pairs."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import yaml

from conftest import read_jsonl, tiny_recipe
from outrider.envs.stepsum import StepSumConfig, StepSumTask, _bucket, split_steps, trace
from outrider.errors import OutriderError
from outrider.loops import recut
from outrider.loops.offline import Pair
from outrider.loops.recut import ReCUTConfig, choose_weight, first_step, recut_pairs, stepwise_trials, trial_reward
from outrider.policy.sampler import Sample, SamplingParams
from outrider.recipe import load_recipe
from outrider.trainer import Trainer
from test_resume import RESUME_OVERRIDES, killed_run_resumes_like


def test_trial_reward_by_hand():
    assert trial_reward(True, 4, 1.0, 1.0) == 0.25
    assert trial_reward(False, 2, 1.0, 1.0) == -0.5
    assert trial_reward(False, 2, 1.0, 0.0) == 0.0
    assert trial_reward(True, 0, 2.0, 1.0) == 2.0  # an empty continuation counts as one token
    # a short correct continuation beats a long correct one, a long wrong one is penalised least
    assert trial_reward(True, 5, 1, 1) > trial_reward(True, 14, 1, 1) > trial_reward(False, 14, 1, 1) > \
        trial_reward(False, 5, 1, 1)


def test_first_step_and_traces():
    assert first_step("2+3=5,5+4=9,#9", ",") == "2+3=5,"
    assert first_step("#9", ",") == "#9"
    assert trace([2, 3, 4], "long") == "2+3=5,5+4=9,#9"
    assert trace([2, 3, 4], "short") == "5,9,#9"
    assert split_steps("5,9,#9") == ["5,", "9,", "#9"] and "".join(split_steps("2+3=5,#5")) == "2+3=5,#5"


def test_stepsum_task_parses_verifies_and_keeps_splits_disjoint():
    task = StepSumTask(StepSumConfig(max_digit=4, min_terms=2, max_terms=4))
    p = task.problem("eval", 0)
    assert task.prompt(p) == p["question"] + "="
    assert task.verify(p, task.parse(trace(p["metadata"]["terms"], "short"))) == 1.0
    assert task.parse("5,9") is None and task.verify(p, task.parse("1,#0")) == 0.0
    train = {tuple(task.problem("train", i)["metadata"]["terms"]) for i in range(400)}
    test = {tuple(task.problem("eval", i)["metadata"]["terms"]) for i in range(100)}
    val_task = StepSumTask(StepSumConfig(max_digit=4, min_terms=2, max_terms=4, holdout="validation"))
    val = {tuple(val_task.problem("eval", i)["metadata"]["terms"]) for i in range(100)}
    assert not (train & test) and not (train & val) and not (test & val)
    assert all(_bucket(t, 0, 0.2) == "test" for t in test)
    demos = task.demonstrations(list(range(200)))
    tagged = [d.turns[0] for d in demos if d.turns[0][0].endswith((" L", " S"))]
    assert 60 < len(tagged) < 140  # instruction_fraction 0.5
    assert all((o.endswith(" S")) == ("+" not in a) for o, a in tagged)  # the instruction picks the style
    with pytest.raises(ValueError, match="instructions must have exactly the keys long and short"):
        StepSumConfig(instructions={"long": " L"})


def test_stratified_heldout_splits_share_their_term_count_mix_and_stay_disjoint():
    """With stratify_terms the held-out problems draw the count first: test and validation hold each count about
    equally often (without it, 2-term chains are 0.40 of test and 0.22 of validation here); train is unchanged."""
    base = dict(max_digit=4, min_terms=2, max_terms=4)
    n_of = lambda task, split, k: [len(task.problem(split, i)["metadata"]["terms"]) for i in range(k)]  # noqa: E731
    plain_test, plain_val = StepSumTask(StepSumConfig(**base)), StepSumTask(StepSumConfig(**base, holdout="validation"))
    assert n_of(plain_test, "eval", 300).count(2) / 300 > 0.3 > n_of(plain_val, "eval", 300).count(2) / 300
    test = StepSumTask(StepSumConfig(**base, stratify_terms=True))
    val = StepSumTask(StepSumConfig(**base, stratify_terms=True, holdout="validation"))
    for task in (test, val):
        counts = n_of(task, "eval", 600)
        assert all(abs(counts.count(n) / 600 - 1 / 3) < 0.06 for n in (2, 3, 4))
    tuples = {name: {tuple(t.problem("eval", i)["metadata"]["terms"]) for i in range(300)}
              for name, t in (("test", test), ("validation", val))}
    train = {tuple(test.problem("train", i)["metadata"]["terms"]) for i in range(600)}
    assert not (tuples["test"] & tuples["validation"]) and not (train & (tuples["test"] | tuples["validation"]))
    assert all(_bucket(t, 0, 0.2) == name for name, ts in tuples.items() for t in ts)
    assert [test.problem("train", i) for i in range(50)] == [plain_test.problem("train", i) for i in range(50)]
    with pytest.raises(OutriderError, match="task.stratify_terms: no 2-term tuple falls in the"):
        StepSumTask(StepSumConfig(max_digit=1, min_terms=2, max_terms=3, stratify_terms=True))


class ScriptedPolicy:
    """Characters as token ids; `script` gives a continuation from the decoded prompt."""

    def encode_observation(self, text, first):
        return [ord(c) for c in text]

    def encode(self, text):
        return [ord(c) for c in text]


def scripted_sample(short_right: bool):
    def fake(policy, prompts, params, generator):
        out = []
        for ids in prompts:
            text = "".join(map(chr, ids))
            question, rest = text.split("=", 1)
            mode, prefix = ("long", rest[2:]) if rest.startswith(" L") else ("short", rest[2:])
            terms = [int(t) for t in question.split("+")]
            done = prefix.count(",")
            steps = split_steps(trace(terms, mode))[done:]
            cont = "".join(steps)
            if mode == "short" and not short_right:
                cont = cont[: cont.index("#") + 1] + str(sum(terms) - 1)
            out.append(Sample(ids=[0] * len(cont), logprobs=[0.0] * len(cont), text=cont, entropies=[],
                              finish_reason="stop"))
        return out
    return fake


def run_trials(monkeypatch, short_right: bool):
    monkeypatch.setattr(recut, "sample", scripted_sample(short_right))
    task = StepSumTask(StepSumConfig())
    problem = {"question": "2+3+4", "answer": "9", "metadata": {"terms": [2, 3, 4]}}
    cfg = ReCUTConfig(objective="accuracy", step_separator=",")
    return stepwise_trials(ScriptedPolicy(), task, [problem], task.instructions, cfg, SamplingParams(),
                           torch.Generator())


def test_trials_follow_the_better_mode_and_fill_the_pools(monkeypatch):
    # short continuations are wrong: R(long) = 1/14 > R(short) = -1/6, so each step follows the long trace
    pools, metrics = run_trials(monkeypatch, short_right=False)
    assert pools[0]["correct"] == [("2+3=5,5+4=9,#9", 14)] * 3
    assert pools[0]["incorrect"] == [("5,9,#8", 6), ("2+3=5,9,#8", 10), ("2+3=5,5+4=9,#8", 14)]
    assert metrics == {"recut/trial_samples": 6.0, "recut/trial_tokens": 14 + 6 + 8 + 4 + 2 + 2,
                       "recut/trial_accuracy": 0.5}
    # short continuations are right: the first step is "5,", then long "5+4=9,#9" vs short "9,#9"
    pools, metrics = run_trials(monkeypatch, short_right=True)
    assert pools[0]["correct"] == [("2+3=5,5+4=9,#9", 14), ("5,9,#9", 6), ("5,5+4=9,#9", 10), ("5,9,#9", 6),
                                   ("5,9,#9", 6), ("5,9,#9", 6)]
    assert pools[0]["incorrect"] == [] and metrics["recut/trial_samples"] == 6


def test_accuracy_and_brevity_pairs():
    pools = [{"correct": [("ab,#1", 5), ("a,#1", 4), ("abcd,#1", 7)], "incorrect": [("x,#2", 4)]},
             {"correct": [("a,#1", 4)], "incorrect": []},           # no incorrect, one correct length: no pair
             {"correct": [], "incorrect": [("x,#2", 4)]}]           # nothing correct: no pair
    rng = np.random.default_rng(0)
    assert recut_pairs(["p", "q", "r"], pools, "accuracy", rng) == [Pair("p", "a,#1", "x,#2")]
    assert recut_pairs(["p", "q", "r"], pools, "brevity", rng) == [Pair("p", "a,#1", "abcd,#1")]


def test_choose_weight_on_validation():
    results = {0.0: {"accuracy": 0.80, "length": 20.0}, 0.5: {"accuracy": 0.79, "length": 12.0},
               1.0: {"accuracy": 0.60, "length": 8.0}}
    assert choose_weight(results, tolerance=0.02) == 0.5
    assert choose_weight(results, tolerance=0.0) == 0.0
    assert choose_weight(results, tolerance=0.5) == 1.0
    with pytest.raises(OutriderError, match="no merged models"):
        choose_weight({}, 0.0)


STEPSUM = {"name": "stepsum", "max_digit": 2, "min_terms": 2, "max_terms": 2, "eval_size": 16}
RECUT_OVERRIDES = dict(
    RESUME_OVERRIDES,
    explore={"name": "group", "max_new_tokens": 12},
    loop={"name": "recut", "objective": "accuracy", "trial_prompts": 24, "max_steps": 3, "step_separator": ",",
          "pairs_per_step": 4},
    score=[{"name": "verifier", "weight": 1.0}],
    update={"loss": "none", "terms": [{"name": "dpo", "beta": 0.5}], "lr": 3.0e-3},
)


def recut_recipe(directory, **overrides):
    """The tiny recipe on the stepsum task (its task section replaced, not merged) with the recut loop."""
    rec = tiny_recipe(**dict(RECUT_OVERRIDES, **overrides))
    rec["task"] = dict(STEPSUM)
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(rec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("recut")
    run = root / "A"
    Trainer(load_recipe(recut_recipe(root)), run, quiet=True).run()
    return run


def test_recut_run_makes_pairs_once_and_trains(reference):
    rows = read_jsonl(reference / "metrics.jsonl")[1:]
    assert rows[0]["recut/pairs"] > 0 and rows[0]["recut/trial_samples"] > 0
    assert all("recut/pairs" not in r for r in rows[1:])
    assert all(r["dpo/pairs"] > 0 for r in rows)


@pytest.mark.slow  # two real processes
def test_killed_recut_run_resumes_identically(reference, tmp_path):
    killed_run_resumes_like(reference, recut_recipe(tmp_path), tmp_path)


def test_recut_needs_terms_and_instructions(tmp_path):
    recipe = recut_recipe(tmp_path, update={"loss": "none"})
    with pytest.raises(OutriderError, match="loop recut: update.terms is empty"):
        Trainer(load_recipe(recipe), tmp_path / "run", quiet=True)
    step = recut.ReCUTStep(ReCUTConfig(objective="brevity"))
    with pytest.raises(OutriderError, match="long_instruction: the task has no 'long' instruction"):
        step.instructions(object())
