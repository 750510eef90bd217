"""Calculator [17]: the safe arithmetic grammar (attacks refused, exact values), tool calls and errors, answers,
horizon, determinism, splits, snapshot/restore, expert and recovery demonstrations, config errors, recipe."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import random
import time

import pytest

from outrider.envs import ENVS
from outrider.envs.arithmetic import CalcError, format_number, parse_number, safe_eval
from outrider.envs.calculator import REDRAW_STRIDE, make_question
from outrider.errors import OutriderError
from outrider.recipe import load_recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "grpo_calculator.yaml"


def make_task(**section):
    entry, cfg = ENVS.build({"name": "calculator", **section}, "task")
    return entry.fn(cfg)


@pytest.mark.parametrize("expr, value", [
    ("417*382", 159294), (" 2 + 3 * 4 ", 14), ("(2+3)*4", 20), ("-3 - -4", 1), ("+5", 5),
    ("7//2", 3), ("-7//2", -4), ("-7 % 3", 2), ("1/4 + 1/4", Fraction(1, 2)), ("2**10", 1024),
    ("2**-2", Fraction(1, 4)),
    ("0.1+0.2", Fraction(3, 10)), ("1_000*2", 2000),  # exact: 0.1 + 0.2 is 3/10, not 0.30000000000000004
])
def test_safe_eval_values(expr, value):
    assert safe_eval(expr) == value


@pytest.mark.parametrize("expr, message", [
    ("__import__('os').system('echo pwned')", "unsupported syntax"),
    ("open('/etc/passwd')", "unsupported syntax"),
    ("x + 1", "unsupported syntax: Name"),
    ("(1).__class__", "unsupported syntax: Attribute"),
    ("[1, 2][0]", "unsupported syntax"),
    ("'a' * 3", "unsupported syntax: Constant"),
    ("True + 1", "unsupported syntax: Constant"),
    ("1j * 2", "unsupported syntax: Constant"),
    ("lambda: 1", "unsupported syntax: Lambda"),
    ("1 if 1 else 2", "unsupported syntax: IfExp"),
    ("1 < 2", "unsupported syntax: Compare"),
    ("9**9**9", "exponent"),  # refused before computing: 9**387420489 would not finish
    ("10**10**10", "exponent"),
    ("2**0.5", "exponent"),
    ("99**64", "result too large"),
    ("1e308 * 10", "result too large"),
    ("1/0", "division by zero"), ("5 % 0", "division by zero"), ("0**-1", "division by zero"),
    ("1" * 121, "longer than"),
    ("(" * 59 + "1" + ")" * 59, None),  # deep but short: fine
    ("417x382", "invalid syntax"), ("(417*382", "invalid syntax"), ("", "empty"), ("1;2", "invalid syntax"),
    ("import os", "invalid syntax"),
])
def test_safe_eval_refuses(expr, message):
    if message is None:
        assert safe_eval(expr) == 1
        return
    with pytest.raises(CalcError, match=message):
        safe_eval(expr)


def test_tool_call_answer_and_rewards():
    task = make_task()
    env = task.make_env("eval")
    obs = env.reset(0)
    q = make_question(task.cfg, 2**31)
    assert obs == f"{q['expr']}=?\n" and "*" in q["expr"]
    obs, reward, done, info = env.step(f"calc: {q['expr']}")
    assert (obs, reward, done, info["invalid"]) == (f"= {q['answer']}\n", 0.0, False, False)
    assert env.state_key() == (2**31, str(q["answer"]), 1)
    obs, reward, done, info = env.step(f" answer: {q['answer']} ")
    assert (obs, reward, done, info["success"]) == ("", 1.0, True, True)
    assert info["reference"] == str(q["answer"]) and info["canonical"] == str(q["answer"])
    assert info["metrics"] == {"tool_calls": 1.0, "tool_errors": 0.0, "recovered": 0.0, "answered": 1.0}
    with pytest.raises(RuntimeError):
        env.step("answer: 1")


def test_wrong_and_unparseable_answers_score_zero():
    task = make_task()
    for answer in ["1", "abc", "", "159294.5"]:
        env = task.make_env("train")
        env.reset(4)
        _, reward, done, info = env.step(f"answer: {answer}")
        assert (reward, done, info["success"]) == (0.0, True, False)
    env = task.make_env("train")
    env.reset(4)
    value = make_question(task.cfg, 4)["answer"]
    assert env.step(f"answer: {value}.0")[1] == 1.0  # numeric match, not string match


def test_errors_are_invalid_and_recovery_is_counted():
    task = make_task(max_turns=4)
    env = task.make_env("train")
    env.reset(9)
    q = make_question(task.cfg, 9)
    obs, reward, done, info = env.step("calc: __import__('os')")
    assert obs.startswith("error: unsupported syntax") and info["invalid"] and info["events"] == ["tool_error"]
    assert (reward, done) == (0.0, False) and env.state_key() == (9, "error", 1)
    obs, _, done, info = env.step("what is it?")
    assert obs.startswith("error: reply `calc:") and info["invalid"] and not done
    env.step(f"calc: {q['expr']}")
    _, reward, done, info = env.step(f"answer: {q['answer']}")
    assert reward == 1.0 and info["metrics"] == {"tool_calls": 2.0, "tool_errors": 2.0, "recovered": 1.0,
                                                 "answered": 1.0}


def test_horizon_ends_the_episode_without_reward():
    env = make_task(max_turns=2).make_env("train")
    env.reset(0)
    assert env.step("calc: 1+1")[2] is False
    obs, reward, done, info = env.step("calc: 2+2")
    assert (reward, done, info["success"], info["metrics"]["answered"]) == (0.0, True, False, 0.0)


def test_determinism_and_disjoint_splits():
    task = make_task()
    assert task.make_env("train").reset(3) == task.make_env("train").reset(3)
    train = {make_question(task.cfg, s)["expr"] for s in range(300)}
    held = [task.make_env("eval").reset(s) for s in range(50)]
    assert len(set(held)) > 45
    assert task.make_env("eval").reset(0) == make_question(task.cfg, 2**31)["text"] + "\n"  # eval s = 2^31 + s
    # different question ids give different questions; the question space (900^2) is large, so overlap is rare
    assert sum(h[:-3] in train for h in held) <= 1


def test_snapshot_restore():
    env = make_task().make_env("train")
    env.reset(11)
    env.step("calc: 1+")
    state, key = env.snapshot(), env.state_key()
    actions = ["calc: 6*7", "answer: 42"]
    first = [env.step(a) for a in actions]
    env.restore(state)
    assert env.state_key() == key
    assert [env.step(a) for a in actions] == first


def test_word_problems_and_verbose_format():
    task = make_task(style="word", ops=["+", "-", "*"], format="verbose")
    obs = task.make_env("train").reset(1)
    assert "calc: <expression>" in obs and "answer: <number>" in obs and "?" in obs
    for s in range(30):
        q = make_question(task.cfg, s)
        assert q["answer"] >= 0  # a tank never drains more than it holds
        demo, info = task.play_expert(s)
        assert info["success"]


def test_expert_and_recovery_demonstrations():
    task = make_task(recovery_fraction=0.5)
    seeds = list(range(10**8, 10**8 + 40))
    demos = task.demonstrations(seeds)
    assert demos == task.demonstrations(seeds)
    lengths = [len(d.turns) for d in demos]
    assert set(lengths) == {2, 3} and 10 <= lengths.count(3) <= 30
    for seed, demo in zip(seeds, demos):
        env = task.make_env("train")
        obs = env.reset(seed)
        for want_obs, action in demo.turns:
            assert obs == want_obs
            obs, reward, done, info = env.step(action)
        assert reward == 1.0 and info["success"]
        if len(demo.turns) == 3:
            assert demo.turns[1][0].startswith("error:") and info["metrics"]["recovered"] == 1.0


def test_config_errors_name_the_field():
    with pytest.raises(OutriderError, match=r"^task\.digits: "):
        make_task(digits=0)
    with pytest.raises(OutriderError, match=r"^task\.ops\.0: "):
        make_task(ops=["^"])
    with pytest.raises(OutriderError, match=r"^task\.max_turns: "):
        make_task(max_turns=0)
    with pytest.raises(OutriderError, match=r"max_turns \(2\) must be >= 3"):
        make_task(max_turns=2, recovery_fraction=0.1)
    with pytest.raises(OutriderError, match=r"terms \(3\) must be 2"):
        make_task(style="word", terms=3)
    with pytest.raises(OutriderError, match="unknown option"):
        make_task(operators=["*"])


def test_recipe_loads():
    recipe = load_recipe(RECIPE)
    assert recipe.task["name"] == "calculator" and recipe.train.threads == 1
    entry, cfg = ENVS.build(recipe.task, "task")
    assert entry.fn(cfg).max_turns == cfg.max_turns >= 3


@pytest.mark.parametrize("expr", ["1e999", "-1e999", "1e999 - 1e999", "2 * 1e400", "(1e999)**0"])
def test_non_finite_floats_are_calc_errors(expr):
    with pytest.raises(CalcError, match="number too large"):
        safe_eval(expr)
    env = make_task().make_env("train")
    env.reset(0)
    obs, reward, done, info = env.step(f"calc: {expr}")  # never raises out of step()
    assert obs.startswith("error: ") and info["invalid"] and info["events"] == ["tool_error"]
    assert (reward, done, env.state_key()[1]) == (0.0, False, "error")


@pytest.mark.parametrize("answer", ["1e30000000", "1e1000000", "-1e1000000", "1e-1000000", "1" * 400 + "/3",
                                    "1" * 5000, "1_0e3_000_000", "inf", "nan", "1/0", "9" * 65, "1e101"])
def test_pathological_answers_return_promptly_with_zero_reward(answer):
    env = make_task().make_env("train")
    env.reset(4)
    start = time.perf_counter()
    obs, reward, done, info = env.step(f"answer: {answer}")
    assert time.perf_counter() - start < 1.0
    assert (obs, reward, done, info["success"]) == ("", 0.0, True, False)
    assert info["canonical"] == answer  # out of bounds counts as unparseable: canonical is the text itself


def test_answer_bounds_and_safe_format_number():
    assert parse_number("1e100") == 10**100 and parse_number("1e101") is None
    assert parse_number("1,234,567") == 1234567 and parse_number("9" * 64) == int("9" * 64)
    assert parse_number("9" * 65) is None and parse_number("1" * 400 + "/3") is None
    assert format_number(Fraction(10**5000)) == "inf" and format_number(Fraction(-(10**5000), 3)) == "-inf"
    assert format_number(Fraction(10**400, 3)) == "inf" and format_number(Fraction(1, 10**400)) == "0"
    assert format_number(Fraction(10**1000)) == str(10**1000) and format_number(Fraction(1, 4)) == "0.25"


def test_no_train_question_is_an_eval_question():
    task = make_task(digits=2, eval_size=512)  # 8100 questions: without the redraw ~6% of train episodes leak
    evals = {task.make_env("eval").reset(s) for s in range(task.eval_size)}
    assert len(evals) > 450
    rng = random.Random(0)
    seeds = [rng.randrange(2**31) for _ in range(2000)] + list(range(300))
    train = task.make_env("train")
    redrawn = 0
    for s in seeds:
        obs = train.reset(s)
        assert obs not in evals
        redrawn += train.index != s
        if train.index != s:
            assert (train.index - s) % REDRAW_STRIDE == 0 and train.reset(s) == obs  # deterministic
    assert 40 <= redrawn <= 250  # ~6% of 2300 collided and were redrawn; the rest kept their question
    demo_seeds = list(range(10**8, 10**8 + 300))
    for demo in task.demonstrations(demo_seeds):
        assert demo.turns[0][0] not in evals
    # the recipe's setting keeps its train questions except the colliding ones
    recipe = make_task(digits=2, terms=2, ops=["*"], eval_size=128)
    env = recipe.make_env("train")
    for s in range(500):
        q = make_question(recipe.cfg, s)
        assert (env.reset(s) == q["text"] + "\n") == (q["expr"] not in recipe.eval_exprs)


def test_question_space_too_small_for_eval_size():
    with pytest.raises(OutriderError, match=r"^task\.eval_size: .*task\.digits=1.* only 81;"):
        make_task(digits=1)
    with pytest.raises(OutriderError, match=r"only 8100"):
        make_task(digits=2, eval_size=2026)
    make_task(digits=2, eval_size=2025)  # 4 x 2025 = 8100: fits
    task = make_task(digits=1, eval_size=20)
    evals = {task.make_env("eval").reset(s) for s in range(20)}
    assert all(task.make_env("train").reset(s) not in evals for s in range(200))
