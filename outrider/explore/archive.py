"""The Go-Explore archive [19]: cells (an env state, or a coarser function of it) of the layouts (train seeds) being
explored, each with the best trajectory that reached it, the env's snapshot there and its counts; and the best
full solution of every layout. Used by the `go_explore` and `intelligent_go_explore` explore pieces.

Cell selection weight, as in the authors' code (uber-research/go-explore, ``robustified/goexplore_py/
randselectors.py``: ``compute_weight(v, w) = w.weight / (v + 1) ** w.power``, summed over counts)::

    W(c) = Σ_a w_a / (n_a(c) + 1) ** p_a,   a ∈ {seen, chosen, chosen_since_new}

times ``low_level_weight ** (L_max − L(c))`` (the code's level weight, with the level of a cell the number of
distinct progress events on its trajectory, ``L_max`` the highest of its layout; 1: off).

``seen``: episodes in which the cell was visited; ``chosen``: times it was returned to; ``chosen_since_new``: times
it was returned to since a return from it last found a new cell or a better trajectory. The paper's no-domain-
knowledge runs use ``seen`` alone with power 0.5 (``phase1_downscaled.sh``: ``--seen_weight=1.0``; power default
0.5), W = 1/√(n_seen + 1): the defaults here. A cell whose trajectory is replaced gets its ``chosen`` counts reset
(``--reset_cell_on_update`` in the same scripts; an option).

Which trajectory a cell keeps (``keep``): ``return`` — the higher return, ties to the shorter (the code's
``should_accept_cell``: higher score, or equal score and shorter); ``shortest`` — the shorter, ties to the higher
return.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Literal

import numpy as np
from pydantic import Field

from outrider.data import Episode, Turn
from outrider.errors import OutriderError
from outrider.registry import Options

Keep = Literal["return", "shortest"]
COUNTS = ("seen", "chosen", "chosen_since_new")


class CountWeight(Options):
    """w / (n + 1) ** p for one count."""

    weight: float = Field(0.0, ge=0, description="w: the count's weight in the sum.")
    power: float = Field(0.5, ge=0, description="p: the power of (n + 1); 0.5 is the paper's 1/√(n+1).")


class SelectionConfig(Options):
    """Cell selection weight W = Σ_a w_a / (n_a + 1) ** p_a over the cell's counts (authors' code)."""

    seen: CountWeight = Field(default_factory=lambda: CountWeight(weight=1.0), description="Episodes that visited "
                              "the cell (the paper's no-domain-knowledge runs: weight 1, power 0.5).")
    chosen: CountWeight = Field(default_factory=CountWeight, description="Times the cell was returned to.")
    chosen_since_new: CountWeight = Field(default_factory=CountWeight, description="Times returned to since a "
                                          "return from it last found a new or better cell.")
    reset_on_update: bool = Field(True, description="Reset the chosen counts when the cell's trajectory is "
                                                    "replaced by a better one.")
    floor: float = Field(1e-5, ge=0, description="Added to every weight (the policy-based code's +1e-5), so no "
                                                 "cell's chance is exactly 0.")
    low_level_weight: float = Field(1.0, gt=0, le=1, description="W × this^(L_max − L(c)), L(c) the distinct "
                                    "progress events on the cell's trajectory and L_max the most of its layout "
                                    "(the code's low_level_weight, 0.1 in its Montezuma runs; 1: off).")


def count_weight(n: float, w: CountWeight) -> float:
    return w.weight / (n + 1.0) ** w.power


@dataclass
class Cell:
    """One archived cell: the best trajectory that reached it (its turns, snapshots removed), the env's snapshot
    there (None for a layout's start state: a reset reaches it), its return, the distinct progress events along the
    way and its counts."""

    seed: int
    turns: list[Turn]
    snapshot: Any
    ret: float
    events: tuple[str, ...] = ()
    seen: int = 0
    chosen: int = 0
    chosen_since_new: int = 0
    text: str = ""  # the observation there (what an LLM judge reads)

    @property
    def depth(self) -> int:
        return len(self.turns)

    def weight(self, cfg: SelectionConfig) -> float:
        return cfg.floor + sum(count_weight(getattr(self, a), getattr(cfg, a)) for a in COUNTS)


def better(ret: float, length: int, old_ret: float, old_length: int, keep: Keep) -> bool:
    """Whether a trajectory (return, length) should replace a cell's (old_ret, old_length)."""
    if keep == "shortest":
        return length < old_length or (length == old_length and ret > old_ret)
    return ret > old_ret or (ret == old_ret and length < old_length)


def _stripped(turns: list[Turn]) -> list[Turn]:
    """Copies of turns without their snapshots (an archive keeps one snapshot per cell, not one per turn)."""
    out = []
    for t in turns:
        c = copy.copy(t)
        c.snapshot, c.info = None, dict(t.info)
        out.append(c)
    return out


def _events(turns: list[Turn]) -> tuple[str, ...]:
    return tuple(sorted({ev for t in turns for ev in t.info.get("events", ())}))


@dataclass
class Update:
    """What one episode changed in the archive."""

    new: int = 0
    improved: int = 0
    solved: bool = False


@dataclass
class Archive:
    """Cells keyed by (seed, cell), and each layout's best solution (a successful episode's turns)."""

    cell_fn: Callable[[Hashable], Hashable]
    keep: Keep = "return"
    reset_on_update: bool = True
    cells: dict[tuple[int, Hashable], Cell] = field(default_factory=dict)
    solutions: dict[int, Cell] = field(default_factory=dict)
    best_return: float = 0.0
    best_events: int = 0

    def add(self, episode: Episode, given: int, accept: Callable[[Cell], bool] | None = None) -> Update:
        """Archive the states an episode visited after its first `given` (prefix) turns: a new cell is added (if
        `accept` says so: an LLM judge), a known one takes the episode's trajectory if it is better; a success
        becomes its layout's solution if it is better. Counts ``seen`` once per cell per episode."""
        up, turns = Update(), None
        seen: set = set()
        for k in range(given, len(episode.turns)):
            t = episode.turns[k]
            if t.state_key is None or t.snapshot is None:
                continue
            key = (episode.seed, self.cell_fn(t.state_key))
            ret = sum(x.reward for x in episode.turns[:k])
            cell = self.cells.get(key)
            if cell is None or better(ret, k, cell.ret, cell.depth, self.keep):
                turns = turns or _stripped(episode.turns)
                new = Cell(episode.seed, turns[:k], t.snapshot if k else None, ret, _events(turns[:k]),
                           text=t.observation)
                if cell is None:
                    if accept is not None and not accept(new):
                        continue
                    up.new += 1
                else:
                    up.improved += 1
                    new.seen = cell.seen
                    if not self.reset_on_update:
                        new.chosen, new.chosen_since_new = cell.chosen, cell.chosen_since_new
                self.cells[key] = cell = new
            if key not in seen:
                seen.add(key)
                cell.seen += 1
        ret = sum(t.reward for t in episode.turns)
        self.best_return = max(self.best_return, ret)
        self.best_events = max(self.best_events, len(_events(episode.turns)))
        if episode.success:
            old = self.solutions.get(episode.seed)
            if old is None or better(ret, len(episode.turns), old.ret, old.depth, self.keep):
                turns = turns or _stripped(episode.turns)
                self.solutions[episode.seed] = Cell(episode.seed, turns, None, ret, _events(turns))
                up.solved = True
        return up

    def probabilities(self, cfg: SelectionConfig) -> tuple[list[tuple[int, Hashable]], np.ndarray]:
        """The cell keys and their selection probabilities W(c)/ΣW (an empty archive: no keys)."""
        keys = list(self.cells)
        w = np.array([self.cells[k].weight(cfg) for k in keys], dtype=np.float64)
        if keys and cfg.low_level_weight < 1:
            top: dict[int, int] = {}
            for c in self.cells.values():
                top[c.seed] = max(top.get(c.seed, 0), len(c.events))
            w *= np.array([cfg.low_level_weight ** (top[c.seed] - len(c.events))
                           for c in (self.cells[k] for k in keys)])
        if keys and w.sum() <= 0:  # every weight 0 (all counts' weights and the floor 0): uniform
            w = np.ones_like(w)
        return keys, w / w.sum() if keys else w

    def choose(self, n: int, rng: np.random.Generator, cfg: SelectionConfig) -> list[tuple[int, Hashable]]:
        """`n` cell keys drawn with probability W(c)/ΣW, without replacement while there are enough cells; each
        chosen cell's ``chosen`` counts go up by one."""
        keys, p = self.probabilities(cfg)
        if not keys or n <= 0:
            return []
        out = [keys[i] for i in rng.choice(len(keys), size=n, replace=n > len(keys), p=p)]
        for k in out:
            self.mark_chosen(k)
        return out

    def mark_chosen(self, key: tuple[int, Hashable]) -> None:
        self.cells[key].chosen += 1
        self.cells[key].chosen_since_new += 1

    def found_new(self, key: tuple[int, Hashable]) -> None:
        """A return from `key` found a new or better cell: its chosen-since-new count starts over."""
        if key in self.cells:
            self.cells[key].chosen_since_new = 0

    def state_dict(self) -> dict[str, Any]:
        return {"cells": list(self.cells.items()), "solutions": dict(self.solutions),
                "best_return": self.best_return, "best_events": self.best_events}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cells = dict(state["cells"])  # insertion order is part of the state: choice() draws by position
        self.solutions = dict(state["solutions"])
        self.best_return, self.best_events = state["best_return"], state["best_events"]


CELLS: dict[str, Callable[[Hashable], Hashable]] = {"state_key": lambda key: key}


def cell_function(name: str, task: Any, where: str = "explore.cell") -> Callable[[Hashable], Hashable]:
    """The named cell function: ``state_key`` (the env's own key) or one the task offers in ``cell_functions``
    (e.g. MiniGrid's ``position``). An unknown name is a one-line error listing the valid ones."""
    offered = dict(CELLS)
    offered.update(getattr(task, "cell_functions", None) or {})
    if name not in offered:
        raise OutriderError(f"{where}: unknown cell function {name!r}; valid: {', '.join(sorted(offered))}")
    return offered[name]
