"""Tasks: reasoning-gym generators and user JSONL files (splits, determinism, verification, input errors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from outrider.envs import ENVS
from outrider.envs.jsonl_task import _held_out
from outrider.envs.reasoning_gym_task import canonical_number
from outrider.errors import OutriderError

CHAIN_SUM_1_DIGIT = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}  # only ~200 problems


def make_task(**section):
    entry, cfg = ENVS.build(section, "task")
    return entry.fn(cfg)


def chain_sum(**options):
    return make_task(name="reasoning_gym", dataset="chain_sum", config=CHAIN_SUM_1_DIGIT, eval_size=16, **options)


@pytest.fixture(scope="module")
def rg_task():
    return chain_sum()


# ---------------------------------------------------------------- reasoning_gym


def test_train_and_eval_problems_are_disjoint(rg_task):
    eval_questions = {rg_task.problem("eval", i)["question"] for i in range(16)}
    train_questions = [rg_task.problem("train", i)["question"] for i in range(2000)]
    assert not eval_questions & set(train_questions)
    # the check has teeth: the raw generator does repeat held-out problems among the first 2000 train indices
    raw = [rg_task._train[i]["question"] for i in range(2000)]
    assert sum(q in eval_questions for q in raw) > 10
    # and the train split is still varied after skipping
    assert len(set(train_questions)) > 100


def test_problems_are_deterministic_by_seed(rg_task):
    other = chain_sum()
    for split in ("train", "eval"):
        assert [rg_task.problem(split, i) for i in range(20)] == [other.problem(split, i) for i in range(20)]
    reseeded = chain_sum(seed=5)
    assert [reseeded.problem("train", i)["question"] for i in range(20)] != \
        [rg_task.problem("train", i)["question"] for i in range(20)]


def test_template_fills_metadata(rg_task):
    task = chain_sum(template="Q: {metadata[expression]} =")
    problem = task.problem("eval", 3)
    assert task.make_env("eval").reset(3) == f"Q: {problem['metadata']['expression']} ="


def test_verifier_rewards_the_reference_answer_only(rg_task):
    for split in ("train", "eval"):
        for seed in range(5):
            problem = rg_task.problem(split, seed)
            env = rg_task.make_env(split)
            env.reset(seed)
            obs, reward, done, info = env.step(problem["answer"])
            assert (reward, done, info["success"], info["invalid"]) == (1.0, True, True, False)
            assert info["reference"] == problem["answer"]
            env.reset(seed)
            _, reward, done, info = env.step(str(int(problem["answer"]) + 1))
            assert (reward, done, info["success"]) == (0.0, True, False)


@pytest.mark.parametrize("spelling, number", [("7", "7"), ("+07", "7"), ("7.0", "7"), ("7.50", "7.5"), ("-0", "0"),
                                              ("0.00", "0"), ("1,000", "1000"), ("1E+1", "10"), ("-12", "-12"),
                                              ("abc", "abc"), ("NaN", "NaN"), ("", "")])
def test_canonical_number_writes_each_decimal_one_way(spelling, number):
    assert canonical_number(spelling) == number


def test_canonical_answer_is_stripped_or_numeric_and_equal_canonicals_score_equally():
    strip, numeric = chain_sum(), chain_sum(canonical="number")
    problem = numeric.problem("eval", 0)
    reference = problem["answer"]
    spellings = [reference, f" {reference} ", f"{reference}.0", f"{int(reference):+03d}"]
    infos = {}
    for task in (strip, numeric):
        env = task.make_env("eval")
        infos[task.cfg.canonical] = []
        for text in spellings:
            env.reset(0)
            _, reward, _, info = env.step(text)
            assert reward == 1.0  # every spelling is right for reasoning-gym's decimal scorer
            infos[task.cfg.canonical].append(info["canonical"])
    assert infos["strip"] == [reference, reference, f"{reference}.0", f"{int(reference):+03d}"]
    assert infos["number"] == [reference] * 4  # one answer, counted once by the bonuses and diversity metrics
    env = numeric.make_env("eval")
    env.reset(0)
    assert env.step("no idea")[3]["canonical"] == "no idea"
    with pytest.raises(OutriderError, match="canonical"):
        chain_sum(canonical="float")


def test_tagged_answer_without_tag_is_invalid_and_scores_zero():
    task = chain_sum(answer_format="tagged")
    reference = task.problem("eval", 0)["answer"]
    env = task.make_env("eval")
    env.reset(0)
    _, reward, done, info = env.step(reference)  # the right number, but not inside <answer>...</answer>
    assert (reward, done, info["invalid"], info["success"], info["answer"]) == (0.0, True, True, False, None)
    env.reset(0)
    _, reward, _, info = env.step(f"so <answer>{reference}</answer>")
    assert (reward, info["invalid"]) == (1.0, False)
    # demonstrations use the same format
    assert task.demonstrations([0])[0].turns[0][1].startswith("<answer>")


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(OutriderError) as err:
        make_task(name="reasoning_gym", dataset="chain_summ")
    message = str(err.value)
    assert message.startswith("task.dataset: unknown reasoning-gym dataset 'chain_summ'; valid: ")
    assert "chain_sum" in message and "countdown" in message


def test_invalid_generator_config_is_a_user_error():
    with pytest.raises(OutriderError, match=r"task\.config: invalid for reasoning-gym 'chain_sum'.*bogus"):
        make_task(name="reasoning_gym", dataset="chain_sum", config={"bogus": 1})


def test_too_few_distinct_eval_problems_is_a_user_error():
    with pytest.raises(OutriderError, match=r"distinct held-out problems for eval_size=1000; lower task.eval_size"):
        make_task(name="reasoning_gym", dataset="chain_sum", config=CHAIN_SUM_1_DIGIT, eval_size=1000)


@pytest.mark.parametrize("template", ["{questoin}", "{metadata[nokey]}", "{question", "{0}"])
def test_bad_template_fails_when_the_task_is_built(template):
    with pytest.raises(OutriderError, match=r"^task\.template: cannot fill"):
        chain_sum(template=template)


# ---------------------------------------------------------------- jsonl


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def numbers(n: int) -> list[dict]:
    return [{"prompt": f"What is {i} + {i}?", "answer": 2 * i} for i in range(n)]


def test_jsonl_broken_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [*numbers(3), '{"prompt": "x", "answer": ', *numbers(2)])
    with pytest.raises(OutriderError) as err:
        make_task(name="jsonl", path=str(path))
    assert str(err.value).startswith(f"{path}:4: not valid JSON")


def test_jsonl_missing_key_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [*numbers(2), "", {"prompt": "only a prompt"}])
    with pytest.raises(OutriderError) as err:
        make_task(name="jsonl", path=str(path))
    assert str(err.value) == f'{path}:4: expected an object with keys "prompt" and "answer"'
    path = write_jsonl(tmp_path / "list.jsonl", [*numbers(1), ["prompt", "answer"]])
    with pytest.raises(OutriderError, match=r"list\.jsonl:2: expected an object"):
        make_task(name="jsonl", path=str(path))


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(OutriderError, match=r"task\.path: no such file"):
        make_task(name="jsonl", path=str(tmp_path / "nope.jsonl"))


def test_jsonl_line_separator_inside_a_string_is_not_a_line_break(tmp_path):
    rows = numbers(40) + [{"prompt": "first\u2028second\x85third", "answer": "ok"}]
    path = tmp_path / "data.jsonl"
    # ensure_ascii=False writes U+2028 and U+0085 raw, as many tools do
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    task = make_task(name="jsonl", path=str(path), eval_fraction=0.5)
    questions = [r["question"] for r in task._train_rows + task._eval_rows]
    assert "first\u2028second\x85third" in questions and len(questions) == 41


def test_jsonl_hash_split_is_disjoint_and_stable(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", numbers(200))
    task = make_task(name="jsonl", path=str(path), eval_fraction=0.25)
    train = {r["question"] for r in task._train_rows}
    held = {r["question"] for r in task._eval_rows}
    assert not train & held and len(train) + len(held) == 200
    assert 20 < len(held) < 80  # about a quarter
    # the split of a prompt depends on the prompt only, not on the rest of the file
    reordered = write_jsonl(tmp_path / "other.jsonl", list(reversed(numbers(200)))[:120])
    task2 = make_task(name="jsonl", path=str(reordered), eval_fraction=0.25)
    assert {r["question"] for r in task2._eval_rows} <= held
    assert all(_held_out(q, 0.25) for q in held) and not any(_held_out(q, 0.25) for q in train)
    # every eval seed indexes a held-out problem
    assert {task.problem("eval", i)["question"] for i in range(task.eval_size)} <= held
    assert {task.problem("train", i)["question"] for i in range(300)} <= train


def test_jsonl_eval_path_removes_its_prompts_from_train(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", numbers(30))
    eval_path = write_jsonl(tmp_path / "eval.jsonl", numbers(30)[:5])
    task = make_task(name="jsonl", path=str(path), eval_path=str(eval_path))
    assert [r["question"] for r in task._eval_rows] == [f"What is {i} + {i}?" for i in range(5)]
    assert len(task._train_rows) == 25 and task.eval_size == 5
    assert not {r["question"] for r in task._train_rows} & {r["question"] for r in task._eval_rows}


def test_jsonl_empty_split_is_a_user_error(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", numbers(3))
    with pytest.raises(OutriderError, match=r"the train split of .* is empty"):
        make_task(name="jsonl", path=str(path), eval_path=str(path))


def test_jsonl_numeric_and_exact_match(tmp_path):
    rows = [{"prompt": f"p{i}", "answer": a} for i, a in enumerate(["1000", "3.5", "Paris"] * 10)]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    numeric = make_task(name="jsonl", path=str(path), match="numeric", eval_fraction=0.5)
    exact = make_task(name="jsonl", path=str(path), match="exact", eval_fraction=0.5)
    assert numeric.verify({"answer": "1000"}, "1,000") == 1.0
    assert numeric.verify({"answer": "1000"}, " 1000.0 ") == 1.0
    assert numeric.verify({"answer": "3.5"}, "3.6") == 0.0
    assert numeric.verify({"answer": "Paris"}, "Paris") == 0.0  # not a number
    assert exact.verify({"answer": "Paris "}, "Paris") == 1.0
    assert exact.verify({"answer": "1000"}, "1,000") == 0.0
    # through the env: the response is stripped before comparison
    problem = numeric.problem("eval", 0)
    env = numeric.make_env("eval")
    assert env.reset(0) == problem["question"]
    _, reward, done, info = env.step(f"  {problem['answer']}\n")
    assert (reward, done, info["success"]) == (1.0, True, True)
