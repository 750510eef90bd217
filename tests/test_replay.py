"""SPEAR [113] and SIL: the replay buffer's rules (entry, stale drop, recalibration, the authors' full-buffer
replay), the curriculum's intrinsic reward, the self-imitation terms and the replayed rows' importance weights, all
by hand; a replayed row through `pack`; kill -9 + --resume with the buffer in checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

from conftest import read_jsonl, tiny_recipe
from outrider.data import Episode, Turn, pack
from outrider.explore.replay import (IntrinsicConfig, ReplayBuffer, SpearConfig, intrinsic_reward,
                                     largest_power_of_two, replayed)
from outrider.observe.metrics import episode_metrics
from outrider.update import LOSSES, TERMS, TokenContext
from outrider.update.off_policy import OffPolicyConfig
from outrider.update.self_imitation import ramp
from outrider.update.terms import PolicyTerm
from test_resume import RESUME_OVERRIDES, killed_run_resumes_like


def episode(group: int, reward: float, success: bool | None = None, seed: int = 0, turns: int = 1) -> Episode:
    e = Episode(group_id=group, seed=seed, success=reward >= 1 if success is None else success)
    e.turns = [Turn("o", [5], "ab", [6, 7], behaviour_logprobs=[-0.5, -1.0]) for _ in range(turns)]
    e.rewards["trajectory"]["verifier"] = reward
    return e


def buffer(**options) -> ReplayBuffer:
    return ReplayBuffer(SpearConfig(**options))


# --- the buffer ---------------------------------------------------------------------------------------------------

def test_successful_positive_advantage_episodes_enter_with_their_group_advantage():
    b = buffer()
    group = [episode(0, 1.0), episode(0, 0.0), episode(0, 0.0), episode(0, 1.0)]  # mean 0.5
    partial = [episode(1, 0.5, success=False), episode(1, 0.0)]  # positive advantage, no success
    everyone = [episode(2, 1.0), episode(2, 1.0)]  # advantage 0
    assert b.add(group + partial + everyone, step=3) == 2
    assert [(s, a) for _, s, a in b.entries] == [(3, 0.5), (3, 0.5)]
    assert b.means == [0.5, 0.25, 1.0]
    assert b.stds == pytest.approx([0.5, 0.25, 0.0])
    b = buffer(success_only=False)
    assert b.add(partial, step=1) == 1 and b.entries[0][2] == pytest.approx(0.25)


def test_the_oldest_entries_leave_beyond_buffer_size():
    b = buffer(buffer_size=3)
    for step in range(1, 4):
        b.add([episode(0, 1.0, seed=step), episode(0, 0.0)], step)
        b.add([episode(1, 1.0, seed=10 + step), episode(1, 0.0)], step)
    assert [e.seed for e, _, _ in b.entries] == [12, 3, 13]


def test_entries_more_than_max_age_steps_older_than_the_newest_are_dropped():
    b = buffer(max_age=5)
    for step in (1, 3, 7):
        b.add([episode(0, 1.0, seed=step), episode(0, 0.0)], step)
    assert b.drop_stale() == 1  # 7 − 1 = 6 > 5; 7 − 3 = 4 stays
    assert [s for _, s, _ in b.entries] == [3, 7]
    assert buffer(max_age=None).drop_stale() == 0


def test_recalibration_against_the_median_of_recent_group_means():
    b = buffer(recalibrate="baseline")
    b.means, b.stds = [0.5, 0.25, 1.0], [0.5, 0.4, 0.0]
    assert b.baseline() == (0.5, 0.4)
    assert b.advantage(episode(0, 1.0), recorded=0.9) == pytest.approx(0.5)
    b = buffer(recalibrate="baseline", std_normalize=True)
    b.means, b.stds = [0.5, 0.25, 1.0], [0.5, 0.4, 0.0]
    assert b.advantage(episode(0, 1.0), recorded=0.9) == pytest.approx(0.5 / (0.4 + 1e-6))
    assert buffer(recalibrate="none").advantage(episode(0, 1.0), recorded=0.9) == 0.9
    assert buffer(recalibrate="decay", decay=0.5).advantage(episode(0, 1.0), recorded=0.9) == 0.45
    assert buffer().baseline() == (0.0, 1.0)  # before any group: R itself


def test_every_step_replays_only_entries_still_above_the_baseline():
    b = buffer(replay_per_step=8)
    b.add([episode(0, 1.0, seed=1), episode(0, 0.0)], step=1)
    assert [(e.seed, a) for e, a in b.draw(np.random.default_rng(0))] == [(1, 0.5)]  # 1 − p50([0.5])
    b.add([episode(1, 1.0, seed=2), episode(1, 1.0)] * 2, step=2)  # the policy now solves it: p50 rises
    b.add([episode(2, 1.0, seed=3), episode(2, 1.0)], step=2)
    assert b.baseline()[0] == 1.0 and b.draw(np.random.default_rng(0)) == []
    # the ablation replays the recorded advantage whatever the policy does now
    b.cfg = SpearConfig(replay_per_step=8, recalibrate="none")
    assert [a for _, a in b.draw(np.random.default_rng(0))] == [0.5]


def test_prioritized_replay_draws_in_proportion_to_the_recalibrated_advantage():
    b = buffer(replay_per_step=1, priority="advantage")
    b.means, b.stds = [0.5], [0.0]
    b.entries = [(episode(0, r, seed=i), 1, 0.0) for i, r in enumerate((1.0, 0.6, 0.5, 0.55))]  # Â .5 .1 0 .05
    rng = np.random.default_rng(0)
    counts = np.bincount([b.draw(rng)[0][0].seed for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.5 / 0.65, 0.1 / 0.65, 0.0, 0.05 / 0.65], atol=0.02)


def test_the_authors_full_buffer_rule_replays_a_power_of_two_and_empties_the_buffer():
    assert [largest_power_of_two(n) for n in (0, 1, 2, 3, 5, 8, 9)] == [0, 0, 2, 2, 4, 8, 8]
    b = buffer(replay_when="full", buffer_size=2)
    b.add([episode(0, 1.0, seed=s) for s in range(3)] + [episode(0, 0.0)], step=1)  # 3 = 1.5·2: not yet
    assert b.draw(np.random.default_rng(0)) == [] and len(b.entries) == 3
    b.add([episode(1, 1.0, seed=s) for s in range(3, 5)] + [episode(1, 0.0)] * 2, step=1)
    out = b.draw(np.random.default_rng(0))
    assert len(out) == 2 and b.entries == []  # 5 positive → 4, at most buffer_size 2


def test_a_replayed_copy_is_off_policy_weight_zero_with_its_advantage_and_packs_it():
    stored = episode(4, 1.0)
    copy = replayed(stored, 0.25, group_id=9)
    assert (copy.group_id, copy.origin, copy.off_policy, copy.weight, copy.advantage) == (9, "replay", True, 0.0, 0.25)
    assert (stored.origin, stored.advantage, stored.group_id) == ("on_policy", None, 4)
    batch = pack([stored, copy], pad_id=0)
    assert torch.isnan(batch.row_advantage[0]) and float(batch.row_advantage[1]) == 0.25
    torch.testing.assert_close(batch.behaviour_logprobs[1], torch.tensor([0.0, -0.5, -1.0]))
    assert episode_metrics([stored, copy])["origin/replay/share"] == 0.5


# --- the curriculum -------------------------------------------------------------------------------------------------

def test_the_intrinsic_reward_decays_to_zero_by_step_t():
    cfg = IntrinsicConfig(count="turns", per_count=0.1, cap=1.0, steps=100)
    three = episode(0, 0.0, turns=3)
    assert intrinsic_reward(three, 0, cfg) == pytest.approx(0.3)
    assert intrinsic_reward(three, 50, cfg) == pytest.approx(0.15)  # (cos(π/2) + 1)/2 = 1/2
    assert intrinsic_reward(three, 100, cfg) == pytest.approx(0.0, abs=1e-12)
    assert intrinsic_reward(three, 101, cfg) == 0.0
    assert intrinsic_reward(episode(0, 0.0, turns=14), 0, cfg) == 1.0  # capped
    three.turns[1].info = {"invalid": True, "events": ["tool_error", "picked_key"]}
    assert intrinsic_reward(three, 0, cfg.model_copy(update={"count": "valid_turns"})) == pytest.approx(0.2)
    assert intrinsic_reward(three, 0, cfg.model_copy(update={"count": "events"})) == pytest.approx(0.1)
    assert [ramp(t, 100) for t in (0, 50, 100, 150)] == pytest.approx([0.0, 0.5, 1.0, 1.0])
    assert ramp(3, 0) == 1.0


# --- the terms ------------------------------------------------------------------------------------------------------

MASK = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
CURRENT = torch.tensor([[0.0, -1.0, -2.0], [0.0, -1.0, -1.0]])  # log π_θ
BEHAVIOUR = torch.tensor([[0.0, -1.1, -2.2], [0.0, -0.5, -3.0]])  # row 1: recorded when it was sampled


def replay_batch(advantage: float | None = 0.5):
    on = episode(0, 0.0)
    rep = replayed(episode(1, 1.0), advantage, group_id=1)
    rep.advantage = advantage
    batch = pack([on, rep], pad_id=0)
    batch.behaviour_logprobs = BEHAVIOUR.clone()
    return batch


def term_ctx(batch, values=None):
    logprobs = CURRENT.clone().requires_grad_(True)
    return TokenContext(logprobs, logprobs.detach(), torch.zeros(2, 3), MASK, batch=batch, values=values), logprobs


def test_spear_sil_is_ppo_clip_against_the_recorded_logprobs_on_positive_replayed_rows():
    term = TERMS.create({"name": "spear_sil", "coef": 2.0, "ramp_steps": 0, "clip_cov": False})
    ctx, leaf = term_ctx(replay_batch(0.5))
    out = term(ctx)
    # row 1 only: r = exp(current − μ) = e^{−0.5}, e^{2}; Â = 0.5 > 0: max(−Â r, −Â clip(r, 0.8, 1.28)) =
    # −0.5·e^{−0.5} (below the band: the unclipped term is larger) and −0.5·1.28 (clipped above)
    per_token = [-0.5 * math.exp(-0.5), -0.5 * 1.28]
    assert float(out.loss) == pytest.approx(2.0 * sum(per_token) / 2)  # token-mean over the replayed tokens
    assert float(out.metrics["ratio_mean"]) == pytest.approx((math.exp(-0.5) + math.exp(2.0)) / 2)
    assert float(out.metrics["ratio_max"]) == pytest.approx(math.exp(2.0))
    assert float(out.metrics["clipped_frac"]) == 0.5
    assert out.metrics["rows"] == 0.5 and out.metrics["advantage_mean"] == 0.5
    out.loss.backward()
    assert torch.all(leaf.grad[0] == 0)  # the on-policy row is not this term's
    torch.testing.assert_close(leaf.grad[1], torch.tensor([0.0, -2.0 * 0.5 * math.exp(-0.5) / 2, 0.0]))


@pytest.mark.parametrize("advantage", [None, 0.0, -0.3])
def test_spear_sil_leaves_rows_without_a_positive_advantage_alone(advantage):
    term = TERMS.create({"name": "spear_sil", "ramp_steps": 0})
    out = term(term_ctx(replay_batch(advantage))[0])
    assert out.loss is None and out.metrics["rows"] == 0.0


def test_spear_sil_weight_ramps_with_the_steps_it_has_seen_and_clip_cov_needs_varying_advantages():
    term = TERMS.create({"name": "spear_sil", "coef": 1.0, "ramp_steps": 4})
    coefs = [term(term_ctx(replay_batch(0.5))[0]).metrics["coef"] for _ in range(5)]
    assert coefs == pytest.approx([ramp(t, 4) for t in range(1, 6)])
    assert term.state_dict() == {"calls": 5}
    # one replayed row, one advantage: every covariance is 0, outside the band, so Clip-Cov detaches nothing and
    # the loss is the plain clipped one
    plain = TERMS.create({"name": "spear_sil", "ramp_steps": 0, "clip_cov": False})
    cov = TERMS.create({"name": "spear_sil", "ramp_steps": 0, "clip_cov": True})
    a, b = plain(term_ctx(replay_batch(0.5))[0]), cov(term_ctx(replay_batch(0.5))[0])
    assert float(b.metrics["cov_detached_frac"]) == 0.0 and float(a.loss) == pytest.approx(float(b.loss))


def test_the_replayed_rows_importance_weights_per_origin_by_hand():
    """The policy term's per-origin metrics on a replayed row (its weight is 0, so it adds no loss)."""
    batch = replay_batch(0.5)
    term = PolicyTerm(LOSSES.create({"name": "ppo"}), OffPolicyConfig(correction="token_clip", clip=2.0))
    ctx, _ = term_ctx(batch)
    out = term(ctx)
    # ρ = exp(old − μ) on row 1, old = the current log-probs (one epoch): e^{−0.5}, e^{2}; e^{2} > 2 is truncated
    assert float(out.metrics["origin/replay/iw_mean"]) == pytest.approx((math.exp(-0.5) + math.exp(2.0)) / 2)
    assert float(out.metrics["origin/replay/iw_max"]) == pytest.approx(math.exp(2.0))
    assert float(out.metrics["origin/replay/iw_clipped_frac"]) == 0.5
    assert float(batch.sample_weight[1]) == 0.0


