"""Two stateful pieces for the lifecycle tests, registered on import (a recipe lists this module under `plugins`):
an exploration piece that tracks every seed's success and revisits the hardest, and a packed score component that
trains a small network on the policy's hidden states every step (an RND-style novelty bonus)."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from outrider.data import Batch, Episode
from outrider.explore import EXPLORE, ExploreConfig, ExploreContext
from outrider.registry import BuildContext, Needs, Piece
from outrider.score import SCORE, ComponentConfig


class RevisitConfig(ExploreConfig):
    revisit: int = Field(1, ge=0, description="Groups per step drawn again from the hardest seeds seen so far.")


@EXPLORE.register("test_revisit", config=RevisitConfig)
class Revisit(Piece):
    """Keeps (attempts, successes) per seed; each step re-samples `revisit` groups from the seeds with the lowest
    success rate (ties broken by the step's rng), and fresh seeds for the rest."""

    cfg: RevisitConfig

    def __init__(self, cfg: RevisitConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        self.stats: dict[int, list[int]] = {}

    def __call__(self, ctx: ExploreContext) -> tuple[list[Episode], dict[str, float]]:
        k = min(self.cfg.revisit, len(self.stats), self.cfg.prompts_per_step)
        ranked = sorted(self.stats, key=lambda s: (self.stats[s][1] / self.stats[s][0], ctx.rng.random()))
        seeds = ranked[:k] + ctx.next_seeds(self.cfg.prompts_per_step - k)
        episodes = ctx.sample_groups(seeds, self.cfg.group_size)
        ctx.score(episodes)
        for e in episodes:
            n, s = self.stats.get(e.seed, [0, 0])
            self.stats[e.seed] = [n + 1, s + int(e.success)]
        return episodes, {"explore/tracked_seeds": float(len(self.stats)), "explore/revisited": float(k)}

    def state_dict(self) -> dict[str, Any]:
        return {"stats": {str(s): v for s, v in self.stats.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats = {int(s): list(v) for s, v in state["stats"].items()}


class NoveltyConfig(ComponentConfig):
    features: int = Field(8, ge=1, description="Width of the random target network's output.")
    lr: float = Field(1e-2, gt=0, description="The predictor's learning rate.")


@SCORE.register("test_novelty", config=NoveltyConfig, needs=Needs(packed=True, hidden=True))
class Novelty(Piece):
    """b_t = ‖f̂(h_t) − f(h_t)‖² / d on each action token, with f a fixed random linear map of the hidden state and
    f̂ a linear predictor trained (Adam, one step per call) on the batch's action tokens after the bonus is read."""

    cfg: NoveltyConfig

    def __init__(self, cfg: NoveltyConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        width = build.policy.model.config.hidden_size
        self.generator = build.generator()
        self.target, self.predictor = nn.Linear(width, cfg.features), nn.Linear(width, cfg.features)
        for p in list(self.target.parameters()) + list(self.predictor.parameters()):
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=self.generator) * 0.3)
        self.target.requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.predictor.parameters(), lr=cfg.lr)

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        h, m = batch.hidden.detach(), batch.action_mask
        error = ((self.predictor(h) - self.target(h)) ** 2).mean(-1)
        bonus = error.detach() * m
        loss = (error * m).sum() / m.sum().clamp(min=1)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return bonus, {"novelty/loss": float(loss.detach())}

    def state_dict(self) -> dict[str, Any]:
        return {"predictor": self.predictor.state_dict(), "target": self.target.state_dict(),
                "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.predictor.load_state_dict(state["predictor"])
        self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
