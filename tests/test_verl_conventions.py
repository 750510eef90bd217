"""Edge behaviour where outrider's update pieces meet verl's `core_algos` conventions (issue 32): the k3 KL clamp,
the GSPO / Clip-Cov / KL-Cov ratio clamps, and loss aggregation with rows that have no trainable token."""

from __future__ import annotations

import math

import pytest
import torch

from outrider.update.kl import kl_penalty


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
