"""Task parameter spaces: the box a teacher samples in, snapping to the task's points, the missing-space error,
and multisol's (digits, sum_fraction) space with its random-label region."""

from __future__ import annotations

import pytest

from outrider.envs.base import ENVS, ParamDim, ParamSpace, require_param_space
from outrider.envs.multisol import check_answer
from outrider.errors import OutriderError


def test_box_and_snap():
    space = ParamSpace([ParamDim("k", 3, 5, integer=True), ParamDim("f", 0.0, 1.0)])
    assert space.names == ["k", "f"]
    assert space.box() == ([2.5, 0.0], [5.5, 1.0])  # integer ends as likely as the middle once rounded
    assert space.snap([2.6, -0.3]) == (3.0, 0.0)
    assert space.snap([3.5, 0.25]) == (4.0, 0.25)  # halves round up
    assert space.snap([5.49, 1.7]) == (5.0, 1.0)
    with pytest.raises(ValueError):
        space.snap([3.0])
    with pytest.raises(ValueError):
        ParamSpace([ParamDim("x", 1.0, 0.0)])


def build(name: str, **options):
    entry, cfg = ENVS.build({"name": name, **options}, "task")
    return entry.fn(cfg)


def test_task_without_a_space_is_one_line_naming_the_field():
    task = build("stepsum")
    assert task.param_space() is None and task.param_region((1.0,)) is None
    with pytest.raises(OutriderError, match=r"^explore.teacher: task StepSumTask declares no parameter space"):
        require_param_space(task, "explore.teacher")


def test_multisol_builds_problems_at_a_parameter_vector():
    task = build("multisol", min_digits=3, max_digits=6, random_label_digits=[6])
    space = require_param_space(task, "explore")
    assert space.box() == ([2.5, 0.0], [6.5, 1.0])
    env = task.make_env("train")
    for k in (3, 4, 5, 6):
        for f in (0.0, 0.5, 1.0):
            seeds = [task.param_seed(space.snap([k, f]), i) for i in range(3)]
            assert len(set(seeds)) == 3
            prompts = {env.reset(s) for s in seeds}
            assert len(prompts) == 1  # one (k, S) pair per point: the indices give distinct seeds of it
            kk, total = map(int, prompts.pop().split(" ")[0].split(":"))
            assert kk == k
            near = [s for (k2, s) in task.all_train if k2 == k]
            assert abs(total - f * 9 * k) == min(abs(s - f * 9 * k) for s in near)
    assert task.param_region((6.0, 0.5)) == "random_labels" and task.param_region((4.0, 0.5)) == "rule"


def test_random_label_region_is_train_only_and_not_the_rule():
    task = build("multisol", min_digits=3, max_digits=6, random_label_digits=[6])
    assert task.random_pairs and all(k == 6 for k, _ in task.random_pairs)
    assert all(k < 6 for k, _ in task.eval_pairs + task.train_pairs)
    held_out = set(task.eval_pairs)
    assert not held_out & set(task.all_train)  # held-out prompts disjoint from every training one
    seed = task.param_seed((6.0, 0.5), 0)
    problem = task.problem("train", seed)
    assert problem["metadata"]["random_label"]
    k, total = problem["metadata"]["k"], problem["metadata"]["sum"]
    rule_answer = "9" * (total // 9) + (str(total % 9) if total % 9 else "")
    rule_answer = rule_answer.ljust(k, "0")
    assert check_answer(k, total, rule_answer) == 1.0
    assert task.verify(problem, rule_answer) == float(rule_answer == problem["answer"])
    assert task.verify(problem, problem["answer"]) == 1.0
    demos = task.demonstrations(list(range(len(task.all_train))))
    assert all(not d.turns[0][0].startswith("6:") for d in demos)  # the random labels are never demonstrated


def test_multisol_seeds_are_unchanged_without_random_labels():
    task = build("multisol")
    assert task.all_train == task.train_pairs
    assert task.problem("train", 5)["question"] == "{}:{}".format(*task.train_pairs[5])


@pytest.mark.parametrize("digits", [[2], [3, 4, 5]])
def test_bad_random_label_digits(digits):
    with pytest.raises(OutriderError, match="random_label_digits"):
        ENVS.build({"name": "multisol", "min_digits": 3, "max_digits": 5, "random_label_digits": digits}, "task")
