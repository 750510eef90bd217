"""Go-Explore [19] on one fixed MiniGrid layout with random starts (`task.fixed_layout`): the recipes of the
robustification comparison in docs/exploration.md and the pool of start states the archive explores there."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from outrider.data import GroupIds
from outrider.envs.minigrid_text import MiniGridConfig, MiniGridTask, room_starts, split_starts
from outrider.explore import ExploreContext
from outrider.explore.go_explore import GoExplore, GoExploreConfig
from outrider.recipe import load_recipe, resolve
from outrider.registry import BuildContext

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ARMS = {"go_explore_fixed_doorkey5": ("imitation", [{"name": "nll", "rows": "chosen", "coef": 1.0}]),
        "go_explore_backward_fixed_doorkey5": ("backward", None),
        "go_explore_robust_fixed_doorkey5": ("backward", [{"name": "nll", "rows": "chosen", "coef": 1.0}])}


@pytest.mark.parametrize("name", sorted(ARMS))
def test_fixed_recipes_differ_from_the_baseline_only_in_robustification(name: str) -> None:
    baseline = resolve(load_recipe(RECIPES / "grpo_start_fixed_doorkey5.yaml"))
    arm = resolve(load_recipe(RECIPES / f"{name}.yaml"))
    method, terms = ARMS[name]
    assert baseline["task"]["fixed_layout"] == 0 and baseline["explore"]["start_groups"] == 4
    assert baseline["explore"]["robustify"]["method"] == "none"
    assert arm["explore"]["robustify"]["method"] == method and arm["explore"]["start_groups"] == 1
    for section in set(arm) - {"explore", "update"}:  # same task, warm start, batch, credit, evaluation
        assert arm[section] == baseline[section], section
    same = ("prompts_per_step", "group_size", "layouts", "cell", "max_new_tokens", "temperature")
    assert all(arm["explore"][k] == baseline["explore"][k] for k in same)
    assert {k: v for k, v in arm["update"].items() if k != "terms"} == \
           {k: v for k, v in baseline["update"].items() if k != "terms"}
    assert arm["update"].get("terms") == terms or (terms is None and not arm["update"].get("terms"))


def test_pool_on_the_fixed_layout_starts_at_train_starts_only() -> None:
    """Every pool seed's start cell is one of the layout's train starts, never a held-out (evaluation) start,
    and the pool's seeds share the layout: Go-Explore's solutions are solutions of the one environment."""
    task = MiniGridTask(MiniGridConfig(env_id="MiniGrid-DoorKey-5x5-v0", max_turns=24, fixed_layout=0))
    ge = GoExplore(GoExploreConfig(prompts_per_step=4, group_size=2, layouts=6, cell="state_key", start_groups=1),
                   BuildContext(task=task))
    ctx = ExploreContext(rollout=None, score=None, next_seeds=lambda n: list(range(n)), groups=GroupIds(),
                         rng=np.random.default_rng(0), step=1)
    ge._start_pool(ctx)
    env = task.make_env("train")
    env.reset(0)
    train, held = split_starts(room_starts(env.env), 0.25)
    assert (len(train), len(held)) == (6, 2) and not set(train) & set(held)
    grids = set()
    for seed, key in ge.archive.cells:
        assert key[:2] in [(tuple(p), d) for p, d in train] and key[:2] not in [(tuple(p), d) for p, d in held]
        grids.add((key[3], key[4]))  # doors and objects: the same layout for every pool seed
    assert len(ge.archive.cells) >= 2 and len(grids) == 1
