"""Task parameter spaces: the box a teacher samples in, snapping to the task's points, the missing-space error."""

from __future__ import annotations

import pytest

from outrider.envs.base import ENVS, ParamDim, ParamSpace, require_param_space
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
