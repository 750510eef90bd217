"""RepExp [13] as a packed score component: the elliptical bonus by hand (leverage and leave-one-out, centring,
a group of one, identical rollouts, groups kept apart), the sparse projection's entries, the bonus on each
episode's last action token from the mean over its action tokens, the solved-group gate, its state, and
kill -9 + --resume."""

from __future__ import annotations

import math

import pytest
import torch

from outrider.data import Batch
from outrider.errors import OutriderError
from outrider.registry import BuildContext
from outrider.score import SCORE
from outrider.score.novelty import elliptical_bonuses, sparse_projection
from test_novelty import scored_run_resumes


def build(**options):
    entry, cfg = SCORE.build({"name": "repexp", "sparse_dim": 4, **options}, "score[1]")
    return entry.create(cfg, BuildContext(where="score[1]"))


def batch(hidden: torch.Tensor, mask: torch.Tensor, groups: list[int], rewards: list[float]) -> Batch:
    b, t = mask.shape
    token_rewards = torch.zeros(b, t)
    token_rewards[:, -1] = torch.tensor(rewards)
    return Batch(input_ids=torch.zeros(b, t, dtype=torch.long), attention_mask=torch.ones(b, t), action_mask=mask,
                 token_rewards=token_rewards, step_index=torch.zeros(b, t, dtype=torch.long),
                 group_index=torch.tensor(groups), sample_weight=torch.ones(b), hidden=hidden)


def test_leverage_and_leave_one_out_by_hand():
    # two rollouts at ±1 (mean 0): A = λ + 2 = 2.01, leverage 1/2.01; without the row itself A − 1 = 1.01
    x, g = torch.tensor([[1.0], [-1.0]]), torch.tensor([0, 0])
    assert elliptical_bonuses(x, g, 0.01).tolist() == pytest.approx([1 / 2.01, 1 / 2.01])
    assert elliptical_bonuses(x, g, 0.01, leave_one_out=True).tolist() == pytest.approx([1 / 1.01, 1 / 1.01])
    # three in 2-d, shifted by (5, 5): centred to (1,0), (-1,0), (0,0); A = diag(2.01, 0.01)
    x = torch.tensor([[6.0, 5.0], [4.0, 5.0], [5.0, 5.0]])
    assert elliptical_bonuses(x, torch.zeros(3, dtype=torch.long), 0.01).tolist() == pytest.approx(
        [1 / 2.01, 1 / 2.01, 0.0])
    # λ = 1, rows (2,0), (0,0) → centred (1,0), (−1,0): A = diag(3, 1), leverage 1/3
    x = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    assert elliptical_bonuses(x, torch.tensor([0, 0]), 1.0).tolist() == pytest.approx([1 / 3, 1 / 3])


def test_degenerate_groups_get_zero_and_groups_stay_apart():
    x = torch.tensor([[3.0, -1.0], [7.0, 2.0], [7.0, 2.0], [7.0, 2.0], [1.0, 0.0], [-1.0, 0.0]])
    g = torch.tensor([0, 1, 1, 1, 2, 2])
    for loo in (False, True):
        out = elliptical_bonuses(x, g, 0.01, leave_one_out=loo)
        assert out[:4].tolist() == [0.0, 0.0, 0.0, 0.0]  # a group of one; identical rollouts
        assert out[4:].tolist() == pytest.approx([1 / 2.01] * 2 if not loo else [1 / 1.01] * 2)


def test_sparse_projection_entries():
    width, dim = 400, 8
    p = sparse_projection(width, dim, torch.Generator().manual_seed(0))
    s = math.sqrt(width)
    value = math.sqrt(s / dim)
    assert p.shape == (width, dim) and p.dtype == torch.float64
    assert all(v == 0.0 or v == pytest.approx(value) for v in p.abs().unique().tolist())
    assert float((p != 0).double().mean()) == pytest.approx(1 / s, abs=0.02)  # density 1/√width
    assert float(p.sum()) == pytest.approx(0.0, abs=8 * value * math.sqrt(width * dim / s))


def test_bonus_on_last_action_token_from_mean_over_action_tokens():
    torch.manual_seed(0)
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1], [0, 1, 0, 0], [0, 1, 1, 1]], dtype=torch.float)
    hidden = torch.randn(4, 4, 6)
    piece = build(new_projection_each_step=False)
    out, metrics = piece(batch(hidden, mask, [0, 0, 0, 1], [1.0, 0.0, 0.0, 1.0]))
    assert out.shape == mask.shape
    assert out.nonzero().tolist() == [[0, 2], [1, 3], [2, 1]]  # last action token; row 3 is a group of one
    mean = torch.stack([hidden[i][mask[i] > 0].mean(0) for i in range(4)]).double()
    expected = elliptical_bonuses(mean @ piece.projection, torch.tensor([0, 0, 0, 1]), 0.01)
    assert [out[0, 2], out[1, 3], out[2, 1]] == pytest.approx(expected[:3].tolist(), rel=1e-5)
    assert metrics["repexp/active_frac"] == pytest.approx(0.75)
    # what sits on non-action tokens does not matter
    hidden2 = hidden.clone()
    hidden2[mask == 0] = 100.0
    assert torch.allclose(piece(batch(hidden2, mask, [0, 0, 0, 1], [1.0, 0.0, 0.0, 1.0]))[0], out)


def test_groups_without_a_correct_rollout_get_no_bonus_unless_asked():
    torch.manual_seed(1)
    mask, hidden = torch.ones(4, 3), torch.randn(4, 3, 6)
    gated, _ = build()(batch(hidden, mask, [0, 0, 1, 1], [0.0, 0.0, 1.0, 0.0]))
    assert gated[:2].abs().sum() == 0 and gated[2:].abs().sum() > 0
    ungated, _ = build(only_solved_groups=False)(batch(hidden, mask, [0, 0, 1, 1], [0.0, 0.0, 1.0, 0.0]))
    assert (ungated[:, -1] > 0).all()


def test_state_round_trips_to_identical_bonus():
    torch.manual_seed(2)
    b = batch(torch.randn(4, 3, 6), torch.ones(4, 3), [0, 0, 1, 1], [1.0, 0.0, 1.0, 0.0])
    a = build()
    a(b)
    state = a.state_dict()
    c = build()
    c.load_state_dict(state)
    assert torch.equal(a(b)[0], c(b)[0])


def test_bad_bonus_kind_is_one_line_error():
    with pytest.raises(OutriderError, match="bonus"):
        SCORE.build({"name": "repexp", "bonus": "volume"}, "score[1]")


@pytest.mark.slow  # two runs of 40 small steps and a killed one
def test_killed_repexp_run_resumes_to_identical_metrics(tmp_path):
    """The projection's generator rides in checkpoints."""
    score = [{"name": "verifier", "weight": 1.0}, {"name": "repexp", "weight": 0.5, "sparse_dim": 8,
                                                    "only_solved_groups": False}]
    rows = scored_run_resumes(tmp_path, score, "repexp")
    assert any(r["repexp/raw_bonus"] > 0 for r in rows)
