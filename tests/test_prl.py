"""PRL [162] (credit/prl.py): segment ends, the suffix log-ratio and the advantage against hand-computed numbers and
against a transcription of the authors' verl code; a run with the piece makes and uses a frozen reference."""

from __future__ import annotations

import pytest
import torch

from conftest import read_jsonl, write_recipe
from outrider.credit import CREDIT
from outrider.credit.prl import segment_end_values, suffix_log_ratio
from outrider.data import Batch
from outrider.errors import OutriderError
from outrider.recipe import load_recipe
from outrider.score.shaping import segment_fixed
from outrider.trainer import Trainer


def _batch(rewards, mask, groups, old, ref) -> Batch:
    r = torch.tensor(rewards, dtype=torch.float32)
    B, T = r.shape
    return Batch(input_ids=torch.zeros(B, T, dtype=torch.long), attention_mask=torch.ones(B, T, dtype=torch.long),
                 action_mask=torch.tensor(mask, dtype=torch.float32), token_rewards=r,
                 step_index=torch.zeros(B, T, dtype=torch.long), group_index=torch.tensor(groups),
                 sample_weight=torch.ones(B), old_logprobs=torch.tensor(old, dtype=torch.float32),
                 ref_logprobs=torch.tensor(ref, dtype=torch.float32))


def test_segment_end_values_by_hand():
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 0.0], [1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]])
    v = torch.arange(21.0).reshape(3, 7)
    # row 0: action tokens at 1..5; segments of 2 → (1, 2), (3, 4), (5); ends 2, 4, 5
    assert segment_end_values(v, mask, 2).tolist() == [[0, 2, 2, 4, 4, 5, 0], [8, 8, 9, 0, 0, 0, 0], [0] * 7]
    assert segment_end_values(v, mask, 1).tolist() == (v * mask).tolist()
    assert segment_end_values(v, mask, 100).tolist() == [[0, 5, 5, 5, 5, 5, 0], [9, 9, 9, 0, 0, 0, 0], [0] * 7]
    # a gap (observation tokens between two turns) does not count toward a segment
    gap = torch.tensor([[1, 0, 0, 1, 1, 1.0]])
    assert segment_end_values(torch.arange(6.0)[None], gap, 2).tolist() == [[3, 0, 0, 3, 5, 5]]
    # the segments are `score/shaping.segment_fixed`'s chunks over the action tokens
    for n in range(1, 10):
        for length in (1, 2, 3, 4):
            got = segment_end_values(torch.arange(float(n))[None], torch.ones(1, n), length)[0].tolist()
            assert got == [float(e - 1) for s, e in segment_fixed(n, length) for _ in range(s, e)]


def test_suffix_log_ratio_counts_action_tokens_only():
    old = torch.tensor([[5.0, -1.0, -2.0, -0.5]])
    ref = torch.tensor([[0.0, -1.5, -1.0, -1.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])  # d = 0.5, −1, 0.5
    assert suffix_log_ratio(old, ref, mask).tolist() == [[0.0, 0.0, -0.5, 0.5]]


def test_prl_advantage_by_hand():
    entry, cfg = CREDIT.build({"name": "prl", "eta": 2.0, "segment_length": 2})
    mask = [[0, 1, 1, 1], [0, 1, 1, 0], [1, 1, 0, 0]]
    rewards = [[9.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]]  # 9 sits outside the mask
    old = [[0.0, -1.0, -1.0, -1.0], [0.0, -0.2, -0.4, 0.0], [-1.0, -1.0, 0.0, 0.0]]
    ref = [[0.0, -2.0, -0.5, -1.5], [0.0, -0.2, -0.8, 0.0], [-1.0, -1.0, 0.0, 0.0]]
    out = entry.fn(_batch(rewards, mask, [0, 0, 1], old, ref), cfg)
    # outcome: group 0 R = (1, 0), mean 0.5, std 1/√2 → ±0.7071; group 1 (alone): mean 0, std 1 → 2
    a = 0.5 / (2 ** -0.5 + 1e-6)
    # row 0: d = (1, −0.5, 0.5) on tokens 1..3, segments (1, 2), (3); S at ends: S_2 = 0, S_3 = 0.5
    # row 1: d = (0, 0.4), one segment ending at 2: S_2 = 0.4; row 2: d = 0
    expected = [[0.0, a, a, a - 0.25], [0.0, -a - 0.2, -a - 0.2, 0.0], [2.0, 2.0, 0.0, 0.0]]
    assert torch.allclose(out.advantages, torch.tensor(expected), atol=1e-5)
    assert out.metrics["prl_segments"] == pytest.approx((2 + 1 + 1) / 3)
    assert out.metrics["prl_log_ratio"] == pytest.approx((1.0 + 0.4 + 0.0) / 3)


def test_prl_is_grpo_while_the_policy_is_the_reference():
    torch.manual_seed(0)
    mask = (torch.rand(6, 9) > 0.3).float().tolist()
    logp = (-torch.rand(6, 9)).tolist()
    rewards = torch.zeros(6, 9)
    rewards[:, -1] = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    batch = _batch(rewards.tolist(), mask, [0, 0, 0, 1, 1, 1], logp, logp)
    entry, cfg = CREDIT.build({"name": "prl", "eta": 0.1, "segment_length": 3})
    grpo, gcfg = CREDIT.build({"name": "grpo"})
    assert torch.equal(entry.fn(batch, cfg).advantages, grpo.fn(batch, gcfg).advantages)


def _authors_advantage(scores, old, ref, mask, groups, eta, step_len):
    """The authors' verl code (ray_trainer.py, prm.adv == "orm", step_split "length"; core_algos.py
    left_fill_by_next_nonzero), transcribed: responses start at column 0, right-padded."""
    z = scores.clone()
    for g in set(groups.tolist()):
        rows = groups == g
        z[rows] = (scores[rows] - scores[rows].mean()) / (scores[rows].std() + 1e-6)
    bsz, seq_len = mask.shape
    last = torch.zeros_like(mask)
    last[torch.arange(bsz), mask.sum(-1).long() - 1] = 1
    reward = z[:, None] * last
    diff = (old - ref) * mask
    cum = diff.cumsum(-1)
    cum = diff.sum(-1, keepdim=True) - cum + diff
    reward = reward.sum(-1, keepdim=True) * mask - cum / eta
    step_mask = (torch.arange(1, seq_len + 1) % step_len == 0).repeat(bsz, 1) * mask
    step_mask[torch.arange(bsz), mask.sum(-1).long() - 1] = 1
    reward = reward * step_mask * mask
    rev = reward.flip(1)  # left_fill_by_next_nonzero
    idx = torch.arange(seq_len).expand_as(rev)
    last_idx, _ = torch.cummax(torch.where(rev != 0, idx, torch.full_like(idx, -1)), dim=1)
    filled = torch.where(last_idx >= 0, rev.gather(1, last_idx.clamp_min(0)), torch.zeros_like(rev))
    return filled.flip(1)


@pytest.mark.parametrize("step_len", [1, 3, 4, 50])
def test_prl_matches_the_authors_code(step_len):
    g = torch.Generator().manual_seed(step_len)
    B, T = 8, 11
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    old = -torch.rand(B, T, generator=g) * 2
    ref = -torch.rand(B, T, generator=g) * 2
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), lengths - 1] = scores
    batch = _batch(rewards.tolist(), mask.tolist(), groups.tolist(), old.tolist(), ref.tolist())
    entry, cfg = CREDIT.build({"name": "prl", "eta": 0.7, "segment_length": step_len})
    expected = _authors_advantage(scores, old, ref, mask, groups, 0.7, step_len)
    assert torch.allclose(entry.fn(batch, cfg).advantages, expected, atol=1e-5)


