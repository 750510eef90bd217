"""Fission-GRPO: error-recovery groups from the policy's own failed trajectories [17] (explore piece ``fission``).

Each step samples the normal GRPO groups (``prompts_per_step`` × ``group_size``) and scores them. Every failed
episode whose first error (``cut``: the first invalid action, or the first step the task's checker rejects) left
turns to spare is a fission candidate; up to ``max_fissions`` of them (drawn with the step's rng) are cut right
after that error and become new prompts:

    Start(seed, group_id=groups.new(), prefix=parent.turns[:k+1], snapshot=<state after the error>,
          context=feedback, keep_context=True, origin="retry")

The prefix (the error included) is given, not trained; the env's error text is the observation the recovery
starts from, and ``feedback: hint`` adds the task's diagnostic hint for that state (``task.hint(env)``, standing in
for the paper's fine-tuned error simulator), kept in the trained sequence so the recovery rollouts stay on-policy.
``recovery_group_size`` recovery rollouts are sampled per fissioned trajectory, each fission its own group, and
trained with GRPO alongside the normal groups.

[17] describes the mechanism, not its constants here [para]: no official code was found, so the recovery group
size, the number of fissions per step and the feedback text are options.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from outrider.data import Episode, Start
from outrider.envs.base import close_env
from outrider.envs.time_limit import EnvTimeout
from outrider.explore import EXPLORE, ExploreConfig, ExploreContext
from outrider.explore.step_check import Cost, env_at, first_invalid, first_wrong_step, require_hook, time_limit
from outrider.registry import BuildContext, Piece


class FissionConfig(ExploreConfig):
    recovery_group_size: int = Field(8, ge=1, description="G of a recovery group: rollouts sampled from each "
                                                          "fissioned trajectory.")
    max_fissions: int = Field(4, ge=0, description="Failed trajectories fissioned per step at most (drawn at "
                                                   "random among the candidates).")
    cut: Literal["invalid", "checker"] = Field("invalid", description="Where a trajectory's first error is: its "
                                               "first invalid action, or the first step the task's step_ok rejects.")
    feedback: Literal["env", "hint"] = Field("env", description="Diagnostic feedback: env (the env's own error "
                                             "text, already the next observation) or hint (plus the task's "
                                             "hint(env) for that state, kept in context).")
    template: str = Field("Hint: {hint}\n", description="The hint text added with feedback: hint ({hint}).")
    restore: Literal["snapshot", "replay"] = Field("snapshot", description="How a recovery rollout reaches the "
                                                   "state after the error: a snapshot (the normal groups keep one "
                                                   "per turn) or a replay of the prefix's actions.")


def first_error(task: Any, episode: Episode, cut: str) -> tuple[int | None, int]:
    """The first error's turn (by `cut`) and the env steps a checker replay took."""
    if cut == "invalid":
        return first_invalid(episode), 0
    return first_wrong_step(task, episode)


@EXPLORE.register("fission", config=FissionConfig)
class Fission(Piece):
    """Fission-GRPO [17]: failed trajectories cut at their first error (plus feedback) become new prompts, each
    with its own group of on-policy recovery rollouts trained with GRPO next to the normal groups."""

    cfg: FissionConfig

    def __init__(self, cfg: FissionConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        task = (build or BuildContext()).task
        if task is not None:
            if cfg.cut == "checker":
                require_hook(task, "step_ok", "explore.cut: checker")
            if cfg.feedback == "hint":
                require_hook(task, "hint", "explore.feedback: hint")
        self.cost = Cost()
        self.counts: dict[str, float] = {}

    def __call__(self, ctx: ExploreContext) -> tuple[list[Episode], dict[str, float]]:
        cfg = self.cfg
        snapshots = cfg.restore == "snapshot"
        normal = ctx.rollout(ctx.group_starts(ctx.next_seeds(cfg.prompts_per_step), cfg.group_size),
                             snapshots=snapshots)
        self.cost.episodes(normal, [0] * len(normal), replayed=False)
        ctx.score(normal)
        horizon = getattr(ctx.task, "max_turns", 1)
        candidates = []
        for e in normal:
            if e.success or e.metadata.get("timed_out"):
                continue
            k, used = first_error(ctx.task, e, cfg.cut)
            self.cost.env_steps += used
            # the recovery starts from the state after the error: it needs that state and a turn left to act
            if k is not None and k + 1 < len(e.turns) and k + 1 < horizon:
                candidates.append((e, k))
        chosen = sorted(ctx.rng.choice(len(candidates), min(cfg.max_fissions, len(candidates)), replace=False)
                        .tolist()) if candidates else []
        starts, given = [], []
        for i in chosen:
            parent, k = candidates[i]
            context = self.feedback(ctx.task, parent, k + 1)
            group = ctx.groups.new()
            snap = parent.turns[k + 1].snapshot if snapshots else None
            for _ in range(cfg.recovery_group_size):
                starts.append(Start(seed=parent.seed, group_id=group, prefix=parent.turns[:k + 1], snapshot=snap,
                                    context=context, keep_context=True, origin="retry",
                                    metadata={"fission_cut": k}))
                given.append(k + 1)
        recoveries = ctx.rollout(starts) if starts else []
        steps, tokens = self.cost.episodes(recoveries, given, replayed=not snapshots)
        ctx.score(recoveries)
        for name, n in (("fissions", len(chosen)), ("recoveries", len(recoveries)),
                        ("recovered", sum(r.success for r in recoveries))):
            self.counts[name] = self.counts.get(name, 0.0) + float(n)
        metrics = {"explore/groups_sampled": float(cfg.prompts_per_step + len(chosen)),
                   "explore/fission_candidates": float(len(candidates)), "explore/fissions": float(len(chosen)),
                   "explore/recovery_success": sum(r.success for r in recoveries) / max(len(recoveries), 1),
                   "explore/recovery_env_steps": steps, "explore/recovery_tokens": tokens,
                   "explore/fissions_total": self.counts["fissions"],
                   "explore/recovered_total": self.counts["recovered"]}
        metrics.update(self.cost.metrics())
        return normal + recoveries, metrics

    def feedback(self, task: Any, parent: Episode, k: int) -> str | None:
        """The diagnostic text added at the recovery's first turn (None with ``feedback: env``)."""
        if self.cfg.feedback == "env":
            return None
        with time_limit(task) as clock:
            try:
                env, steps = env_at(task, parent, k, clock)
            except EnvTimeout:
                return None
            self.cost.env_steps += steps
            try:
                return self.cfg.template.format(hint=task.hint(env))
            finally:
                close_env(env)

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "cost_totals": dict(self.cost.totals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = dict(state.get("counts", {}))
        self.cost.totals = dict(state.get("cost_totals", {}))
