"""Knapsack RL [141]: the value of N rollouts, the allocation (hand cases; the authors' code agreed on 1485 random
cases when this was written), the success estimates, the piece's recurring pool and its kill -9 + --resume."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from conftest import read_jsonl, tiny_recipe
from outrider.data import Episode, GroupIds, Turn
from outrider.errors import OutriderError
from outrider.explore import EXPLORE, ExploreContext
from outrider.explore.budget import SuccessTracker, allocate, knapsack_value, solve_dp
from outrider.registry import BuildContext
from test_resume import RESUME_OVERRIDES, killed_run_resumes_like


def test_value_by_hand():
    assert knapsack_value(0.5, 2) == pytest.approx((1 - 0.25 - 0.25) * 0.5 * 0.25)
    assert knapsack_value(0.9, 4) == pytest.approx((1 - 0.9 ** 4 - 0.1 ** 4) * 0.9 * 0.01)
    assert knapsack_value(0.0, 8) == 0.0 and knapsack_value(1.0, 8) == 0.0


def test_degenerate_allocations():
    assert allocate([None, None], 4, 2, 8) == ([4, 4], {"fallback": 0.0})  # no estimates: uniform
    assert allocate([1.0, 1.0], 4, 2, 8)[0] == [4, 4]  # nothing to learn anywhere: uniform
    assert allocate([0.0, 1.0, 1.0], 4, 2, 8)[0] == [8, 2, 2]  # solved prompts give their rest to the unsolved
    assert allocate([0.0, 0.0, 1.0], 4, 2, 8)[0] == [5, 5, 2]


def test_knapsack_by_hand():
    # p = 0.5 twice, 4 left after min_n = 2 each; estimated cost int(log 0.1 / log 0.5) = 3 each ≥ 4 left: no
    # fallback. v(k) = (1 − 2·0.5^(k+2))/8: (2, 2) 0.21875 beats (1, 3) 0.2109 and (0, 4) 0.1211
    assert allocate([0.5, 0.5], 4, 2, 8) == ([4, 4], {"fallback": 0.0})
    # p = 0.5 and p = 0: estimated 3 < 4 left, so 1 goes to the p = 0 prompt and the knapsack places 3
    assert allocate([0.5, 0.0], 4, 2, 8) == ([5, 3], {"fallback": 1.0})
    # p = 0.9 is worth little (p(1−p)² = 0.009): (4, 0) 0.1211 beats (3, 1) 0.1196
    assert allocate([0.5, 0.9], 4, 2, 8, allow_fallback=False)[0] == [6, 2]
    # the cap: at most max_n − min_n extra each; what no prompt can take is spread evenly
    assert solve_dp([0.5, 0.5], 2, 1, 5) == [3, 2]


def test_tracker_follows_the_authors_estimates():
    t = SuccessTracker(min_count=8, buffer_length=16)
    t.update(7, [1.0, 0.0])
    assert t.rate(7) is None and t.estimate[7] == 0.5  # too few outcomes: the default budget
    t.update(7, [1.0] * 8)  # a group smaller than 16: the latest 16 outcomes (here all 10)
    assert t.rate(7) == pytest.approx(0.9)
    t4 = SuccessTracker(min_count=1, buffer_length=4)
    t4.update(1, [0.0] * 4)
    t4.update(1, [1.0, 1.0, 0.0, 1.0])  # a full group: its own mean
    assert t4.rate(1) == 0.75
    other = SuccessTracker()
    other.load_state_dict(t.state_dict())
    assert other.rate(7) == t.rate(7) and other.history == t.history


def fake_context(step: int, p_of_seed: dict[int, float]) -> ExploreContext:
    """Rollouts whose success is seed-determined (p 0, 1 or alternating), scoring a no-op."""
    counter = {"n": 0}

    def rollout(starts):
        out = []
        for s in starts:
            counter["n"] += 1
            p = p_of_seed[s.seed]
            ok = p == 1.0 or (0 < p < 1 and counter["n"] % 2 == 0)
            out.append(Episode(group_id=s.group_id, seed=s.seed, turns=[Turn("q", [1], "a", [2], reward=float(ok))],
                               success=ok, rewards={"trajectory": {"v": float(ok)}, "step": {}, "token": {}}))
        return out

    seeds = iter(sorted(p_of_seed))
    return ExploreContext(rollout=rollout, score=lambda eps: None, next_seeds=lambda n: [next(seeds) for _ in range(n)],
                          groups=GroupIds(), rng=np.random.default_rng([0, step, 1]), step=step)


def build(**options):
    entry, cfg = EXPLORE.build({"name": "budget", "prompts_per_step": 3, "group_size": 4, "pool": 3, "min_count": 4,
                                **options}, "explore")
    return entry.create(cfg, BuildContext(where="explore"))


def test_piece_reallocates_once_prompts_are_estimated():
    p = {10: 0.0, 11: 0.5, 12: 1.0}
    piece = build(max_n=8)
    episodes, m = piece(fake_context(1, p))
    assert len(episodes) == 12 and m["explore/group_size_max"] == m["explore/group_size_min"] == 4
    assert m["explore/informative_groups"] == pytest.approx(1 / 3)
    episodes, m = piece(fake_context(2, p))  # the same three prompts, now estimated: 0, 0.5, 1
    sizes = {s: sum(e.seed == s for e in episodes) for s in p}
    assert len(episodes) == 12 and sizes[12] == 2 and sizes[11] >= 2 and sizes[10] > 2
    assert m["explore/estimated_prompts"] == 1.0
    uniform = build(allocation="uniform")
    uniform(fake_context(1, p))
    episodes, _ = uniform(fake_context(2, p))
    assert {s: sum(e.seed == s for e in episodes) for s in p} == {10: 4, 11: 4, 12: 4}
    clone = build(max_n=8)
    clone.load_state_dict(piece.state_dict())
    assert clone.state_dict() == piece.state_dict()


def test_pool_is_walked_in_epochs():
    piece = build(prompts_per_step=2, pool=3)
    p = {10: 0.5, 11: 0.5, 12: 0.5}
    seen = [sorted({e.seed for e in piece(fake_context(step, p))[0]}) for step in (1, 2, 3)]
    first_epoch = seen[0] + [s for s in seen[1] if s not in seen[0]][:1]
    assert sorted(first_epoch) == [10, 11, 12]  # every pool prompt once before any repeats


@pytest.mark.parametrize("options", [{"min_n": 9}, {"max_n": 1}, {"negative_n": 9}, {"allocation": "greedy"}])
def test_bad_options_are_rejected(options):
    with pytest.raises(OutriderError):
        EXPLORE.build({"name": "budget", "group_size": 8, "min_n": 2, **options}, "explore")


@pytest.mark.slow  # two runs of 40 small steps and a killed one, ~40 s
def test_killed_knapsack_run_resumes_to_identical_metrics(tmp_path):
    """Unequal groups go through pack, credit and the learner; estimates, pool and order ride in checkpoints."""
    from outrider.recipe import load_recipe
    from outrider.trainer import Trainer

    explore = {"name": "budget", "prompts_per_step": 4, "group_size": 4, "pool": 8, "min_count": 2, "max_n": 8}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(**dict(RESUME_OVERRIDES, explore=explore)), sort_keys=False))
    reference = tmp_path / "A"
    Trainer(load_recipe(recipe), reference, quiet=True).run()
    rows = [r for r in read_jsonl(reference / "metrics.jsonl") if "explore/rollouts" in r]
    assert all(r["explore/rollouts"] == 16 for r in rows)
    assert any(r["explore/group_size_max"] > r["explore/group_size_min"] for r in rows)  # groups of unequal size
    assert sum(r.get("optim/grad_norm", 0.0) > 0 for r in rows) >= 5
    killed_run_resumes_like(reference, recipe, tmp_path)
