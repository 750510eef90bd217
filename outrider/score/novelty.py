"""Random network distillation [128] as a packed score component: a novelty bonus on the policy's hidden states.

A fixed, randomly initialised target network f and a trained predictor f̂ read the hidden state h_t that the
preparing forward computed before each action token (no second model pass). The bonus of token t is the
predictor's error on it, b_t = mean_k (f̂(ĥ_t) − f(ĥ_t))²_k, where ĥ_t = clip((h_t − μ_h)/σ_h, −5, 5) is the state
normalised by running statistics (Burda et al.'s observation normalisation), divided by the running standard
deviation of the bonus so its scale stays fixed while the predictor learns (the paper normalises the intrinsic
reward by a running std [128, para]). After the bonus is read, the predictor takes one Adam step on a random
`update_proportion` of the batch's action tokens. Networks, optimiser, running statistics and the generator that
draws the update's tokens are the piece's state; its time per step is logged as ``time/score/rnd_s``.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from outrider.data import Batch
from outrider.registry import BuildContext, Needs, Piece
from outrider.score import SCORE, ComponentConfig


class RunningMoments:
    """Running mean and variance of a stream of vectors (Chan et al.'s parallel update, as RND's RunningMeanStd):
    after batches x₁…x_n the mean and (population) variance of all their rows together."""

    def __init__(self, width: int):
        self.mean, self.var, self.count = torch.zeros(width), torch.ones(width), 1e-4

    def update(self, x: Tensor) -> None:
        if x.shape[0] == 0:
            return
        x = x.float()
        b_mean, b_var, b_count = x.mean(0), x.var(0, unbiased=False), x.shape[0]
        delta, total = b_mean - self.mean, self.count + b_count
        self.mean = self.mean + delta * b_count / total
        m2 = self.var * self.count + b_var * b_count + delta ** 2 * self.count * b_count / total
        self.var, self.count = m2 / total, total

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.clone(), "var": self.var.clone(), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.var, self.count = state["mean"].clone(), state["var"].clone(), float(state["count"])


class RNDConfig(ComponentConfig):
    features: int = Field(64, ge=1, description="Width k of the target's (and predictor's) output.")
    width: int = Field(128, ge=1, description="Hidden width of both networks (two-layer MLPs; the predictor has "
                                              "one more layer, as in RND).")
    lr: float = Field(1e-4, gt=0, description="The predictor's Adam learning rate (RND's 1e-4).")
    update_proportion: float = Field(0.25, gt=0, le=1, description="Share of the batch's action tokens the "
                                                                   "predictor trains on each step (RND's 0.25).")
    normalize: bool = Field(True, description="Divide the bonus by its running standard deviation.")


def _mlp(sizes: list[int], generator: torch.Generator) -> nn.Sequential:
    """Linear layers with LeakyReLU between them, weights drawn orthogonally (gain √2) from `generator`."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = nn.Linear(a, b)
        nn.init.orthogonal_(linear.weight, gain=2 ** 0.5, generator=generator)
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU())
    return nn.Sequential(*layers)


@SCORE.register("rnd", config=RNDConfig, needs=Needs(packed=True, hidden=True))
class RND(Piece):
    """Random network distillation [128]: b_t = mean_k (f̂(ĥ_t) − f(ĥ_t))²_k on each action token's hidden
    state, ĥ the state normalised by running moments and clipped to ±5, the bonus divided by its running std; the
    predictor f̂ trains one Adam step per call, the random target f never does."""

    def __init__(self, cfg: RNDConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        hidden = build.policy.model.config.hidden_size if build and build.policy is not None else cfg.width
        self.generator = (build or BuildContext()).generator()
        self.target = _mlp([hidden, cfg.width, cfg.features], self.generator).requires_grad_(False)
        self.predictor = _mlp([hidden, cfg.width, cfg.width, cfg.features], self.generator)
        self.optimizer = torch.optim.Adam(self.predictor.parameters(), lr=cfg.lr)
        self.state_moments, self.bonus_moments = RunningMoments(hidden), RunningMoments(1)

    def errors(self, hidden: Tensor) -> Tensor:
        """[N] prediction errors of N hidden states, normalised by the current running moments."""
        h = ((hidden - self.state_moments.mean) / self.state_moments.var.sqrt().clamp(min=1e-8)).clamp(-5, 5)
        return ((self.predictor(h) - self.target(h)) ** 2).mean(-1)

    def __call__(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        cfg: RNDConfig = self.cfg
        mask = batch.action_mask > 0
        states = batch.hidden.detach().float()[mask].cpu()
        self.state_moments.update(states)
        error = self.errors(states)
        raw = error.detach()
        self.bonus_moments.update(raw[:, None])
        scale = self.bonus_moments.var.sqrt().clamp(min=1e-8)[0] if cfg.normalize else torch.tensor(1.0)
        rewards = torch.zeros(mask.shape)
        rewards[mask.cpu()] = raw / scale
        keep = torch.rand(error.shape[0], generator=self.generator) < cfg.update_proportion
        loss = (error * keep).sum() / keep.sum().clamp(min=1)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return rewards.to(batch.action_mask.device), {"rnd/predictor_loss": float(loss.detach()),
                                                      "rnd/raw_bonus": float(raw.mean()) if raw.numel() else 0.0}

    def state_dict(self) -> dict[str, Any]:
        return {"target": self.target.state_dict(), "predictor": self.predictor.state_dict(),
                "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                "state_moments": self.state_moments.state_dict(), "bonus_moments": self.bonus_moments.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.target.load_state_dict(state["target"])
        self.predictor.load_state_dict(state["predictor"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.state_moments.load_state_dict(state["state_moments"])
        self.bonus_moments.load_state_dict(state["bonus_moments"])
