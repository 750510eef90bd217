"""Novelty bonuses on the policy's hidden states (packed score components): random network distillation [128]
and RepExp's elliptical bonus [13] (at the end of the file).

Random network distillation [128]: a fixed, randomly initialised target network f and a trained predictor f̂
read the hidden state h_t that the preparing forward computed before each action token (no second model pass). The bonus of token t is the
predictor's error on it, b_t = mean_k (f̂(ĥ_t) − f(ĥ_t))²_k, where ĥ_t = clip((h_t − μ_h)/σ_h, −5, 5) is the state
normalised by running statistics (Burda et al.'s observation normalisation), divided by the running standard
deviation of the bonus so its scale stays fixed while the predictor learns (the paper normalises the intrinsic
reward by a running std [128, para]). After the bonus is read, the predictor takes one Adam step on a random
`update_proportion` of the batch's action tokens. Networks, optimiser, running statistics and the generator that
draws the update's tokens are the piece's state; its time per step is logged as ``time/score/rnd_s``.

RepExp [13]: see `RepExp` (time ``time/score/repexp_s``).
"""

from __future__ import annotations

from typing import Any, Literal

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


def sparse_projection(width: int, dim: int, generator: torch.Generator) -> Tensor:
    """[width, dim] sparse random projection (Achlioptas / Li et al., scikit-learn's `SparseRandomProjection` with
    density 'auto' as RepExp uses it [13]): with s = √width, each entry is +√(s/dim) or −√(s/dim) with probability
    1/(2s) each and 0 otherwise, so squared distances are preserved in expectation."""
    s = width ** 0.5
    u = torch.rand(width, dim, generator=generator, dtype=torch.float64)
    value = (s / dim) ** 0.5
    return torch.where(u < 1 / (2 * s), value, torch.where(u < 1 / s, -value, 0.0)).double()


def elliptical_bonuses(features: Tensor, groups: Tensor, lamb: float, leave_one_out: bool = False) -> Tensor:
    """RepExp's elliptical bonus [13] of each row of `features` [N, d] against the rows of its group: with c_i the
    row minus its group's mean and A = λI + Σ_{j in group} c_j c_jᵀ, the leverage b_i = c_iᵀ A⁻¹ c_i (in [0, 1));
    ``leave_one_out``: b_i = c_iᵀ (A − c_i c_iᵀ)⁻¹ c_i (the other rollouts only). A group of one, or of identical
    rows, has every c_i = 0 and gets 0. Computed in float64, as the authors' code does."""
    x = features.double()
    out = torch.zeros(x.shape[0], dtype=torch.float64)
    eye = torch.eye(x.shape[1], dtype=torch.float64)
    for g in torch.unique(groups):
        rows = (groups == g).nonzero().flatten()
        c = x[rows] - x[rows].mean(0)
        a = lamb * eye + c.T @ c
        if leave_one_out:
            out[rows] = torch.stack([ci @ torch.linalg.solve(a - torch.outer(ci, ci), ci) for ci in c])
        else:
            out[rows] = (c * torch.linalg.solve(a, c.T).T).sum(-1)
    return out


class RepExpConfig(ComponentConfig):
    sparse_dim: int = Field(32, ge=1, description="Width d of the sparse random projection of the mean hidden "
                                                  "state (the authors' 32 on MATH/GSM8K, 128 on DAPO).")
    lamb: float = Field(0.01, gt=0, description="Ridge λ of A = λI + Σ c_j c_jᵀ (the authors' 0.01).")
    bonus: Literal["leverage", "leave_one_out"] = Field(
        "leverage", description="leverage: c_iᵀA⁻¹c_i with the row itself in A (the authors' training script); "
                                "leave_one_out: against the other rollouts only (their config's default).")
    only_solved_groups: bool = Field(True, description="Bonus only in groups where some rollout is correct "
                                                       "(reward so far > 0), as the authors' training script "
                                                       "(turn_off_elliptical_if_none_correct).")
    new_projection_each_step: bool = Field(True, description="Draw a fresh projection each step (the authors' "
                                                             "randomize_sparse_matrix); else one for the run.")


@SCORE.register("repexp", config=RepExpConfig, needs=Needs(packed=True, hidden=True))
class RepExp(Piece):
    """Representation-based exploration [13]: h̄_i, the mean of the last-layer hidden states over episode i's
    action tokens (from the preparing forward, no second pass), is sparsely projected, centred on its group's mean
    and scored b_i = c_iᵀ(λI + Σ_j c_j c_jᵀ)⁻¹c_i over the group (the rollouts of the same prompt); the bonus sits
    on the episode's last action token, the component's weight is the paper's β. The projection's generator is the
    piece's state."""

    def __init__(self, cfg: RepExpConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        self.generator = (build or BuildContext()).generator()
        self.projection: Tensor | None = None

    def __call__(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        cfg: RepExpConfig = self.cfg
        mask = batch.action_mask.detach().cpu().float()
        hidden = batch.hidden.detach().cpu().double()
        mean_hidden = (hidden * mask[..., None]).sum(1) / mask.sum(1).clamp(min=1)[:, None]
        if self.projection is None or cfg.new_projection_each_step:
            self.projection = sparse_projection(hidden.shape[-1], cfg.sparse_dim, self.generator)
        groups = batch.group_index.cpu()
        raw = elliptical_bonuses(mean_hidden @ self.projection, groups, cfg.lamb, cfg.bonus == "leave_one_out")
        bonus = raw.clone()
        if cfg.only_solved_groups:
            solved = batch.token_rewards.detach().cpu().sum(-1) > 0
            for g in torch.unique(groups):
                if not bool(solved[groups == g].any()):
                    bonus[groups == g] = 0.0
        positions = torch.arange(mask.shape[1]).expand_as(mask)
        last = torch.where(mask > 0, positions, -1).amax(-1)
        rewards = torch.zeros(mask.shape)
        rows = (last >= 0).nonzero().flatten()
        rewards[rows, last[rows]] = bonus[rows].float()
        return rewards.to(batch.action_mask.device), {"repexp/raw_bonus": float(raw.mean()) if raw.numel() else 0.0,
                                                      "repexp/active_frac": float((bonus != 0).float().mean())
                                                      if bonus.numel() else 0.0}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "projection": self.projection}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.projection = state["projection"]
