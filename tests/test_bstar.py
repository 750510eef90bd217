"""B-STaR [32] (loops/bstar.py): the balance score and the grid choice on hand-computed cases, the monitors, the
loop's options, a short run of B-STaR and of STaR (the one-point grid), kill -9 + --resume; ReGFT [104]'s hints."""

from __future__ import annotations

import pytest
import yaml

from conftest import read_jsonl, tiny_recipe
from outrider.errors import OutriderError
from outrider.loops import LOOPS
from outrider.data import Episode, Turn
from outrider.envs.base import Demonstration
from outrider.loops.bstar import (PAPER_TEMPERATURES, PAPER_THRESHOLDS, balance_score, choose, hinted_starts,
                                  partial_hint, pass_at_k_s, query_balance, select_unique, unique_correct)
from test_resume import RESUME_OVERRIDES, killed_run_resumes_like

# (response, total reward, correct)
MIXED = [("a", 1.0, True), ("a", 1.0, True), ("b", 1.0, True), ("c", 0.0, False)]
NONE_CORRECT = [("x", 0.0, False), ("y", 0.0, False), ("x", 0.0, False)]


def test_select_unique_keeps_first_distinct_response_above_threshold():
    assert select_unique(MIXED, 0.5) == [0, 2]
    assert select_unique(MIXED, -0.5) == [0, 2, 3]
    assert select_unique(MIXED, 1.0) == []  # strictly above τ, as in the authors' code


def test_query_balance_hand_computed():
    # τ = 0.5: distinct selected {a, b}, both correct: min(2/8, 1) · 2/2 = 0.25
    assert query_balance(MIXED, 0.5, 8) == pytest.approx(0.25)
    # τ = −0.5: distinct selected {a, b, c}, 2 correct: 0.25 · 2/3
    assert query_balance(MIXED, -0.5, 8) == pytest.approx(1 / 6)
    # n* = 2: the cap is reached, only the precision is left
    assert query_balance(MIXED, -0.5, 2) == pytest.approx(2 / 3)


def test_query_balance_degenerate_cases():
    # no correct sample: selected but none correct → 0; nothing selected → None (left out of the mean)
    assert query_balance(NONE_CORRECT, -0.5, 8) == 0.0
    assert query_balance(NONE_CORRECT, 0.5, 8) is None
    # all correct, 10 distinct ≥ n* = 8: the cap holds the first factor at 1 → 1.0
    all_correct = [(str(i), 1.0, True) for i in range(10)]
    assert query_balance(all_correct, 0.5, 8) == pytest.approx(1.0)
    # the n' cap with wrong ones: 8 distinct correct and 4 wrong at τ = −0.5: 1 · 8/12
    capped = [(str(i), 1.0, True) for i in range(8)] + [(f"w{i}", 0.0, False) for i in range(4)]
    assert query_balance(capped, -0.5, 8) == pytest.approx(2 / 3)
    # duplicates do not count: 16 copies of one correct answer is n' = 1
    assert query_balance([("z", 1.0, True)] * 16, 0.5, 8) == pytest.approx(1 / 8)


def test_balance_score_means_over_queries_with_a_selection():
    # τ = 0.5: NONE_CORRECT has nothing selected and leaves the mean: 0.25
    assert balance_score([MIXED, NONE_CORRECT], 0.5, 8) == pytest.approx(0.25)
    # τ = −0.5: (1/6 + 0) / 2
    assert balance_score([MIXED, NONE_CORRECT], -0.5, 8) == pytest.approx(1 / 12)
    # nothing selected anywhere: 0, not NaN
    assert balance_score([NONE_CORRECT], 0.5, 8) == 0.0
    assert balance_score([], 0.5, 8) == 0.0


def test_a_reward_that_accepts_a_wrong_answer_lowers_precision_and_the_score():
    noisy = [("a", 1.0, True), ("b", 0.8, False), ("c", 0.3, False)]
    # τ = 0.5 keeps a wrong "b" the reward liked: 1/8 · 1/2; τ = 0.9 keeps only "a": 1/8
    assert balance_score([noisy], 0.5, 8) == pytest.approx(1 / 16)
    assert balance_score([noisy], 0.9, 8) == pytest.approx(1 / 8)
    assert choose({1.0: [noisy]}, [0.5, 0.9], 8) == (1.0, 0.9, pytest.approx(1 / 8))


