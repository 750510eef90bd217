"""Edge behaviour where outrider's update pieces meet verl's `core_algos` conventions (issue 32): the k3 KL clamp,
the GSPO / Clip-Cov / KL-Cov ratio clamps, and loss aggregation with rows that have no trainable token."""

from __future__ import annotations

import math

import pytest
import torch

from outrider.kl import kl_penalty


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


# ---------------------------------------------------------------- k3 KL: verl's low_var_kl clamps to [-10, 10]


def test_k3_value_is_clamped_at_10_where_the_reference_is_about_13_6_times_likelier():
    """k3 = ρ − log ρ − 1 with ρ = π_ref/π: 12.5× gives 12.5 − ln 12.5 − 1 = 8.9743 (free); 14× gives 10.361,
    clamped to 10; the policy 1.6e5× likelier than the reference (log ρ = −12) gives 11.000006, clamped to 10."""
    logp = t([math.log(0.04), math.log(0.04), 0.0, 0.0]).requires_grad_(True)
    ref = t([math.log(0.5), math.log(0.56), -12.0, 0.0])
    kl = kl_penalty(logp, ref, "k3")
    torch.testing.assert_close(kl, t([12.5 - math.log(12.5) - 1.0, 10.0, 10.0, 0.0]))
    kl.sum().backward()
    # d k3 / d logp = −(ρ − 1) inside the clamp, 0 beyond it (and 0 at ρ = 1)
    torch.testing.assert_close(logp.grad, t([-11.5, 0.0, 0.0, 0.0]))


def test_k3_clamp_threshold():
    """The clamp binds from log ρ ≈ 2.6109 up (ρ ≈ 13.61) and from log ρ ≈ −11.0 down."""
    d = t([2.60, 2.62, -10.99, -11.01])
    kl = kl_penalty(torch.zeros(4, dtype=torch.float64), d, "k3")
    assert kl[0] < 10 and kl[1] == 10 and kl[2] < 10 and kl[3] == 10


# ---------------------------------------------------------------- ratio clamps at extremes


def surrogate(name: str, log_ratios, advantages, mask=None, **options):
    """(loss, logp.grad, metrics) of a loss piece with old = 0 and logp = the given token log-ratios."""
    from outrider.update import LOSSES, TokenContext

    logp = t(log_ratios).requires_grad_(True)
    mask = torch.ones_like(logp) if mask is None else t(mask)
    entry, cfg = LOSSES.build({"name": name, **options})
    loss, metrics = entry.fn(TokenContext(logp, torch.zeros_like(logp), t(advantages), mask), cfg)
    loss.sum().backward()
    return loss.detach(), logp.grad, metrics


def test_gspo_averages_raw_token_log_ratios():
    """Token log-ratios 25, 0, 2: s = exp(mean) = e^9 (verl averages the raw values; clamping each token to ±20
    first would give e^(22/3)). A = −1 and s far above 1 + ε: the unclipped branch −A·s wins, gradient s."""
    loss, grad, m = surrogate("gspo", [[25.0, 0.0, 2.0]], [[-1.0, -1.0, -1.0]])
    s = math.exp(9.0)
    torch.testing.assert_close(loss, t([[s, s, s]]))
    torch.testing.assert_close(grad, t([[s, s, s]]))
    torch.testing.assert_close(m["ratio_mean"], t(s))


def test_gspo_caps_the_sequence_log_ratio_at_10_with_no_gradient_beyond():
    """Sequence log-ratio 12 > 10: s_{i,t} = e^10 and, as in verl (the clamp sits on the per-token log-ratio),
    no gradient; a masked token's log-ratio of 50 is ignored."""
    loss, grad, m = surrogate("gspo", [[12.0, 12.0, 50.0]], [[-1.0, -1.0, -1.0]], mask=[[1, 1, 0]])
    e10 = math.exp(10.0)
    torch.testing.assert_close(loss, t([[e10, e10, 0.0]]))
    assert grad.tolist() == [[0.0, 0.0, 0.0]]
    torch.testing.assert_close(m["ratio_mean"], t(e10))


def test_gspo_has_no_lower_clamp():
    """Sequence log-ratio −30: s = e^-30 (not e^-20). A = +1: the unclipped −A·s is the max, gradient −s."""
    loss, grad, _ = surrogate("gspo", [[-30.0, -30.0]], [[1.0, 1.0]])
    s = math.exp(-30.0)
    torch.testing.assert_close(loss, t([[-s, -s]]), rtol=1e-9, atol=0)
    torch.testing.assert_close(grad, t([[-s, -s]]), rtol=1e-9, atol=0)


def test_ppo_keeps_verls_token_clamp_of_20():
    """verl's vanilla PPO clamps the token log-ratio to ±20: log-ratio 25 with A = −1 gives −A·e^20, no gradient."""
    loss, grad, _ = surrogate("ppo", [[25.0, 0.0]], [[-1.0, -1.0]])
    torch.testing.assert_close(loss, t([[math.exp(20.0), 1.0]]))
    assert grad[0, 0] == 0.0


