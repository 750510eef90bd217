"""Implicit process reward model (PRIME [159]): a copy of the policy trained online as an outcome reward model
whose per-token log-likelihood ratio to a frozen reference is a dense process reward.

The PRM φ and its reference are copies of the policy as it is when the component is first called (the warm
start: pieces are built before it). Each call, on the packed batch:

- the outcome label of row i is ``y_i = 1[R_i ≥ label_threshold]``, with R_i the row's composed reward so far
  (the episode-level components: the verifier; list this component before other packed ones);
- ``q_{i,t} = log πφ(y_t | y_<t) − log πref(y_t | y_<t)`` on the trained action tokens, and the token reward is
  ``r_{i,t} = β·q_{i,t}``; the implicit outcome score of the row is ``β·Σ_t q_{i,t}`` (its Q-value at the end);
- φ takes ``updates`` Adam steps on the cross-entropy ``BCE(σ(β·Σ_t q_{i,t}), y_i)`` (PRIME's ``ce`` loss,
  `compute_ce_dpo_loss_rm` in verl's ``recipe/prime``). The rewards come from φ before this batch's update,
  so a row's reward never saw its own label.

A step's process reward is the sum of its tokens' rewards, i.e. the difference of the implicit Q-values at the
step's two ends [159] (`step_rewards`). φ, its optimiser and the reference are the component's state. The
component's time per step (both forwards, the update) is logged by `compose_packed` as
``time/score/implicit_prm_s``. PRIME's own advantage combines the implicit and outcome rewards with RLOO and
returns-to-go (credit ``prime``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from outrider.data import Batch
from outrider.policy.model import Policy
from outrider.registry import BuildContext, Needs, Piece
from outrider.score import SCORE, ComponentConfig
from outrider.stats import masked_mean


class ImplicitPRMConfig(ComponentConfig):
    """Options of `implicit_prm` (PRIME [159])."""

    beta: float = Field(0.05, gt=0, description="β: token reward β·log πφ/πref and the outcome score "
                                                "β·Σ_t log πφ/πref in the cross-entropy (PRIME's beta_train 0.05).")
    lr: float = Field(1e-4, gt=0, description="Learning rate of the PRM's own Adam optimiser.")
    updates: int = Field(1, ge=1, description="Adam steps of the PRM per policy step, on the whole batch.")
    label_threshold: float = Field(0.5, description="A row is labelled correct when its episode-level reward "
                                                    "(the verifier's, at this point) is at least this.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clip of the PRM's update.")


def implicit_rewards(phi_logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, beta: float) -> Tensor:
    """``r_t = β·(log πφ(y_t) − log πref(y_t))`` on masked tokens, 0 elsewhere [159]."""
    return torch.where(mask > 0, beta * (phi_logprobs - ref_logprobs), torch.zeros_like(phi_logprobs))


def implicit_ce_loss(phi_logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, labels: Tensor, beta: float) -> Tensor:
    """PRIME's cross-entropy loss: ``mean_i BCE(σ(β·Σ_t m_{i,t}(log πφ − log πref)), y_i)`` (in the logits form,
    which is the same value without σ's rounding at large scores)."""
    score = beta * ((phi_logprobs - ref_logprobs) * mask).sum(-1)
    return F.binary_cross_entropy_with_logits(score, labels.to(score.dtype))


def step_rewards(token_rewards: list[float], step_ends: list[int]) -> list[float]:
    """Per-step process rewards from one response's token rewards: ``q_{e_k} − q_{e_{k−1}}`` with q the running
    sum and ``e_k`` the (exclusive) end token of step k, i.e. the sum of the step's tokens' rewards [159]."""
    out, start = [], 0
    for end in step_ends:
        out.append(float(sum(token_rewards[start:end])))
        start = end
    return out


@SCORE.register("implicit_prm", config=ImplicitPRMConfig, needs=Needs(packed=True))
class ImplicitPRM(Piece):
    """PRIME's implicit PRM [159]: dense rewards ``β·log πφ/πref`` per action token from a policy copy trained
    online on outcome labels with cross-entropy; φ, its Adam state and the frozen reference ride in checkpoints."""

    cfg: ImplicitPRMConfig

    def __init__(self, cfg: ImplicitPRMConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        self.policy = build.policy if build is not None else None
        self.phi: Policy | None = None
        self.reference: Policy | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def _start(self) -> None:
        """Copy the policy as φ and as the reference (first call: the policy is the warm start by then)."""
        self.phi = copy.deepcopy(self.policy)
        self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.phi.parameters(), lr=self.cfg.lr)

    def logprobs(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(log πφ, log πref) of every token of the batch at temperature 1; φ's with gradient."""
        with torch.no_grad():
            ref = self.reference.score(batch.input_ids, batch.attention_mask, groups=batch.group_index).logprobs
        phi = self.phi.score(batch.input_ids, batch.attention_mask, groups=batch.group_index).logprobs
        return phi, ref

    def __call__(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        if self.phi is None:
            self._start()
        m = batch.action_mask
        outcome = torch.where(m > 0, batch.token_rewards * m, torch.zeros_like(m)).sum(-1)
        labels = (outcome >= self.cfg.label_threshold).float()
        metrics: dict[str, float] = {}
        for k in range(self.cfg.updates):
            phi, ref = self.logprobs(batch)
            if k == 0:
                rewards = implicit_rewards(phi.detach(), ref, m, self.cfg.beta)
                score = rewards.sum(-1)
                metrics["prm/accuracy"] = float(((score > 0).float() == labels).float().mean())
                metrics["prm/score_correct"] = float(score[labels > 0].mean()) if labels.any() else 0.0
                metrics["prm/score_wrong"] = float(score[labels == 0].mean()) if (labels == 0).any() else 0.0
            loss = implicit_ce_loss(phi, ref, m, labels, self.cfg.beta)
            self.optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.phi.parameters(), self.cfg.max_grad_norm)
            self.optimizer.step()
            metrics["prm/loss" if k == 0 else "prm/loss_last"] = float(loss.detach())
        metrics["prm/label_mean"] = float(labels.mean())
        metrics["prm/abs_token_reward"] = float(masked_mean(rewards.abs(), m))
        return rewards, metrics

    def state_dict(self) -> dict[str, Any]:
        if self.phi is None:
            return {}
        return {"phi": self.phi.state_dict(), "reference": self.reference.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self._start()
        self.phi.load_state_dict(state["phi"])
        self.reference.load_state_dict(state["reference"])
        self.optimizer.load_state_dict(state["optimizer"])
