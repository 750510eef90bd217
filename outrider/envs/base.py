"""The world: the `Env` protocol (text in, text out) and `Task`, which makes envs for a split and gives
demonstrations for the warm start. A single-turn task is an env whose episode ends after one action."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import Field

from outrider.registry import PieceConfig, Registry

Split = Literal["train", "eval"]

# Envs that derive a problem or layout from a seed: train seeds are drawn from [0, 2^31) and eval seed s maps to
# 2^31 + s, so the two splits never share a seed.
EVAL_OFFSET = 2**31


@runtime_checkable
class Env(Protocol):
    """Gymnasium-like text env.

    ``reset(seed)`` returns the first observation; ``step(action)`` returns ``(observation, reward, done, info)``.
    Optional methods, used when present: ``state_key() -> Hashable`` (the current state, before the next action:
    step grouping, archives, distinct-state counts), ``snapshot() -> state`` and ``restore(state)`` (restarts:
    restore, then the same actions ⇒ the same observations).

    Keys of ``info`` the library reads: ``success`` (bool, on the final step), ``invalid`` (the action could not be
    parsed or is not allowed: the observation is the env's error text and the episode goes on), ``events`` (list
    of progress-event names this step, e.g. ``picked_key``), ``metrics`` (dict of floats on the final step, e.g.
    ``regret``; averaged per batch as ``env/<name>``), ``admissible`` (list of valid commands, where the env has
    one).
    """

    def reset(self, seed: int) -> str: ...

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]: ...


class ReplaySnapshot:
    """``snapshot``/``restore`` by replay, for envs whose internal state cannot be copied (an external game
    process): the snapshot is ``(seed, actions so far)`` and restoring resets to the seed and replays the actions.
    The env keeps ``self.seed`` and ``self.history`` (the actions since reset)."""

    seed: int
    history: list[str]

    def snapshot(self) -> tuple[int, tuple[str, ...]]:
        return self.seed, tuple(self.history)

    def restore(self, state: tuple[int, tuple[str, ...]]) -> str:
        """Reset to the snapshot's seed and replay its actions; returns the observation at that point."""
        seed, actions = state
        obs = self.reset(seed)  # type: ignore[attr-defined]
        for action in actions:
            obs = self.step(action)[0]  # type: ignore[attr-defined]
        return obs


@dataclass
class Demonstration:
    """A correct (or deliberately wrong) episode for supervised warm start: (observation, action) per turn."""

    turns: list[tuple[str, str]]


class TaskConfig(PieceConfig):
    """Options every task has."""

    eval_size: int = Field(512, ge=1, description="Number of held-out prompts/seeds in the eval split.")
    max_turns: int = Field(1, ge=1, description="Horizon: the most turns in one episode (1 for single-turn tasks).")


class Task(ABC):
    """Makes envs and demonstrations. Train seeds and eval seeds index disjoint sets of problems."""

    max_turns: int = 1
    eval_size: int = 512

    @abstractmethod
    def make_env(self, split: Split) -> Env: ...

    @abstractmethod
    def demonstrations(self, seeds: list[int]) -> list[Demonstration]:
        """Expert episodes for the given train seeds."""


ENVS: Registry = Registry("task")
