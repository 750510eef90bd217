"""STARC distances between reward functions on tabular MDPs [99] (Skalse et al.; checked against the authors'
`lucyfarnik/starc`, `canon.py` / `distance/canon.py`), with EPIC (Gleave et al. 2021) and plain L2 for comparison.

A tabular MDP: transitions ``T[s, a, s']``, discount γ, initial distribution μ0; a reward ``R[s, a, s']``.

- **Canonicalisation** c removes what does not change the optimal policies (potential shaping, S′-redistribution):
  - EPIC: ``c(R)(s,a,s′) = R(s,a,s′) + γ·Φ(s′) − Φ(s) − γ·E[R(S,A,S′)]`` with ``Φ(s) = E_{A,S′}[R(s,A,S′)]``, A and
    S, S′ drawn independently from coverage distributions D_A, D_S (uniform by default, as in the authors' code);
  - VAL: ``c(R)(s,a,s′) = E_{S″∼T(s,a)}[R(s,a,S″) + γ·V^π(S″)] − V^π(s)`` for a fixed policy π (uniform by default):
    the advantage of a under π, the same for every s′.
- **Standardisation** ``s(R) = c(R) / ‖c(R)‖₂`` (``c(R)`` itself when its norm is 0: a reward that makes every
  policy equally good).
- **STARC distance** ``d(R1, R2) = ½·‖s(R1) − s(R2)‖₂`` between 0 and 1: 0 for a potential-shaped or positively rescaled
  copy, 1 for a negated one, ½ between any reward and a trivial one.
- **EPIC** ``d = sqrt((1 − ρ)/2)`` with ρ the Pearson correlation of the two EPIC-canonicalised rewards over
  D_S × D_A × D_S; **L2** ``½·‖R1/‖R1‖ − R2/‖R2‖‖₂`` (no canonicalisation).

Regret (what a distance should predict): ``(J1(π1*) − J1(π2*)) / (J1(π1*) − min_π J1(π))`` with π_i* optimal for
R_i and J1 the expected discounted return under R1 from μ0.
"""

from __future__ import annotations

import numpy as np

from outrider.errors import OutriderError


def _check(R: np.ndarray, T: np.ndarray | None = None) -> None:
    if R.ndim != 3 or R.shape[0] != R.shape[2]:
        raise OutriderError(f"starc: a reward is an array [S, A, S], got shape {R.shape}")
    if T is not None and T.shape != R.shape:
        raise OutriderError(f"starc: transitions have shape {T.shape}, the reward {R.shape}; they must match")


def epic_canon(R: np.ndarray, gamma: float, ds: np.ndarray | None = None, da: np.ndarray | None = None) -> np.ndarray:
    """EPIC canonicalisation ``R + γΦ(s′) − Φ(s) − γE[R]`` (module docstring), uniform D_S, D_A by default."""
    _check(R)
    n_s, n_a, _ = R.shape
    ds = np.full(n_s, 1 / n_s) if ds is None else ds
    da = np.full(n_a, 1 / n_a) if da is None else da
    phi = np.einsum("sat,a,t->s", R, da, ds)
    mean = float(ds @ phi)
    return R + gamma * phi[None, None, :] - phi[:, None, None] - gamma * mean


def policy_value(R: np.ndarray, T: np.ndarray, gamma: float, pi: np.ndarray) -> np.ndarray:
    """``V^π = (I − γP_π)⁻¹ r_π`` with ``r_π(s) = Σ_a π(a|s) Σ_s′ T(s,a,s′) R(s,a,s′)``."""
    r_pi = np.einsum("sa,sat,sat->s", pi, T, R)
    p_pi = np.einsum("sa,sat->st", pi, T)
    return np.linalg.solve(np.eye(len(r_pi)) - gamma * p_pi, r_pi)


def val_canon(R: np.ndarray, T: np.ndarray, gamma: float, pi: np.ndarray | None = None) -> np.ndarray:
    """VAL canonicalisation ``E_{S″∼T(s,a)}[R(s,a,S″) + γV^π(S″)] − V^π(s)``, broadcast over s′ (uniform π by
    default)."""
    _check(R, T)
    n_s, n_a, _ = R.shape
    pi = np.full((n_s, n_a), 1 / n_a) if pi is None else pi
    v = policy_value(R, T, gamma, pi)
    q = np.einsum("sat,sat->sa", T, R + gamma * v[None, None, :])
    return np.broadcast_to((q - v[:, None])[:, :, None], R.shape).copy()