def test_prl_equals_segment_rewards_as_returns_to_go():
    """The docstring's reading: process rewards −(S_{e_k} − S_{e_{k+1}})/η per segment, summed from segment k to the
    end, plus the outcome advantage, give the same advantages."""
    g = torch.Generator().manual_seed(3)
    T, L = 10, 3
    old, ref = -torch.rand(1, T, generator=g), -torch.rand(1, T, generator=g)
    mask = torch.ones(1, T)
    out = CREDIT.build({"name": "prl", "eta": 0.5, "segment_length": L})
    adv = out[0].fn(_batch([[0.0] * T], mask.tolist(), [0], old.tolist(), ref.tolist()), out[1]).advantages[0]
    s = suffix_log_ratio(old, ref, mask)[0].tolist() + [0.0]
    ends = [2, 5, 8, 9]
    seg_rewards = [-(s[e] - s[n]) / 0.5 for e, n in zip(ends, ends[1:] + [T])]
    togo = [sum(seg_rewards[k:]) for k in range(len(ends))]
    assert torch.allclose(adv, torch.tensor([togo[t // L] for t in range(T)]), atol=1e-5)


@pytest.mark.parametrize("option, text", [({"eta": 0}, "credit.eta"), ({"segment_length": 0}, "credit.segment_length")])
def test_bad_options_name_the_field(tmp_path, option, text):
    recipe = write_recipe(tmp_path, credit={"name": "prl", **option})
    with pytest.raises(OutriderError, match=text):
        load_recipe(recipe)


def test_a_prl_run_keeps_a_frozen_reference_and_logs_the_process_term(tmp_path):
    # the format reward varies inside groups, so every step moves the policy away from the reference
    score = [{"name": "verifier", "weight": 1.0}, {"name": "format", "pattern": ".*[0-9].*", "weight": 0.5}]
    recipe = write_recipe(tmp_path, credit={"name": "prl", "eta": 0.5, "segment_length": 2}, score=score,
                          explore={"prompts_per_step": 4, "group_size": 4}, update={"lr": 1e-2}, train={"steps": 4})
    Trainer(load_recipe(recipe), tmp_path / "run", quiet=True).run()
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["step"] > 0]
    assert (tmp_path / "run" / "checkpoints" / "reference").is_dir()
    assert rows[0]["credit/prl_process_abs"] == pytest.approx(0.0, abs=1e-5)  # step 1: π_old = π_ref
    assert rows[-1]["credit/prl_process_abs"] > 0.0 and rows[-1]["credit/prl_segments"] >= 1.0


def test_a_batch_without_log_probs_is_a_one_line_error():
    batch = _batch([[1.0]], [[1]], [0], [[0.0]], [[0.0]])
    batch.ref_logprobs = None
    with pytest.raises(OutriderError, match="^credit prl: needs the sampling policy's and the reference's log-probs"):
        CREDIT.create({"name": "prl"})(batch)
