"""Global × episodic bonuses [130]: episodic counts and the elliptical bonus by hand (first visit, one state
repeated), the tabular product over two steps, the RND × episodic factor on packed tokens, the missing-state_key
error, state, and kill -9 + --resume."""

from __future__ import annotations

import math

import pytest
import torch

from outrider.data import Batch, Episode, Turn
from outrider.errors import OutriderError
from outrider.registry import BuildContext
from outrider.score import SCORE
from outrider.score.episodic import elliptical_episodic, episodic_counts, inverse_sqrt


def build(name: str, **options):
    entry, cfg = SCORE.build({"name": name, **options}, "score[1]")
    return entry.create(cfg, BuildContext(where="score[1]"))


def episode(keys: list, group: int = 0) -> Episode:
    turns = [Turn(observation="o", observation_ids=[1], action="a", action_ids=[2], info={"state_key": k})
             for k in keys]
    return Episode(seed=0, turns=turns, group_id=group)


def test_episodic_counts_by_hand():
    assert episodic_counts([]) == []
    assert episodic_counts(["a"]) == [1]  # a first visit
    assert episodic_counts(["a", "a", "a"]) == [1, 2, 3]  # one state repeated
    assert episodic_counts(["a", "b", "a", None, "b"]) == [1, 1, 2, 0, 2]  # no key: 0
    assert [inverse_sqrt(n) for n in (0, 1, 4)] == [0.0, 1.0, 0.5]


def test_elliptical_by_hand():
    # φ = (3, 4), |φ|² = 25, λ = 0.1: first visit 25/0.1 = 250; the same φ again 25/(0.1 + 25)
    b = elliptical_episodic(torch.tensor([[3.0, 4.0], [3.0, 4.0]]), 0.1)
    assert b.tolist() == pytest.approx([250.0, 25 / 25.1])
    # an orthogonal second state is as new as the first: (0, 2) → 4/0.1
    b = elliptical_episodic(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), 0.1)
    assert b.tolist() == pytest.approx([10.0, 40.0])
    # against a direct solve, random features
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    direct = [float(x[k] @ torch.linalg.solve(0.5 * torch.eye(3, dtype=torch.float64) + x[:k].T @ x[:k], x[k]))
              for k in range(5)]
    assert elliptical_episodic(x, 0.5).tolist() == pytest.approx(direct)


def test_state_count_product_over_two_steps_by_hand():
    piece = build("state_count")
    # step 1: a visited 3 times in the batch (twice in the first episode), b once
    out = piece([episode(["a", "a", "b"]), episode(["a"], group=1)])
    assert out[0] == pytest.approx([1 / math.sqrt(3) * 1, 1 / math.sqrt(3) / math.sqrt(2), 1.0])
    assert out[1] == pytest.approx([1 / math.sqrt(3)])
    # step 2: the counts carry over: a now 4, c new
    out = piece([episode(["c", "a"])])
    assert out[0] == pytest.approx([1.0, 0.5])
    assert piece.state_dict()["counts"] == {"a": 4, "b": 1, "c": 1}


def test_state_count_factors_switch_off():
    glob = build("state_count", episodic_bonus="none")
    assert glob([episode(["a", "a"])])[0] == pytest.approx([1 / math.sqrt(2)] * 2)
    epi = build("state_count", global_bonus="none")
    assert epi([episode(["a", "a", "a"])])[0] == pytest.approx([1.0, 1 / math.sqrt(2), 1 / math.sqrt(3)])
    assert epi([episode(["a", None])])[0] == [1.0, 0.0]  # a turn with no state gets nothing


def test_state_count_without_state_key_is_one_line_error():
    with pytest.raises(OutriderError, match="state_key"):
        build("state_count")([episode([None, None])])


def test_state_count_state_round_trips():
    a = build("state_count")
    a([episode([(1, 2), (1, 2)])])
    b = build("state_count")
    b.load_state_dict(a.state_dict())
    assert a([episode([(1, 2)])]) == b([episode([(1, 2)])])


def packed(step: list[list[int]], mask: list[list[int]], state_ids: list[list[int]], hidden: torch.Tensor) -> Batch:
    m = torch.tensor(mask, dtype=torch.float32)
    b, t = m.shape
    return Batch(input_ids=torch.zeros(b, t, dtype=torch.long), attention_mask=torch.ones(b, t), action_mask=m,
                 token_rewards=torch.zeros(b, t), step_index=torch.tensor(step),
                 group_index=torch.zeros(b, dtype=torch.long), sample_weight=torch.ones(b), hidden=hidden,
                 turn_state_ids=torch.tensor(state_ids))


