"""RND [128] as a packed score component: running moments and the normalised error by hand, the bonus only on
action tokens, a predictor that learns, its state, and kill -9 + --resume."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

from conftest import read_jsonl, tiny_recipe
from outrider.data import Batch
from outrider.registry import BuildContext
from outrider.score import SCORE
from outrider.score.novelty import RunningMoments
from test_resume import RESUME_OVERRIDES, killed_run_resumes_like


def build(**options):
    entry, cfg = SCORE.build({"name": "rnd", "width": 8, "features": 4, **options}, "score[1]")
    return entry.create(cfg, BuildContext(where="score[1]"))


def batch(hidden: torch.Tensor, mask: torch.Tensor) -> Batch:
    b, t = mask.shape
    z = torch.zeros(b, t)
    return Batch(input_ids=torch.zeros(b, t, dtype=torch.long), attention_mask=torch.ones(b, t), action_mask=mask,
                 token_rewards=z, step_index=torch.zeros(b, t, dtype=torch.long),
                 group_index=torch.zeros(b, dtype=torch.long), sample_weight=torch.ones(b), hidden=hidden)


def test_running_moments_by_hand():
    m = RunningMoments(1)
    m.update(torch.tensor([[1.0], [2.0], [3.0]]))
    m.update(torch.tensor([[4.0], [5.0]]))
    assert float(m.mean[0]) == pytest.approx(3.0, abs=1e-3)  # the rows 1..5 together
    assert float(m.var[0]) == pytest.approx(2.0, abs=1e-3)  # their population variance
    m.update(torch.zeros(0, 1))  # an empty batch changes nothing
    assert float(m.mean[0]) == pytest.approx(3.0, abs=1e-3)


def test_error_normalises_and_clips_by_hand():
    piece = build()
    piece.target, piece.predictor = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        piece.target.weight.copy_(torch.tensor([[1.0, 0.0]]))
        piece.target.bias.zero_()
        piece.predictor.weight.zero_()
        piece.predictor.bias.zero_()
    piece.state_moments = RunningMoments(2)
    piece.state_moments.mean, piece.state_moments.var = torch.tensor([1.0, 0.0]), torch.tensor([4.0, 1.0])
    # (3 − 1)/2 = 1 → error 1²; (21 − 1)/2 = 10 → clipped to 5 → 25
    assert piece.errors(torch.tensor([[3.0, 9.0], [21.0, 0.0]])).tolist() == pytest.approx([1.0, 25.0])


def test_bonus_on_action_tokens_and_predictor_learns():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 8, generator=g)
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 0, 0, 0]], dtype=torch.float32)
    piece = build(lr=1e-2, update_proportion=1.0, normalize=False)
    rewards, metrics = piece(batch(hidden, mask))
    assert rewards.shape == mask.shape and bool((rewards[mask == 0] == 0).all()) and bool((rewards[mask > 0] > 0).all())
    first = metrics["rnd/raw_bonus"]
    for _ in range(30):
        _, metrics = piece(batch(hidden, mask))
    assert metrics["rnd/raw_bonus"] < 0.5 * first  # seen states become familiar
    target = [p.clone() for p in piece.target.parameters()]
    piece(batch(hidden, mask))
    assert all(torch.equal(a, b) for a, b in zip(target, piece.target.parameters()))  # the target never trains


def test_state_round_trips_to_identical_bonus():
    g = torch.Generator().manual_seed(1)
    hidden, mask = torch.randn(2, 4, 8, generator=g), torch.ones(2, 4)
    a = build()
    a(batch(hidden, mask))
    b = build(lr=0.5)  # different until loaded
    b.load_state_dict(a.state_dict())
    ra, _ = a(batch(hidden, mask))
    rb, _ = b(batch(hidden, mask))
    torch.testing.assert_close(ra, rb, rtol=0, atol=0)


@pytest.mark.slow  # two runs of 40 small steps and a killed one, ~40 s
def test_killed_rnd_run_resumes_to_identical_metrics(tmp_path):
    """Networks, optimiser, running moments and generator ride in checkpoints."""
    score = [{"name": "verifier", "weight": 1.0}, {"name": "rnd", "weight": 0.1, "width": 16, "features": 8}]
    scored_run_resumes(tmp_path, score, "rnd")


def scored_run_resumes(tmp_path, score: list[dict], name: str) -> list[dict]:
    """A tiny run with these score components logs ``<name>/raw_bonus`` and ``time/score/<name>_s`` every step
    and, killed with SIGKILL and resumed, ends bit-identical to itself unkilled; returns its logged rows."""
    from outrider.recipe import load_recipe
    from outrider.trainer import Trainer

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(**dict(RESUME_OVERRIDES, score=score)), sort_keys=False))
    reference = tmp_path / "A"
    Trainer(load_recipe(recipe), reference, quiet=True).run()
    rows = [r for r in read_jsonl(reference / "metrics.jsonl") if f"{name}/raw_bonus" in r]
    assert rows and all(f"time/score/{name}_s" in r for r in rows)
    killed_run_resumes_like(reference, recipe, tmp_path)
    return rows