def test_choose_hand_computed_grid():
    low = [[("a", 1.0, True)] * 4]  # T = 0.5: one distinct correct answer: 1/8 at either τ
    high = [[("a", 1.0, True), ("b", 1.0, True), ("c", 1.0, True), ("d", 0.0, False)]]
    # T = 1.0: τ = 0.5 → 3/8 · 1 = 0.375; τ = −0.5 → 3/8 · 3/4 = 0.28125
    t, tau, score = choose({0.5: low, 1.0: high}, [-0.5, 0.5], 8)
    assert (t, tau) == (1.0, 0.5) and score == pytest.approx(0.375)
    # ties: the first maximum in grid order (lowest T, then lowest τ) wins
    assert choose({0.5: low, 1.0: low}, [-0.5, 0.5], 8)[:2] == (0.5, -0.5)
    # nothing correct anywhere: every point scores 0 and the first one is returned
    assert choose({0.7: [NONE_CORRECT], 0.9: [NONE_CORRECT]}, [0.5, 0.9], 8) == (0.7, 0.5, 0.0)


def test_monitors_hand_computed():
    queries = [MIXED, NONE_CORRECT]
    assert pass_at_k_s(queries, 1) == 0.5 and pass_at_k_s(queries, 3) == 0.5 and pass_at_k_s(queries, 4) == 0.0
    assert unique_correct(queries) == pytest.approx((2 + 0) / 2)


def test_paper_grids():
    assert PAPER_TEMPERATURES[0] == 0.5 and PAPER_TEMPERATURES[-1] == 1.2 and len(PAPER_TEMPERATURES) == 15
    assert PAPER_THRESHOLDS[0] == -1.0 and PAPER_THRESHOLDS[-1] == 1.0 and len(PAPER_THRESHOLDS) == 201
    assert 0.0 in PAPER_THRESHOLDS and 0.85 in PAPER_TEMPERATURES


@pytest.mark.parametrize("options", [{"temperatures": [0.0]}, {"temperatures": []}, {"n_star": 0},
                                     {"pass_s": [0]}, {"thresholds": []}, {"calibration_prompts": 0}])
def test_bad_options_are_one_line_errors(options):
    with pytest.raises(OutriderError):
        LOOPS.build({"name": "bstar", **options}, "loop")


BSTAR = {"name": "bstar", "temperatures": [0.6, 1.2], "thresholds": [-0.5, 0.5], "calibration_prompts": 2,
         "calibration_samples": 4}
SFT = {"loss": "none", "terms": [{"name": "nll", "rows": "all"}], "lr": 3.0e-3}


def run_recipe(tmp_path, **overrides):
    from outrider.recipe import load_recipe
    from outrider.trainer import Trainer

    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(**overrides), sort_keys=False))
    Trainer(load_recipe(path), tmp_path / "run", quiet=True).run()
    return read_jsonl(tmp_path / "run" / "metrics.jsonl")


def test_bstar_and_star_runs_log_their_rounds(tmp_path):
    rows = [r for r in run_recipe(tmp_path / "b", loop=BSTAR, update=SFT) if "bstar/round" in r]
    assert [r["bstar/round"] for r in rows] == [1.0, 2.0, 3.0]
    assert all(r["bstar/temperature"] in (0.6, 1.2) and r["bstar/threshold"] in (-0.5, 0.5) for r in rows)
    assert all("time/calibration_s" in r and 0 <= r["bstar/precision"] <= 1 for r in rows)
    star = [r for r in run_recipe(tmp_path / "s", loop={"name": "bstar", "temperatures": [0.7], "thresholds": [0.5]},
                                  update=SFT) if "bstar/round" in r]
    assert all(r["bstar/temperature"] == 0.7 and "time/calibration_s" not in r for r in star)
    # τ = 0.5 on a 0/1 verifier keeps only correct responses
    assert all(r["bstar/precision"] == 1.0 or r["bstar/selected"] == 0 for r in star)


def test_bstar_without_terms_is_refused(tmp_path):
    with pytest.raises(OutriderError, match="update.terms"):
        run_recipe(tmp_path, loop=BSTAR, update={"loss": "none", "lr": 1e-3})