def test_clip_cov_ratio_is_unclamped():
    """Clip-Cov's r = exp(logp − old), unclamped as in verl / [153]: log-ratio 25 with A = −1 (the band holds no
    token, so nothing is detached) gives loss e^25 with gradient e^25."""
    loss, grad, _ = surrogate("clip_cov", [[25.0, 0.0]], [[-1.0, -1.0]], clip_cov_lb=1e6, clip_cov_ub=2e6)
    e25 = math.exp(25.0)
    torch.testing.assert_close(loss, t([[e25, 1.0]]))
    torch.testing.assert_close(grad, t([[e25, 1.0]]))


def test_kl_cov_ratio_and_penalty_are_unclamped():
    """KL-Cov: token 0 (log-ratio 25, A = +1) has the largest covariance, (2/3)(50/3) = 100/9 against 25/9, and
    is the one token (k = int(3·0.34) = 1) penalised by β·|25|: loss −e^25 + 12.5, gradient −e^25 + 0.5
    (β = 0.5); tokens with A = 0 have loss 0."""
    loss, grad, m = surrogate("kl_cov", [[25.0, 0.0, 0.0]], [[1.0, 0.0, 0.0]], kl_cov_ratio=0.34, ppo_kl_coef=0.5)
    e25 = math.exp(25.0)
    torch.testing.assert_close(loss, t([[-e25 + 12.5, 0.0, 0.0]]))
    torch.testing.assert_close(grad, t([[-e25 + 0.5, 0.0, 0.0]]))
    torch.testing.assert_close(m["kl_abs_mean"], t(25.0 / 3))


# ---------------------------------------------------------------- aggregation: one step-wide denominator


def ragged_batch():
    """8 rows of 5 positions, rows 2 and 6 without any trainable token, a NaN on a masked position."""
    g = torch.Generator().manual_seed(1)
    loss = torch.randn(8, 5, generator=g, dtype=torch.float64)
    lengths = [5, 2, 0, 3, 1, 4, 0, 5]
    mask = t([[1.0 if j < n else 0.0 for j in range(5)] for n in lengths])
    loss[0, :][mask[0] == 0] = float("nan")
    loss[3, 4] = float("nan")
    return loss, mask


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                                  "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("splits", [[8], [3, 5], [1, 2, 3, 2], [4, 4]])
def test_micro_batches_with_the_step_denominator_sum_to_the_whole(mode, splits):
    from outrider.update.aggregate import aggregate, denominator

    loss, mask = ragged_batch()
    whole_in = loss.clone().requires_grad_(True)
    whole = aggregate(whole_in, mask, mode, norm_length=7)
    whole.backward()
    parts_in = loss.clone().requires_grad_(True)
    total = denominator(mask, mode, norm_length=7)
    summed = sum(aggregate(x, m, mode, norm_length=7, total=total)
                 for x, m in zip(parts_in.split(splits), mask.split(splits)))
    summed.backward()
    torch.testing.assert_close(summed, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(parts_in.grad, whole_in.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_sequence_modes_need_only_the_row_count(mode):
    """D of a sequence mode is the row count: each micro-batch aggregated on its own, weighted by its share of
    the rows, sums to the whole, whichever micro-batch the empty rows fall in (false when D counts only the
    non-empty rows)."""
    from outrider.update.aggregate import aggregate

    loss, mask = ragged_batch()
    whole = aggregate(loss, mask, mode)
    for splits in ([2, 6], [3, 5], [1, 1, 6]):
        parts = sum(aggregate(x, m, mode) * m.shape[0] / 8 for x, m in zip(loss.split(splits), mask.split(splits)))
        torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                                  "seq-mean-token-sum-norm"])
def test_a_row_without_trainable_tokens_counts_like_a_zero_advantage_row(mode):
    """Rows 0: loss 1, 2 (two tokens); row 1: loss 4 (one token); row 2: either no trainable token or two tokens
    of loss 0 (a zero-advantage row). The sequence modes give the same result both ways (row 2 counts once),
    by hand: seq-mean-token-sum (3 + 4 + 0)/3; seq-mean-token-mean (1.5 + 4 + 0)/3; sum-norm 7/(3·2).
    token-mean counts tokens: 7/3 with the empty row, 7/5 with the zero-loss tokens."""
    from outrider.update.aggregate import aggregate

    loss = t([[1.0, 2.0], [4.0, 0.0], [0.0, 0.0]])
    empty = aggregate(loss, t([[1, 1], [1, 0], [0, 0]]), mode)
    zero_adv = aggregate(loss, t([[1, 1], [1, 0], [1, 1]]), mode)
    expected = {"token-mean": (7 / 3, 7 / 5), "seq-mean-token-sum": (7 / 3, 7 / 3),
                "seq-mean-token-mean": (5.5 / 3, 5.5 / 3), "seq-mean-token-sum-norm": (7 / 6, 7 / 6)}[mode]
    torch.testing.assert_close((empty, zero_adv), (t(expected[0]), t(expected[1])))
