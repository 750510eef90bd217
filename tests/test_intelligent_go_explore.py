"""Intelligent Go-Explore [112] with a scripted judge (a real judge needs a pretrained HF model): the judge's
index picks the cell returned to, its yes/no filters new cells, unreadable answers fall back and are counted, and
a judge on the tiny model is a one-line error."""

from __future__ import annotations

import re

import pytest

from outrider.errors import OutriderError
from outrider.explore.intelligent_go_explore import IGEConfig, IntelligentGoExplore
from outrider.registry import BuildContext
from test_go_explore import CorridorTask, corridor_ctx

PROMPTS: list[str] = []


def deepest(prompt: str) -> str:
    """Picks the listed state with the largest position; calls a state interesting unless it is 'at 0'."""
    PROMPTS.append(prompt)
    if prompt.endswith("Index:"):
        listed = re.findall(r"^\[(\d+)\] at (\d+)", prompt, re.M)
        return max(listed, key=lambda x: int(x[1]))[0]
    return "no" if prompt.split("New state:\n")[1].startswith("at 0\n") else "yes, it is"


def nonsense(prompt: str) -> str:
    return "maybe 99"


def ige(judge: str, **options) -> IntelligentGoExplore:
    cfg = IGEConfig(**{"prompts_per_step": 4, "group_size": 2, "layouts": 2, "judge": judge, "candidates": 4,
                       "robustify": {"method": "none"}, **options})
    return IntelligentGoExplore(cfg, BuildContext(task=CorridorTask()))


def test_the_judge_picks_the_cell_and_filters_new_ones() -> None:
    piece = ige("test_intelligent_go_explore:deepest")
    PROMPTS.clear()
    piece(corridor_ctx(0))
    assert all(c.text != "at 0" or c.depth == 0 for c in piece.archive.cells.values())  # refused: at 0 again
    for step in range(2, 5):
        PROMPTS.clear()
        episodes, m = piece(corridor_ctx(0, step))
        assert m["explore/judge_calls"] >= 4 and m["explore/judge_invalid"] == 0 and m["time/explore/judge_s"] >= 0
        # each group starts at the deepest state its selection prompt listed (4 groups of 2, in order)
        deepest_listed = [max(int(x) for x in re.findall(r"^\[\d+\] at (\d+)", p, re.M))
                          for p in PROMPTS if p.endswith("Index:")]
        assert [e.metadata["start_pos"] for e in episodes[::2]] == deepest_listed
    assert m["explore/mean_start_depth"] > 0 and "(depth " in PROMPTS[0]


def test_unreadable_answers_fall_back_and_are_counted() -> None:
    piece = ige("test_intelligent_go_explore:nonsense")
    _, m = piece(corridor_ctx(1))
    assert m["explore/judge_invalid"] == m["explore/judge_calls"] > 0  # 'maybe 99': index out of range, not yes/no
    assert m["explore/new_cells"] > 0  # unreadable interestingness: archived anyway


@pytest.mark.parametrize("judge, match", [
    ("policy", r"^explore.judge: 'policy' .* tiny model"),
    ("no_such_module:fn", r"^explore.judge: 'no_such_module:fn' is neither"),
    ("test_intelligent_go_explore:PROMPTS", r"^explore.judge: .* is neither"),
])
def test_bad_judges_are_one_line(judge, match) -> None:
    with pytest.raises(OutriderError, match=match):
        ige(judge)