def standardise(C: np.ndarray) -> np.ndarray:
    """``C / ‖C‖₂``, or C when its norm is 0."""
    norm = float(np.linalg.norm(C))
    return C / norm if norm > 1e-12 else C


def starc_distance(R1: np.ndarray, R2: np.ndarray, T: np.ndarray, gamma: float, canon: str = "val") -> float:
    """``½‖s(R1) − s(R2)‖₂`` with the `canon` ("epic" or "val") canonicalisation; between 0 and 1."""
    if canon == "epic":
        c1, c2 = epic_canon(R1, gamma), epic_canon(R2, gamma)
    elif canon == "val":
        c1, c2 = val_canon(R1, T, gamma), val_canon(R2, T, gamma)
    else:
        raise OutriderError(f"starc: canon '{canon}' is unknown; valid: epic, val")
    return 0.5 * float(np.linalg.norm(standardise(c1) - standardise(c2)))


def epic_distance(R1: np.ndarray, R2: np.ndarray, gamma: float) -> float:
    """EPIC: ``sqrt((1 − ρ)/2)``, ρ the Pearson correlation of the EPIC-canonicalised rewards (uniform coverage;
    ρ = 0 when one of them is constant)."""
    c1, c2 = epic_canon(R1, gamma).ravel(), epic_canon(R2, gamma).ravel()
    c1, c2 = c1 - c1.mean(), c2 - c2.mean()
    denom = float(np.linalg.norm(c1) * np.linalg.norm(c2))
    rho = float(c1 @ c2) / denom if denom > 1e-12 else 0.0
    return float(np.sqrt(max(0.0, (1 - rho) / 2)))


def l2_distance(R1: np.ndarray, R2: np.ndarray) -> float:
    """``½‖R1/‖R1‖ − R2/‖R2‖‖₂``: standardised but not canonicalised."""
    return 0.5 * float(np.linalg.norm(standardise(R1) - standardise(R2)))


def optimal_q(R: np.ndarray, T: np.ndarray, gamma: float, sign: float = 1.0, iters: int = 2000,
              tol: float = 1e-10) -> np.ndarray:
    """Q* of ``sign·R`` by value iteration (sign −1: the worst policy's Q, negated)."""
    n_s, n_a, _ = R.shape
    q = np.zeros((n_s, n_a))
    r = sign * np.einsum("sat,sat->sa", T, R)
    for _ in range(iters):
        new = r + gamma * np.einsum("sat,t->sa", T, q.max(axis=1))
        if np.abs(new - q).max() < tol:
            return new
        q = new
    return q


def greedy(q: np.ndarray) -> np.ndarray:
    """The deterministic policy ``argmax_a Q(s, a)`` as a one-hot [S, A] array (the first among ties)."""
    pi = np.zeros_like(q)
    pi[np.arange(len(q)), q.argmax(axis=1)] = 1.0
    return pi


def policy_return(R: np.ndarray, T: np.ndarray, gamma: float, pi: np.ndarray, mu0: np.ndarray) -> float:
    """``J(π) = μ0 · V^π``."""
    return float(mu0 @ policy_value(R, T, gamma, pi))


def regret(R1: np.ndarray, R2: np.ndarray, T: np.ndarray, gamma: float, mu0: np.ndarray) -> float:
    """Normalised regret under R1 of a policy optimal for R2 (module docstring); 0 when every policy is equally
    good under R1."""
    best = policy_return(R1, T, gamma, greedy(optimal_q(R1, T, gamma)), mu0)
    worst = policy_return(R1, T, gamma, greedy(optimal_q(R1, T, gamma, sign=-1.0)), mu0)
    if best - worst < 1e-9:
        return 0.0
    return (best - policy_return(R1, T, gamma, greedy(optimal_q(R2, T, gamma)), mu0)) / (best - worst)


def potential_shaped(R: np.ndarray, phi: np.ndarray, gamma: float) -> np.ndarray:
    """``R(s,a,s′) + γΦ(s′) − Φ(s)``: the same optimal policies as R."""
    return R + gamma * phi[None, None, :] - phi[:, None, None]


def random_mdp(n_states: int, n_actions: int, rng: np.random.Generator,
               concentration: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(T, μ0): Dirichlet(`concentration`) transition rows and a uniform initial distribution."""
    T = rng.dirichlet(np.full(n_states, concentration), size=(n_states, n_actions))
    return T, np.full(n_states, 1 / n_states)
