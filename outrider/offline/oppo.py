"""OPPO [38] (Kang et al. 2023, "Beyond Reward: Offline Preference-guided Policy Optimization") for a small
neural policy on discrete actions: no reward function, a contextual policy and a searched context.

Pieces (this module's MLPs; `outrider.offline.text` gives the tiny-LM encoder and policy, z as prefix embeddings,
to the same `OPPO` class):

* an encoder ``z = E(τ)`` of a whole trajectory (a per-step MLP over (s_t, a_t), masked mean pooling, a linear
  head to ``z_dim``; the paper uses a BERT-style transformer over a K-step segment);
* a contextual policy ``π(a | s, z)`` (an MLP over [s, z]; the paper's is a decision transformer);
* the optimal context ``z*``, a free vector (``randn(z_dim) · z_init``; the authors' code uses z_init = 2).

Losses (constants from the authors' code, human-label variant):

* hindsight information matching: ``L_HIM = − mean_t log π(a_t | s_t + ξ, E(τ))`` over a trajectory's steps (the
  paper's MSE on continuous actions becomes the negative log-likelihood of discrete ones; ξ ~ N(0, 0.1²) on the
  states in the HIM step);
* preference (triplet) on z: for a pair with τ⁺ preferred,
  ``ℓ(z*, z⁺, z⁻) = max(‖z* − z⁺‖ − ‖z* − z⁻‖ + m, 0)`` with margin ``m = 1`` (PyTorch's TripletMarginLoss, p = 2,
  distance ``‖x − y + 10⁻⁶‖``); a tie (preference ½) adds the same with ``m = 0``, the first trajectory as the
  positive; summed over the batch and divided by the batch size;
* a norm penalty ``mean max(‖z‖ − 1, 0)`` on the encoder's outputs.

Alternation, per step: (1) every other step an HIM step on a batch of trajectories updates E and π; (2) on a batch
of pairs the encoder alone minimises ``L_HIM(π frozen) on both sides + λ_pref ℓ(z*.detach, ·) + λ_norm norm``
(λ = 0.1 each), which shapes the z space by the preferences; (3) ``z*`` alone minimises ℓ with E's outputs
detached (its own optimiser). Gradients of E and π are clipped to norm 0.25. At test time the policy acts with z*.

``z_max_norm`` (not in the paper; None: off) projects z* back into the ball ``‖z*‖ ≤ z_max_norm`` after each of
its steps. Without it the triplet loss pushes z* past the preferred embeddings (moving the anchor further along
the direction from rejected to preferred keeps lowering ``‖z* − z⁺‖ − ‖z* − z⁻‖``), out of the region the norm
penalty keeps the encoder's outputs in, where π(a | s, z*) extrapolates.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TRIPLET_EPS = 1e-6  # torch.pairwise_distance's eps, added to the difference


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """``E(τ)``: a per-step MLP over [s_t, onehot(a_t)], mean-pooled over the valid steps, then a linear head."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: int, z_dim: int):
        super().__init__()
        self.n_actions = n_actions
        self.step = mlp([obs_dim + n_actions, hidden, hidden])
        self.head = nn.Linear(hidden, z_dim)

    def forward(self, obs: Tensor, actions: Tensor, mask: Tensor) -> Tensor:  # [B, T, D], [B, T], [B, T] -> [B, z]
        h = torch.relu(self.step(torch.cat([obs, F.one_hot(actions, self.n_actions).float()], -1)))
        m = mask.unsqueeze(-1).float()
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1.0))


