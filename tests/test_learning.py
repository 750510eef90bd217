"""Learning runs (slow): GRPO must improve a deliberately weak warm start on held-out problems."""

from pathlib import Path

import pytest

from outrider.recipe import load_recipe
from outrider.trainer import Trainer

QUICKSTART = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"
SHORT = ["train.steps=80", "observe.eval_every=0", "observe.eval_prompts=64", "observe.eval_samples=8",
         "observe.pass_at=[1, 8]", "observe.checkpoint_every=0", "observe.tensorboard=false"]


@pytest.mark.slow
def test_grpo_improves_weak_warm_start(tmp_path: Path) -> None:
    # Measured on the 2-core dev machine: seed 0 gives pass@1 0.19 -> 0.46 after 80 steps (17 s); seed 1,
    # whose warm start is weaker (0.05), gives 0.12 -- the threshold is set for the fixed seed 0 with a wide margin.
    recipe = load_recipe(QUICKSTART, SHORT)
    summary = Trainer(recipe, tmp_path / "run", quiet=True).run()
    start, end = summary["eval_start"]["pass@1"], summary["eval_end"]["pass@1"]
    assert start < 0.4, f"the warm start should be weak, got pass@1 {start:.3f}"
    assert end >= start + 0.10, f"GRPO did not improve held-out pass@1: {start:.3f} -> {end:.3f}"
