"""explore/: prompts and env seeds → scored episodes. Strategies are registered in `EXPLORE`.

A strategy is a piece called once per RL step, ``strategy(ctx: ExploreContext) -> (episodes, metrics)`` (a
function ``fn(ctx, cfg)``, or a `Piece` subclass that keeps state across steps: an archive, a replay buffer, a
per-prompt success tracker). `ExploreContext` hands it the means to act without knowing the trainer: roll out
from any `Start` (a seed; a restored state with the turns that led there; a response prefix; extra context for the
sampler), score episodes, draw fresh prompt seeds, open groups. The piece sets each episode's ``origin`` and
``weight`` through its starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from pydantic import Field

from outrider.data import Episode, GroupIds, Start
from outrider.registry import PieceConfig, Registry, register_package


class TurnCapConfig(PieceConfig):
    """ScalingInter-RL's interaction-horizon curriculum [126] (AgentGym-RL, Xi et al. 2025): train on short
    horizons first (exploit), then let episodes run longer (explore). The staged schedule, as the paper describes
    it [para]: ``h(step) = min(start + increment · ⌊(step − 1) / every⌋, task.max_turns)``. Evaluation always
    uses the task's full horizon."""

    start: int = Field(5, ge=1, description="Turn cap during the first `every` RL steps.")
    increment: int = Field(5, ge=0, description="Turns added to the cap at each stage.")
    every: int = Field(50, ge=1, description="RL steps per stage.")

    def at(self, step: int, horizon: int) -> int:
        return min(self.start + self.increment * ((max(step, 1) - 1) // self.every), horizon)


class ExploreConfig(PieceConfig):
    """Sampling options every strategy shares."""

    prompts_per_step: int = Field(16, ge=1, description="Groups (distinct prompts/seeds) per RL step.")
    group_size: int = Field(8, ge=1, description="Episodes sampled per prompt (the G of GRPO).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature during training, > 0 (log-probs are "
                                                       "taken at it); for greedy evaluation set "
                                                       "observe.eval_temperature: 0.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens (0: off).")
    max_new_tokens: int = Field(16, ge=1, description="Token limit per action (per turn).")
    stop: list[str] = Field(default_factory=list, description="Stop strings that end an action.")
    turn_cap: TurnCapConfig | None = Field(None, description="Multi-turn tasks: a growing cap on the turns of "
                                                             "training episodes (ScalingInter-RL [126]), "
                                                             "{start, increment, every}: the cap is start + "
                                                             "increment·⌊(step−1)/every⌋, at most the task's "
                                                             "max_turns (e.g. {start: 5, increment: 5, every: 50}); "
                                                             "null: always max_turns.")


@dataclass
class ExploreContext:
    """What an exploration piece may do in one step.

    ``rollout(starts, snapshots=False)`` plays one episode per `Start` (on the train split, under the step's turn
    cap; with ``snapshots`` every new turn keeps the env's snapshot, for archives). ``score(episodes)`` attaches
    the recipe's rewards in place. ``next_seeds(n)`` draws n fresh train seeds. ``groups.new()`` opens a group;
    a start that should join an existing group (a retry) takes that episode's ``group_id``. ``rng`` is seeded from
    the run's seed and the step, for the piece's own random choices. ``task`` gives demonstrations (hints,
    teacher solutions) and env-specific knowledge; ``step`` is the RL step (1-based).
    """

    rollout: Callable[..., list[Episode]]
    score: Callable[[list[Episode]], None]
    next_seeds: Callable[[int], list[int]]
    groups: GroupIds
    rng: np.random.Generator
    step: int = 1
    task: Any = None

    def group_starts(self, seeds: list[int], size: int) -> list[Start]:
        """`size` starts from each seed, each seed its own new group (GRPO's groups)."""
        out = []
        for seed in seeds:
            group = self.groups.new()
            out += [Start(seed=seed, group_id=group) for _ in range(size)]
        return out

    def sample_groups(self, seeds: list[int], size: int) -> list[Episode]:
        """Roll out `size` episodes from each seed (one group per seed); not yet scored."""
        return self.rollout(self.group_starts(seeds, size))


EXPLORE: Registry = Registry("explore")

register_package(__name__, __path__)  # every module of this package registers its pieces (a new method: a new file)
