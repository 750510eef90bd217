"""On-policy preference pairs: the policy's own samples, compared by a preference oracle (by default the recipe's
score pieces' reward), the best and the worst of each group marked ``chosen`` / ``rejected`` for the pairwise
learner terms (`dpo`, `ipo`, ...). Under the `rl` loop this is online DPO; under `dno`, DNO's batched rounds [48]."""

from __future__ import annotations

import torch
from pydantic import Field, field_validator

from outrider.data import Episode, groups_of
from outrider.explore import EXPLORE, ExploreConfig, ExploreContext
from outrider.registry import BuildContext, Piece
from outrider.score.preference import PREFERENCES, build_oracle, win_rates


class PreferencePairsConfig(ExploreConfig):
    """Options of the `preference_pairs` strategy."""

    oracle: dict = Field(default_factory=lambda: {"name": "reward"},
                         description="Preference oracle that compares two samples of a prompt: {name: reward} (the "
                                     "score pieces' total reward; option temperature) or {name: cyclic} (an "
                                     "intransitive rock-paper-scissors preference over the response's first "
                                     "character, for tests and experiments; options classes, correct_first).")
    min_margin: float = Field(0.0, ge=0, lt=1, description="Keep a group's pair only when the chosen sample's win "
                                                           "rate exceeds the rejected one's by more than this "
                                                           "(DNO's large-margin filter; 0: any strict preference).")
    keep_unpaired: bool = Field(False, description="Also return the group's other samples (no preference: the "
                                                   "pairwise terms ignore them, other terms may use them); false "
                                                   "trains only on the pairs.")

    @field_validator("oracle", mode="before")
    @classmethod
    def _oracle(cls, v: object) -> object:
        v = {"name": v} if isinstance(v, str) else v
        if isinstance(v, dict):
            PREFERENCES.build(v, "explore.oracle")  # an unknown oracle or option fails at load, as one line
        return v


@EXPLORE.register("preference_pairs", config=PreferencePairsConfig)
class PreferencePairs(Piece):
    """Sample ``group_size`` episodes for each of ``prompts_per_step`` prompts, score them, and let the oracle
    compare every two samples of a prompt. Each sample's win rate is its mean win probability against the others,
    ``w_i = Σ_{j≠i} P(y_i ≻ y_j) / (G − 1)`` (DNO's per-iteration reward [48]); the highest-rate sample becomes
    ``chosen`` and the lowest ``rejected`` (ties broken at random), and the pair is kept when ``w_c − w_l >
    min_margin``. With the `reward` oracle at τ = 0 this is "best vs worst reward, if they differ". Groups without a
    pair are dropped (their samples still count as sampled tokens); a step without any pair trains on every sample
    with no preference, which pairwise terms score 0. Metrics: ``explore/pairs``, ``explore/pair_frac`` (groups
    with a pair), ``explore/winrate_gap`` (mean w_c − w_l of kept pairs), ``explore/sampled_reward`` and
    ``explore/sampled_success`` (over every sample, where ``episode/*`` describe the returned pairs)."""

    cfg: PreferencePairsConfig

    def __init__(self, cfg: PreferencePairsConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        self.oracle = build_oracle(cfg.oracle, build, f"{build.where if build else 'explore'}.oracle")

    def __call__(self, ctx: ExploreContext) -> tuple[list[Episode], dict[str, float]]:
        cfg = self.cfg
        episodes = ctx.sample_groups(ctx.next_seeds(cfg.prompts_per_step), cfg.group_size)
        ctx.score(episodes)
        kept, gaps = [], []
        for group in groups_of(episodes).values():
            pair = self.pick(group, ctx)
            if pair is None:
                if cfg.keep_unpaired:
                    kept += group
                continue
            gaps.append(pair)
            kept += group if cfg.keep_unpaired else [e for e in group if e.preference is not None]
        metrics = {"explore/groups_sampled": float(cfg.prompts_per_step), "explore/pairs": float(len(gaps)),
                   "explore/pair_frac": len(gaps) / max(cfg.prompts_per_step, 1),
                   "explore/sampled_reward": sum(e.total_reward() for e in episodes) / len(episodes),
                   "explore/sampled_success": sum(bool(e.success) for e in episodes) / len(episodes)}
        if gaps:
            metrics["explore/winrate_gap"] = sum(gaps) / len(gaps)
        return (kept if gaps else episodes), metrics

    def pick(self, group: list[Episode], ctx: ExploreContext) -> float | None:
        """Mark the group's chosen and rejected sample; their win-rate gap, or None when the group has no pair."""
        if len(group) < 2:
            return None
        w = win_rates(self.oracle(group))
        order = torch.from_numpy(ctx.rng.permutation(len(group)))  # random tie-breaking, seeded per step
        best = int(order[torch.argmax(w[order])])
        worst = int(order[torch.argmin(w[order])])
        gap = float(w[best] - w[worst])
        if gap <= self.cfg.min_margin:
            return None
        group[best].preference, group[worst].preference = "chosen", "rejected"
        return gap
