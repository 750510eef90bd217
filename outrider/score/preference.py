"""Preference oracles: who wins between two responses to one prompt. Where a score piece gives each episode a
number, an oracle compares two episodes, ``P(y_i ≻ y_j)``, and need not be transitive: it is what DNO [48] optimises
against and what on-policy preference pairs are picked by (`explore: preference_pairs`).

An oracle is registered in `PREFERENCES` as ``oracle(episodes, cfg) -> Tensor [n, n]``, the episodes one group (one
prompt, already scored by the recipe's score pieces), with ``P[i, j] + P[j, i] = 1`` and ``P[i, i] = ½``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import Tensor

from outrider.data import Episode
from outrider.registry import BuildContext, Piece, PieceConfig, Registry

PREFERENCES: Registry = Registry("preference oracle")


class RewardOracleConfig(PieceConfig):
    """Options of the `reward` oracle."""

    temperature: float = Field(0.0, ge=0, description="τ: P(y_i ≻ y_j) = σ((r_i − r_j)/τ); 0: the hard comparison "
                                                      "(1 if r_i > r_j, ½ if equal, 0 else).")


@PREFERENCES.register("reward", config=RewardOracleConfig)
def reward_oracle(episodes: list[Episode], cfg: RewardOracleConfig) -> Tensor:
    """The score pieces' total reward as a (transitive, Bradley–Terry) preference: ``P(y_i ≻ y_j) = σ((r_i −
    r_j)/τ)``, or with τ = 0 ``1[r_i > r_j] + ½·1[r_i = r_j]``."""
    r = torch.tensor([e.total_reward() for e in episodes], dtype=torch.float64)
    diff = r[:, None] - r[None, :]
    if cfg.temperature == 0:
        return (diff > 0).double() + 0.5 * (diff == 0).double()
    return torch.sigmoid(diff / cfg.temperature)


class CyclicOracleConfig(PieceConfig):
    """Options of the `cyclic` oracle."""

    classes: int = Field(3, ge=3, description="n, odd: the number of classes in the cycle (3: rock-paper-scissors).")
    correct_first: bool = Field(True, description="A successful episode (the env's verdict) beats an unsuccessful "
                                                  "one, and two unsuccessful ones tie; the cycle decides between "
                                                  "two successful ones. false: the cycle decides every comparison.")

    @field_validator("classes")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("must be odd, so that every class beats as many classes as beat it")
        return v


def response_class(episode: Episode, n: int) -> int:
    """The cyclic oracle's class of a response: the code point of its first character mod n (0 when empty)."""
    text = episode.response
    return ord(text[0]) % n if text else 0


@PREFERENCES.register("cyclic", config=CyclicOracleConfig)
def cyclic_oracle(episodes: list[Episode], cfg: CyclicOracleConfig) -> Tensor:
    """An intransitive preference for tests and experiments: class ``c(y) = ord(y[0]) mod n`` and ``y ≻ y'`` when
    ``(c(y) − c(y')) mod n`` is in ``1 … (n−1)/2`` (for n = 3 rock-paper-scissors: 1 beats 0, 2 beats 1, 0 beats
    2); equal classes tie. With ``correct_first`` success comes before the cycle. No Bradley–Terry reward
    reproduces it: every class loses to another, so the policy it favours is a mixture (uniform over the classes
    for the bare cycle), which a reward maximiser cannot reach."""
    n = cfg.classes
    c = torch.tensor([response_class(e, n) for e in episodes])
    d = (c[:, None] - c[None, :]) % n
    p = (d >= 1).double() * (d <= (n - 1) // 2).double() + 0.5 * (d == 0).double()
    if cfg.correct_first:
        ok = torch.tensor([bool(e.success) for e in episodes])
        both, neither = ok[:, None] & ok[None, :], ~ok[:, None] & ~ok[None, :]
        p = torch.where(both, p, torch.where(neither, torch.full_like(p, 0.5), ok[:, None].double()))
    return p


def build_oracle(section: dict[str, Any], build: BuildContext | None, where: str) -> Piece:
    """The oracle of a recipe section ``{name, ...options}`` (one-line errors naming `where`)."""
    return PREFERENCES.create(section, build, where)


def win_rates(p: Tensor) -> Tensor:
    """Each response's mean win probability against the others of its group, ``w_i = Σ_{j≠i} P[i, j] / (n − 1)``
    (DNO's per-iteration reward [48]); ½ for a group of one."""
    n = p.shape[0]
    if n < 2:
        return torch.full((n,), 0.5, dtype=p.dtype)
    return (p.sum(1) - p.diagonal()) / (n - 1)


def oracle_pairs(p: Tensor, responses: list[str], rng: np.random.Generator,
                 max_pairs: int | None = None) -> list[tuple[int, int]]:
    """Labelled pairs of one group for a reward model: ``(chosen, rejected)`` indices. Every two samples with
    different texts are compared once (the first of each repeated text stands for it); a strict preference P[i, j]
    of 0 or 1 labels the pair, a tie (½) gives none, and a soft one is drawn, i over j with probability P[i, j]
    (the oracle's own Bradley–Terry noise). With `max_pairs`, a uniform draw of at most that many."""
    first: dict[str, int] = {}
    for i, text in enumerate(responses):
        first.setdefault(text, i)
    idx = sorted(first.values())
    out = []
    for a, i in enumerate(idx):
        for j in idx[a + 1:]:
            q = float(p[i, j])
            if q == 0.5:
                continue
            wins = q == 1.0 or (q != 0.0 and rng.random() < q)
            out.append((i, j) if wins else (j, i))
    if max_pairs is not None and len(out) > max_pairs:
        out = [out[k] for k in sorted(rng.choice(len(out), max_pairs, replace=False).tolist())]
    return out
