"""stepsum's criteria hook (the rubric a response is scored on: format, each step, the answer), by hand."""

from __future__ import annotations

from outrider.envs.stepsum import StepSumConfig, StepSumTask, step_criteria

TERMS = [3, 5, 2]  # running sums 8, 10
RIGHT, SHORT, WRONG_ANSWER, WRONG_STEP, GARBAGE = "8,10,#10", "3+5=8,8+2=10,#10", "8,10,#11", "8,11,#11", "8 10 #"


def test_stepsum_criteria_by_hand():
    full = {"format": True, "step_1": True, "step_2": True, "answer": True}
    assert step_criteria(TERMS, RIGHT) == full
    assert step_criteria(TERMS, SHORT) == full  # the long form passes the same checks
    assert step_criteria(TERMS, WRONG_ANSWER) == {**full, "answer": False}
    assert step_criteria(TERMS, WRONG_STEP) == {**full, "step_2": False, "answer": False}
    assert step_criteria(TERMS, "#10") == {**full, "step_1": False, "step_2": False}  # missing steps fail
    assert step_criteria(TERMS, GARBAGE) == {"format": False, "step_1": False, "step_2": False, "answer": False}
    assert list(step_criteria([1, 2, 3, 4], "3,6,10,#10")) == ["format", "step_1", "step_2", "step_3", "answer"]


def test_stepsum_criteria_hook_reads_the_env():
    task = StepSumTask(StepSumConfig(min_terms=3, max_terms=3))
    env = task.make_env("train")
    env.reset(4)
    terms = env.problem["metadata"]["terms"]
    s1, s2 = terms[0] + terms[1], sum(terms)
    assert all(task.criteria(env, f"{s1},{s2},#{s2}").values())
    assert task.criteria(env, f"{s1},{s2},#{s2 + 1}")["answer"] is False
