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
