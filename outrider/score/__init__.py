"""score/: reward components and their composition.

A component is ``fn(episodes, cfg) -> list[value]`` over the whole batch (so group-level rewards are possible);
its config's `level` says whether a value is one float per episode (``trajectory``) or a list per turn (``step``)
or per action token (``token``). `compose` writes ``weight * value`` into ``episode.rewards[level][name]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from outrider.data import Episode
from outrider.registry import Entry, PieceConfig, Registry

Level = Literal["trajectory", "step", "token"]


class ComponentConfig(PieceConfig):
    level: ClassVar[Level] = "trajectory"


SCORE: Registry = Registry("score")


@dataclass
class Component:
    name: str
    entry: Entry
    cfg: PieceConfig
    weight: float


def compose(episodes: list[Episode], components: list[Component]) -> None:
    """Attach every component's weighted reward to every episode, at its level, under its own name."""
    for comp in components:
        values: list[Any] = comp.entry.fn(episodes, comp.cfg)
        level = getattr(type(comp.cfg), "level", "trajectory")
        for episode, value in zip(episodes, values):
            if level == "trajectory":
                episode.rewards[level][comp.name] = comp.weight * float(value)
            else:
                episode.rewards[level][comp.name] = [comp.weight * float(v) for v in value]


from outrider.score import builtin  # noqa: E402,F401  (registers the built-ins)
from outrider.score import phase_entropy  # noqa: E402,F401  (pear)
