"""The baselines OPPO [38] is compared with: plain behaviour cloning, and a Bradley–Terry reward learned from the
preferences followed by filtered behaviour cloning on the trajectories it ranks highest.

* BC: ``min − mean_t log π(a_t | s_t)`` over every trajectory of the dataset.
* BT + filtered BC: a per-step reward ``r_ψ(s, a)`` (an MLP), a trajectory's predicted return
  ``R̂(τ) = Σ_t r_ψ(s_t, a_t)``, trained on the pairs with ``− [p log σ(R̂_a − R̂_b) + (1 − p) log σ(R̂_b − R̂_a)]``
  (p = 1, 0 or ½ for a tie) for `reward_steps` steps; then the trajectories are ranked by R̂ and the policy is
  cloned from the top `keep` fraction (the preference-based analogue of filtered BC / %BC, a common offline-RL
  baseline; the paper's baselines are reward learning + IQL/CQL).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from outrider.offline.oppo import ContextPolicy, mlp


def bt_loss(r_a: Tensor, r_b: Tensor, pref: Tensor) -> Tensor:
    """Bradley–Terry cross-entropy of P(a ≻ b) = σ(R̂_a − R̂_b) against p, averaged over pairs."""
    return F.binary_cross_entropy_with_logits(r_a - r_b, pref)


class BC:
    """Behaviour cloning on the trajectories the batch sampler draws from (all of them, or a filtered set). The
    policy is a piece with `loss(batch, None)` (the MLP `ContextPolicy` or the tiny LM of `offline.text`)."""

    def __init__(self, policy: nn.Module, lr: float, weight_decay: float):
        self.policy = policy
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=lr, weight_decay=weight_decay)

    @classmethod
    def mlp(cls, obs_dim: int, n_actions: int, hidden: int, lr: float, weight_decay: float, seed: int) -> "BC":
        torch.manual_seed(seed)
        return cls(ContextPolicy(obs_dim, n_actions, hidden, 0), lr, weight_decay)

    def bc_step(self, traj_batch: tuple[Tensor, ...]) -> float:
        loss = self.policy.loss(traj_batch, None)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.item()

    def step(self, step: int, traj_batch: tuple, pair_batch: tuple, gen: torch.Generator) -> dict[str, float]:
        return {"bc/nll": self.bc_step(traj_batch)}

    def context(self) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.opt.load_state_dict(state["opt"])


class RewardModel(nn.Module):
    """``r_ψ(s, a)`` per step; `forward` returns the masked sum over a trajectory, R̂(τ)."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: int):
        super().__init__()
        self.n_actions = n_actions
        self.net = mlp([obs_dim + n_actions, hidden, hidden, 1])

    def forward(self, obs: Tensor, actions: Tensor, mask: Tensor) -> Tensor:
        r = self.net(torch.cat([obs, F.one_hot(actions, self.n_actions).float()], -1)).squeeze(-1)
        return (r * mask.float()).sum(-1)


class BTFilteredBC(BC):
    """`reward_steps` Bradley–Terry steps on the pairs, then BC on the top `keep` fraction by predicted return.
    The run computes the kept set with `select` after the reward steps (again on resume, from the reward model in
    the checkpoint). `reward(*batch) -> R̂ [B]` is a piece too (`RewardModel` here, a pooled tiny LM for text)."""

    def __init__(self, policy: nn.Module, reward: nn.Module, lr: float, weight_decay: float, reward_steps: int,
                 keep: float):
        super().__init__(policy, lr, weight_decay)
        self.reward = reward
        self.opt_reward = torch.optim.AdamW(self.reward.parameters(), lr=lr, weight_decay=weight_decay)
        self.reward_steps, self.keep = reward_steps, keep

    @classmethod
    def mlp(cls, obs_dim: int, n_actions: int, hidden: int, lr: float, weight_decay: float, seed: int,
            reward_steps: int, keep: float) -> "BTFilteredBC":
        torch.manual_seed(seed)
        policy = ContextPolicy(obs_dim, n_actions, hidden, 0)
        return cls(policy, RewardModel(obs_dim, n_actions, hidden), lr, weight_decay, reward_steps, keep)

    def select(self, returns: Tensor) -> list[int]:
        """Indices of the top ``ceil(keep · N)`` trajectories by predicted return (ties: lower index first)."""
        k = max(1, int(torch.ceil(torch.tensor(self.keep * returns.numel())).item()))
        order = sorted(range(returns.numel()), key=lambda i: (-float(returns[i]), i))
        return sorted(order[:k])

    def step(self, step: int, traj_batch: tuple, pair_batch: tuple, gen: torch.Generator) -> dict[str, float]:
        if step <= self.reward_steps:
            batch_a, batch_b, pref = pair_batch
            loss = bt_loss(self.reward(*batch_a), self.reward(*batch_b), pref)
            self.opt_reward.zero_grad()
            loss.backward()
            self.opt_reward.step()
            return {"bt/loss": loss.item()}
        return {"bc/nll": self.bc_step(traj_batch)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "reward": self.reward.state_dict(), "opt_reward": self.opt_reward.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.reward.load_state_dict(state["reward"])
        self.opt_reward.load_state_dict(state["opt_reward"])
