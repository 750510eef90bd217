"""Log-probs under top-k / top-p sampling (issue 32): the sampler records, and the learner scores, the truncated
and renormalised distribution the tokens are drawn from, so the PPO ratio at the first step is 1 against it."""

from __future__ import annotations

import math

import pytest
import torch

from outrider.data import Episode, Turn, pack
from outrider.policy.model import Policy
from outrider.policy.outputs import RowOutputs
from outrider.policy.sampler import SamplingParams, sample
from outrider.update.learner import UpdateConfig, prepare

# one position's logits over a 4-token vocabulary; softmax = 0.6439, 0.2369, 0.0871, 0.0321
LOGITS = [2.0, 1.0, 0.0, -1.0]
LSE_ALL = math.log(sum(math.exp(x) for x in LOGITS))


@pytest.fixture(scope="module")
def policy(scaled_tiny_policy) -> Policy:
    return scaled_tiny_policy


def score_fixed_logits(tokens: list[int], **truncation) -> tuple[torch.Tensor, torch.Tensor]:
    """`Policy.score` of one row [0, x] whose position 0 predicts x with LOGITS: (log-prob of x, its gradient
    with respect to the four logits)."""
    logits = torch.tensor([LOGITS, [0.0] * 4], requires_grad=True)
    policy = Policy.tiny(hidden=8, layers=1, heads=1)
    policy._forward = lambda *a, **k: RowOutputs.dense(logits[None].expand(len(tokens), 2, 4), None)
    ids = torch.tensor([[0, x] for x in tokens])
    lp = policy.score(ids, torch.ones_like(ids), **truncation).logprobs[:, 1]
    grads = [torch.autograd.grad(v, logits, retain_graph=True)[0][0] for v in lp]
    return lp.detach(), torch.stack(grads)


def test_score_top_k_renormalises_over_the_kept_tokens():
    """top_k = 2 keeps tokens 0, 1: log q(0) = 2 − log(e² + e) = −0.31326, log q(1) = −1.31326 (untruncated:
    −0.44019, −1.44019); ∇ log q(0) = (1 − q0, −q1, 0, 0) with q0 = 0.73106: no gradient to the dropped logits."""
    lp, grad = score_fixed_logits([0, 1], top_k=2)
    kept = math.log(math.exp(2) + math.exp(1))
    torch.testing.assert_close(lp, torch.tensor([2 - kept, 1 - kept]))
    q0 = math.exp(2 - kept)
    torch.testing.assert_close(grad[0], torch.tensor([1 - q0, -(1 - q0), 0.0, 0.0]))
    full, _ = score_fixed_logits([0, 1])
    torch.testing.assert_close(full, torch.tensor([2 - LSE_ALL, 1 - LSE_ALL]))


@pytest.mark.parametrize("top_p, kept", [(0.6, [0]), (0.7, [0, 1]), (0.9, [0, 1, 2]), (1.0, [0, 1, 2, 3])])
def test_score_top_p_keeps_the_token_that_crosses_top_p(top_p, kept):
    """Preceding masses 0, 0.6439, 0.8808, 0.9679: a token is kept while its preceding mass is ≤ top_p."""
    lp, _ = score_fixed_logits([0], top_p=top_p)
    expected = LOGITS[0] - math.log(sum(math.exp(LOGITS[j]) for j in kept))
    torch.testing.assert_close(lp, torch.tensor([expected]))


def test_score_floors_a_token_outside_the_recomputed_set():
    """top_k = 2 drops token 2; scored anyway, it is normalised over the kept set plus itself:
    log q = 0 − log(e² + e + 1) = −2.40761 (finite, above the untruncated −2.44019), and its gradient is finite
    and zero on the other dropped logit."""
    lp, grad = score_fixed_logits([2, 3], top_k=2)
    torch.testing.assert_close(lp, torch.tensor([-math.log(math.exp(2) + math.exp(1) + 1.0),
                                                 -1.0 - math.log(math.exp(2) + math.exp(1) + math.exp(-1))]))
    assert torch.isfinite(grad).all() and grad[0, 3] == 0 and grad[1, 2] == 0
    assert (lp > torch.tensor([0 - LSE_ALL, -1 - LSE_ALL])).all()


def test_score_rejects_bad_truncation():
    from outrider.errors import OutriderError

    with pytest.raises(OutriderError, match="top_p in"):
        score_fixed_logits([0], top_p=0.0)
    with pytest.raises(OutriderError, match="top_k must be"):
        score_fixed_logits([0], top_k=-1)


def test_sampler_records_the_truncated_log_prob(policy):
    """With top_k = 3 the behaviour log-prob of every drawn token is log_softmax over the 3 largest logits of the
    full forward (computed here with torch.topk, independently of the library), not the untruncated one."""
    prompt = [policy.bos_id] + policy.encode("3 + 4 =")
    s = sample(policy, [prompt], SamplingParams(temperature=1.3, top_k=3, max_new_tokens=8),
               torch.Generator().manual_seed(5))[0]
    seq = torch.tensor([prompt + s.ids])
    with torch.no_grad():
        logits = policy.model(input_ids=seq).logits[0, len(prompt) - 1:-1].float() / 1.3
    top = torch.topk(logits, 3, dim=-1)
    tokens = torch.tensor(s.ids)
    assert (top.indices == tokens[:, None]).any(-1).all()  # every drawn token is among the 3 largest
    expected = logits.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(top.values, dim=-1)
    torch.testing.assert_close(torch.tensor(s.logprobs), expected, atol=1e-4, rtol=0)
    untruncated = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    assert (expected - untruncated).min() > 1e-3


@pytest.mark.parametrize("top_k, top_p", [(0, 0.8), (4, 1.0), (6, 0.9)])
def test_first_step_ratio_against_the_sampling_distribution_is_one(policy, top_k, top_p):
    """`prepare` scores what the sampler drew under the same truncation: old log-probs equal the recorded
    behaviour log-probs (ratio exp(old − behaviour) = 1 to float rounding); untruncated scoring is off by the
    log of the kept mass, at least 0.01 on some token here."""
    prompts = [[policy.bos_id] + policy.encode(p) for p in ("3 + 4 =", "12 - 7 + 1 =", "9")]
    params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, max_new_tokens=8)
    episodes = []
    for i, (prompt, s) in enumerate(zip(prompts, sample(policy, prompts, params, torch.Generator().manual_seed(2)))):
        episode = Episode(group_id=i, seed=i)
        episode.turns.append(Turn("", prompt[1:], s.text, s.ids, behaviour_logprobs=s.logprobs))
        episodes.append(episode)
    batch = pack(episodes, policy.pad_id, policy.bos_id)
    m = batch.action_mask > 0
    prepare(batch, policy, None, UpdateConfig(), 1.0, need_old=True, need_values=False, top_k=top_k, top_p=top_p)
    torch.testing.assert_close(batch.old_logprobs[m], batch.behaviour_logprobs[m], atol=1e-4, rtol=0)
    prepare(batch, policy, None, UpdateConfig(), 1.0, need_old=True, need_values=False)
    assert (batch.behaviour_logprobs[m] - batch.old_logprobs[m]).max() > 1e-2
