"""RLPR's standard-deviation filter [67] as an exploration piece: a likelihood reward is dense, so a prompt whose
samples all score nearly alike (too easy or too hard) gives GRPO a tiny, noisy advantage; RLPR drops prompts
whose reward std within the group is below a threshold β that follows the batch's mean std by an exponential
moving average.

Each step: sample `prompts_per_step` groups, score them, compute each group's std s_g of the total reward
(population std over its members), keep the groups with ``s_g ≥ β_t``, then update
``β_{t+1} = m·β_t + (1 − m)·mean_g s_g`` over every group sampled this step. β starts at ``initial_threshold``
(0 keeps every group on the first step). When no group passes, the step trains on all of them (its advantages
are then small, not absent: the step is not skipped). β and the step count are the piece's state.

The EMA form and that the threshold tracks the mean group std are RLPR's description; its momentum is not stated
in what could be checked, so ``momentum`` is a knob (0.9 here: runs of tens of steps).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from outrider.data import Episode, group_reward_std, groups_of
from outrider.explore import EXPLORE, ExploreConfig, ExploreContext
from outrider.registry import BuildContext, Piece


class StdFilterConfig(ExploreConfig):
    momentum: float = Field(0.9, ge=0, lt=1, description="m of the threshold's EMA: β ← m·β + (1 − m)·(mean group "
                                                         "reward std of the step).")
    initial_threshold: float = Field(0.0, ge=0, description="β before the first step (0: keep every group then).")


def ema(threshold: float, stds: list[float], momentum: float) -> float:
    """``m·β + (1 − m)·mean(stds)`` (β unchanged without groups)."""
    return momentum * threshold + (1 - momentum) * sum(stds) / len(stds) if stds else threshold


@EXPLORE.register("std_filter", config=StdFilterConfig)
class StdFilter(Piece):
    """RLPR's std filter [67]: groups whose reward std is below an EMA threshold are dropped; β is its state."""

    cfg: StdFilterConfig

    def __init__(self, cfg: StdFilterConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        self.threshold = float(cfg.initial_threshold)
        self.steps = 0

    def __call__(self, ctx: ExploreContext) -> tuple[list[Episode], dict[str, float]]:
        cfg = self.cfg
        episodes = ctx.sample_groups(ctx.next_seeds(cfg.prompts_per_step), cfg.group_size)
        ctx.score(episodes)
        groups = list(groups_of(episodes).values())
        stds = [group_reward_std(g) for g in groups]
        kept = [g for g, s in zip(groups, stds) if s >= self.threshold] or groups
        metrics = {"explore/std_threshold": self.threshold, "explore/groups_sampled": float(len(groups)),
                   "explore/groups_kept": float(len(kept)),
                   "explore/group_reward_std": sum(stds) / max(len(stds), 1)}
        self.threshold = ema(self.threshold, stds, cfg.momentum)
        self.steps += 1
        return [e for g in kept for e in g], metrics

    def state_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.threshold = float(state["threshold"])
        self.steps = int(state["steps"])