def test_sil_weights_the_loglikelihood_and_value_by_the_positive_return_gap():
    term = TERMS.create({"name": "sil", "coef": 1.0, "value_coef": 0.01, "clip": None, "normalize": "aggregate"})
    batch = replay_batch(None)
    values = torch.tensor([[0.0, 0.25, 1.5], [0.0, 0.25, 1.5]], requires_grad=True)
    ctx, leaf = term_ctx(batch, values)
    out = term(ctx)
    # row 1: reward 1 on its last action token; R_t = 1 at both tokens; (R − V)₊ = 0.75, 0 (V = 1.5 > R)
    policy = (-(-1.0) * 0.75 + 0.0) / 2
    value = (0.5 * 0.75 ** 2) / 2
    assert float(out.loss) == pytest.approx(policy + 0.01 * value)
    assert float(out.metrics["advantage_mean"]) == pytest.approx(0.375)
    out.loss.backward()
    torch.testing.assert_close(leaf.grad[1], torch.tensor([0.0, -0.75 / 2, 0.0]))
    assert torch.all(leaf.grad[0] == 0)
    torch.testing.assert_close(values.grad[1], torch.tensor([0.0, -0.01 * 0.75 / 2, 0.0]))


@pytest.mark.parametrize("min_samples", [1, 64])
def test_sil_clips_the_gap_at_c_and_divides_by_the_tokens_above_the_value_as_the_authors_code(min_samples):
    term = TERMS.create({"name": "sil", "coef": 1.0, "value_coef": 0.01, "min_samples": min_samples})  # clip 1
    values = torch.tensor([[0.0, -0.5, 0.25], [0.0, -0.5, 0.25]], requires_grad=True)
    ctx, leaf = term_ctx(replay_batch(None), values)
    out = term(ctx)
    # row 1: R_t = 1; (R − V)₊ = 1.5, 0.75 → g = 1 (clipped), 0.75; both tokens above V: n = max(2, min_samples)
    n = max(2, min_samples)
    policy = (1.0 * 1.0 + 1.0 * 0.75) / n  # −log π = 1, 1
    value = (1.0 * (1.5 - 0.5) + 0.5 * 0.75 ** 2) / n  # linear above c: c·(gap − c/2)
    assert float(out.loss) == pytest.approx(policy + 0.01 * value)
    assert float(out.metrics["loss"]) == pytest.approx(policy) and out.metrics["valid_frac"] == 1.0
    out.loss.backward()
    torch.testing.assert_close(leaf.grad[1], torch.tensor([0.0, -1.0 / n, -0.75 / n]))
    torch.testing.assert_close(values.grad[1], torch.tensor([0.0, -0.01 * 1.0 / n, -0.01 * 0.75 / n]))
    assert torch.all(values.grad[0] == 0)


