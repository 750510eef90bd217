"""Off-policy rows: a guided episode (hint shown while sampling, removed for training) and a replayed one take
their recorded behaviour log-probs as the ratio's old log-probs; the importance-weight options, by hand; and the
per-origin metrics."""

from __future__ import annotations

import math

import pytest
import torch

from outrider.data import ORIGINS, Episode, Start, Turn, pack
from outrider.envs import ENVS
from outrider.explore.rollout import rollout
from outrider.observe.metrics import episode_metrics
from outrider.policy.model import Policy
from outrider.policy.sampler import SamplingParams
from outrider.registry import Entry
from outrider.update import LOSSES, TokenContext
from outrider.update.learner import UpdateConfig, learner_step, prepare
from outrider.update.off_policy import OffPolicyConfig
from outrider.update.terms import PolicyTerm

# two rows of three positions, the last two of each are action tokens; row 0 on-policy, row 1 guided (off-policy)
MASK = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
CURRENT = torch.tensor([[0.0, -1.0, -2.0], [0.0, -1.0, -1.0]])  # log π_θ on the trained (unguided) sequence
BEHAVIOUR = torch.tensor([[0.0, -1.1, -2.2], [0.0, -0.5, -3.0]])  # recorded while sampling (row 1: with the hint)


def term_on(correction: str, clip: float = 2.0):
    batch = pack([Episode(group_id=0, seed=0, turns=[Turn("o", [5], "ab", [6, 7])]),
                  Episode(group_id=0, seed=0, turns=[Turn("o", [5], "ab", [6, 7])], origin="guided", off_policy=True)],
                 pad_id=0)
    batch.behaviour_logprobs = BEHAVIOUR.clone()
    logprobs = CURRENT.clone().requires_grad_(True)
    ctx = TokenContext(logprobs, logprobs.detach(), torch.ones(2, 3) * MASK, MASK, batch=batch)
    term = PolicyTerm(LOSSES.create({"name": "ppo"}), OffPolicyConfig(correction=correction, clip=clip))
    out = term(ctx)
    out.leaf = logprobs
    return out


def test_none_takes_the_behaviour_logprobs_as_old_on_off_policy_rows_only():
    out = term_on("none")
    # row 0: ratio 1 → −A = −1; row 1: r = exp(current − behaviour) = e^{−0.5}, e^{2}; A = 1 > 0:
    # max(−r, −clip(r, 0.8, 1.2)) = −e^{−0.5} (below the band: unclipped) and −1.2 (above: clipped)
    expected = torch.tensor([[0.0, -1.0, -1.0], [0.0, -math.exp(-0.5), -1.2]])
    torch.testing.assert_close(out.per_token, expected)
    assert float(out.metrics["loss/ratio_mean"]) == pytest.approx((2 + math.exp(-0.5) + math.exp(2.0)) / 4)
    # ρ = exp(old − μ) with old the current log-probs (one epoch): e^{−0.5}, e^{2}
    assert float(out.metrics["origin/guided/iw_mean"]) == pytest.approx((math.exp(-0.5) + math.exp(2.0)) / 2)
    assert float(out.metrics["origin/guided/iw_max"]) == pytest.approx(math.exp(2.0))
    assert "origin/guided/iw_clipped_frac" not in out.metrics


def test_token_clip_weights_each_token_by_its_truncated_ratio():
    out = term_on("token_clip", clip=2.0)
    # ratio π_θ/π_old = 1 everywhere (one epoch); row 1 weighted by min(ρ, 2): e^{−0.5} and 2 (e^{2} truncated)
    expected = torch.tensor([[0.0, -1.0, -1.0], [0.0, -math.exp(-0.5), -2.0]])
    torch.testing.assert_close(out.per_token, expected)
    assert float(out.metrics["origin/guided/iw_clipped_frac"]) == pytest.approx(0.5)
    # the weight is detached: the gradient of row 1's tokens is −A·w·∂r/∂logp = −w
    out.per_token.sum().backward()
    torch.testing.assert_close(out.leaf.grad[1, 1:], torch.tensor([-math.exp(-0.5), -2.0]))


