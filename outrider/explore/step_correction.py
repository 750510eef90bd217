"""First-error correction: SCOPE's step-wise rectification of near misses [7] (InT's single-step intervention
[33]), and whole-trajectory replacement to compare it with (explore piece ``step_correction``).

Each step samples and scores the normal groups (with snapshots). In every failed episode the task's step checker
locates the first wrong step k (``task.step_ok``, replayed from the seed); a *near miss* is one with at least
``near_miss`` right steps before it. With ``replace: step`` the near miss is rewritten at that step only: its
own turns before k, then the oracle's action for the state at k (``task.oracle_step``), then an on-policy
continuation from the state that action reaches:

    Start(seed, group_id=parent.group_id, prefix=parent.turns[:k] + [oracle turn], snapshot=<after it>,
          origin="guided")

With ``replace: trajectory`` the near miss is replaced by the oracle's whole trajectory from the start (the
off-policy guidance SCOPE argues against: it leaves the policy's own largely-right steps unused). The corrected
episode takes the near miss's place in its group (``keep_failed`` adds it instead) and is scored like any other.

What trains: ``train_given: true`` (default) trains the given part too, at ratio 1 (the episode stays on-policy:
its old log-probs are the current ones): the policy's own steps before k get the corrected outcome's advantage
instead of the failure's, and the oracle's step (or trajectory) gets A·∇log π, an advantage-weighted imitation of
the fix, as InT fine-tunes on the intervention and SCOPE trains its rectified step as off-policy guidance [para].
With ``false`` the given prefix is untrained and only the sampled continuation learns: the fix itself is never
taught. SCOPE's exact loss on the rectified step (its importance weighting) was not checked against code.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import Field

from outrider.data import Episode, Start
from outrider.envs.base import close_env
from outrider.envs.time_limit import EnvTimeout
from outrider.errors import OutriderError
from outrider.explore import EXPLORE, ExploreConfig, ExploreContext
from outrider.explore.step_check import (Cost, env_at, first_wrong_step, given_turn, require_hook, state_key,
                                         step_given, time_limit)
from outrider.registry import BuildContext, Piece


class StepCorrectionConfig(ExploreConfig):
    replace: Literal["step", "trajectory"] = Field("step", description="step: rewrite only the first wrong step "
                                                   "from the oracle and continue on-policy (SCOPE); trajectory: "
                                                   "replace the whole episode by the oracle's.")
    near_miss: int = Field(1, ge=0, description="Right steps a failed episode needs before its first wrong one to "
                                                "be corrected (0: every failure with a wrong step).")
    max_corrections: int | None = Field(None, ge=1, description="Corrected episodes per group at most (null: all "
                                                                "near misses).")
    keep_failed: bool = Field(False, description="Keep the near miss in its group next to its correction (false: "
                                                 "the correction takes its place).")
    train_given: bool = Field(True, description="Train the given part of a corrected episode (the policy's own "
                                                "steps before the error and the oracle's step or trajectory) at "
                                                "ratio 1; false: only the sampled continuation trains.")
    restore: Literal["snapshot", "replay"] = Field("snapshot", description="How a corrected episode reaches the "
                                                   "state after the oracle's step: a snapshot or a replay.")


@EXPLORE.register("step_correction", config=StepCorrectionConfig)
class StepCorrection(Piece):
    """SCOPE / InT first-error correction [7, 33]: near misses are rewritten at their first wrong step by the
    task's oracle and continued on-policy (or, to compare, replaced by the oracle's whole trajectory)."""

    cfg: StepCorrectionConfig

    def __init__(self, cfg: StepCorrectionConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        build = build or BuildContext()
        self.policy = build.policy
        if build.task is not None:
            require_hook(build.task, "step_ok", "explore.name: step_correction")
            require_hook(build.task, "oracle_step", "explore.name: step_correction")
        self.cost = Cost()
        self.counts: dict[str, float] = {}

    def __call__(self, ctx: ExploreContext) -> tuple[list[Episode], dict[str, float]]:
        cfg, task = self.cfg, ctx.task
        snapshots = cfg.restore == "snapshot"
        normal = ctx.rollout(ctx.group_starts(ctx.next_seeds(cfg.prompts_per_step), cfg.group_size),
                             snapshots=snapshots)
        self.cost.episodes(normal, [0] * len(normal), replayed=False)
        ctx.score(normal)
        per_group: dict[int, int] = {}
        wrong_at, built, starts, slots, given = [], {}, [], [], []
        for i, e in enumerate(normal):
            if e.success or e.metadata.get("timed_out"):
                continue
            k, used = first_wrong_step(task, e)
            self.cost.env_steps += used
            if k is None or k < cfg.near_miss:
                continue
            if cfg.max_corrections is not None and per_group.get(e.group_id, 0) >= cfg.max_corrections:
                continue
            wrong_at.append(k)
            try:
                out = self.oracle_trajectory(task, e) if cfg.replace == "trajectory" else self.correct(task, e, k)
            except (EnvTimeout, OutriderError):  # the oracle has no plan from here, or the env hung: no correction
                continue
            per_group[e.group_id] = per_group.get(e.group_id, 0) + 1
            if isinstance(out, Episode):
                built[i] = out
            else:
                starts.append(out)
                slots.append(i)
                given.append(len(out.prefix))
        rolled = ctx.rollout(starts) if starts else []
        self.cost.episodes(rolled, given, replayed=not snapshots)
        corrected = dict(built)
        corrected.update(zip(slots, rolled))
        fixes = [corrected[i] for i in sorted(corrected)]
        ctx.score(fixes)
        for e in fixes:
            if cfg.train_given:
                e.prefix_tokens = 0
        if cfg.keep_failed:
            episodes = normal + fixes
        else:
            episodes = [corrected.get(i, e) for i, e in enumerate(normal)]
        self.counts["corrections"] = self.counts.get("corrections", 0.0) + len(fixes)
        self.counts["corrected_successes"] = self.counts.get("corrected_successes", 0.0) + sum(e.success for e in fixes)
        failed = sum(not e.success for e in normal)
        metrics = {"explore/groups_sampled": float(cfg.prompts_per_step),
                   "explore/near_miss_frac": len(wrong_at) / max(failed, 1),
                   "explore/first_wrong_mean": sum(wrong_at) / max(len(wrong_at), 1),
                   "explore/corrections": float(len(fixes)),
                   "explore/corrected_success": sum(e.success for e in fixes) / max(len(fixes), 1),
                   "explore/corrections_total": self.counts["corrections"]}
        metrics.update(self.cost.metrics())
        return episodes, metrics

    def correct(self, task: Any, parent: Episode, k: int) -> Start | Episode:
        """The near miss with its step k rewritten by the oracle: a `Start` to continue on-policy from the state
        the oracle's action reaches, or (when that action ends the episode) the finished episode itself."""
        with time_limit(task) as clock:
            env, steps = env_at(task, parent, k, clock)
            try:
                seen = parent.turns[k]
                turn = given_turn(self.policy, seen.observation, k == 0, task.oracle_step(env), seen.state_key)
                _, done, info = step_given(env, turn, clock)
                self.cost.env_steps += steps + 1
                prefix = [copy.copy(t) for t in parent.turns[:k]] + [turn]
                if done or k + 1 >= task.max_turns:
                    return self._finished(parent, prefix, done, info)
                snap = env.snapshot() if self.cfg.restore == "snapshot" else None  # type: ignore[attr-defined]
            finally:
                close_env(env)
        return Start(seed=parent.seed, group_id=parent.group_id, prefix=prefix, snapshot=snap, origin="guided",
                     metadata={"corrected_at": k})

    def oracle_trajectory(self, task: Any, parent: Episode) -> Episode:
        """The oracle's whole episode from the seed (whole-trajectory replacement), every action given."""
        turns, info, done = [], {}, False
        with time_limit(task) as clock:
            env = task.make_env("train")
            try:
                obs = clock.call(env.reset, parent.seed)
                while not done and len(turns) < task.max_turns:
                    turn = given_turn(self.policy, obs, not turns, task.oracle_step(env), state_key(env))
                    turns.append(turn)
                    obs, done, info = step_given(env, turn, clock)
                    self.cost.env_steps += 1
            finally:
                close_env(env)
        return self._finished(parent, turns, done, info, metadata={"oracle_trajectory": True})

    @staticmethod
    def _finished(parent: Episode, turns: list, done: bool, info: dict[str, Any],
                  metadata: dict[str, Any] | None = None) -> Episode:
        """A corrected episode that needed no sampling: every action given."""
        episode = Episode(group_id=parent.group_id, seed=parent.seed, turns=turns, origin="guided", done=done,
                          success=bool(info.get("success", False)), metadata=metadata or {"corrected_at": len(turns) - 1})
        episode.prefix_tokens = episode.num_action_tokens
        return episode

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "cost_totals": dict(self.cost.totals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = dict(state.get("counts", {}))
        self.cost.totals = dict(state.get("cost_totals", {}))
