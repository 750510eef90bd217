"""The Python API, for notebooks and scripts: build a recipe, run it, read what it wrote.

    import outrider
    recipe = outrider.load_recipe("quickstart", overrides=["train.steps=20"])  # a name, a path or a dict
    summary = outrider.train(recipe, out="runs/nb")                           # the run's summary.json
    rows = outrider.load_metrics("runs/nb")                                   # metrics.jsonl, one dict a step

Everything the CLI's ``train`` validates is validated here, with the same one-line `OutriderError`s. Resuming,
evaluating and comparing runs are the CLI's (``outrider train --resume``, ``eval``, ``compare``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Sequence

from outrider.errors import OutriderError
from outrider.recipe import Recipe, apply_overrides, parse_recipe
from outrider.recipe import load_recipe as _load_recipe_file


def load_recipe(recipe: Recipe | dict[str, Any] | str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """A validated recipe from a dict (the YAML's structure), a YAML file, a shipped recipe's name
    (``"quickstart"``) or a `Recipe`, with ``key.path=value`` overrides applied (as ``--set`` does)."""
    if isinstance(recipe, Recipe):
        recipe = recipe.model_dump(mode="json")
    if isinstance(recipe, dict):
        return parse_recipe(apply_overrides(copy.deepcopy(recipe), list(overrides)))
    if isinstance(recipe, (str, Path)):
        return _load_recipe_file(recipe, list(overrides))
    raise OutriderError(f"recipe: expected a dict, a path or a recipe name (got {type(recipe).__name__})")


def train(recipe: Recipe | dict[str, Any] | str | Path, out: str | Path, overrides: Sequence[str] = (),
          quiet: bool = False) -> dict[str, Any]:
    """Run a recipe into the run directory `out` (warm start, evaluations, RL steps, checkpoints: what
    ``outrider train`` does) and return its summary (``summary.json``: ``eval_start``, ``eval_end``, ``steps``,
    ``wall_time_s``, …). `out` must not hold anything yet."""
    from outrider.trainer import Trainer

    rec = load_recipe(recipe, overrides)
    run_dir = Path(out)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise OutriderError(f"out: '{run_dir}' already exists and is not empty; choose another directory (to "
                            "continue a run: outrider train --resume --out DIR)")
    return Trainer(rec, run_dir, quiet=quiet).run()


def load_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """The run's ``metrics.jsonl``: one dict per logged step (``step``, ``reward/total``, ``eval/pass@1``, …),
    in order. Step 0 holds the start evaluation."""
    from outrider.observe.metrics import read_metrics

    return read_metrics(Path(run_dir))


def load_summary(run_dir: str | Path) -> dict[str, Any]:
    """The run's ``summary.json`` (written when the run finishes)."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise OutriderError(f"'{run_dir}' has no summary.json (not a run directory, or the run has not finished)")
    return json.loads(path.read_text())