def test_sequence_truncation_weights_the_row_by_its_truncated_product():
    out = term_on("sequence_truncation", clip=2.0)
    # Π ρ = e^{−0.5 + 2} = e^{1.5} ≈ 4.48 → truncated to 2 for both of row 1's tokens
    expected = torch.tensor([[0.0, -1.0, -1.0], [0.0, -2.0, -2.0]])
    torch.testing.assert_close(out.per_token, expected)
    assert float(out.metrics["origin/guided/iw_max"]) == pytest.approx(math.exp(1.5), rel=1e-5)
    out = term_on("sequence_truncation", clip=5.0)
    torch.testing.assert_close(out.per_token[1], torch.tensor([0.0, -math.exp(1.5), -math.exp(1.5)]))


def test_a_guided_episode_through_the_learner():
    """Sampled with a hint the trained sequence leaves out: the recorded behaviour log-probs are those of the
    guided context, and the learner's ratio compares the current log-probs of the unguided sequence with them."""
    policy = Policy.tiny(hidden=32, layers=1, heads=2, seed=0)
    entry, cfg = ENVS.build({"name": "reasoning_gym", "dataset": "spell_backward", "eval_size": 16,
                             "config": {"min_word_len": 3, "max_word_len": 5}}, "task")
    task = entry.fn(cfg)
    hint = " (hint: reverse it)"
    starts = [Start(seed=1, group_id=0), Start(seed=1, group_id=0, context=hint, origin="guided")]
    plain, guided = rollout(policy, lambda: task.make_env("train"), starts, SamplingParams(max_new_tokens=4),
                            torch.Generator().manual_seed(0))
    obs = plain.turns[0].observation
    # the behaviour log-probs are the guided context's: scoring prompt + hint + action reproduces them
    seq = [policy.bos_id] + policy.encode(obs + hint) + guided.turns[0].action_ids
    lp = policy.score(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long)).logprobs[0]
    torch.testing.assert_close(lp[-len(guided.turns[0].action_ids):], torch.tensor(guided.turns[0].behaviour_logprobs),
                               atol=1e-5, rtol=0)
    for e, r in ((plain, 1.0), (guided, 0.0)):
        e.rewards["trajectory"]["r"] = r
    batch = pack([plain, guided], policy.pad_id, policy.bos_id)
    update = UpdateConfig(lr=1e-3)
    prepare(batch, policy, None, update, 1.0, need_old=False, need_values=False)
    batch.advantages = torch.tensor([1.0, -1.0])[:, None] * batch.action_mask
    seen = []
    ppo = LOSSES.build({"name": "ppo"})

    def spy(ctx, c):
        seen.append((ctx.logprobs.detach().clone(), ctx.old_logprobs.clone()))
        return ppo[0].fn(ctx, c)

    term = PolicyTerm(Entry("ppo", spy, ppo[0].config, ppo[0].needs).create(ppo[1]), update.off_policy)
    learner_step(policy, torch.optim.SGD(policy.parameters(), lr=0.0), batch, [term], update, 1.0,
                 torch.Generator().manual_seed(0), norm_length=4)
    (current, old), m = seen[0], batch.action_mask > 0
    # the unguided trained sequence's current log-probs differ from the guided behaviour ones ...
    assert not torch.allclose(current[1][m[1]], batch.behaviour_logprobs[1][m[1]], atol=1e-3)
    # ... and the ratio's old log-probs are the behaviour ones on the guided row, the current ones elsewhere
    torch.testing.assert_close(old[1][m[1]], batch.behaviour_logprobs[1][m[1]])
    torch.testing.assert_close(old[0], current[0])


def test_origin_metrics():
    def ep(origin, reward, success):
        e = Episode(group_id=0, seed=0, turns=[Turn("o", [1], "a", [2])], origin=origin, success=success)
        e.rewards["trajectory"]["r"] = reward
        return e

    assert not any(k.startswith("origin/") for k in episode_metrics([ep("on_policy", 1.0, True)]))
    m = episode_metrics([ep("on_policy", 1.0, True), ep("on_policy", 0.0, False), ep("replay", 1.0, True),
                         ep("guided", 0.5, False)])
    assert m["origin/on_policy/share"] == 0.5 and m["origin/on_policy/reward"] == 0.5
    assert m["origin/on_policy/accuracy"] == 0.5
    assert (m["origin/replay/share"], m["origin/replay/accuracy"], m["origin/guided/reward"]) == (0.25, 1.0, 0.5)
    assert set(ORIGINS) >= {"on_policy", "replay", "retry", "guided", "restart", "offline"}
