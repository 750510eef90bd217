"""STARC [99]: EPIC and VAL canonicalisation against hand-computed arrays, distance 0 for potential-shaped and
positively rescaled rewards, the [0, 1] bound, and the regret it is meant to bound."""

from __future__ import annotations

import numpy as np
import pytest

from outrider.errors import OutriderError
from outrider.score.starc import (epic_canon, epic_distance, l2_distance, potential_shaped, random_mdp, regret,
                                  standardise, starc_distance, val_canon)


def test_epic_canon_hand_computed():
    # 2 states, 1 action, γ ½; R(0,·,0) = 1 else 0: Φ = (½, 0), E[R] = ¼, c = R + ½Φ(s′) − Φ(s) − ⅛
    R = np.zeros((2, 1, 2))
    R[0, 0, 0] = 1.0
    c = epic_canon(R, 0.5)
    assert c[:, 0, :].ravel().tolist() == pytest.approx([0.625, -0.625, 0.125, -0.125])


def test_val_canon_hand_computed():
    # action a moves to state a; R = 1 for action 1; uniform π: r_π = ½, V = ½/(1 − ½) = 1 everywhere;
    # c(s, a) = R(s, a) + ½V(a) − V(s) = R − ½
    T = np.zeros((2, 2, 2))
    T[:, 0, 0] = T[:, 1, 1] = 1.0
    R = np.zeros((2, 2, 2))
    R[:, 1, :] = 1.0
    c = val_canon(R, T, 0.5)
    assert np.allclose(c[:, 0, :], -0.5) and np.allclose(c[:, 1, :], 0.5)


def test_shaped_and_rescaled_rewards_are_at_distance_zero_negated_at_one():
    rng = np.random.default_rng(0)
    T, _ = random_mdp(5, 3, rng)
    R = rng.normal(size=(5, 3, 5))
    shaped = potential_shaped(R, rng.normal(size=5) * 3, 0.9)
    for canon in ("epic", "val"):
        assert starc_distance(R, shaped, T, 0.9, canon) == pytest.approx(0.0, abs=1e-9)
        assert starc_distance(R, 7.5 * R, T, 0.9, canon) == pytest.approx(0.0, abs=1e-9)
        assert starc_distance(R, 2.0 * shaped, T, 0.9, canon) == pytest.approx(0.0, abs=1e-9)
        assert starc_distance(R, -R, T, 0.9, canon) == pytest.approx(1.0, abs=1e-9)
    assert epic_distance(R, 3 * shaped, 0.9) == pytest.approx(0.0, abs=1e-6)
    assert l2_distance(R, shaped) > 0.05  # plain L2 is fooled by shaping


def test_distances_are_bounded_and_a_trivial_reward_is_at_one_half():
    rng = np.random.default_rng(1)
    T, _ = random_mdp(4, 2, rng)
    for _ in range(50):
        R1, R2 = rng.normal(size=(4, 2, 4)), rng.normal(size=(4, 2, 4)) * rng.exponential()
        for canon in ("epic", "val"):
            assert 0.0 <= starc_distance(R1, R2, T, 0.8, canon) <= 1.0
        assert 0.0 <= epic_distance(R1, R2, 0.8) <= 1.0 and 0.0 <= l2_distance(R1, R2) <= 1.0
    zero = np.zeros((4, 2, 4))
    assert standardise(zero).tolist() == zero.tolist()
    assert starc_distance(R1, zero, T, 0.8, "val") == pytest.approx(0.5)
    # a potential-shaped zero reward canonicalises to zero: also ½ from any reward
    assert starc_distance(R1, potential_shaped(zero, np.arange(4.0), 0.8), T, 0.8, "epic") == pytest.approx(0.5)


def test_regret_zero_for_same_optimal_policies_one_for_negated():
    rng = np.random.default_rng(2)
    T, mu0 = random_mdp(4, 3, rng)
    R = rng.normal(size=(4, 3, 4))
    assert regret(R, potential_shaped(R, rng.normal(size=4), 0.9), T, 0.9, mu0) == pytest.approx(0.0, abs=1e-9)
    assert regret(R, -R, T, 0.9, mu0) == pytest.approx(1.0, abs=1e-6)
    assert regret(np.zeros_like(R), R, T, 0.9, mu0) == 0.0  # every policy equally good


def test_bad_input_is_one_error():
    with pytest.raises(OutriderError, match="canon 'l1' is unknown"):
        starc_distance(np.zeros((2, 1, 2)), np.zeros((2, 1, 2)), np.zeros((2, 1, 2)), 0.9, "l1")
    with pytest.raises(OutriderError, match=r"shape \(2, 2\)"):
        epic_canon(np.zeros((2, 2)), 0.9)
