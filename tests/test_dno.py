"""Batched on-policy preference rounds (`loop: dno`, DNO [48]) and online DPO (`preference_pairs` under the rl
loop): the round's reference is the round's starting policy, the round's pairs ride in checkpoints, and a run
killed mid-round resumes bit-identically."""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import read_jsonl, write_recipe
from outrider.checkpoint import STATE_FILE, list_checkpoints
from outrider.policy.model import Policy
from outrider.recipe import load_recipe
from outrider.trainer import Trainer
from test_resume import RESUME_OVERRIDES, STEPS, killed_run_resumes_like

DNO_OVERRIDES = dict(
    RESUME_OVERRIDES,
    explore={"name": "preference_pairs", "prompts_per_step": 4, "group_size": 4},
    loop={"name": "dno", "round_steps": 3},
    update={"loss": "none", "terms": [{"name": "dpo", "beta": 0.5}], "lr": 3.0e-3},
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("dno")
    run = root / "A"
    Trainer(load_recipe(write_recipe(root, **DNO_OVERRIDES)), run, quiet=True).run()
    return run


def test_rounds_sample_once_and_refresh_the_reference(reference):
    rows = read_jsonl(reference / "metrics.jsonl")[1:]
    assert [r["dno/round"] for r in rows[:7]] == [0, 0, 0, 1, 1, 1, 2]
    starts = [r for r in rows if (r["step"] - 1) % 3 == 0]
    assert all("explore/pairs" in r and r["throughput/sample_tok_s"] > 0 for r in starts)
    assert all("explore/pairs" not in r and r["throughput/sample_tok_s"] == 0 for r in rows if r not in starts)
    with_pairs = [r for r in starts if r["dpo/pairs"] > 0]
    assert len(with_pairs) > 5
    # at a round's first step the policy is its own reference: zero log-ratio, zero margin
    assert all(abs(r["dpo/margin"]) < 1e-6 and abs(r["policy/kl"]) < 1e-6 for r in with_pairs)
    assert any(abs(r["dpo/margin"]) > 1e-3 for r in rows if r not in starts and r["dpo/pairs"] > 0)
    state = torch.load(list_checkpoints(reference)[-1] / STATE_FILE, weights_only=False)
    assert set(state["pieces"]) == {"loop"} and state["pieces"]["loop"]["batch"]["preference"].abs().sum() > 0


def test_initial_reference_is_the_warm_start(tmp_path):
    recipe = write_recipe(tmp_path, **dict(DNO_OVERRIDES, loop={"name": "dno", "round_steps": 3,
                                                                 "reference": "initial"}, train={"steps": 9}))
    Trainer(load_recipe(recipe), tmp_path / "run", quiet=True).run()
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")[1:]
    assert abs(rows[0]["policy/kl"]) < 1e-6 and rows[3]["policy/kl"] > 1e-4 and rows[6]["policy/kl"] > 1e-4


def test_resuming_without_the_rounds_pairs_changes_the_run(reference, tmp_path):
    """The resume comparison below is not vacuous: a run resumed mid-round without the round's batch samples a
    new one and goes elsewhere."""
    run = tmp_path / "C"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "checkpoints" / f"step_{STEPS}")
    (run / "summary.json").unlink()
    last = list_checkpoints(run)[-1]
    assert int(last.name.split("_")[1]) % 3 != 0  # the next step is mid-round
    state = torch.load(last / STATE_FILE, weights_only=False)
    state["pieces"] = {}
    torch.save(state, last / STATE_FILE)
    Trainer(load_recipe(run / "recipe.yaml"), run, resume=True, quiet=True).run()
    a, c = read_jsonl(reference / "metrics.jsonl"), read_jsonl(run / "metrics.jsonl")
    resumed = int(last.name.split("_")[1])
    assert "explore/pairs" in c[resumed + 1] and "explore/pairs" not in a[resumed + 1]  # it sampled again
    wa, wc = (Policy.load(d / "checkpoints" / f"step_{STEPS}") for d in (reference, run))
    assert any(not torch.equal(x, y) for x, y in zip(wa.parameters(), wc.parameters()))


@pytest.mark.slow  # two real processes, ~20 s
def test_killed_dno_run_resumes_mid_round_to_identical_metrics(reference, tmp_path):
    killed_run_resumes_like(reference, write_recipe(tmp_path, **DNO_OVERRIDES), tmp_path)


def test_dno_without_terms_is_one_line(tmp_path):
    from outrider.errors import OutriderError

    recipe = write_recipe(tmp_path, **dict(DNO_OVERRIDES, update={"loss": "none"}))
    with pytest.raises(OutriderError, match="loop dno: update.terms is empty"):
        Trainer(load_recipe(recipe), tmp_path / "run", quiet=True)