@pytest.mark.slow  # three runs of 40 small rounds, ~1 min
def test_killed_bstar_run_resumes_to_identical_metrics(tmp_path):
    from outrider.recipe import load_recipe
    from outrider.trainer import Trainer

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(**dict(RESUME_OVERRIDES, loop=BSTAR, update=SFT)), sort_keys=False))
    reference = tmp_path / "A"
    Trainer(load_recipe(recipe), reference, quiet=True).run()
    rows = [r for r in read_jsonl(reference / "metrics.jsonl") if "bstar/round" in r]
    assert len({r["bstar/temperature"] for r in rows}) >= 1 and sum(r["bstar/selected"] for r in rows) > 0
    killed_run_resumes_like(reference, recipe, tmp_path)


# --- ReGFT [104]: the same loop with partial references as hints -------------------------------------------------
def test_partial_hint_cuts_at_the_ceiling_of_the_fraction():
    assert partial_hint("3905", 0.5) == "39"
    assert partial_hint("3905", 0.1) == "3"  # ⌈0.4⌉ = 1
    assert partial_hint("12345", 0.5) == "123"  # ⌈2.5⌉ = 3
    assert partial_hint("3905", 0.0) == ""


def test_the_warm_start_shows_partial_hints_at_hint_cut():
    import random

    from outrider.policy.sft import add_hints

    demos = [Demonstration([("p1", "13,19,20,#20")]), Demonstration([("p2", "7,9,#9")])]
    assert [d.turns[0][0] for d in add_hints(demos, 1.0, "Hint: {hint}\n", random.Random(0), cut=0.5)] == \
        ["Hint: 13,19,\np1", "Hint: 7,9\np2"]  # ⌈6⌉ and ⌈3⌉ characters; the actions stay whole
    assert add_hints(demos, 1.0, "{hint}|", random.Random(0))[1].turns[0] == ("7,9,#9|p2", "7,9,#9")


class DemoTask:
    def demonstrations(self, seeds):
        return [Demonstration([(f"p{s}", f"{s}{s}{s}{s}")]) for s in seeds]


def test_hinted_starts_one_new_group_per_failed_group_of_its_size():
    failed = [[Episode(group_id=0, seed=7)] * 3, [Episode(group_id=4, seed=2)] * 2]
    starts = hinted_starts(DemoTask(), failed, 0.5, "Hint: {hint}\n", first_group=9)
    assert [(s.seed, s.group_id) for s in starts] == [(7, 9)] * 3 + [(2, 10)] * 2
    assert starts[0].context == "Hint: 77\n" and starts[-1].context == "Hint: 22\n"
    assert all(s.context_at == "before_observation" and s.origin == "guided" and not s.keep_context
               for s in starts)


def test_hinted_metrics_count_solved_prompts_and_tokens_by_hand():
    from outrider.loops.bstar import hinted_metrics

    def ep(group, ok, n):
        e = Episode(group_id=group, seed=group, success=ok)
        e.turns = [Turn("o", [1], "a", [2] * n)]
        return e

    # prompt 9: 1 of 3 hinted samples right; prompt 10: none of 2; 4 + 3 + 2 + 5 + 1 tokens
    out = hinted_metrics([ep(9, False, 4), ep(9, True, 3), ep(9, False, 2), ep(10, False, 5), ep(10, False, 1)])
    assert out == {"regft/hinted_success": 0.2, "regft/hinted_solved": 0.5, "regft/hinted_tokens": 15.0}
    assert hinted_metrics([]) == {"regft/hinted_success": 0.0, "regft/hinted_solved": 0.0,
                                  "regft/hinted_tokens": 0.0}


def test_hints_need_demonstrations():
    from outrider.loops.bstar import BStar, BStarConfig
    from outrider.registry import BuildContext

    with pytest.raises(OutriderError, match="demonstrations"):
        BStar(BStarConfig(hint_fraction=0.5), BuildContext(object(), None, None, 0, "loop", None))


def test_regft_run_trains_on_hinted_responses(tmp_path):
    rows = [r for r in run_recipe(tmp_path, loop=dict(BSTAR, temperatures=[1.0], thresholds=[0.5], hint_fraction=0.5),
                                  update=SFT, train={"steps": 4}) if "bstar/round" in r]
    assert sum(r["regft/hinted_prompts"] for r in rows) > 0
    assert all(0 <= r.get("regft/hinted_success", 0) <= 1 for r in rows)
