"""Rubric rewards: RGR's weighted rubric score [50] and VeRPO's difficulty-weighted partial credit [66]
against hand-computed numbers (weights from pass counts, all-pass and none-pass cases, running and
group statistics, the combinations with the outcome), its counts as state, and a killed run resuming identically."""

from __future__ import annotations

import math

import pytest

from outrider.data import Episode, Turn
from outrider.errors import OutriderError
from outrider.registry import BuildContext
from outrider.score import SCORE
from outrider.score.rubric import difficulty_weights, weighted_credit

def test_difficulty_weights_from_pass_counts_by_hand():
    # alpha 0: rho = 3/4, 1/4, 0/4 -> d = 1/4, 3/4, 1 -> sum 2 -> w = 1/8, 3/8, 1/2 (rarer pass, heavier)
    w = difficulty_weights(["a", "b", "c"], {"a": 3, "b": 1, "c": 0}, {"a": 4, "b": 4, "c": 4}, alpha=0.0)
    assert w == pytest.approx({"a": 0.125, "b": 0.375, "c": 0.5})
    assert weighted_credit({"a": True, "b": True, "c": False}, w) == pytest.approx(0.5)
    # alpha 1: rho = 4/6, 2/6, 1/6 -> d = 2/6, 4/6, 5/6 -> w = 2/11, 4/11, 5/11
    w = difficulty_weights(["a", "b", "c"], {"a": 3, "b": 1, "c": 0}, {"a": 4, "b": 4, "c": 4}, alpha=1.0)
    assert w == pytest.approx({"a": 2 / 11, "b": 4 / 11, "c": 5 / 11})
    # all pass always (alpha 0): every d is 0 -> uniform; none pass: every d is 1 -> uniform
    assert difficulty_weights(["a", "b"], {"a": 5, "b": 5}, {"a": 5, "b": 5}, 0.0) == {"a": 0.5, "b": 0.5}
    assert difficulty_weights(["a", "b"], {}, {"a": 5, "b": 5}, 0.0) == {"a": 0.5, "b": 0.5}
    assert difficulty_weights(["a"], {}, {}, 0.0) == {"a": 1.0}  # unseen: rho 0
    assert difficulty_weights([], {}, {}, 1.0) == {}


class FakeTask:
    """criteria from a table keyed by the response (no env needed)."""

    def __init__(self, table):
        self.table = table

    def make_env(self, split):
        return FakeEnv()

    def criteria(self, env, action):
        return self.table[action]


class FakeEnv:
    def reset(self, seed):
        return ""

    def close(self):
        pass


def episode(response: str, reward: float, group: int = 0) -> Episode:
    e = Episode(group_id=group, seed=0)
    e.turns.append(Turn("q", [1], response, [5], reward=reward))
    return e


TABLE = {"ok": {"f": True, "s": True, "answer": True}, "half": {"f": True, "s": False, "answer": False},
         "steps": {"f": True, "s": True, "answer": False}, "none": {"f": False, "s": False, "answer": False}}


def build(name: str, **options):
    entry, cfg = SCORE.build({"name": name, **options}, "score[1]")
    return entry.create(cfg, BuildContext(task=FakeTask(TABLE), where="score[1]"))


def test_verpo_running_counts_and_rewards_by_hand():
    piece = build("verpo", alpha=0.0, beta=0.5)
    eps = [episode("ok", 1.0), episode("half", 0.0), episode("steps", 0.0), episode("none", 0.0)]
    # counts after this batch: f 3/4, s 2/4, answer 1/4 -> d = 1/4, 1/2, 3/4 -> w = 1/6, 1/3, 1/2
    r = piece(eps)
    w = {"f": 1 / 6, "s": 1 / 3, "answer": 0.5}
    assert r == pytest.approx([1 + 0.5 * 1.0, 0.5 * w["f"], 0.5 * (w["f"] + w["s"]), 0.0])
    m = piece.step_metrics()
    assert m["rubric/pass/answer"] == 0.25 and m["rubric/weight/answer"] == pytest.approx(0.5)
    assert m["rubric/hacked"] == pytest.approx(0.25)  # "steps": every criterion but the answer met
    assert m["rubric/partial_wrong"] == pytest.approx((1 / 6 + 1 / 2 + 0) / 3)
    # a second batch, one response meeting f only: counts f 4/5, s 2/5, answer 1/5 -> d 1/5, 3/5, 4/5 -> w_f 1/8
    assert piece([episode("half", 0.0)]) == pytest.approx([0.5 / 8])
    assert piece.passes == {"f": 4.0, "s": 2.0, "answer": 1.0} and piece.trials["f"] == 5.0


