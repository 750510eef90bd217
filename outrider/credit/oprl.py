"""OPRL, Online Process Reward Learning [72] (Liu et al. 2025, arXiv:2509.19199; v3 is titled "Agentic
Reinforcement Learning with Implicit Step Rewards", iStar): an implicit PRM trained by trajectory-pair DPO against
the old policy, whose per-turn log-ratio is a step reward, and step advantages added to GRPO's episode advantages.

Notation as in `step_level`: episode i of group g has turns k (``batch.step_index``); a turn is a *step* when it
has an action token; ``R_i`` is the episode's composed reward (the verifier's). Each call, on the packed batch:

- ``q_{i,k} = β·Σ_{t ∈ turn k} (log πφ(y_t|y_<t) − log πθold(y_t|y_<t))`` over the turn's action tokens, with
  πθold the policy as it is when credit runs (before this step's update) and πφ the PRM, a copy of the policy made
  at the first call (the warm start). ``r_{i,k} = q_{i,k}`` (from φ *before* this batch's update: a step's
  reward never saw its own pair) is the implicit step reward;
- preference pairs inside each group: ``pairing: label`` pairs every episode with ``R > label_threshold`` with
  every one at or below it (the authors' code: success vs failure, all pairs); ``order`` pairs every (i, j) with
  ``R_i > R_j``. The trajectory score is ``s_i = Σ_k q_{i,k}`` (``trajectory_score: sum``, the paper's
  ``β log πφ(τ)/πθold(τ)``) or the mean over its steps (``mean``, the authors' ``compute_eto_loss_rm``);
- φ takes ``updates`` Adam steps on ``L = mean_pairs −log σ(s_+ − s_−)``; a batch with no pair leaves φ and its
  optimiser untouched;
- step advantage: ``A^S_{i,k} = (r̃_{i,k} − mean_g r̃) / (std_g r̃ + ε)`` over ALL steps of the group's episodes
  (``mode: mean_std_norm``; ``mean_norm`` only subtracts the mean; ``step_mode`` sets the step level apart), with
  ``r̃ = r / (max_batch |r| + 1e-6)`` under ``step_scale: batch_max`` (the authors' ``istar_norm``; it cancels under
  mean_std_norm up to ε);
- ``A_{i,t} = A^E_i + ω·A^S_{i,k(t)}`` with ``A^E`` GRPO's episode advantage in the same ``mode``.

Deviations, all checked against the authors' code (Tongyi-ConvAI/Qwen-Character, ``CharacterRL-iStar/istar``):
their step baseline (``step_grpo_reward``/``step_rloo_reward``) is computed from one step per trajectory (its
first row seen), a copy of the episode-level code; here every step of the group counts, the reading of the paper
"normalised over the group's steps". Their shipped scripts use the RLOO form (``istar_rloo``) with PRM lr 1e-6 on
7B models; here GRPO's form, to compare with `grpo`/`gigpo` on equal terms. The potential-based-shaping result
is the paper's theory; nothing here depends on it. φ, its Adam state ride in checkpoints; ``credit/prm_time_s`` is
the piece's own time per step (two forwards, the update).
"""

from __future__ import annotations

import copy
import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from outrider.credit import CREDIT, CreditConfig, CreditOutput
from outrider.credit.outcome import broadcast_to_actions, episode_scores, grpo_episode_advantages
from outrider.credit.step_level import _cluster, _cluster_mean_std, _per_turn_sum, broadcast_turns
from outrider.data import Batch
from outrider.errors import OutriderError
from outrider.policy.model import Policy
from outrider.registry import BuildContext, Piece


