"""Policy losses, loss aggregation, KL estimators and entropy regulators against hand-computed numbers."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from outrider.errors import OutriderError
from outrider.update import ENTROPY, LOSSES, TokenContext
from outrider.update.aggregate import AGGREGATIONS, aggregate
from outrider.kl import KL_ESTIMATORS, kl_penalty


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def build_loss(name: str, **options):
    """The loss as a function of (logprobs, old, advantages, mask)."""
    entry, cfg = LOSSES.build({"name": name, **options})
    return lambda logp, old, adv, mask: entry.fn(TokenContext(logp, old, adv, mask), cfg)


def build_regulator(name: str, **options):
    entry, cfg = ENTROPY.build({"name": name, **options})
    return entry.create(cfg)


def ppo_inputs(ratios, advantages, mask):
    """old = 0 and logp = log(ratio), so exp(logp - old) is the given ratio; logp requires grad."""
    logp = torch.log(t(ratios)).requires_grad_(True)
    return logp, torch.zeros_like(logp), t(advantages), t(mask)


# ---------------------------------------------------------------- ppo


def test_ppo_clip_low_and_high():
    # eps = 0.2 both sides; per token (A, r):
    #   (-1, 0.5): max(0.5, 0.8)   = 0.8   low clip active   -> grad 0
    #   (+1, 1.5): max(-1.5, -1.2) = -1.2  high clip active  -> grad 0
    #   (+1, 1.1): max(-1.1, -1.1) = -1.1  unclipped         -> d/dlogp (-A r) = -1.1
    #   (+1, 0.7): max(-0.7, -0.8) = -0.7  r < 0.8 but A > 0: not clipped -> grad -0.7
    #   (-1, 1.5): max(1.5, 1.2)   = 1.5   r > 1.2 but A < 0: not clipped -> grad +1.5
    #   masked token: old logp is -100 (ratio e^100 unguarded) -> loss exactly 0, grad 0
    logp, old, adv, mask = ppo_inputs([0.5, 1.5, 1.1, 0.7, 1.5, 1.0], [-1, 1, 1, 1, -1, 1], [1, 1, 1, 1, 1, 0])
    old = old.clone()
    old[5] = -100.0
    loss, metrics = build_loss("ppo")(logp[None], old[None], adv[None], mask[None])
    torch.testing.assert_close(loss[0], t([0.8, -1.2, -1.1, -0.7, 1.5, 0.0]))
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, t([0.0, 0.0, -1.1, -0.7, 1.5, 0.0]))
    # 1 of 5 action tokens each; ratio mean (0.5 + 1.5 + 1.1 + 0.7 + 1.5) / 5 = 1.06
    torch.testing.assert_close(metrics["clip_frac_low"], t(0.2))
    torch.testing.assert_close(metrics["clip_frac_high"], t(0.2))
    torch.testing.assert_close(metrics["ratio_mean"], t(1.06))
    assert "clip_frac_dual" not in metrics
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())


def test_ppo_clip_higher():
    # A = +1, r = 1.25: symmetric 0.2 clips at 1.2 (loss -1.2, no grad); clip_high 0.28 does not (loss -1.25)
    logp, old, adv, mask = ppo_inputs([[1.25]], [[1.0]], [[1.0]])
    loss, m = build_loss("ppo")(logp, old, adv, mask)
    torch.testing.assert_close(loss, t([[-1.2]]))
    assert m["clip_frac_high"] == 1.0
    loss, m = build_loss("ppo", clip_high=0.28)(logp, old, adv, mask)
    torch.testing.assert_close(loss, t([[-1.25]]))
    assert m["clip_frac_high"] == 0.0
    # the low side stays at 0.8: A = -1, r = 0.75 -> max(0.75, 0.8) = 0.8, clipped
    logp, old, adv, mask = ppo_inputs([[0.75]], [[-1.0]], [[1.0]])
    loss, m = build_loss("ppo", clip_high=0.28)(logp, old, adv, mask)
    torch.testing.assert_close(loss, t([[0.8]]))
    assert m["clip_frac_low"] == 1.0


def test_ppo_dual_clip():
    # c = 3; (A, r):
    #   (-1, 4):   max(4, 1.2) = 4 -> min(4, 3) = 3          dual active, grad 0
    #   (-1, 2):   max(2, 1.2) = 2 < 3                       not active, grad = r = 2
    #   (+1, 4):   max(-4, -1.2) = -1.2 (A > 0: no dual)     high clip active, grad 0
    #   (-2, 0.5): max(1, 1.6) = 1.6 < 6                     low clip active, grad 0
    #   masked
    logp, old, adv, mask = ppo_inputs([[4.0, 2.0, 4.0, 0.5, 1.0]], [[-1, -1, 1, -2, 1]], [[1, 1, 1, 1, 0]])
    loss, m = build_loss("ppo", dual_clip=3.0)(logp, old, adv, mask)
    torch.testing.assert_close(loss, t([[3.0, 2.0, -1.2, 1.6, 0.0]]))
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, t([[0.0, 2.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(m["clip_frac_dual"], t(0.25))
    torch.testing.assert_close(m["clip_frac_low"], t(0.25))
    torch.testing.assert_close(m["clip_frac_high"], t(0.25))
    # without dual clip the first token's loss grows with r
    loss, _ = build_loss("ppo")(logp.detach(), old, adv, mask)
    assert loss[0, 0] == pytest.approx(4.0)


def test_ppo_options_validated():
    for bad in ({"dual_clip": 1.0}, {"dual_clip": 0.5}, {"clip_low": 1.0}, {"clip_high": -0.1}, {"bogus": 1}):
        with pytest.raises(OutriderError):
            LOSSES.build({"name": "ppo", **bad})


# ---------------------------------------------------------------- gspo


def gspo_inputs():
    # row 0: token log-ratios 0.1, -0.2, 0.4 -> mean 0.1  -> s0 = e^0.1  = 1.1051709; A = +1
    # row 1: token log-ratios -0.3, -0.1 (+ a masked token with log-ratio 5, ignored) -> mean -0.2
    #        -> s1 = e^-0.2 = 0.8187308; A = -1
    old = t([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    logp = (old + t([[0.1, -0.2, 0.4], [-0.3, -0.1, 5.0]])).requires_grad_(True)
    adv = t([[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    return logp, old, adv, mask


def test_gspo_ratio_is_sequence_value_and_gradient_per_token():
    s0, s1 = math.exp(0.1), math.exp(-0.2)
    logp, old, adv, mask = gspo_inputs()
    loss, m = build_loss("gspo", clip_low=0.5, clip_high=0.5)(logp, old, adv, mask)  # nothing clipped
    # every token of a row carries -A * s_i (not its own token ratio e^0.1, e^-0.2, e^0.4)
    torch.testing.assert_close(loss, t([[-s0, -s0, -s0], [s1, s1, 0.0]]))
    loss.sum().backward()
    # d/dlogp_t of -A * sg(s_i) * exp(logp_t - sg(logp_t)) = -A * s_i, only through the token's own logp
    torch.testing.assert_close(logp.grad, t([[-s0, -s0, -s0], [s1, s1, 0.0]]))
    # token-weighted mean of the sequence ratio over the 5 action tokens
    torch.testing.assert_close(m["ratio_mean"], t((3 * s0 + 2 * s1) / 5))
    assert m["clip_frac_low"] == 0 and m["clip_frac_high"] == 0


def test_gspo_default_clipping():
    # defaults 3e-4 / 4e-4 (GSPO paper): s0 = 1.105 > 1.0004 with A > 0 -> clipped high, loss -1.0004, grad 0
    # s1 = 0.819 < 0.9997 with A < 0 -> clipped low, loss +0.9997, grad 0
    logp, old, adv, mask = gspo_inputs()
    loss, m = build_loss("gspo")(logp, old, adv, mask)
    torch.testing.assert_close(loss, t([[-1.0004, -1.0004, -1.0004], [0.9997, 0.9997, 0.0]]))
    loss.sum().backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp))
    torch.testing.assert_close(m["clip_frac_high"], t(3 / 5))
    torch.testing.assert_close(m["clip_frac_low"], t(2 / 5))


# ---------------------------------------------------------------- aggregation

# ragged: row 0 has 3 tokens, row 1 one token, row 2 none (and an inf on a masked position)
AGG_LOSS = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0], [float("inf"), 8.0, 9.0, 10.0]]
AGG_MASK = [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize(
    "mode, norm_length, expected",
    [
        ("token-mean", None, 11 / 4),  # (1 + 2 + 3 + 5) / 4 tokens
        ("seq-mean-token-sum", None, 11 / 3),  # (6 + 5) / 3 rows (the empty row counts)
        ("seq-mean-token-mean", None, 7 / 3),  # (6/3 + 5/1 + 0) / 3
        ("seq-mean-token-sum-norm", None, 11 / 12),  # 11 / (3 rows * T=4)
        ("seq-mean-token-sum-norm", 10, 11 / 30),  # 11 / (3 rows * 10)
    ],
)
def test_aggregate_ragged(mode, norm_length, expected):
    loss = t(AGG_LOSS).requires_grad_(True)
    out = aggregate(loss, t(AGG_MASK), mode, norm_length)
    assert out.dim() == 0
    torch.testing.assert_close(out, t(expected))
    out.backward()
    assert torch.isfinite(loss.grad).all()
    assert torch.equal(loss.grad[t(AGG_MASK) == 0], torch.zeros(8, dtype=torch.float64))  # 12 - 4 tokens


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_aggregate_all_masked_is_zero(mode):
    loss = t([[1.0, 2.0], [3.0, 4.0]]).requires_grad_(True)
    out = aggregate(loss, torch.zeros(2, 2), mode)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(loss.grad, torch.zeros(2, 2, dtype=torch.float64))


def test_aggregate_unknown_mode():
    with pytest.raises(OutriderError, match="token-mean"):
        aggregate(torch.zeros(1, 1), torch.ones(1, 1), "seq-sum")


# ---------------------------------------------------------------- KL


def test_kl_estimators():
    # logp - ref = 0.5, -1, 0; log rho = ref - logp = -0.5, 1, 0
    logp, ref = t([-1.0, -2.0, -0.5]), t([-1.5, -1.0, -0.5])
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), t([0.5, -1.0, 0.0]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), t([0.125, 0.5, 0.0]))  # 0.5 * d^2
    # k3: e^-0.5 + 0.5 - 1 = 0.1065307; e^1 - 1 - 1 = 0.7182818; 0
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), t([0.10653066, 0.71828183, 0.0]))
    assert KL_ESTIMATORS == ("k1", "k2", "k3")


def test_kl_k3_clamps_log_ratio_and_value():
    # log rho = ±100 -> clamped to ±20 before exp (finite), then the value to verl's 10
    out = kl_penalty(t([0.0, -100.0]), t([-100.0, 0.0]), "k3")
    assert out.tolist() == [10.0, 10.0]
    with pytest.raises(OutriderError, match="k1, k2, k3"):
        kl_penalty(t([0.0]), t([0.0]), "k4")


# ---------------------------------------------------------------- entropy


def test_entropy_regulators():
    entropy = t([[1.0, 2.0], [3.0, 7.0]]).requires_grad_(True)
    mask = t([[1, 1], [1, 0]])
    agg = partial(aggregate, mode="token-mean")  # (1 + 2 + 3) / 3 = 2
    zeros = torch.zeros_like(mask)
    ctx = TokenContext(zeros, zeros, zeros, mask, entropy=entropy, aggregate=agg)
    out = build_regulator("none")(ctx)
    assert out.term.dim() == 0 and out.term.item() == 0.0 and out.token_weight is None
    torch.testing.assert_close(out.metrics["entropy"], t(2.0))
    out = build_regulator("bonus", coef=0.1)(ctx)
    term = out.term
    torch.testing.assert_close(term, t(-0.2))  # -0.1 * 2
    term.backward()
    torch.testing.assert_close(entropy.grad, t([[-0.1 / 3, -0.1 / 3], [-0.1 / 3, 0.0]]))
    assert ENTROPY.build({"name": "bonus"})[1].coef == 0.001
    with pytest.raises(OutriderError):
        ENTROPY.build({"name": "none", "coef": 0.1})


def test_registries_list_the_builtins():
    assert LOSSES.names() == ["clip_cov", "gspo", "kl_cov", "none", "ppo"]
    assert ENTROPY.names() == ["adaptive_entropy", "bonus", "entropy_mask", "epo", "none", "siren"]
    with pytest.raises(OutriderError, match="valid: clip_cov, gspo, kl_cov, none, ppo"):
        LOSSES.build({"name": "reinforce"})


def test_entropy_advantage_covariance_by_hand():
    from outrider.update.learner import entropy_advantage_covariance

    # action tokens: logp [0, −2, −4], A [2, 0, −2]; means −2 and 0 → cov = [2·2, 0·0, (−2)(−2)] = [4, 0, 4]
    logp, adv, mask = t([[0.0, -2.0, -4.0, -9.0]]), t([[2.0, 0.0, -2.0, 5.0]]), t([[1, 1, 1, 0]])
    mean_cov, frac = entropy_advantage_covariance(logp, adv, mask)
    torch.testing.assert_close(mean_cov, t(8.0 / 3))
    torch.testing.assert_close(frac, t(2.0 / 3))
