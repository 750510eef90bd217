"""The piece lifecycle: pieces are built once, called every step, and their state rides in every checkpoint. A
stateful exploration piece and a score component that trains a network every step (`lifecycle_pieces`, loaded as
a recipe plugin) resume bit-identically after kill -9."""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import read_jsonl, write_recipe
from outrider.checkpoint import STATE_FILE, list_checkpoints
from outrider.recipe import load_recipe
from outrider.trainer import Trainer
from test_resume import RESUME_OVERRIDES, STEPS, killed_run_resumes_like

LIFECYCLE_OVERRIDES = dict(
    RESUME_OVERRIDES,
    plugins=["lifecycle_pieces"],
    explore={"name": "test_revisit", "prompts_per_step": 4, "group_size": 2, "revisit": 2},
    score=RESUME_OVERRIDES["score"] + [{"name": "test_novelty", "weight": 0.05}],
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle")
    run = root / "A"
    Trainer(load_recipe(write_recipe(root, **LIFECYCLE_OVERRIDES)), run, quiet=True).run()
    return run


def test_pieces_act_and_their_state_is_checkpointed(reference):
    rows = read_jsonl(reference / "metrics.jsonl")
    assert sum(r.get("explore/revisited", 0) for r in rows) >= 2 * (STEPS - 1)  # seeds come back every step
    losses = [r["novelty/loss"] for r in rows if "novelty/loss" in r]
    assert len(losses) == STEPS and losses[-1] < losses[0]  # the bonus network trains
    assert all(r["reward/test_novelty"] > 0 for r in rows if r["step"] > 0)
    state = torch.load(list_checkpoints(reference)[-1] / STATE_FILE, weights_only=False)
    assert set(state["pieces"]) == {"explore", "score[2]"}  # stateless pieces save nothing
    assert len(state["pieces"]["explore"]["stats"]) > 4
    assert set(state["pieces"]["score[2]"]) == {"predictor", "target", "optimizer", "generator"}


def test_resuming_without_the_pieces_state_changes_the_run(reference, tmp_path):
    """The resume comparison below is not vacuous: a run that loses its pieces' state goes elsewhere."""
    run = tmp_path / "C"
    shutil.copytree(reference, run)
    for step in (STEPS - 2, STEPS):
        shutil.rmtree(run / "checkpoints" / f"step_{step}")
    (run / "summary.json").unlink()
    last = list_checkpoints(run)[-1]
    state = torch.load(last / STATE_FILE, weights_only=False)
    state["pieces"] = {}
    torch.save(state, last / STATE_FILE)
    Trainer(load_recipe(run / "recipe.yaml"), run, resume=True, quiet=True).run()
    resumed_from = int(last.name.split("_")[1])
    a, c = read_jsonl(reference / "metrics.jsonl"), read_jsonl(run / "metrics.jsonl")
    keys = ("explore/revisited", "reward/test_novelty")
    assert [[r[k] for k in keys] for r in a[1:resumed_from + 1]] == [[r[k] for k in keys] for r in c[1:resumed_from + 1]]
    assert any([ra[k] for k in keys] != [rc[k] for k in keys] for ra, rc in zip(a[resumed_from + 1:], c[resumed_from + 1:]))


@pytest.mark.slow  # two real processes, ~20 s
def test_killed_run_with_stateful_pieces_resumes_to_identical_metrics(reference, tmp_path):
    killed_run_resumes_like(reference, write_recipe(tmp_path, **LIFECYCLE_OVERRIDES), tmp_path)


def test_unknown_plugin_is_one_line(tmp_path):
    from outrider.errors import OutriderError

    with pytest.raises(OutriderError, match="plugins: cannot import 'no_such_module' \\(ModuleNotFoundError"):
        load_recipe(write_recipe(tmp_path, plugins=["no_such_module"]))


def test_checkpoints_from_before_the_lifecycle_restore_the_entropy_regulator():
    """Such checkpoints kept only the regulator's state, as `regulator`; it is `update.entropy`'s now."""
    from outrider.trainer import piece_states

    assert piece_states({"regulator": {"anchor": 0.5}}) == {"update.entropy": {"anchor": 0.5}}
    assert piece_states({"regulator": {}}) == {}
    assert piece_states({"pieces": {"explore": {"stats": {}}}, "regulator": {"anchor": 1.0}}) == {
        "explore": {"stats": {}}}
