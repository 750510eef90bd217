"""score/: reward components and their composition.

A component is a piece with one of two forms, declared by its `Needs`:

- **on episodes** (the default): ``component(episodes) -> list[value]`` over the whole batch (so group-level
  rewards are possible), called as soon as episodes exist (exploration strategies such as dynamic sampling read
  them); ``needs.level`` says whether a value is one float per episode (``trajectory``), a list per turn
  (``step``) or per action token (``token``). `compose` writes ``weight · value`` into
  ``episode.rewards[level][name]``.
- **on the packed batch** (``needs.packed``): ``component(batch) -> (rewards [B, T], metrics)``, called after the
  preparing forward, so it may read what it declared it needs (hidden states, reference or old log-probs) and
  train a model of its own on the batch (a novelty bonus, a process reward model). `compose_packed` adds
  ``weight · rewards`` on the trained action tokens to ``batch.token_rewards``. Such rewards reach credit but not
  the episodes' rewards, which exploration read earlier.

A component that keeps state (counts, a network and its optimiser) is a `Piece` subclass with `state_dict`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from outrider.data import Batch, Episode
from outrider.registry import Level, Piece, PieceConfig, Registry, register_package


class ComponentConfig(PieceConfig):
    """Options every component has (none beyond the recipe's `weight`, which is the composition's)."""


SCORE: Registry = Registry("score")


@dataclass
class Component:
    name: str
    piece: Piece
    weight: float

    @property
    def level(self) -> Level:
        return self.piece.needs.level


def compose(episodes: list[Episode], components: list[Component]) -> None:
    """Attach every episode-level component's weighted reward to every episode, at its level, under its name."""
    for comp in components:
        if comp.piece.needs.packed:
            continue
        values: list[Any] = comp.piece(episodes)
        level = comp.level
        for episode, value in zip(episodes, values):
            if level == "trajectory":
                episode.rewards[level][comp.name] = comp.weight * float(value)
            else:
                episode.rewards[level][comp.name] = [comp.weight * float(v) for v in value]


def compose_packed(batch: Batch, components: list[Component]) -> dict[str, float]:
    """Add every packed component's weighted token rewards to ``batch.token_rewards`` (on trained action tokens
    only); return ``reward/<name>`` (the mean per-episode sum), ``time/score/<name>_s`` (the component's own time,
    a model's training step included) and the components' own metrics."""
    metrics: dict[str, float] = {}
    mask = batch.action_mask
    for comp in components:
        if not comp.piece.needs.packed:
            continue
        t0 = time.perf_counter()
        rewards, own = comp.piece(batch)
        metrics[f"time/score/{comp.name}_s"] = time.perf_counter() - t0
        added = comp.weight * torch.where(mask > 0, rewards * mask, torch.zeros_like(rewards))
        batch.token_rewards = batch.token_rewards + added
        metrics[f"reward/{comp.name}"] = float(added.sum(-1).mean())
        metrics.update({k: float(v) for k, v in own.items()})
    return metrics


register_package(__name__, __path__)  # every module of this package registers its pieces (a new method: a new file)
