"""MultiSol ("emit k digits summing to S"): exact verifier, uniform solver, splits, canonical answers, recipe."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from pathlib import Path

import pytest

from outrider.envs import ENVS
from outrider.envs.multisol import check_answer, count_solutions, sample_solution
from outrider.errors import OutriderError
from outrider.recipe import load_recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "grpo_multisol.yaml"


def make_task(**section):
    entry, cfg = ENVS.build({"name": "multisol", **section}, "task")
    return entry.fn(cfg)


@pytest.fixture(scope="module")
def task():
    return make_task()


def step(task, split, seed, action):
    env = task.make_env(split)
    env.reset(seed)
    return env.step(action)


# ---------------------------------------------------------------- verifier


@pytest.mark.parametrize("answer, reward", [
    ("3905", 1.0), ("0098", 1.0), ("9440", 1.0),  # right: leading zeros and any order allowed
    ("3906", 0.0), ("0000", 0.0),  # wrong sum
    ("395", 0.0), ("39050", 0.0), ("98", 0.0),  # wrong length (the last two even sum to 17)
    ("39a5", 0.0), ("3 95", 0.0), ("-395", 0.0), ("+395", 0.0), ("3.95", 0.0),  # not digits only
    ("\u0663\u0669\u0660\u0665", 0.0),  # Arabic-Indic 3905: str.isdigit() is true, but not ASCII digits
    ("", 0.0),
])
def test_verifier_on_hand_made_answers(answer, reward):
    assert check_answer(4, 17, answer) == reward


def test_env_scores_answers_and_never_raises(task):
    problem = task.problem("eval", 0)
    k, total = problem["metadata"]["k"], problem["metadata"]["sum"]
    good = sample_solution(k, total, random.Random(1))
    obs, reward, done, info = step(task, "eval", 0, f" {good}\n")  # surrounding whitespace is stripped
    assert (obs, reward, done, info["success"], info["invalid"]) == ("", 1.0, True, True, False)
    for bad in ("", "\n", "x" * 40, "9" * k, good[:-1], good + "0", "<answer>" + good + "</answer>"):
        _, reward, done, info = step(task, "eval", 0, bad)
        assert (reward, done, info["success"]) == (0.0, True, False)


def test_count_solutions_matches_brute_force():
    for k in range(1, 5):
        counts = Counter(sum(t) for t in itertools.product(range(10), repeat=k))
        assert all(count_solutions(k, s) == counts.get(s, 0) for s in range(-2, 9 * k + 3))


# ---------------------------------------------------------------- solver


def test_solver_answers_verify_and_are_diverse():
    for k, total in [(3, 5), (4, 17), (5, 30), (3, 22)]:
        answers = [sample_solution(k, total, random.Random(seed)) for seed in range(300)]
        assert all(check_answer(k, total, a) == 1.0 for a in answers)
        assert len(set(answers)) >= min(count_solutions(k, total) * 0.9, 150)


def test_solver_is_uniform_over_valid_answers():
    # 21 answers for (3, 5); 4200 draws put ~200 on each: a non-uniform sampler (e.g. greedy digits) fails this
    rng = random.Random(0)
    counts = Counter(sample_solution(3, 5, rng) for _ in range(4200))
    assert len(counts) == count_solutions(3, 5) == 21
    assert 130 < min(counts.values()) and max(counts.values()) < 270


def test_solver_is_deterministic_given_the_seed():
    assert [sample_solution(5, 23, random.Random(s)) for s in range(50)] == \
        [sample_solution(5, 23, random.Random(s)) for s in range(50)]
    with pytest.raises(ValueError):
        sample_solution(3, 28, random.Random(0))


def test_demonstrations_verify_and_cover_many_answers(task):
    demos = task.demonstrations(list(range(10**8, 10**8 + 400)))
    by_prompt: dict[str, set[str]] = {}
    for seed, demo in zip(range(10**8, 10**8 + 400), demos):
        (obs, action), = demo.turns
        assert obs == task.prompt(task.problem("train", seed))
        assert step(task, "train", seed, action)[1] == 1.0
        by_prompt.setdefault(obs, set()).add(action)
    assert len(by_prompt) == len(task.train_pairs)  # consecutive seeds sweep every train pair
    assert sum(len(v) for v in by_prompt.values()) > 0.9 * 400  # and rarely repeat an answer


# ---------------------------------------------------------------- problems and splits


def test_problems_are_deterministic_by_seed(task):
    other = make_task()
    for split in ("train", "eval"):
        assert [task.problem(split, i) for i in range(30)] == [other.problem(split, i) for i in range(30)]
    reseeded = make_task(seed=3)
    assert reseeded.eval_pairs != task.eval_pairs
    assert [reseeded.problem("train", i)["answer"] for i in range(30)] != \
        [task.problem("train", i)["answer"] for i in range(30)]


def test_train_and_eval_prompts_are_disjoint(task):
    train = {task.problem("train", i)["question"] for i in range(3 * len(task.train_pairs))}
    held = {task.problem("eval", i)["question"] for i in range(task.eval_size)}
    assert not train & held
    assert len(held) == task.eval_size == len(task.eval_pairs)  # eval_size is capped at the held-out pairs
    # every allowed pair is in exactly one split, and each split spans every digit count
    pairs = task.train_pairs + task.eval_pairs
    assert len(set(pairs)) == len(pairs)
    assert all(count_solutions(k, s) >= task.cfg.min_solutions for k, s in pairs)
    assert {k for k, _ in task.train_pairs} == {k for k, _ in task.eval_pairs} == {3, 4, 5}
    assert 0.2 < len(task.eval_pairs) / len(pairs) < 0.4


def test_eval_size_below_the_held_out_pairs_is_kept():
    assert make_task(eval_size=4).eval_size == 4


def test_prompt_and_template(task):
    problem = task.problem("eval", 0)
    assert task.make_env("eval").reset(0) == f"{problem['metadata']['k']}:{problem['metadata']['sum']} ->"
    custom = make_task(template="{metadata[k]} digits, sum {metadata[sum]}:")
    assert custom.make_env("eval").reset(0) == \
        f"{problem['metadata']['k']} digits, sum {problem['metadata']['sum']}:"


def test_bad_options_are_user_errors():
    with pytest.raises(OutriderError, match="min_digits"):
        make_task(min_digits=5, max_digits=3)
    with pytest.raises(OutriderError, match="split of multisol is empty"):
        make_task(min_digits=1, max_digits=1, min_solutions=1, eval_fraction=0.01)
    with pytest.raises(OutriderError, match="unknown option"):
        make_task(digits=4)


# ---------------------------------------------------------------- canonical answers


def test_info_canonical_is_the_digit_string(task):
    _, _, _, info = step(task, "eval", 0, " 0123 \n")
    assert info["canonical"] == "0123"
    tagged = make_task(answer_format="tagged")
    _, reward, _, info = step(tagged, "eval", 0, "no tag here")
    assert (reward, info["invalid"], info["canonical"]) == (0.0, True, None)
    problem = tagged.problem("eval", 0)
    _, reward, _, info = step(tagged, "eval", 0, f"<answer>{problem['answer']}</answer>")
    assert (reward, info["canonical"]) == (1.0, problem["answer"])


def test_canonical_default_for_other_tasks(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"{i}+1", "answer": str(i + 1)}) for i in range(40)))
    entry, cfg = ENVS.build({"name": "jsonl", "path": str(path), "eval_fraction": 0.5}, "task")
    jsonl = entry.fn(cfg)
    _, reward, _, info = step(jsonl, "eval", 0, f"  {jsonl.problem('eval', 0)['answer']} ")
    assert (reward, info["canonical"]) == (1.0, jsonl.problem("eval", 0)["answer"])


# ---------------------------------------------------------------- recipe


def test_recipe_loads():
    recipe = load_recipe(RECIPE)
    assert recipe.task["name"] == "multisol"
    assert recipe.observe.pass_at == [1, 4, 16, 64] and recipe.observe.eval_samples == 64
    assert recipe.train.threads == 1
    entry, cfg = ENVS.build(recipe.task, "task")
    assert entry.fn(cfg).eval_size >= 20  # enough held-out prompts for a usable pass@k