class OPRLConfig(CreditConfig):
    """Options of `oprl` (defaults: the authors' `run_sokoban.sh`/`run_webshop.sh` where they carry over)."""

    beta: float = Field(0.05, gt=0, description="β of the step reward β·Σ_turn log πφ/πθold and of the DPO "
                                                "margin (the authors' beta_train 0.05).")
    lr: float = Field(1e-4, gt=0, description="Learning rate of the PRM's own Adam optimiser.")
    updates: int = Field(1, ge=1, description="Adam steps of the PRM per policy step, each on all of the batch's "
                                              "pairs (the authors: 1).")
    max_grad_norm: float = Field(10.0, gt=0, description="Gradient-norm clip of the PRM's update (the authors' "
                                                         "grad_clip 10).")
    omega: float = Field(1.0, ge=0.0, description="ω (the authors' step_advantage_w): weight of the step "
                                                  "advantage in A = A_episode + ω·A_step.")
    mode: Literal["mean_norm", "mean_std_norm"] = Field(
        "mean_std_norm", description="mean_norm: subtract the group mean; mean_std_norm: also divide by the group "
                                     "std + ε. Applies to the episode and the step level alike.")
    step_mode: Literal["mean_norm", "mean_std_norm"] | None = Field(
        None, description="The step level's normalisation when it differs from `mode` (the authors' code: the "
                          "batch_max-scaled step rewards minus the group mean, no std); None: `mode`.")
    epsilon: float = Field(1e-6, ge=0.0, description="Added to a std before dividing (mean_std_norm only).")
    pairing: Literal["label", "order"] = Field(
        "label", description="Preference pairs inside a group: label = every episode with R > label_threshold "
                             "against every one at or below it (the authors' success/failure pairs); order = every "
                             "pair with R_i > R_j (graded rewards: a faster success beats a slower one).")
    label_threshold: float = Field(0.0, description="An episode is preferred (pairing: label) when its reward is "
                                                    "above this (the authors: R > 0 is a success).")
    trajectory_score: Literal["sum", "mean"] = Field(
        "sum", description="The DPO score of a trajectory: sum = Σ_k q_k = β log πφ(τ)/πθold(τ) (the paper's "
                           "formula); mean = the mean over its steps (the authors' code).")
    step_scale: Literal["none", "batch_max"] = Field(
        "batch_max", description="Scale the step rewards by 1/(max over the batch's steps of |r| + 1e-6) before "
                                 "the group normalisation (the authors' istar_norm: batch_norm); none keeps β's "
                                 "scale. It matters only under mean_norm.")


# ------------------------------------------------------------------------------------------------- the formulas
def turn_log_ratios(phi_logprobs: Tensor, old_logprobs: Tensor, batch: Batch, beta: float) -> tuple[Tensor, Tensor]:
    """``q_{i,k} = β·Σ_{t ∈ turn k, m_t > 0} (log πφ − log πθold)`` ``[B, K]`` (differentiable in φ's
    log-probs) and the step flag ``[B, K]``."""
    m = batch.action_mask
    diff = torch.where(m > 0, phi_logprobs - old_logprobs, torch.zeros_like(phi_logprobs))
    sums, counts = _per_turn_sum(diff, batch)
    return beta * sums, counts > 0


def trajectory_scores(q: Tensor, valid: Tensor, how: str) -> Tensor:
    """``s_i = Σ_k q_{i,k}`` (sum) or that over the number of steps (mean; 0 for an episode without steps)."""
    total = torch.where(valid, q, torch.zeros_like(q)).sum(-1)
    if how == "sum":
        return total
    return total / valid.sum(-1).clamp(min=1).to(q.dtype)


def preference_pairs(rewards: Tensor, group_index: Tensor, pairing: str, threshold: float) -> tuple[Tensor, Tensor]:
    """Row indices ``(chosen, rejected)`` of every preference pair inside a group, in row order."""
    same = group_index[:, None] == group_index[None, :]
    if pairing == "label":
        good = rewards > threshold
        better = good[:, None] & ~good[None, :]
    else:
        better = rewards[:, None] > rewards[None, :]
    chosen, rejected = (same & better).nonzero(as_tuple=True)
    return chosen, rejected


def dpo_pair_loss(scores: Tensor, chosen: Tensor, rejected: Tensor) -> Tensor:
    """``mean_pairs −log σ(s_chosen − s_rejected)`` (as ``softplus(−margin)``, the same value without σ's
    rounding at large margins)."""
    return F.softplus(-(scores[chosen] - scores[rejected])).mean()