def test_sil_without_a_token_above_the_value_trains_nothing():
    term = TERMS.create({"name": "sil", "min_samples": 1})
    values = torch.tensor([[0.0, 2.0, 1.0], [0.0, 2.0, 1.0]], requires_grad=True)  # V ≥ R = 1 everywhere
    ctx, leaf = term_ctx(replay_batch(None), values)
    out = term(ctx)
    assert float(out.loss) == 0.0 and out.metrics["valid_frac"] == 0.0
    out.loss.backward()
    assert torch.all(leaf.grad == 0) and torch.all(values.grad == 0)


# --- a run ----------------------------------------------------------------------------------------------------------

CALC = {"name": "calculator", "digits": 2, "terms": 2, "ops": ["*"], "style": "expression", "format": "compact",
        "max_turns": 4, "eval_size": 16}
# the tiny warm start rarely solves a question: RESUME_OVERRIDES' format reward gives positive advantages to buffer
SPEAR_OVERRIDES = dict(RESUME_OVERRIDES,
                       policy={"warm_start": {"steps": 20, "batch_size": 16, "lr": 5.0e-3}},
                       explore={"name": "spear", "prompts_per_step": 2, "group_size": 4, "max_new_tokens": 8,
                                "pool": 8, "replay_per_step": 2, "max_age": 3, "success_only": False,
                                "intrinsic": {"count": "turns", "steps": 40}},
                       update={"lr": 3.0e-3, "terms": [{"name": "spear_sil", "ramp_steps": 10}]})


@pytest.mark.slow  # three runs of 40 small steps, ~1 min
def test_killed_spear_run_resumes_to_identical_metrics(tmp_path):
    """The buffer (entries, baseline statistics), the per-prompt records and the term's step count ride in
    checkpoints: a run killed mid-way and resumed logs the same metrics as one that was not."""
    from outrider.recipe import load_recipe
    from outrider.trainer import Trainer

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**tiny_recipe(**SPEAR_OVERRIDES), "task": CALC}, sort_keys=False))
    Trainer(load_recipe(recipe), tmp_path / "A", quiet=True).run()
    last = read_jsonl(tmp_path / "A" / "metrics.jsonl")[-1]
    # the buffer was filled and replayed and the term trained, so their state matters
    assert last["explore/replay_replayed_total"] > 0 and last["explore/replay_buffer"] > 0 and "sil/loss" in last
    killed_run_resumes_like(tmp_path / "A", recipe, tmp_path)