def test_verpo_degenerate_groups_and_gate():
    # all pass: uniform weights, D = 1; none pass: D = 0 — with gate the outcome alone decides a passing response
    allpass = build("verpo", alpha=0.0, beta=0.5, combine="gate", statistics="group")
    assert allpass([episode("ok", 1.0), episode("ok", 1.0)]) == [1.0, 1.0]
    nonepass = build("verpo", alpha=0.0, beta=0.5, statistics="group")
    assert nonepass([episode("none", 0.0), episode("none", 0.0)]) == [0.0, 0.0]
    # group statistics: each group's own pass rates. group 0: f 2/2, s 1/2, answer 0/2 -> d 0, 1/2, 1 -> w 0, 1/3, 2/3
    piece = build("verpo", alpha=0.0, beta=1.0, statistics="group")
    r = piece([episode("steps", 0.0, 0), episode("half", 0.0, 0), episode("half", 0.0, 1)])
    assert r == pytest.approx([1 / 3, 0.0, 0.0])  # group 1: f 1/1, s 0/1, answer 0/1 -> w 0, 1/2, 1/2: f earns 0
    assert piece.passes == {}  # group statistics keep no state


def test_verpo_counts_decay_and_round_trip():
    piece = build("verpo", decay=0.5)
    piece([episode("ok", 1.0)])
    piece([episode("none", 0.0)])
    assert piece.passes == {"f": 0.5, "s": 0.5, "answer": 0.5} and piece.trials["f"] == 1.5
    other = build("verpo", decay=0.5)
    other.load_state_dict(piece.state_dict())
    assert other([episode("half", 0.0)]) == piece([episode("half", 0.0)])


def test_rubric_weighted_score_by_hand():
    piece = build("rubric", weights={"answer": 2.0, "s*": 1.0}, default_weight=1.0)
    # weights f 1, s 1, answer 2 -> total 4
    r = piece([episode("ok", 1.0), episode("half", 0.0), episode("steps", 0.0), episode("none", 0.0)])
    assert r == pytest.approx([1.0, 0.25, 0.5, 0.0])
    m = piece.step_metrics()
    assert m["rubric/partial"] == pytest.approx(1.75 / 4) and "rubric/weight/f" not in m
    zero = build("rubric", default_weight=0.0)  # every weight 0: scores 0, never a division by zero
    assert zero([episode("ok", 1.0)]) == [0.0]


def test_a_task_without_criteria_and_bad_options_are_one_line():
    for name in ("verpo", "rubric"):
        entry, cfg = SCORE.build({"name": name}, "score[1]")
        with pytest.raises(OutriderError, match=r"score\[1\].*criteria"):
            entry.create(cfg, BuildContext(task=object(), where="score[1]"))
    with pytest.raises(OutriderError, match=r"score\[1\].*combine"):
        build("verpo", combine="max")
    with pytest.raises(OutriderError, match=r"score\[1\].*decay"):
        build("verpo", decay=0.0)
    with pytest.raises(OutriderError, match=r"score\[1\]\.weights"):
        build("rubric", weights={"answer": -1.0})
    assert math.isfinite(build("verpo")([episode("none", 0.0)])[0])


@pytest.mark.slow  # two runs of a few tiny steps and a killed one, ~30 s
def test_killed_verpo_run_resumes_to_identical_metrics(tmp_path):
    import yaml
    from conftest import tiny_recipe
    from outrider.recipe import load_recipe
    from outrider.trainer import Trainer
    from test_resume import RESUME_OVERRIDES, killed_run_resumes_like

    data = tiny_recipe(**dict(RESUME_OVERRIDES, explore={"prompts_per_step": 4, "group_size": 2, "max_new_tokens": 8},
                              score=[{"name": "verpo", "weight": 1.0, "decay": 0.9}]))
    data["task"] = {"name": "stepsum", "min_terms": 2, "max_terms": 3, "max_digit": 5, "eval_size": 8,
                    "long_fraction": 0.0, "instruction_fraction": 0.0}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    Trainer(load_recipe(recipe), tmp_path / "A", quiet=True).run()
    killed_run_resumes_like(tmp_path / "A", recipe, tmp_path)


@pytest.mark.parametrize("name,piece", [("verpo_stepsum", "verpo"), ("rgr_stepsum", "rubric")])
def test_the_recipes_validate(name, piece):
    from outrider.recipe import load_recipe
    from outrider import RECIPES_DIR

    recipe = load_recipe(RECIPES_DIR / f"{name}.yaml")
    assert [s["name"] for s in recipe.score] == ["verifier", piece]
