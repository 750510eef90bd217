"""Implicit PRM / PRIME [159] (score/implicit_prm.py, credit/prime.py) and stepsum's step checker: formulas against
hand-computed numbers, the piece training φ on outcome labels, its state surviving kill -9 + --resume."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import read_jsonl, write_recipe
from outrider.checkpoint import STATE_FILE, list_checkpoints
from outrider.credit import CREDIT
from outrider.data import Batch
from outrider.envs.stepsum import check_steps, split_steps
from outrider.policy.model import Policy
from outrider.recipe import load_recipe
from outrider.registry import BuildContext
from outrider.score import SCORE
from outrider.score.implicit_prm import implicit_ce_loss, implicit_rewards, step_rewards
from outrider.stats import masked_whiten
from outrider.trainer import Trainer
from test_resume import RESUME_OVERRIDES, killed_run_resumes_like


# --- the step checker ---------------------------------------------------------------------------------------------

def test_check_steps_finds_the_first_wrong_step():
    terms = [3, 5, 2, 4]  # running sums 8, 10, 14
    assert check_steps(terms, "8,10,14,#14").first_wrong is None
    assert check_steps(terms, "3+5=8,8+2=10,10+4=14,#14").correct == [True] * 4
    c = check_steps(terms, "8,11,15,#15")  # the second addition is wrong, the third carries it
    assert c.correct == [True, False, False, False] and c.first_wrong == 1
    assert check_steps(terms, "8,10,14,#15").first_wrong == 3  # only the answer step is wrong
    assert check_steps(terms, "3+5=8,8+3=11,11+4=15,#15").first_wrong == 1  # a wrong operand restated
    assert check_steps(terms, "8,10,14,18,#14").first_wrong == 3  # an extra step
    assert check_steps(terms, "8,#14").correct == [True, True]  # a skipped step: the steps written are right
    assert check_steps(terms, "").correct == [False] and check_steps(terms, "").first_wrong == 0
    assert len(check_steps(terms, "8,10,14,#14").correct) == len(split_steps("8,10,14,#14"))


# --- formulas -----------------------------------------------------------------------------------------------------

def test_implicit_rewards_and_ce_loss_by_hand():
    phi = torch.tensor([[0.0, -1.0, -2.0, -0.5], [0.0, -3.0, -1.0, 0.0]])
    ref = torch.tensor([[0.0, -2.0, -1.0, -0.5], [0.0, -1.0, -1.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    r = implicit_rewards(phi, ref, mask, beta=0.5)
    assert torch.equal(r, torch.tensor([[0.0, 0.5, -0.5, 0.0], [0.0, -1.0, 0.0, 0.0]]))
    # scores β·Σ q: row 0: 0.5·(1 − 1 + 0) = 0; row 1: 0.5·(−2) = −1; labels 1, 0
    loss = implicit_ce_loss(phi, ref, mask, torch.tensor([1.0, 0.0]), beta=0.5)
    expected = (-math.log(0.5) - math.log(1 - 1 / (1 + math.exp(1.0)))) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # φ = ref: every reward 0 and the loss log 2, whatever the labels
    assert float(implicit_rewards(ref, ref, mask, 0.05).abs().sum()) == 0.0
    assert float(implicit_ce_loss(ref, ref, mask, torch.tensor([1.0, 0.0]), 0.05)) == pytest.approx(math.log(2))


def test_step_rewards_are_differences_of_the_running_q():
    tokens = [0.1, 0.2, -0.4, 0.5, 0.0, -0.1]
    assert step_rewards(tokens, [2, 5, 6]) == pytest.approx([0.3, 0.1, -0.1])
    q = [sum(tokens[:e]) for e in (0, 2, 5, 6)]
    assert step_rewards(tokens, [2, 5, 6]) == pytest.approx([b - a for a, b in zip(q, q[1:])])
    assert step_rewards([], []) == []


def _batch(rewards, mask, groups) -> Batch:
    r = torch.tensor(rewards, dtype=torch.float32)
    B, T = r.shape
    return Batch(input_ids=torch.zeros(B, T, dtype=torch.long), attention_mask=torch.ones(B, T, dtype=torch.long),
                 action_mask=torch.tensor(mask, dtype=torch.float32), token_rewards=r,
                 step_index=torch.zeros(B, T, dtype=torch.long), group_index=torch.tensor(groups),
                 sample_weight=torch.ones(B))


def test_prime_credit_by_hand():
    entry, cfg = CREDIT.build({"name": "prime"})
    mask = [[0, 1, 1, 1], [0, 1, 1, 0], [1, 1, 0, 0]]
    rewards = [[9.0, 0.5, -0.5, 1.0], [0.0, -1.0, 0.0, 0.0], [2.0, 1.0, 0.0, 0.0]]  # 9 sits outside the mask
    out = entry.fn(_batch(rewards, mask, [0, 0, 1]), cfg)
    # group 0 (n = 2): implicit tokens (all but the last): row 0 (0.5, −0.5) mean 0, row 1 (−1) mean −1;
    #   r' = 2·r − (0 − 1)/1 → row 0: 2, 0; row 1: −1.  Last tokens 1 and 0: RLOO → 2·1 − 1 = 1, 2·0 − 1 = −1.
    # group 1 (n = 1) keeps its rewards: 2, 1.
    shaped = [[0.0, 2.0, 0.0, 1.0], [0.0, -1.0, -1.0, 0.0], [2.0, 1.0, 0.0, 0.0]]
    returns = torch.tensor([[0.0, 3.0, 1.0, 1.0], [0.0, -2.0, -1.0, 0.0], [3.0, 1.0, 0.0, 0.0]])
    assert returns.tolist() == [[sum(r[t:]) if mask[i][t] else 0.0 for t in range(4)] for i, r in enumerate(shaped)]
    expected = masked_whiten(returns, torch.tensor(mask, dtype=torch.float32))
    assert torch.allclose(out.advantages, expected, atol=1e-6)
    # on an outcome reward alone (last token) it is RLOO, whitened
    outcome = entry.fn(_batch([[0, 0, 1.0], [0, 0, 0.0], [0, 0, 1.0]], [[1, 1, 1]] * 3, [0, 0, 0]), cfg)
    rloo = torch.tensor([1.0, -1.0, 1.0]) * 3 / 2 - torch.tensor([2.0, 2.0, 2.0]) / 2  # R_i − mean of the others
    assert torch.allclose(outcome.advantages, masked_whiten(rloo[:, None].expand(3, 3), torch.ones(3, 3)), atol=1e-6)
    # a constant implicit reward per token pays nothing for length: every token's shaped reward is 0
    const = entry.fn(_batch([[-0.3] * 3 + [0.0] * 3, [-0.3] * 5 + [0.0]], [[1] * 4 + [0] * 2, [1] * 6], [0, 0]), cfg)
    assert float(const.advantages.abs().max()) < 1e-6


# --- the piece ----------------------------------------------------------------------------------------------------

def test_piece_trains_phi_toward_the_labels_and_keeps_the_reference():
    torch.manual_seed(0)
    policy = Policy.tiny(hidden=32, layers=1, seed=0)
    entry, cfg = SCORE.build({"name": "implicit_prm", "beta": 0.5, "lr": 1e-2, "updates": 1})
    piece = entry.create(cfg, BuildContext(None, policy, torch.device("cpu"), 0))
    ids = torch.tensor([[5, 10, 11, 12, 13], [5, 10, 14, 15, 16]])
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0, 1.0]])
    outcome = torch.zeros(2, 5)
    outcome[0, 4] = 1.0  # row 0 is correct, row 1 wrong
    batch = Batch(input_ids=ids, attention_mask=torch.ones_like(ids), action_mask=mask, token_rewards=outcome,
                  step_index=torch.zeros_like(ids), group_index=torch.tensor([0, 0]), sample_weight=torch.ones(2))
    rewards, metrics = piece(batch)
    assert float(rewards.abs().sum()) == 0.0 and metrics["prm/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["prm/label_mean"] == 0.5
    ref_before = {k: v.clone() for k, v in piece.reference.state_dict().items()}
    for _ in range(5):
        rewards, metrics = piece(batch)
    assert metrics["prm/loss"] < 0.6
    assert float(rewards[0].sum()) > 0 > float(rewards[1].sum())  # φ learnt which row was right
    assert float((rewards * (1 - mask)).abs().sum()) == 0.0  # nothing outside the trained tokens
    assert all(torch.equal(v, piece.reference.state_dict()[k]) for k, v in ref_before.items())
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in ref_before.items())  # the policy is untouched
    state = piece.state_dict()
    assert set(state) == {"phi", "reference", "optimizer"}
    fresh = entry.create(cfg, BuildContext(None, Policy.tiny(hidden=32, layers=1, seed=1), torch.device("cpu"), 0))
    fresh.load_state_dict(state)
    assert torch.equal(fresh(batch)[0], piece(batch)[0])


PRIME_OVERRIDES = dict(
    RESUME_OVERRIDES,
    score=RESUME_OVERRIDES["score"] + [{"name": "implicit_prm", "weight": 1.0, "beta": 0.5, "lr": 1e-3}],
    credit={"name": "prime"},
)


@pytest.fixture(scope="module")
def prime_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("prime")
    run = root / "A"
    Trainer(load_recipe(write_recipe(root, **PRIME_OVERRIDES)), run, quiet=True).run()
    return run


def test_prime_run_logs_the_prm_and_its_time(prime_reference):
    rows = [r for r in read_jsonl(prime_reference / "metrics.jsonl") if r["step"] > 0]
    assert all("time/score/implicit_prm_s" in r and "prm/loss" in r for r in rows)
    assert any(r["reward/implicit_prm"] != 0 for r in rows[1:])
    state = torch.load(list_checkpoints(prime_reference)[-1] / STATE_FILE, weights_only=False)
    assert set(state["pieces"]["score[2]"]) == {"phi", "reference", "optimizer"}


@pytest.mark.slow  # two real processes, ~25 s
def test_killed_prime_run_resumes_to_identical_metrics(prime_reference, tmp_path):
    killed_run_resumes_like(prime_reference, write_recipe(tmp_path, **PRIME_OVERRIDES), tmp_path)
