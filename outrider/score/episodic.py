"""Global × episodic novelty bonuses [130]: a *global* bonus (novelty against everything the run has seen) times an
*episodic* one (novelty inside the current episode), on each turn's env state.

Henaff et al. [130] find that a global bonus helps when episodes share structure (one layout, many starts) and an
episodic one when each episode is a new context (a fresh layout every episode), and that their product
b(s_t) = b_global(s_t) · b_episodic(s_t) is the robust choice across both; their tabular form is
b_global = 1/√N(s), b_episodic = 1/√N_e(s), and with function approximation RND [128] as the global factor and an
episodic count or E3B's elliptical bonus as the episodic one [130, para]. The state of turn k is the env's
`state_key` before the turn's action (the state the policy acts in, the same state the hidden state before the
action encodes).

- `state_count` (episodes, one value per turn): b_k = g(s_k)·e(s_k) with g = 1/√N(s_k), N the run's count of
  turns in s_k (earlier steps and the whole current batch, so it is at least 1 and one batch sees one table) or 1
  under ``global_bonus: none``; e = 1/√N_e(s_k), N_e the turns 0..k of this episode in s_k, or 1 under
  ``episodic_bonus: none``. The counts are the piece's state.
- `rnd_episodic` (packed): RND's normalised bonus on each action token [128] (`score/novelty.py`) times the
  episodic factor of the token's turn: ``count``, 1/√N_e(s_k) over `Batch.turn_state_ids`; or ``elliptical``
  (E3B's form), φ_kᵀ C_{k−1}⁻¹ φ_k with C_{k−1} = λI + Σ_{j<k} φ_j φ_jᵀ over the episode's earlier turns, φ_k the
  RND-normalised hidden state at the turn's first action token (E3B learns φ by inverse dynamics; this reads the
  policy's own state, no extra model).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from outrider.data import Batch, Episode
from outrider.errors import OutriderError
from outrider.registry import BuildContext, Needs, Piece
from outrider.score import SCORE, ComponentConfig
from outrider.score.novelty import RND, RNDConfig


def episodic_counts(keys: Sequence[Hashable | None]) -> list[int]:
    """N_e(s_k) for each turn k: how many of turns 0..k were in turn k's state, itself included (1 on a first
    visit); 0 for a turn without a key."""
    seen: dict[Hashable, int] = {}
    out = []
    for key in keys:
        if key is None:
            out.append(0)
            continue
        seen[key] = seen.get(key, 0) + 1
        out.append(seen[key])
    return out


def inverse_sqrt(count: int | float) -> float:
    """1/√N, 0 for N ≤ 0 (a turn without a state gets no bonus)."""
    return 0.0 if count <= 0 else 1.0 / math.sqrt(count)


def elliptical_episodic(features: Tensor, lamb: float) -> Tensor:
    """E3B's episodic bonus [130] of K turns' features [K, d] in order: b_k = φ_kᵀ C_{k−1}⁻¹ φ_k with
    C_{k−1} = λI + Σ_{j<k} φ_j φ_jᵀ (so the first turn gets |φ|²/λ and a repeat of it |φ|²/(λ + |φ|²)); C⁻¹ is
    kept by Sherman-Morrison rank-one updates, in float64."""
    x = features.double()
    inv = torch.eye(x.shape[1], dtype=torch.float64) / lamb
    out = torch.zeros(x.shape[0], dtype=torch.float64)
    for k in range(x.shape[0]):
        u = inv @ x[k]
        out[k] = x[k] @ u
        inv = inv - torch.outer(u, u) / (1.0 + out[k])
    return out


class StateCountConfig(ComponentConfig):
    global_bonus: Literal["count", "none"] = Field(
        "count", description="count: 1/√N(s), N the run's visits to the state (this step's batch included); none: "
                             "1 (the episodic bonus alone).")
    episodic_bonus: Literal["count", "none"] = Field(
        "count", description="count: 1/√N_e(s), N_e the visits to the state in this episode up to this turn; "
                             "none: 1 (the global bonus alone).")


def _no_state_key(where: str, name: str) -> OutriderError:
    return OutriderError(f"{where} ({name}): the task's env gives no state_key (Env.state_key()); count bonuses "
                         "need a task whose env names its states (minigrid, calculator, bandit, textworld)")


@SCORE.register("state_count", config=StateCountConfig, needs=Needs(level="step"))
class StateCount(Piece):
    """Tabular global × episodic bonus [130]: turn k of an episode gets b_k = (1/√N(s_k))·(1/√N_e(s_k)), either
    factor replaceable by 1; the run's counts N are the piece's state."""

    def __init__(self, cfg: StateCountConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        self.where = (build.where if build else "") or "score"
        self.counts: dict[Hashable, int] = {}

    def __call__(self, episodes: list[Episode]) -> list[list[float]]:
        cfg: StateCountConfig = self.cfg
        keys = [[t.state_key for t in e.turns] for e in episodes]
        if episodes and all(k is None for row in keys for k in row):
            raise _no_state_key(self.where, "state_count")
        for row in keys:  # the whole batch is counted first: every episode of a step reads one table
            for key in row:
                if key is not None:
                    self.counts[key] = self.counts.get(key, 0) + 1
        out = []
        for row in keys:
            local = episodic_counts(row)
            values = []
            for key, n_e in zip(row, local):
                if key is None:
                    values.append(0.0)
                    continue
                g = inverse_sqrt(self.counts[key]) if cfg.global_bonus == "count" else 1.0
                e = inverse_sqrt(n_e) if cfg.episodic_bonus == "count" else 1.0
                values.append(g * e)
            out.append(values)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = dict(state.get("counts", {}))


class RNDEpisodicConfig(RNDConfig):
    episodic: Literal["count", "elliptical"] = Field(
        "count", description="Episodic factor: count, 1/√N_e(s) of the turn's env state (needs the env's "
                             "state_key); elliptical, E3B's φᵀC⁻¹φ on the normalised hidden state against the "
                             "episode's earlier turns.")
    ridge: float = Field(0.1, gt=0, description="λ of C = λI + Σ φφᵀ (elliptical; E3B's 0.1).")


def turn_factors(batch: Batch, cfg: RNDEpisodicConfig, features: Tensor | None, where: str) -> Tensor:
    """[B, T] the episodic factor of each token's turn (1 where a turn has no state key or no action token).
    ``features``: [B, T, d] normalised states (elliptical only)."""
    step = batch.step_index.cpu()
    factors = torch.ones(step.shape)
    if cfg.episodic == "count":
        ids = batch.turn_state_ids
        if ids is None or not bool((ids >= 0).any()):
            raise _no_state_key(where, "rnd_episodic")
        for i, row in enumerate(ids.cpu().tolist()):
            counts = episodic_counts([None if s < 0 else s for s in row])
            table = torch.tensor([inverse_sqrt(n) if n > 0 else 1.0 for n in counts] + [1.0])
            factors[i] = table[step[i].clamp(min=-1)]  # padding (-1) reads the trailing 1
        return factors
    mask = batch.action_mask.cpu() > 0
    for i in range(step.shape[0]):
        positions = mask[i].nonzero().flatten()
        turns = step[i, positions]
        first = torch.ones_like(turns, dtype=torch.bool)
        first[1:] = turns[1:] != turns[:-1]  # the first action token of each turn carries its state
        bonus = elliptical_episodic(features[i, positions[first]], cfg.ridge).float()
        per_turn = dict(zip(turns[first].tolist(), bonus.tolist()))
        factors[i, positions] = torch.tensor([per_turn[k] for k in turns.tolist()])
    return factors


@SCORE.register("rnd_episodic", config=RNDEpisodicConfig, needs=Needs(packed=True, hidden=True))
class RNDEpisodic(RND):
    """Global × episodic bonus with function approximation [130]: RND's bonus on each action token [128] times the
    episodic factor of its turn (``count`` 1/√N_e(s_k), or E3B's elliptical φ_kᵀC_{k−1}⁻¹φ_k). The RND networks,
    optimiser, moments and generator are the piece's state; the episodic factor resets every episode."""

    def __init__(self, cfg: RNDEpisodicConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        self.where = (build.where if build else "") or "score"

    def __call__(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        cfg: RNDEpisodicConfig = self.cfg
        features = None
        if cfg.episodic == "elliptical":  # normalised by the moments of earlier steps (RND adds this batch next)
            h = batch.hidden.detach().float().cpu()
            mean, std = self.state_moments.mean, self.state_moments.var.sqrt().clamp(min=1e-8)
            features = ((h - mean) / std).clamp(-5, 5)
        factors = turn_factors(batch, cfg, features, self.where)
        rewards, own = super().__call__(batch)
        mask = batch.action_mask.cpu() > 0
        out = {"rnd_episodic/raw_bonus": own["rnd/raw_bonus"], "rnd_episodic/predictor_loss": own["rnd/predictor_loss"],
               "rnd_episodic/episodic_factor": float(factors[mask].mean()) if bool(mask.any()) else 0.0}
        return rewards * factors.to(rewards.device), out
