"""Built-in exploration strategies: plain group sampling and DAPO's dynamic sampling."""

from __future__ import annotations

from pydantic import Field

from outrider.data import Episode, groups_of, has_reward_variance
from outrider.explore import EXPLORE, ExploreConfig, ExploreContext


@EXPLORE.register("group", config=ExploreConfig)
def group_sampling(ctx: ExploreContext, cfg: ExploreConfig) -> tuple[list[Episode], dict[str, float]]:
    """`group_size` episodes for each of `prompts_per_step` fresh prompts (GRPO's group sampling)."""
    episodes = ctx.sample_groups(ctx.next_seeds(cfg.prompts_per_step), cfg.group_size)
    ctx.score(episodes)
    return episodes, {"explore/groups_sampled": float(cfg.prompts_per_step)}


class DynamicConfig(ExploreConfig):
    max_rounds: int = Field(4, ge=1, description="Sampling rounds per step before training on what was kept.")


@EXPLORE.register("dynamic", config=DynamicConfig)
def dynamic_sampling(ctx: ExploreContext, cfg: DynamicConfig) -> tuple[list[Episode], dict[str, float]]:
    """DAPO dynamic sampling [Yu et al. 2025]: drop groups whose rewards are all equal (their GRPO advantage is 0)
    and sample fresh prompts until `prompts_per_step` informative groups are kept or `max_rounds` is spent.
    If no group is informative the last round is kept as it is (its loss is zero; the step is not skipped)."""
    kept: list[list[Episode]] = []
    sampled, last = 0, []
    for _ in range(cfg.max_rounds):
        need = cfg.prompts_per_step - len(kept)
        episodes = ctx.sample_groups(ctx.next_seeds(need), cfg.group_size)
        ctx.score(episodes)
        sampled += need
        last = list(groups_of(episodes).values())
        kept += [g for g in last if has_reward_variance(g)]
        if len(kept) >= cfg.prompts_per_step:
            break
    kept = kept[: cfg.prompts_per_step] or last
    metrics = {"explore/groups_sampled": float(sampled), "explore/groups_kept": float(len(kept)),
               "explore/kept_fraction": len([g for g in kept if has_reward_variance(g)]) / max(sampled, 1)}
    return [e for g in kept for e in g], metrics