def group_step_advantages(r: Tensor, valid: Tensor, group_index: Tensor, std_norm: bool, epsilon: float) -> Tensor:
    """``A^S_{i,k} = r_{i,k} − mean_g r`` (``/ (std_g r + ε)`` with `std_norm`), the moments over every step of
    every episode of group g; exactly 0 on non-steps, for a group with one step, and for a group of equal
    rewards."""
    groups = group_index[:, None].expand_as(r)
    cid, sizes = _cluster([groups], valid, torch.ones_like(valid))
    mean, std, size = _cluster_mean_std(r, cid, valid, int(sizes.numel()))
    adv = r - mean
    if std_norm:
        adv = adv / (std + epsilon)
    return torch.where(valid & (size > 1), adv, torch.zeros_like(adv))


# -------------------------------------------------------------------------------------------------------- piece
@CREDIT.register("oprl", config=OPRLConfig)
class OPRL(Piece):
    """OPRL [72]: an implicit PRM trained online by trajectory-pair DPO against πθold gives step rewards
    ``β·Σ_turn log πφ/πθold``; ``A = A_episode + ω·A_step`` with the step rewards normalised over the group's
    steps. φ and its Adam state ride in checkpoints."""

    cfg: OPRLConfig

    def __init__(self, cfg: OPRLConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        self.policy = build.policy if build is not None else None
        self.phi: Policy | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def _start(self) -> None:
        """Copy the policy as φ (first call: the policy is the warm start by then)."""
        if self.policy is None:
            raise OutriderError("credit 'oprl' needs the run's policy: its PRM is a copy of it")
        self.phi = copy.deepcopy(self.policy).eval()
        self.optimizer = torch.optim.Adam(self.phi.parameters(), lr=self.cfg.lr)

    def _phi_ratios(self, batch: Batch, old: Tensor) -> tuple[Tensor, Tensor]:
        phi = self.phi.score(batch.input_ids, batch.attention_mask, groups=batch.group_index).logprobs
        return turn_log_ratios(phi, old, batch, self.cfg.beta)

    def __call__(self, batch: Batch) -> CreditOutput:
        t0 = time.perf_counter()
        if self.phi is None:
            self._start()
        cfg = self.cfg
        with torch.no_grad():  # πθold: the policy before this step's update
            old = self.policy.score(batch.input_ids, batch.attention_mask, groups=batch.group_index).logprobs
        q, valid = self._phi_ratios(batch, old)
        r = q.detach()
        rewards = episode_scores(batch)
        chosen, rejected = preference_pairs(rewards, batch.group_index, cfg.pairing, cfg.label_threshold)
        metrics: dict[str, float] = {"prm_pairs": float(chosen.numel())}
        if chosen.numel():
            scores = trajectory_scores(q, valid, cfg.trajectory_score)
            margin = (scores[chosen] - scores[rejected]).detach()
            metrics["prm_pair_accuracy"] = float((margin > 0).float().mean())
            for k in range(cfg.updates):
                if k > 0:
                    scores = trajectory_scores(self._phi_ratios(batch, old)[0], valid, cfg.trajectory_score)
                loss = dpo_pair_loss(scores, chosen, rejected)
                self.optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.phi.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                metrics["prm_loss" if k == 0 else "prm_loss_last"] = float(loss.detach())
        scaled = r
        if cfg.step_scale == "batch_max" and bool(valid.any()):
            scaled = r / (r[valid].abs().max() + 1e-6)
        step_std = (cfg.step_mode or cfg.mode) == "mean_std_norm"
        a_step = group_step_advantages(scaled, valid, batch.group_index, step_std, cfg.epsilon)
        a_ep = grpo_episode_advantages(batch, cfg.mode == "mean_std_norm", cfg.epsilon)
        adv = broadcast_to_actions(a_ep, batch.action_mask) + cfg.omega * broadcast_turns(a_step, batch)
        metrics["step_reward_abs"] = float(r[valid].abs().mean()) if bool(valid.any()) else 0.0
        metrics["step_advantage_abs"] = float(a_step[valid].abs().mean()) if bool(valid.any()) else 0.0
        metrics["prm_time_s"] = time.perf_counter() - t0
        return CreditOutput(advantages=adv, metrics=metrics)

    def state_dict(self) -> dict[str, Any]:
        if self.phi is None:
            return {}
        return {"phi": self.phi.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self._start()
        self.phi.load_state_dict(state["phi"])
        self.optimizer.load_state_dict(state["optimizer"])
