"""NaN and inf in the update: a non-finite loss or gradient skips the optimiser step (counted), a run stops with one
line after `train.max_nonfinite_steps` such steps in a row, no checkpoint holds non-finite parameters, and
non-finite score weights are refused by validation."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import call_main, learner_terms, read_jsonl, tiny_recipe, write_recipe
from outrider.credit import CREDIT, CreditOutput
from outrider.errors import OutriderError
from outrider.policy.model import Policy
from outrider.recipe import load_recipe, parse_recipe
from outrider.registry import Entry
from outrider.update import LOSSES
from outrider.update.learner import UpdateConfig, learner_step
from test_learner import small_batch

SKIPPED_NONFINITE = "update/skipped_nonfinite_steps"


def test_a_nan_loss_skips_the_optimiser_step():
    policy = Policy.tiny(hidden=32, layers=1, heads=2, seed=0)
    before = [p.detach().clone() for p in policy.parameters()]
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    cfg = UpdateConfig(epochs=2, minibatches=2)
    terms = learner_terms(LOSSES.build({"name": "ppo"}), cfg)
    batch = small_batch(policy)
    batch.advantages[0] = torch.where(batch.action_mask[0] > 0, torch.tensor(float("nan")), 0.0)
    metrics = learner_step(policy, opt, batch, terms, cfg, 1.0, torch.Generator().manual_seed(0), 8)
    # 2 epochs x 2 minibatches: row 0's minibatch is NaN in each epoch, the other one steps
    assert metrics[SKIPPED_NONFINITE] == 2.0
    for p, b in zip(policy.parameters(), before):
        assert torch.isfinite(p).all()
    assert any(not torch.equal(p, b) for p, b in zip(policy.parameters(), before))  # the finite ones stepped
    for state in opt.state.values():
        assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v))


def _nan_credit(batch, cfg) -> CreditOutput:
    """Advantages that are NaN on every action token (a diverged credit piece)."""
    nan = torch.full_like(batch.action_mask, float("nan"), dtype=torch.float32)
    return CreditOutput(torch.where(batch.action_mask > 0, nan, 0.0))


def test_run_stops_after_consecutive_nonfinite_updates_without_a_nonfinite_checkpoint(tmp_path, monkeypatch,
                                                                                      capsys):
    # registered for this test only: other tests compare the registry's names with a fresh process's
    grpo = CREDIT.get("grpo")
    monkeypatch.setitem(CREDIT._entries, "test_nan_credit", Entry("test_nan_credit", _nan_credit, grpo.config))
    write_recipe(tmp_path, "nan.yaml", credit={"name": "test_nan_credit"}, train={"steps": 8},
                 observe={"checkpoint_every": 1})
    run = tmp_path / "run"
    code, _, err = call_main(monkeypatch, capsys, "train", str(tmp_path / "nan.yaml"), "--out", str(run), "--quiet",
                             "--set", "train.max_nonfinite_steps=3")
    assert code == 2, err
    assert err.strip() == ("error: update: the loss or gradients were NaN/inf in 3 steps in a row (steps 1-3; each "
                           "update skipped), so the run stopped; newest checkpoint: step_2. Lower update.lr (now "
                           "0.001)")
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r[SKIPPED_NONFINITE] for r in rows[1:]] == [1.0, 1.0, 1.0]
    for name in ("step_0", "step_1", "step_2"):
        model = Policy.load(run / "checkpoints" / name)
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_no_checkpoint_of_nonfinite_parameters(tmp_path):
    from outrider.trainer import Trainer

    trainer = Trainer(parse_recipe(tiny_recipe()), tmp_path / "run")
    with torch.no_grad():
        next(trainer.policy.parameters())[0] = float("inf")
    with pytest.raises(OutriderError, match=r"parameters are not finite \(NaN/inf\) at step 4; no checkpoint"):
        trainer._checkpoint(4)
    assert not (tmp_path / "run" / "checkpoints" / "step_4").exists()


@pytest.mark.parametrize("weight", [".nan", ".inf", "-.inf"])
def test_nonfinite_score_weights_are_refused(tmp_path, weight):
    path = write_recipe(tmp_path)
    path.write_text(path.read_text().replace("weight: 1.0", f"weight: {weight}"))
    with pytest.raises(OutriderError) as e:
        load_recipe(path)
    assert str(e.value).startswith("score[0].weight: must be a finite number (got ")
    with pytest.raises(OutriderError, match=r"score\[0\].weight: must be a finite number"):
        load_recipe(write_recipe(tmp_path), [f"score.0.weight={weight}"])
    assert math.isfinite(load_recipe(write_recipe(tmp_path), ["score.0.weight=2"]).score[0]["weight"])


def test_effective_rank_of_a_diverged_model_is_nan_not_an_svd_error():
    from outrider.observe.diagnostics import effective_rank

    z = torch.eye(3)
    assert effective_rank(z) == pytest.approx(3.0)
    z[1, 1] = float("nan")
    assert math.isnan(effective_rank(z))
