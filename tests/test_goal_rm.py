"""Goal-conditioned contrastive reward-model representations [87]: the loss against hand-computed numbers on
hand-made vectors (degenerate cases: a prefix that is the whole response, one pair), the position sampling, Q,
the early-abort majority vote, and the option of `outrider rm train` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import call_main
from outrider.score.goal_rm import (contrastive_term, early_abort_vote, first_below, gather, goal_contrastive_loss,
                                    majority_vote, q_values, sample_offsets, uniform_offsets)
from outrider.score.reward_model import RewardModel


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_loss_one_pair_one_sample_hand_computed():
    # cos(s, g) = 1 (same direction), cos(s', n) = 0 (orthogonal): −log σ(1) − log(1 − σ(0)) = 0.3132617 + log 2
    loss = goal_contrastive_loss(t([[[1, 0]]]), t([[[2, 0]]]), t([[[1, 0]]]), t([[[0, 3]]]))
    assert float(loss) == pytest.approx(0.3132617 + math.log(2), abs=1e-6)


def test_loss_bounds_best_and_worst_case():
    a, b = t([[[1, 0]]]), t([[[-1, 0]]])
    best = goal_contrastive_loss(a, a, a, b)  # positives aligned, negatives opposite
    worst = goal_contrastive_loss(a, b, a, a)
    assert float(best) == pytest.approx(-2 * math.log(sig(1)), abs=1e-6)  # 0.6265234
    assert float(worst) == pytest.approx(-2 * math.log(sig(-1)), abs=1e-6)  # 2.6265234


def test_loss_averages_sigmoids_over_the_grid_and_batch_before_the_log():
    # one row, S = 2: positives cos = [[1, 0], [0, 1]] → mean σ = (2σ(1) + 2·½)/4; negatives all cos −1
    s, g = t([[[1, 0], [0, 1]]]), t([[[1, 0], [0, 1]]])
    neg = t([[[1, 0], [1, 0]]])
    n = t([[[-1, 0], [-2, 0]]])
    expected = -math.log((2 * sig(1) + 1) / 4) - math.log(1 - sig(-1))
    assert float(goal_contrastive_loss(s, g, neg, n)) == pytest.approx(expected, abs=1e-6)


def test_loss_gradient_pulls_source_toward_goal():
    s = torch.tensor([[[1.0, 1.0]]], requires_grad=True)
    goal_contrastive_loss(s, t([[[1, 0]]]), t([[[0, 1]]]), t([[[1, 0]]])).backward()
    # rotating s toward (1, 0) lowers the loss: the gradient along x is negative, along y positive
    assert s.grad[0, 0, 0] < 0 < s.grad[0, 0, 1]


def test_offsets_stay_in_the_response_and_the_source_never_follows_the_goal():
    n = torch.tensor([1, 3, 7])
    src, goal = sample_offsets(n, 200, torch.Generator().manual_seed(0))
    assert (src >= goal).all() and (goal >= 0).all() and (src <= (n - 1).unsqueeze(1)).all()
    assert (src[0] == 0).all()  # a one-position response: every draw is its last position
    assert set(src[2].tolist()) == set(range(7))
    u = uniform_offsets(n, 200, torch.Generator().manual_seed(1))
    assert (u >= 0).all() and (u <= (n - 1).unsqueeze(1)).all()


def test_gather_reads_positions_counted_from_each_rows_last():
    h = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)  # row 0: 0..3, row 1: 4..7
    out = gather(h, torch.tensor([3, 1]), torch.tensor([[0, 2], [1, 0]]))
    assert out.squeeze(-1).tolist() == [[3.0, 1.0], [4.0, 5.0]]


def test_prefix_that_is_the_whole_response_and_one_pair():
    # one-position responses (a prefix that is the whole response): every draw is the last state, so the
    # positive term compares the final state with itself: −log σ(1); the negative one the two final states
    hc = t([[[9, 9], [1, 2]]])  # position 0 is the prompt's, never drawn
    hr = t([[[9, 9], [-2, 1]]])  # orthogonal to the chosen final state
    last, n = torch.tensor([1]), torch.tensor([1])
    loss = contrastive_term(hc, last, n, hr, last, n, 4, torch.Generator().manual_seed(0))
    assert float(loss) == pytest.approx(-math.log(sig(1)) + math.log(2), abs=1e-6)
    # Q of the whole response against a goal equal to its final state is 1
    assert float(q_values(hc[0, 1], hc[0, 1])) == pytest.approx(1.0)


def test_q_values_are_cosines_over_any_leading_shape():
    h = t([[[3, 4], [0, 1]], [[-1, 0], [1, 1]]])
    q = q_values(h, t([1, 0]))
    assert q.shape == (2, 2) and q.flatten().tolist() == pytest.approx([0.6, 0.0, -1.0, 1 / math.sqrt(2)], abs=1e-6)


def test_majority_vote_and_early_abort():
    assert majority_vote(["5", "6", "6", None], [True] * 4) == "6"
    assert majority_vote(["5", "6", "6", None], [True, False, False, True]) == "5"
    assert majority_vote(["5", "6"], [False, False]) == "5"  # none kept: all vote, the first seen wins a tie
    assert majority_vote([None, None], [True, True]) is None
    assert first_below([0.5, 0.2, 0.9], 0.3) == 1 and first_below([0.5], 0.3) is None
    q = [[0.9, 0.8, 0.7], [0.9, 0.1, 0.9, 0.9], [0.2, 0.9], [0.9, 0.1]]
    # threshold 0.5 over the first 2 positions: samples 1, 2, 3 cut at 1, 0, 1 (3 + 2 + 1 tokens saved)
    vote, saved, total = early_abort_vote(["7", "8", "8", "8"], q, 0.5, [2, 2, 2, 2])
    assert (vote, saved, total) == ("7", 6, 11)
    # the filter sees only the first position: samples 1 and 3 are kept and the vote flips
    assert early_abort_vote(["7", "8", "8", "8"], q, 0.5, [1, 1, 1, 1])[:2] == ("8", 2)
    # everything dropped: the vote falls back to every sample and nothing counts as saved
    assert early_abort_vote(["7", "8"], [[0.1], [0.1]], 0.5, [1, 1]) == ("7", 0, 2)


def test_rm_train_contrastive_option_saves_a_goal_state_and_q_ranks_prefixes(tmp_path, monkeypatch, capsys):
    rows = [{"prompt": f"{i}+{i}=", "chosen": f"77{i}", "rejected": f"33{i}"} for i in range(16)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rm"
    code, stdout, err = call_main(monkeypatch, capsys, "rm", "train", str(data), "--out", str(out), "--hidden",
                                  "16", "--layers", "1", "--heads", "2", "--epochs", "3", "--batch-size", "8",
                                  "--lr", "3e-3", "--heldout", "0.25", "--contrastive", "0.5",
                                  "--contrastive-samples", "4", "--threads", "1", "--quiet")
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["contrastive"] == 0.5 and len(summary["goal_state"]) == 16
    rm = RewardModel.load(out)
    goal = torch.tensor(rm.meta["goal_state"])
    _, hidden, last = rm.forward_hidden([rm.encode("5+5=", "775"), rm.encode("5+5=", "335")])
    q = q_values(hidden[torch.arange(2), last], goal)
    assert q[0] > q[1]
    # a labelled-responses file has no pairs for the contrastive term: one line naming the option
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"prompt": "q", "response": "a", "label": 1}) + "\n")
    code, _, err = call_main(monkeypatch, capsys, "rm", "train", str(labels), "--out", str(tmp_path / "rm2"),
                             "--contrastive", "0.5", "--quiet")
    assert code == 2 and "--contrastive" in err and len(err.strip().splitlines()) == 1


def test_plain_bt_training_is_unchanged_by_the_option_at_zero(tmp_path):
    from outrider.loops.offline import Pair
    from outrider.policy.model import Policy
    from outrider.score.rm_training import TrainConfig, train

    torch.set_num_threads(1)
    pairs = [Pair(f"{i}", f"7{i}", f"3{i}") for i in range(8)]
    runs = []
    for cfg in (TrainConfig(epochs=1, batch_size=4, heldout=0.0), TrainConfig(epochs=1, batch_size=4, heldout=0.0,
                                                                               contrastive=0.0)):
        rm = RewardModel(Policy.tiny(hidden=16, layers=1, heads=2, value_head=True))
        runs.append((train(rm, "pairs", pairs, cfg), rm.rewards(["1"], ["71"])))
    assert runs[0][1] == runs[1][1] and "goal_state" not in runs[0][0]