class ContextPolicy(nn.Module):
    """``π(a | s, z)``: logits from an MLP over [s, z] (z_dim 0: a plain policy π(a | s))."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: int, z_dim: int):
        super().__init__()
        self.net = mlp([obs_dim + z_dim, hidden, hidden, n_actions])

    def forward(self, obs: Tensor, z: Tensor | None = None) -> Tensor:
        if z is not None:
            obs = torch.cat([obs, z.unsqueeze(-2).expand(*obs.shape[:-1], z.shape[-1]) if z.dim() < obs.dim()
                             else z], -1)
        return self.net(obs)

    def loss(self, batch: tuple[Tensor, ...], z: Tensor | None, noise: float = 0.0,
             gen: torch.Generator | None = None) -> Tensor:
        """HIM / BC loss on a batch (obs, actions, mask), states perturbed by N(0, noise²) when noise > 0."""
        obs, act, mask = batch
        if noise > 0:
            obs = obs + torch.randn(obs.shape, generator=gen) * noise
        return nll(self(obs, z), act, mask)


def nll(logits: Tensor, actions: Tensor, mask: Tensor) -> Tensor:
    """``− mean log π(a_t | ·)`` over the valid steps (mask) of a padded batch: the HIM / behaviour-cloning loss."""
    logp = torch.log_softmax(logits, -1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    m = mask.float()
    return -(logp * m).sum() / m.sum().clamp_min(1.0)


def triplet(anchor: Tensor, positive: Tensor, negative: Tensor, margin: float) -> Tensor:
    """``Σ_i max(‖a_i − p_i + ε‖ − ‖a_i − n_i + ε‖ + margin, 0)`` (PyTorch's TripletMarginLoss, p = 2, sum)."""
    d_pos = (anchor - positive + TRIPLET_EPS).norm(dim=-1)
    d_neg = (anchor - negative + TRIPLET_EPS).norm(dim=-1)
    return torch.relu(d_pos - d_neg + margin).sum()


def preference_loss(z_star: Tensor, z_a: Tensor, z_b: Tensor, pref: Tensor, margin: float = 1.0) -> Tensor:
    """OPPO's preference loss on a batch of pairs: the triplet with the preferred side as positive (margin m) for
    strict pairs, plus the margin-0 triplet with side a as positive for ties (pref ½); sum / batch size."""
    a_wins, b_wins, tie = pref == 1.0, pref == 0.0, pref == 0.5
    pos = torch.cat([z_a[a_wins], z_b[b_wins]])
    neg = torch.cat([z_b[a_wins], z_a[b_wins]])
    anchor = z_star.expand_as(pos)
    loss = triplet(anchor, pos, neg, margin) + triplet(z_star.expand_as(z_a[tie]), z_a[tie], z_b[tie], 0.0)
    return loss / pref.shape[0]


def norm_loss(z: Tensor) -> Tensor:
    """``mean max(‖z‖ − 1, 0)``: keeps embeddings within the unit ball without pinning them to it."""
    return torch.relu(z.norm(dim=-1) - 1.0).mean()


class OPPO:
    """Encoder, contextual policy and z*, each with its optimiser; `step` is one alternation (see module doc).

    The networks are pieces: `encoder(*batch) -> z [B, z_dim]` and `policy.loss(batch, z, noise, gen)` (the HIM
    loss) on whatever a batch is (MiniGrid's padded vectors here, token ids in `offline.text`), so the same
    alternation trains the MLP policy and the tiny LM with z as a prefix."""

    def __init__(self, encoder: nn.Module, policy: nn.Module, z_dim: int, lr: float, z_lr: float, z_init: float,
                 z_max_norm: float | None, weight_decay: float, pref_weight: float, norm_weight: float,
                 margin: float, state_noise: float):
        self.encoder, self.policy = encoder, policy
        self.z_star = nn.Parameter(torch.randn(z_dim) * z_init)
        self.opt_policy = torch.optim.AdamW(self.policy.parameters(), lr=lr, weight_decay=weight_decay)
        self.opt_encoder = torch.optim.AdamW(self.encoder.parameters(), lr=lr, weight_decay=weight_decay)
        self.opt_z = torch.optim.AdamW([self.z_star], lr=z_lr, weight_decay=weight_decay)
        self.z_max_norm = z_max_norm
        self.pref_weight, self.norm_weight, self.margin, self.state_noise = pref_weight, norm_weight, margin, state_noise

    @classmethod
    def mlp(cls, obs_dim: int, n_actions: int, hidden: int, z_dim: int, lr: float, z_lr: float, z_init: float,
            z_max_norm: float | None, weight_decay: float, pref_weight: float, norm_weight: float, margin: float,
            state_noise: float, seed: int) -> "OPPO":
        """OPPO with the MLP encoder and policy on state vectors (MiniGrid)."""
        torch.manual_seed(seed)
        encoder, policy = Encoder(obs_dim, n_actions, hidden, z_dim), ContextPolicy(obs_dim, n_actions, hidden, z_dim)
        return cls(encoder, policy, z_dim, lr, z_lr, z_init, z_max_norm, weight_decay, pref_weight, norm_weight,
                   margin, state_noise)

    def step(self, step: int, traj_batch: tuple[Tensor, ...], pair_batch: tuple, gen: torch.Generator
             ) -> dict[str, float]:
        out: dict[str, float] = {}
        if step % 2 == 1:  # (1) HIM on trajectories: encoder and policy
            loss = self.policy.loss(traj_batch, self.encoder(*traj_batch), self.state_noise, gen)
            self.opt_policy.zero_grad()
            self.opt_encoder.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(self.policy.parameters(), 0.25)
            nn.utils.clip_grad_norm_(self.encoder.parameters(), 0.25)
            self.opt_policy.step()
            self.opt_encoder.step()
            out["oppo/him"] = loss.item()
        batch_a, batch_b, pref = pair_batch
        # (2) the encoder: HIM through the frozen policy + the preference and norm terms with z* fixed
        z_a, z_b = self.encoder(*batch_a), self.encoder(*batch_b)
        self.policy.requires_grad_(False)
        him_pairs = self.policy.loss(batch_a, z_a) + self.policy.loss(batch_b, z_b)
        self.policy.requires_grad_(True)
        pref_enc = preference_loss(self.z_star.detach(), z_a, z_b, pref, self.margin)
        norm = norm_loss(z_a) + norm_loss(z_b)
        loss = him_pairs + self.pref_weight * pref_enc + self.norm_weight * norm
        self.opt_encoder.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(self.encoder.parameters(), 0.25)
        self.opt_encoder.step()
        # (3) z*: the preference loss on the updated encoder's (detached) embeddings
        with torch.no_grad():
            z_a, z_b = self.encoder(*batch_a), self.encoder(*batch_b)
        pref_z = preference_loss(self.z_star, z_a, z_b, pref, self.margin)
        self.opt_z.zero_grad()
        pref_z.backward()
        self.opt_z.step()
        if self.z_max_norm is not None:  # keep z* where the encoder puts trajectories (its norm penalty's ball)
            with torch.no_grad():
                self.z_star.mul_(torch.clamp(self.z_max_norm / self.z_star.norm().clamp_min(1e-12), max=1.0))
        out.update({"oppo/him_pairs": him_pairs.item() / 2, "oppo/pref_encoder": pref_enc.item(),
                    "oppo/norm": norm.item(), "oppo/pref_z": pref_z.item(), "oppo/z_star_norm": self.z_star.norm().item()})
        return out

    def context(self) -> Tensor:
        """The context the policy acts with at test time: z*."""
        return self.z_star.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"encoder": self.encoder.state_dict(), "policy": self.policy.state_dict(), "z_star": self.z_star.data,
                "opt_policy": self.opt_policy.state_dict(), "opt_encoder": self.opt_encoder.state_dict(),
                "opt_z": self.opt_z.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.encoder.load_state_dict(state["encoder"])
        self.policy.load_state_dict(state["policy"])
        self.z_star.data.copy_(state["z_star"])
        self.opt_policy.load_state_dict(state["opt_policy"])
        self.opt_encoder.load_state_dict(state["opt_encoder"])
        self.opt_z.load_state_dict(state["opt_z"])
