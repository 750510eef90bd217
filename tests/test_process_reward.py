"""The `process_reward` component: the valid-equations step scorer and its sum / Clip / Delta [42] / PAR [51]
shapings against hand-computed numbers, PAR's reference rewards as state, and a killed run resuming identically."""

from __future__ import annotations

import math

import pytest

from outrider.data import Episode, Turn
from outrider.errors import OutriderError
from outrider.registry import BuildContext
from outrider.score import SCORE
from outrider.score.process import valid_equation_scores


def build(**options):
    entry, cfg = SCORE.build({"name": "process_reward", **options}, "score[1]")
    return entry.create(cfg, BuildContext(where="score[1]"))


def episode(response: str) -> Episode:
    e = Episode(group_id=0, seed=0)
    e.turns.append(Turn("3+5+2=", [1], response, [5] * len(response)))
    return e


# a right trace, the same with a useless true equation inserted, a wrong step, and no step at all
RIGHT, PADDED, WRONG, EMPTY = "3+5=8,8+2=10,#10", "3+5=8,1+1=2,8+2=10,#10", "3+5=9,9+2=11,#11", "#10"


def test_valid_equations_scores_each_step_by_hand():
    assert valid_equation_scores(RIGHT) == [1.0, 1.0, 0.0]
    assert valid_equation_scores(PADDED) == [1.0, 1.0, 1.0, 0.0]
    assert valid_equation_scores(WRONG) == [0.0, 1.0, 0.0]  # 9+2=11 is a true equation, whatever came before
    assert valid_equation_scores(EMPTY) == [0.0]
    assert valid_equation_scores("") == [0.0]
    assert valid_equation_scores(" 12 + 30 = 42 ;7+1=9", delimiter=";") == [1.0, 0.0]
    assert valid_equation_scores("3+5=8,,") == [1.0, 0.0]  # an empty step scores 0


def test_sum_pays_for_a_useless_step_and_clip_delta_do_not():
    eps = [episode(t) for t in (RIGHT, PADDED, WRONG, EMPTY)]
    assert build(shaping="sum")(eps) == [2.0, 3.0, 1.0, 0.0]
    # clip, eta 1: min(r - 1, 0) per step, so a valid step is 0 and any other step -1
    assert build(shaping="clip")(eps) == [-1.0, -1.0, -2.0, -1.0]
    # clip, eta 0.5: valid 0, invalid -0.5
    assert build(shaping="clip", eta=0.5)(eps) == [-0.5, -0.5, -1.0, -0.5]
    # delta: the sum telescopes to the first step's score
    piece = build(shaping="delta")
    assert piece(eps) == [1.0, 1.0, 0.0, 0.0]
    assert piece.step_metrics() == {"process_reward/steps": 11 / 4, "process_reward/raw": 6 / 4}
    assert piece.step_metrics() == {"process_reward/steps": 0.0, "process_reward/raw": 0.0}  # nothing scored since


def test_par_against_the_first_responses_it_scores():
    piece = build(shaping="par", references=2)
    first = piece([episode(RIGHT), episode(WRONG), episode(PADDED)])  # references: the first two sums, 2 and 1

    def shaped(r):
        return (1 / (1 + math.exp(-(r - 2))) + 1 / (1 + math.exp(-(r - 1)))) / 2

    assert piece.reference == [2.0, 1.0]
    assert first == pytest.approx([shaped(2), shaped(1), shaped(3)], abs=1e-12)
    assert first[0] == pytest.approx((0.5 + 1 / (1 + math.exp(-1))) / 2)
    later = piece([episode(EMPTY)])
    assert piece.reference == [2.0, 1.0] and later == pytest.approx([shaped(0)])
    # bounded: five more valid steps than a 3-step response add < 0.2, and never reach 1
    far = piece([episode(",".join(["1+1=2"] * 8))])[0]
    assert far == pytest.approx(shaped(8)) and far < 1.0 and far - shaped(3) < 0.2  # sum would pay 5 more


def test_par_references_ride_in_state():
    piece = build(shaping="par", references=3)
    piece([episode(RIGHT), episode(PADDED)])
    state = piece.state_dict()
    assert state == {"reference": [2.0, 3.0]}
    fresh = build(shaping="par", references=3)
    fresh.load_state_dict(state)
    eps = [episode(WRONG), episode(EMPTY)]
    assert fresh(eps) == piece(eps) and fresh.reference == piece.reference == [2.0, 3.0, 1.0]
    assert build(shaping="par", references=3)(eps) != fresh(eps)  # a piece without them takes other references


def test_bad_options_are_one_line():
    with pytest.raises(OutriderError, match=r"score\[1\].*shaping"):
        build(shaping="minmax")
    with pytest.raises(OutriderError, match=r"score\[1\].*references"):
        build(shaping="par", references=0)


@pytest.mark.slow  # two runs of small steps and a killed one, ~40 s
def test_killed_par_run_resumes_to_identical_metrics(tmp_path):
    from conftest import write_recipe
    from outrider.recipe import load_recipe
    from outrider.trainer import Trainer
    from test_resume import RESUME_OVERRIDES, killed_run_resumes_like

    overrides = dict(RESUME_OVERRIDES, score=RESUME_OVERRIDES["score"] + [
        {"name": "process_reward", "weight": 0.5, "shaping": "par", "references": 4, "delimiter": "+"}])
    recipe = write_recipe(tmp_path, **overrides)
    Trainer(load_recipe(recipe), tmp_path / "A", quiet=True).run()
    killed_run_resumes_like(tmp_path / "A", recipe, tmp_path)
