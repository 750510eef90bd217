"""Go-Explore [19] as an explore piece: remember the states reached, return to one by restoring the env, explore
from it with the policy, and robustify the solutions found into a policy that succeeds from the start state.

Each step (`GoExplore.__call__`):

1. **Choose** `prompts_per_step` cells (minus the start-state and backward groups) from the archive with weight
   W(c) = Σ_a w_a / (n_a(c) + 1)^{p_a} (`explore/archive.py`; default 1/√(n_seen + 1)). The archive covers a pool
   of `layouts` train seeds drawn at the first step; every pool layout's start state is a cell from the start.
2. **Return** to each chosen cell: ``Start(seed, group, prefix=cell.turns, snapshot=cell.snapshot,
   origin="restart")`` (a start-state cell is a plain reset, on-policy), `group_size` episodes per cell, one GRPO
   group each. The prefix is in the episode and never trained (`prefix_tokens`); the horizon counts it, so from a
   cell at depth d the policy explores for ``max_turns − d`` turns.
3. **Explore** with the policy (``ctx.rollout(starts, snapshots=True)``) and score the episodes: they are the
   step's training episodes, each group's advantages taken relative to its own start.
4. **Archive** every state the new turns visited: new cells are added, a cell takes a trajectory that is better
   (``keep``: higher return then shorter, or shorter then higher return), and a success becomes its layout's
   solution if it beats the one held.
5. **Robustify** (``robustify.method``), once ``robustify.after`` layouts are solved:
   - ``imitation``: up to ``demos_per_step`` layouts' best solutions, from the start state, join the batch as
     episodes marked ``preference="chosen"`` (``origin="replay"``, off-policy, each its own group so the policy
     loss gives them advantage 0); the recipe's ``update.terms: [{name: nll, rows: chosen}]`` imitates them (the
     piece refuses to build without it).
   - ``backward``: the backward algorithm (Salimans & Chen 2018, Go-Explore's robustification): ``groups`` of
     the step's groups start along a solved layout's solution at its turn p (the prefix replayed, not restored:
     solution turns keep no snapshots), first near its end; when a group's success rate from p reaches
     ``threshold``, p moves ``step_back`` turns earlier, until the layout is solved from its start state. As in
     the authors' code (uber-research/go-explore, atari_reset's ReplayResetEnv), a share ``later_share`` of the
     backward groups may start at a turn drawn uniformly between p and the solution's last turn (their
     ``frac_sample``), and ``imitate`` adds the imitation rows beside them (their PPO + self-imitation).

The archive (cells with their snapshots and trajectories, solutions, counts), the pool and the backward pointers
are the piece's state: every checkpoint carries them.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Hashable, Literal

from pydantic import Field, model_validator

from outrider.data import Episode, Start
from outrider.errors import OutriderError
from outrider.explore import EXPLORE, ExploreConfig, ExploreContext
from outrider.explore.archive import Archive, Cell, Keep, SelectionConfig, cell_function
from outrider.explore.rollout import _given_turn
from outrider.registry import BuildContext, Options, Piece


class RobustifyConfig(Options):
    """How archive solutions become a policy that succeeds from the start state."""

    method: Literal["none", "imitation", "backward"] = Field("none", description="none; imitation (NLL on the "
                                                             "best solutions from the start state, through "
                                                             "update.terms nll rows: chosen); backward (the "
                                                             "backward algorithm: starts along each solution, "
                                                             "moved earlier as success is reached).")
    after: int = Field(1, ge=1, description="Solved layouts needed before robustifying starts.")
    demos_per_step: int = Field(8, ge=1, description="imitation: solutions added to each step's batch.")
    groups: int = Field(2, ge=1, description="backward: groups per step (of explore.prompts_per_step) started "
                                             "along solutions.")
    threshold: float = Field(0.2, gt=0, le=1, description="backward: a group's success rate from a start point "
                                                          "that moves the point earlier.")
    step_back: int = Field(1, ge=1, description="backward: turns the start point moves back each time.")
    later_share: float = Field(0.0, ge=0, lt=1, description="backward: share of the backward groups started at a "
                               "turn drawn uniformly between the start point and the solution's last turn, so the "
                               "later turns stay practised (the authors' frac_sample, 0.2); they never move p.")
    imitate: bool = Field(False, description="backward: also add the imitation rows of method imitation (the "
                                             "authors robustify with PPO plus self-imitation of the "
                                             "demonstrations); needs update.terms nll rows: chosen.")

    @model_validator(mode="after")
    def _imitate_with_backward(self) -> "RobustifyConfig":
        if self.imitate and self.method != "backward":
            raise ValueError(f"imitate adds imitation rows to method backward; with method {self.method} use "
                             "method: imitation or imitate: false")
        return self


class GoExploreConfig(ExploreConfig):
    """Go-Explore [19]: an archive of cells, returns by restore, exploration by the policy, robustification."""

    layouts: int = Field(16, ge=1, description="Train seeds (layouts) the archive explores, drawn at the first step.")
    cell: str = Field("state_key", description="Cell function: state_key (the env's key) or one the task offers "
                                               "(minigrid: position, without the agent's direction).")
    keep: Keep = Field("return", description="A cell's trajectory: 'return' (higher return, then shorter) or "
                                             "'shortest' (shorter, then higher return).")
    selection: SelectionConfig = Field(default_factory=SelectionConfig, description="Cell selection weight W = "
                                       "Σ w/(n+1)^p over the seen, chosen and chosen_since_new counts.")
    start_groups: int = Field(0, ge=0, description="Groups per step from pool layouts' start states (plain "
                                                   "resets), besides the chosen cells.")
    robustify: RobustifyConfig = Field(default_factory=RobustifyConfig, description="Robustification phase.")

    @model_validator(mode="after")
    def _groups_fit(self) -> "GoExploreConfig":
        backward = self.robustify.groups if self.robustify.method == "backward" else 0
        if self.start_groups + backward > self.prompts_per_step:
            raise ValueError(f"start_groups ({self.start_groups}) + robustify.groups ({backward}) exceed "
                             f"prompts_per_step ({self.prompts_per_step})")
        return self


def check_restorable(task: Any, piece: str) -> None:
    """A one-line error unless the task's env can name its states and return to them (state_key, snapshot,
    restore)."""
    if task is None:
        return
    env = task.make_env("train")
    try:
        missing = [m for m in ("state_key", "snapshot", "restore") if not callable(getattr(env, m, None))]
    finally:
        close = getattr(env, "close", None)
        if callable(close):
            close()
    if missing:
        raise OutriderError(f"task.name: {piece} returns to archived states, and the env of this task "
                            f"({type(env).__name__}) has no {' / '.join(m + '()' for m in missing)}; use a task whose "
                            "env has state_key, snapshot and restore (minigrid, bandit, calculator, textworld)")


def check_imitation_term(recipe: Any, field: str = "explore.robustify.method: imitation") -> None:
    terms = getattr(getattr(recipe, "update", None), "terms", None)
    if terms is None:
        return
    if not any(t.get("name") == "nll" and t.get("rows", "chosen") == "chosen" for t in terms):
        raise OutriderError(f"{field} marks solutions preference=chosen for the nll term; add update.terms: "
                            "[{name: nll, rows: chosen}] (or use method: backward or none)")


@EXPLORE.register("go_explore", config=GoExploreConfig)
class GoExplore(Piece):
    """Go-Explore [19]: return to archived cells by restore, explore from them with the policy, keep the best
    trajectory to every cell and every layout's best solution, robustify by imitation or the backward algorithm
    (see the module docstring for the weights and the options)."""

    cfg: GoExploreConfig
    kind = "go_explore"  # for messages (the registry sets the entry only after construction)

    def __init__(self, cfg: GoExploreConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        build = build or BuildContext()
        self.task = build.task
        check_restorable(self.task, self.kind)
        if cfg.robustify.method == "imitation":
            check_imitation_term(build.recipe)
        if cfg.robustify.imitate:
            check_imitation_term(build.recipe, "explore.robustify.imitate: true")
        self.archive = Archive(cell_function(cfg.cell, self.task), cfg.keep, cfg.selection.reset_on_update)
        self.pool: list[int] = []
        self.pointers: dict[int, int] = {}  # backward algorithm: layout -> turn its starts begin at

    # --- a step ---------------------------------------------------------------------------------------------
    def __call__(self, ctx: ExploreContext) -> tuple[list[Episode], dict[str, float]]:
        t0 = time.perf_counter()
        if not self.pool:
            self._start_pool(ctx)
        cfg, rb = self.cfg, self.cfg.robustify
        solved = len(self.archive.solutions) >= rb.after
        backward = rb.groups if rb.method == "backward" and solved else 0
        chosen = self.choose(ctx, cfg.prompts_per_step - cfg.start_groups - backward)
        chosen += [(int(s), None) for s in ctx.rng.choice(self.pool, cfg.start_groups)] if cfg.start_groups else []
        starts, sources = [], []
        for seed, key in chosen:
            cell = self.archive.cells.get((seed, key)) if key is not None else None
            starts += self._starts(ctx, seed, cell)
            sources += [(seed, key)] * cfg.group_size
        back_layouts = self._backward_layouts(ctx, backward)
        back_from = [self._backward_turn(ctx, seed) for seed in back_layouts]
        for seed, p in zip(back_layouts, back_from):
            starts += self._backward_starts(ctx, seed, p)
        select_s = time.perf_counter() - t0
        episodes = ctx.rollout(starts, snapshots=True)
        ctx.score(episodes)
        t1 = time.perf_counter()
        new = improved = 0
        for start, episode, source in zip(starts, episodes, sources + [None] * (len(starts) - len(sources))):
            up = self.archive.add(episode, len(start.prefix), self.accept(ctx))
            new, improved = new + up.new, improved + up.improved
            if source is not None and (up.new or up.improved) and source[1] is not None:
                self.archive.found_new(source)
        self._move_pointers(episodes[len(sources):], back_layouts, back_from)
        demos = self._demos(ctx) if (rb.method == "imitation" or rb.imitate) and solved else []
        metrics = self._metrics(episodes, starts, new, improved, len(demos))
        metrics["time/explore/archive_s"] = select_s + time.perf_counter() - t1
        return episodes + demos, metrics

    def choose(self, ctx: ExploreContext, n: int) -> list[tuple[int, Hashable]]:
        """`n` cells to return to, as (seed, cell key): drawn by weight (`Archive.choose`)."""
        return [(seed, key) for seed, key in self.archive.choose(n, ctx.rng, self.cfg.selection)] if n > 0 else []

    def accept(self, ctx: ExploreContext) -> Callable[[Cell], bool] | None:
        """A filter of new cells (a judge's hook); plain Go-Explore keeps every new cell."""
        return None

    def _start_pool(self, ctx: ExploreContext) -> None:
        """Draw the pool of layouts and archive each one's start state (a reset reaches it: no snapshot)."""
        self.pool = [int(s) for s in ctx.next_seeds(self.cfg.layouts)]
        for seed in self.pool:
            env = self.task.make_env("train")
            try:
                obs = env.reset(seed)
                key = (seed, self.archive.cell_fn(env.state_key()))
            finally:
                close = getattr(env, "close", None)
                if callable(close):
                    close()
            self.archive.cells.setdefault(key, Cell(seed, [], None, 0.0, text=obs))

    def _starts(self, ctx: ExploreContext, seed: int, cell: Cell | None) -> list[Start]:
        group = ctx.groups.new()
        if cell is None or cell.depth == 0:
            return [Start(seed=seed, group_id=group) for _ in range(self.cfg.group_size)]
        return [Start(seed=seed, group_id=group, prefix=cell.turns, snapshot=cell.snapshot, origin="restart",
                      metadata={"cell_depth": cell.depth}) for _ in range(self.cfg.group_size)]

    # --- robustification -----------------------------------------------------------------------------------
    def _backward_layouts(self, ctx: ExploreContext, n: int) -> list[int]:
        if n == 0:
            return []
        for seed, sol in self.archive.solutions.items():  # a new or shorter solution: start near its end
            self.pointers[seed] = min(self.pointers.get(seed, sol.depth - 1), sol.depth - 1)
        solved = sorted(self.archive.solutions)
        return [int(s) for s in ctx.rng.choice(solved, n, replace=n > len(solved))]

    def _backward_turn(self, ctx: ExploreContext, seed: int) -> int:
        """The pointer, or with probability `later_share` a turn drawn uniformly in [p, last turn]."""
        p, share = self.pointers[seed], self.cfg.robustify.later_share
        if share > 0 and ctx.rng.random() < share:  # no draw at 0: runs without the option keep their stream
            return int(ctx.rng.integers(p, max(self.archive.solutions[seed].depth, p + 1)))
        return p

    def _backward_starts(self, ctx: ExploreContext, seed: int, p: int) -> list[Start]:
        sol, group = self.archive.solutions[seed], ctx.groups.new()
        return [Start(seed=seed, group_id=group, prefix=sol.turns[:p], origin="restart" if p else "on_policy",
                      metadata={"backward_from": p}) for _ in range(self.cfg.group_size)]

    def _move_pointers(self, episodes: list[Episode], layouts: list[int], starts_at: list[int]) -> None:
        g = self.cfg.group_size
        for i, (seed, p) in enumerate(zip(layouts, starts_at)):
            if p != self.pointers[seed]:  # a later start practises; only starts at the pointer move it
                continue
            group = episodes[i * g:(i + 1) * g]
            rate = sum(e.success for e in group) / max(len(group), 1)
            if rate >= self.cfg.robustify.threshold and self.pointers[seed] > 0:
                self.pointers[seed] = max(0, self.pointers[seed] - self.cfg.robustify.step_back)

    def _demos(self, ctx: ExploreContext) -> list[Episode]:
        """The best solutions of up to `demos_per_step` solved layouts as imitation rows."""
        solved = sorted(self.archive.solutions)
        n = min(self.cfg.robustify.demos_per_step, len(solved))
        out = []
        for seed in ctx.rng.choice(solved, n, replace=False):
            sol = self.archive.solutions[int(seed)]
            out.append(Episode(group_id=ctx.groups.new(), seed=int(seed), turns=[_given_turn(t) for t in sol.turns],
                               origin="replay", off_policy=True, preference="chosen", done=True, success=True))
        ctx.score(out)
        return out

    # --- metrics and state ----------------------------------------------------------------------------------
    def _metrics(self, episodes: list[Episode], starts: list[Start], new: int, improved: int,
                 demos: int) -> dict[str, float]:
        a, n = self.archive, max(len(episodes), 1)
        fresh = [e for e, s in zip(episodes, starts) if not s.prefix]
        out = {"explore/archive_cells": float(len(a.cells)), "explore/new_cells": float(new),
               "explore/improved_cells": float(improved), "explore/solved_layouts": float(len(a.solutions)),
               "explore/best_return": a.best_return, "explore/best_events": float(a.best_events),
               "explore/restart_share": sum(bool(s.prefix) for s in starts) / n,
               "explore/mean_start_depth": sum(len(s.prefix) for s in starts) / n,
               "explore/demos": float(demos)}
        if fresh:
            out["explore/start_success"] = sum(e.success for e in fresh) / len(fresh)
        if self.pointers:
            sols = a.solutions
            out["explore/backward_position"] = sum(p / max(sols[s].depth, 1) for s, p in self.pointers.items()) / len(
                self.pointers)
            out["explore/backward_at_start"] = sum(p == 0 for p in self.pointers.values()) / len(self.pointers)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"archive": self.archive.state_dict(), "pool": list(self.pool), "pointers": dict(self.pointers)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.archive.load_state_dict(state["archive"])
        self.pool = [int(s) for s in state["pool"]]
        self.pointers = {int(k): int(v) for k, v in state["pointers"].items()}