def test_rnd_episodic_count_factor_by_hand():
    """Row 0: turns in states 5, 5, 7 (two action tokens each) → factors 1, 1/√2, 1; row 1: one turn, then
    padding. The rewards are RND's own (same networks, same draws) times these factors."""
    step = [[0, 0, 0, 1, 1, 1, 2, 2, 2], [0, 0, 0, -1, -1, -1, -1, -1, -1]]
    mask = [[0, 1, 1, 0, 1, 1, 0, 1, 1], [0, 1, 1, 0, 0, 0, 0, 0, 0]]
    hidden = torch.randn(2, 9, 8, generator=torch.Generator().manual_seed(0))
    batch = packed(step, mask, [[5, 5, 7], [5, -1, -1]], hidden)
    gxe, rnd = build("rnd_episodic", width=8, features=4), build("rnd", width=8, features=4)
    rewards, metrics = gxe(batch)
    plain, _ = rnd(batch)
    f = 1 / math.sqrt(2)
    factor = torch.tensor([[1, 1, 1, f, f, f, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.float32)
    torch.testing.assert_close(rewards, plain * factor)
    assert set(metrics) == {"rnd_episodic/raw_bonus", "rnd_episodic/predictor_loss", "rnd_episodic/episodic_factor"}
    assert metrics["rnd_episodic/episodic_factor"] == pytest.approx((4 + 2 * f + 2) / 8)  # 8 action tokens


def test_rnd_episodic_elliptical_by_hand():
    """The first turn of an episode has C = λI, so its factor is |φ|²/λ, φ the state at the turn's first action
    token normalised by the moments of earlier steps (fresh here); both turns are in the same state, so the second
    gets |φ|²/(λ + |φ|²)."""
    step, mask = [[0, 0, 1, 1]], [[0, 1, 0, 1]]
    state = torch.zeros(8)
    state[:2] = torch.tensor([0.3, 0.4])
    hidden = torch.stack([torch.full((8,), 9.0), state, torch.full((8,), 9.0), state])[None]
    gxe = build("rnd_episodic", width=8, features=4, episodic="elliptical", ridge=0.5)
    rnd = build("rnd", width=8, features=4)
    batch = packed(step, mask, [[-1, -1]], hidden)
    phi = ((state - gxe.state_moments.mean) / gxe.state_moments.var.sqrt()).clamp(-5, 5)
    sq = float(phi @ phi)
    rewards, _ = gxe(batch)
    plain, _ = rnd(batch)
    torch.testing.assert_close(rewards[0, [1, 3]], plain[0, [1, 3]] * torch.tensor([sq / 0.5, sq / (0.5 + sq)]))


def test_rnd_episodic_count_without_state_key_is_one_line_error():
    batch = packed([[0, 0]], [[0, 1]], [[-1]], torch.zeros(1, 2, 8))
    with pytest.raises(OutriderError, match="state_key"):
        build("rnd_episodic", width=8, features=4)(batch)


def bandit_run(tmp_path, component: dict):
    """A bandit run (its env names its states) with this bonus beside the verifier, and its recipe."""
    import yaml

    from conftest import tiny_recipe
    from outrider.recipe import load_recipe
    from outrider.trainer import Trainer
    from test_resume import RESUME_OVERRIDES

    r = tiny_recipe(**{k: v for k, v in RESUME_OVERRIDES.items() if k != "score"})
    r["task"] = {"name": "bandit", "arms": 3, "pulls": 6, "eval_size": 16}
    r["policy"]["max_positions"] = 128
    r["explore"] = {"name": "group", "prompts_per_step": 3, "group_size": 2, "max_new_tokens": 2}
    r["score"] = [{"name": "verifier", "weight": 1.0}, component]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(r, sort_keys=False))
    reference = tmp_path / "A"
    Trainer(load_recipe(recipe), reference, quiet=True).run()
    return recipe, reference


@pytest.mark.slow  # two runs of 40 small steps and a killed one, ~40 s
def test_killed_rnd_episodic_run_resumes_to_identical_metrics(tmp_path):
    """RND's networks, optimiser, moments and generator ride in checkpoints; the episodic factor is per episode."""
    from conftest import read_jsonl
    from test_resume import killed_run_resumes_like

    recipe, reference = bandit_run(tmp_path, {"name": "rnd_episodic", "weight": 0.1, "width": 16, "features": 8})
    rows = [r for r in read_jsonl(reference / "metrics.jsonl") if "rnd_episodic/raw_bonus" in r]
    assert rows and all("time/score/rnd_episodic_s" in r for r in rows)
    assert all(0 < r["rnd_episodic/episodic_factor"] <= 1 for r in rows)
    killed_run_resumes_like(reference, recipe, tmp_path)


@pytest.mark.slow  # two runs of 40 small steps and a killed one, ~40 s
def test_killed_state_count_run_resumes_to_identical_metrics(tmp_path):
    """The run's global counts ride in checkpoints."""
    import torch

    from outrider.checkpoint import STATE_FILE, list_checkpoints
    from test_resume import killed_run_resumes_like

    recipe, reference = bandit_run(tmp_path, {"name": "state_count", "weight": 0.1})
    pieces = torch.load(list_checkpoints(reference)[-1] / STATE_FILE, weights_only=False)["pieces"]
    assert len(pieces["score[1]"]["counts"]) > 3
    killed_run_resumes_like(reference, recipe, tmp_path)
