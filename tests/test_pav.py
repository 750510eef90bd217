"""PAV [139] (`score/pav.py`) with a scripted prover against hand-computed progress, the credit that keeps its step
rewards on their steps (`credit/dense.py`), its prover's one-line errors, and a kill -9 + `--resume` run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from outrider.credit import CREDIT
from outrider.data import Batch, Episode, Turn
from outrider.errors import OutriderError
from outrider.registry import BuildContext
from outrider.score import SCORE
from outrider.score.pav import dense_rewards, progress, step_spans

CHARS = SimpleNamespace(decode=lambda ids: "".join(chr(i) for i in ids),
                        tokenizer=SimpleNamespace(get_vocab=lambda: {"a": 0}))


def episode(text: str, reward: float, seed: int = 7) -> Episode:
    ids = [ord(c) for c in text]
    return Episode(group_id=0, seed=seed, turns=[Turn("p", [1], text, ids, reward=reward)])


def pav(scripted: dict[str, float] | None = None, **options):
    """A `pav` piece over character 'tokens' whose prover is the table ``prefix text -> V^μ``; it records calls."""
    piece = SCORE.create({"name": "pav", "prover": "unused", **options}, BuildContext(policy=CHARS), where="score[1]")
    piece.calls = []

    def estimate(prefixes):
        piece.calls.append(prefixes)
        return [scripted["".join(chr(i) for i in ids)] for _, ids in prefixes]

    piece.estimate = estimate
    return piece


def test_steps_progress_and_placement():
    assert step_spans(list("8,17,#25"), ",") == [(0, 2), (2, 5), (5, 8)]
    assert step_spans(list("8,17,"), ",") == [(0, 2), (2, 5)]
    assert step_spans([], ",") == []
    assert progress([0.5, 0.75, 0.25, 0.0]) == [0.25, -0.5, -0.25]
    # step h's advantage on each of its tokens, the last token left to the outcome
    assert dense_rewards([0.25, -0.5], [(0, 2), (2, 4)], 4) == [0.25, 0.25, -0.5, 0.0]


def test_progress_under_a_scripted_prover():
    # V^μ: prompt 0.5; after "8," 0.75 (a right first step); after "8,17," 0.25 (a wrong one); the answer is wrong (0)
    piece = pav({"": 0.5, "8,": 0.75, "8,17,": 0.25, "8,9,": 0.9})
    wrong, right = episode("8,17,#17", 0.0), episode("8,9,#17", 1.0)
    out = piece([wrong, right])
    assert out[0] == [0.25, 0.25, -0.5, -0.5, -0.5, -0.25, -0.25, 0.0]
    assert out[1] == pytest.approx([0.25, 0.25, 0.15, 0.15, 0.1, 0.1, 0.0])
    # identical prefixes (the prompt, the shared first step) are estimated once, in one call
    assert len(piece.calls) == 1 and sorted(len(ids) for _, ids in piece.calls[0]) == [0, 2, 4, 5]
    m = piece.step_metrics()
    assert m["pav/steps_per_episode"] == 3.0
    assert m["pav/abs_advantage"] == pytest.approx((0.25 + 0.5 + 0.25 + 0.25 + 0.15 + 0.1) / 6)
    assert "time/score/pav_s" in m and piece.step_metrics()["pav/steps_per_episode"] == 0.0  # reset per step


def test_a_response_without_steps_and_the_sum_telescopes():
    piece = pav({"": 0.3, "1,": 0.6})
    assert piece([episode("", 0.0)]) == [[]]
    out = piece([episode("1,2", 1.0)])[0]
    assert out == pytest.approx([0.3, 0.3, 0.0])  # the last step's 0.4 has only the last token, the outcome's


def test_the_prover_must_exist_and_share_the_tokenizer(tmp_path):
    from outrider.policy.model import Policy

    piece = SCORE.create({"name": "pav", "prover": str(tmp_path / "none")}, BuildContext(), where="score[1]")
    with pytest.raises(OutriderError, match=r"^score\[1\]\.prover: no model directory at .*none") as e:
        piece._load_prover()
    assert "\n" not in str(e.value)
    Policy.tiny(hidden=16, layers=1, heads=2).save(tmp_path / "mu")
    piece = SCORE.create({"name": "pav", "prover": str(tmp_path / "mu")}, BuildContext(policy=CHARS), where="score[1]")
    with pytest.raises(OutriderError, match=r"^score\[1\]\.prover: .* another tokenizer"):
        piece._load_prover()


def test_outcome_plus_dense_by_hand():
    # rows 0, 1 one group: outcome on the last trained token (1 and 0), dense rewards before it
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.float)
    rewards = torch.tensor([[9.0, 0.2, -0.1, 1.0], [9.0, 0.3, 0.0, 7.0], [0.0, 0.5, 0.5, 2.0]])
    B, T = mask.shape
    batch = Batch(input_ids=torch.zeros(B, T, dtype=torch.long), attention_mask=torch.ones(B, T, dtype=torch.long),
                  action_mask=mask, token_rewards=rewards, step_index=torch.zeros(B, T, dtype=torch.long),
                  group_index=torch.tensor([0, 0, 1]), sample_weight=torch.ones(B))
    out = CREDIT.create({"name": "outcome_plus_dense", "std_normalize": False})(batch)
    # group 0: outcomes 1 and 0 (row 1's last trained token is position 2), centred ±0.5; row 2 alone: A = 2
    want = torch.tensor([[0, 0.7, 0.4, 0.5], [0, -0.2, -0.5, 0], [0, 2.5, 2.5, 2.0]])
    assert torch.allclose(out.advantages, want, atol=1e-6)
    z = CREDIT.create({"name": "outcome_plus_dense"})(batch).advantages
    s = 1 / (2 ** 0.5 + 1e-6)  # (1 − 0.5)/std with the unbiased std of (1, 0)
    assert z[0, 3].item() == pytest.approx(s, abs=1e-5) and z[1, 1].item() == pytest.approx(0.3 - s, abs=1e-5)


@pytest.mark.slow  # a reference run and a killed + resumed one, MC rollouts of a tiny prover every step
def test_killed_pav_run_resumes_to_identical_metrics(tmp_path):
    from conftest import write_recipe
    from outrider.policy.model import Policy
    from outrider.recipe import load_recipe
    from outrider.trainer import Trainer
    from test_resume import RESUME_OVERRIDES, killed_run_resumes_like

    Policy.tiny(hidden=32, layers=1, heads=2, seed=1).save(tmp_path / "prover")
    overrides = dict(RESUME_OVERRIDES, credit={"name": "outcome_plus_dense"}, score=RESUME_OVERRIDES["score"] + [
        {"name": "pav", "weight": 0.5, "prover": str(tmp_path / "prover"), "rollouts": 2, "delimiter": "+",
         "max_new_tokens": 4}])
    recipe = write_recipe(tmp_path, **overrides)
    Trainer(load_recipe(recipe), tmp_path / "A", quiet=True).run()
    killed_run_resumes_like(tmp_path / "A", recipe, tmp_path)
