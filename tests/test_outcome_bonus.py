"""Outcome-based exploration [26]: the UCB bonus and its baselines, the batch penalty, by hand; counts as state."""

from __future__ import annotations

import math

import pytest
import yaml

from conftest import read_jsonl, tiny_recipe
from outrider.data import Episode, Turn
from outrider.errors import OutriderError
from outrider.registry import BuildContext
from outrider.score import SCORE, Component, compose
from outrider.score.outcome import batch_penalty, corrected, ucb_bonus
from test_resume import RESUME_OVERRIDES, killed_run_resumes_like


def ep(prompt: str, answer: str | None, group: int = 0, success: bool = False, **info) -> Episode:
    info = {"canonical": answer, **info} if "canonical" not in info else info
    e = Episode(group_id=group, seed=0, turns=[Turn(prompt, [1], "x", [2], info=info)], success=success)
    return e


def build(name: str, **options):
    entry, cfg = SCORE.build({"name": name, **options}, "score[1]")
    return entry.create(cfg, BuildContext(where="score[1]"))


def test_ucb_bonus_by_hand():
    assert [ucb_bonus(n) for n in (0, 1, 4, 9, 100)] == [1.0, 1.0, 0.5, pytest.approx(1 / 3), 0.1]


def test_baselines_by_hand():
    b, g = [1.0, 0.5, 0.25, 1.0], [0, 0, 0, 1]
    assert corrected(b, g, "none", 0.5) == b
    assert corrected(b, g, "constant", 0.5) == [0.5, 0.0, -0.25, 0.5]
    mean0 = (1.0 + 0.5 + 0.25) / 3
    assert corrected(b, g, "mean", 0.5) == pytest.approx([1.0 - mean0, 0.5 - mean0, 0.25 - mean0, 0.0])


def test_ucb_counts_across_steps_by_hand():
    piece = build("outcome_ucb", baseline="none")
    # step 1: nothing seen, every parsed answer gets 1; the unparseable one 0
    assert piece([ep("p", "12"), ep("p", "12"), ep("p", "21"), ep("p", None)]) == [1.0, 1.0, 1.0, 0.0]
    assert piece.counts == {"p": {"12": 2, "21": 1}}
    # step 2: "12" seen twice (1/√2), "21" once (1), "30" never (1); prompts are counted apart
    out = piece([ep("p", "12"), ep("p", "21"), ep("p", "30"), ep("q", "12", group=1)])
    assert out == pytest.approx([1 / math.sqrt(2), 1.0, 1.0, 1.0])
    assert piece.counts == {"p": {"12": 3, "21": 2, "30": 1}, "q": {"12": 1}}


def test_ucb_mean_baseline_and_correct_only():
    piece = build("outcome_ucb", baseline="mean")
    piece.counts = {"p": {"a": 4, "b": 1}}
    # raw bonuses 0.5, 1, 1 (group 0) and 1 (group 1, alone): the mean of group 0 is 2.5/3
    out = piece([ep("p", "a"), ep("p", "b"), ep("p", "c"), ep("r", "a", group=1)])
    assert out == pytest.approx([0.5 - 2.5 / 3, 1 - 2.5 / 3, 1 - 2.5 / 3, 0.0])
    only = build("outcome_ucb", baseline="constant", constant=0.25, correct_only=True)
    assert only([ep("p", "a", success=True), ep("p", "b")]) == [0.75, 0.0]
    assert only.counts == {"p": {"a": 1, "b": 1}}  # every answer is counted, rewarded or not


def test_ucb_state_round_trips():
    piece = build("outcome_ucb")
    piece([ep("p", "a"), ep("p", "b")])
    other = build("outcome_ucb")
    other.load_state_dict(piece.state_dict())
    assert other.counts == piece.counts and other.counts is not piece.counts


def test_batch_penalty_by_hand():
    # group 0 (G = 4): "a" twice → each −1/3; "b" once → 0; unparseable → 0. group 1 (G = 3): all "c" → −1 each.
    # group 2: one member → 0
    answers = ["a", "a", "b", None, "c", "c", "c", "z"]
    groups = [0, 0, 0, 0, 1, 1, 1, 2]
    assert batch_penalty(answers, groups) == pytest.approx([-1 / 3, -1 / 3, 0, 0, -1, -1, -1, 0])
    # rows in any order: the same values follow their rows
    order = [7, 4, 0, 5, 3, 1, 6, 2]
    assert batch_penalty([answers[i] for i in order], [groups[i] for i in order]) == pytest.approx(
        [batch_penalty(answers, groups)[i] for i in order])


def test_batch_component_through_compose_with_weight():
    entry, cfg = SCORE.build({"name": "outcome_batch"}, "score[1]")
    comp = Component("outcome_batch", entry.create(cfg), 0.5, "score[1]")
    episodes = [ep("p", "a"), ep("p", "a"), ep("p", "b")]
    compose(episodes, [comp])
    assert [e.rewards["trajectory"]["outcome_batch"] for e in episodes] == pytest.approx([-0.25, -0.25, 0.0])
    only = build("outcome_batch", correct_only=True)
    assert only([ep("p", "a", success=True), ep("p", "a")]) == [-1.0, 0.0]


@pytest.mark.parametrize("name", ["outcome_ucb", "outcome_batch"])
def test_task_without_canonical_answers_is_one_line_error(name):
    entry, cfg = SCORE.build({"name": name}, "score[1]")
    comp = Component(name, entry.create(cfg, BuildContext(where="score[1]")), 1.0, "score[1]")
    no_answer = Episode(group_id=0, seed=0, turns=[Turn("obs", [1], "left", [2], info={"success": False})])
    with pytest.raises(OutriderError, match="StepInfo.canonical") as err:
        compose([no_answer], [comp])
    assert "\n" not in str(err.value)


@pytest.mark.slow  # two runs of 40 small steps and a killed one, ~40 s
def test_killed_outcome_ucb_run_resumes_to_identical_metrics(tmp_path):
    """The (prompt, answer) counts ride in checkpoints: kill -9 + --resume ends bit-identical."""
    from outrider.recipe import load_recipe
    from outrider.trainer import Trainer

    score = [{"name": "verifier", "weight": 1.0}, {"name": "outcome_ucb", "weight": 0.5, "baseline": "none"}]
    # four prompts that recur every step (the budget piece's pool), sampled cold, so answers repeat and the
    # counts matter (at temperature 1 the weak model's answers are nearly all new)
    explore = {"name": "budget", "allocation": "uniform", "pool": 4, "prompts_per_step": 4, "group_size": 2,
               "temperature": 0.2}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(**dict(RESUME_OVERRIDES, score=score, explore=explore)),
                                     sort_keys=False))
    reference = tmp_path / "A"
    Trainer(load_recipe(recipe), reference, quiet=True).run()
    rows = read_jsonl(reference / "metrics.jsonl")
    # the bonus falls as answers repeat: without restored counts a resumed run would pay 1 again
    bonus = [r["reward/outcome_ucb"] for r in rows if "reward/outcome_ucb" in r]
    assert bonus[0] == pytest.approx(0.5) and bonus[-1] < bonus[0]
    killed_run_resumes_like(reference, recipe, tmp_path)
