"""Step-level (turn-level) credit for multi-turn agents: GiGPO, SALT [53] and EMPG [146].

Notation: episode i has turns k = 0 … K−1 (``batch.step_index``); a turn is a *step* when it has at least one action
token. ``r_{i,k} = Σ_{t ∈ turn k} token_rewards[i, t]·m[i, t]`` is the turn's reward (step rewards sit on the turn's
last action token, the trajectory reward on the episode's last one), ``R_i = Σ_k r_{i,k}``. Returns are discounted
per TURN, never per token: ``G_{i,k} = Σ_{j≥0} γ^j r_{i,k+j}``. A group ``g`` is the episodes sharing
``batch.group_index``. Per-turn values ``[B, K]`` reach the tokens through `broadcast_turns`; every advantage is
exactly 0 outside the action mask. No piece normalises by turn *index* (verl issue #7244: a per-index baseline is
biased and action-dependent); step groups are built from env state keys instead.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from outrider.credit import CREDIT, CreditConfig, CreditOutput
from outrider.credit.outcome import broadcast_to_actions, grpo_episode_advantages
from outrider.data import Batch
from outrider.stats import group_moments

EMPG_EPS = 1e-8  # EMPG's guard in the min-max normalisation and in g's mean (official pseudocode)


# ------------------------------------------------------------------------------------------------ shared helpers
def num_turns(batch: Batch) -> int:
    """K: the width of the per-turn tensors (``turn_state_ids`` when present, else the most turns of any row)."""
    k = int(batch.step_index.max().item()) + 1 if batch.step_index.numel() else 0
    if batch.turn_state_ids is not None:
        k = max(k, batch.turn_state_ids.shape[1])
    return max(k, 1)


def _per_turn_sum(x: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
    """``Σ_{t ∈ turn k, m_t > 0} x_t`` and the number of such action tokens, both ``[B, K]``."""
    K = num_turns(batch)
    act = (batch.action_mask > 0) & (batch.step_index >= 0)
    idx = batch.step_index.clamp(min=0)
    xs = torch.where(act, x * batch.action_mask, torch.zeros_like(x))
    sums = torch.zeros(x.shape[0], K, dtype=x.dtype, device=x.device).scatter_add_(1, idx, xs)
    counts = torch.zeros_like(sums).scatter_add_(1, idx, act.to(x.dtype))
    return sums, counts


def turn_rewards(batch: Batch) -> tuple[Tensor, Tensor]:
    """Per-turn rewards ``r_{i,k} = Σ_{t ∈ turn k} r_{i,t}·m_{i,t}`` ``[B, K]`` and the step flag ``[B, K]`` (True
    where turn k of row i has at least one action token)."""
    sums, counts = _per_turn_sum(batch.token_rewards, batch)
    return sums, counts > 0


def discounted_turn_returns(rewards: Tensor, valid: Tensor, gamma: float) -> Tensor:
    """``G_{i,k} = r_{i,k} + γ·G_{i,k'}`` with k' the row's next step: one discount factor per turn. Turns that are
    not steps are transparent (no reward, no discount) and get 0."""
    out = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for k in reversed(range(rewards.shape[1])):
        running = torch.where(valid[:, k], rewards[:, k] + gamma * running, running)
        out[:, k] = torch.where(valid[:, k], running, torch.zeros_like(running))
    return out


def broadcast_turns(per_turn: Tensor, batch: Batch) -> Tensor:
    """``A_{i,t} = v_{i, step_index[i,t]}`` on action tokens, 0 on observation tokens and padding."""
    idx = batch.step_index.clamp(min=0, max=per_turn.shape[1] - 1)
    vals = torch.gather(per_turn.to(batch.action_mask.dtype), 1, idx)
    keep = (batch.action_mask > 0) & (batch.step_index >= 0)
    return torch.where(keep, vals, torch.zeros_like(vals))


def _turn_ids(ids: Tensor | None, batch: Batch) -> Tensor:
    """A ``[B, K]`` id tensor (``turn_state_ids`` / ``turn_action_ids``) padded to K with -1; all -1 when absent."""
    B, K = batch.size, num_turns(batch)
    out = torch.full((B, K), -1, dtype=torch.long, device=batch.action_mask.device)
    if ids is not None:
        out[:, : ids.shape[1]] = ids.to(out.device)
    return out


def _cluster(columns: list[Tensor], valid: Tensor, known: Tensor) -> tuple[Tensor, Tensor]:
    """Cluster the steps (``valid``) by equal key columns (each ``[B, K]``); a step with ``known`` False is its own
    cluster. Returns the cluster id ``[B, K]`` (-1 on non-steps) and each cluster's size ``[n_clusters]``."""
    B, K = valid.shape
    flat = torch.arange(B * K, device=valid.device).view(B, K)
    lone = torch.where(known, torch.zeros_like(flat), flat + 1)  # a unique tiebreak makes unkeyed steps singletons
    keys = torch.stack([c[valid] for c in columns] + [lone[valid]], dim=1)
    cid = torch.full((B, K), -1, dtype=torch.long, device=valid.device)
    if keys.shape[0] == 0:
        return cid, torch.zeros(0, dtype=torch.long, device=valid.device)
    _, inverse, counts = torch.unique(keys, dim=0, return_inverse=True, return_counts=True)
    cid[valid] = inverse
    return cid, counts


def _cluster_mean_std(x: Tensor, cid: Tensor, valid: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-step mean, unbiased std and size of its cluster, all ``[B, K]`` (0 / 1 / 0 on non-steps). The moments
    come from `group_moments`, so a cluster of equal returns has exactly that return as mean and std 0."""
    flat_c = cid[valid]
    cnt, mean_c, sq = group_moments(x[valid], flat_c, n)
    std_c = torch.where(cnt > 1, (sq / (cnt - 1).clamp(min=1.0)).sqrt(), torch.ones_like(cnt))
    mean, std, size = torch.zeros_like(x), torch.ones_like(x), torch.zeros_like(x)
    mean[valid], std[valid], size[valid] = (v[flat_c].to(x.dtype) for v in (mean_c, std_c, cnt))
    return mean, std, size


def group_size_metrics(sizes: Tensor, prefix: str = "step_group") -> dict[str, float]:
    """Step-group size statistics from the per-group sizes: ``<prefix>_mean_size`` (mean over groups, as
    verl-agent's "Avg size of step-level group"), ``<prefix>_singleton_frac`` (fraction of *steps* in groups of
    one) and a coarse histogram of the fraction of steps in groups of size 1, 2–3, 4–7 and ≥ 8."""
    if sizes.numel() == 0:
        return {f"{prefix}_mean_size": 0.0, f"{prefix}_singleton_frac": 0.0}
    s = sizes.to(torch.float64)
    steps = float(s.sum())
    frac = {name: float(s[(s >= lo) & (s <= hi)].sum()) / steps
            for name, lo, hi in (("1", 1, 1), ("2_3", 2, 3), ("4_7", 4, 7), ("8plus", 8, float("inf")))}
    out = {f"{prefix}_mean_size": float(s.mean()), f"{prefix}_singleton_frac": frac["1"]}
    out.update({f"{prefix}_size_{k}": v for k, v in frac.items()})
    return out


# ------------------------------------------------------------------------------------------------------- GiGPO
class GiGPOConfig(CreditConfig):
    """Options of `gigpo` (defaults: verl-agent's `compute_gigpo_outcome_advantage` and its example scripts)."""

    omega: float = Field(1.0, ge=0.0, description="ω (verl-agent `step_advantage_w`): weight of the step-level "
                                                  "advantage in A = A_episode + ω·A_step.")
    gamma: float = Field(0.95, ge=0.0, le=1.0, description="Discount per TURN of the step return G_k "
                                                           "(verl-agent's examples set algorithm.gamma=0.95).")
    mode: Literal["mean_norm", "mean_std_norm"] = Field(
        "mean_norm", description="mean_norm: subtract the group mean (the function default in verl-agent); "
                                 "mean_std_norm: also divide by the group std + ε (verl-agent's yaml default). "
                                 "Applies to both the episode and the step level.")
    epsilon: float = Field(1e-6, ge=0.0, description="Added to a std before dividing (mean_std_norm only).")


@CREDIT.register("gigpo", config=GiGPOConfig)
def gigpo(batch: Batch, cfg: GiGPOConfig) -> CreditOutput:
    """GiGPO: episode-level plus anchor-state step-level group advantage (Feng et al. 2025, arXiv:2505.10978).

    "Group-in-Group Policy Optimization for LLM Agent Training" (not in the paper index). Checked against
    verl-agent `gigpo/core_gigpo.py` (read from the fork zhangyun04/verl-agent; langfengQ's original not indexed).

    ``A_{i,t} = A^E_i + ω·A^S_{i,k(t)}``. Episode level: ``A^E_i = R_i − mean_g R`` (mean_norm) or
    ``(R_i − mean_g R)/(std_g R + ε)`` (mean_std_norm, unbiased std); a group of one uses mean 0, std 1.
    Step level: steps of the same prompt group whose anchor state is equal (``turn_state_ids``) form a step group
    S — across episodes and also repeated visits within one episode, as verl-agent's `build_step_group` does;
    ``A^S = G − mean_S G`` (or ``/(std_S G + ε)``) with the per-turn return ``G_k = Σ_j γ^j r_{k+j}``. A step
    group of one gets ``A^S = 0`` (verl-agent: its mean is its own return, std 1); a step without a state key is
    such a singleton. Deviation: verl-agent's rows are steps and, with its default
    ``compute_mean_std_cross_all_data``, the episode mean weighs each trajectory by its number of steps; here each
    episode counts once (the paper's formula). Verl-agent's optional similarity-based grouping is not implemented.
    Metrics: see `group_size_metrics`.
    """
    std_norm = cfg.mode == "mean_std_norm"
    a_ep = grpo_episode_advantages(batch, std_norm, cfg.epsilon)
    r, valid = turn_rewards(batch)
    G = discounted_turn_returns(r, valid, cfg.gamma)
    states = _turn_ids(batch.turn_state_ids, batch)
    groups = batch.group_index[:, None].expand_as(states)
    cid, sizes = _cluster([groups, states], valid, states >= 0)
    mean, std, size = _cluster_mean_std(G, cid, valid, int(sizes.numel()))
    a_step = G - mean
    if std_norm:
        a_step = a_step / (std + cfg.epsilon)
    a_step = torch.where(valid & (size > 1), a_step, torch.zeros_like(a_step))  # exactly 0 for singletons
    adv = broadcast_to_actions(a_ep, batch.action_mask) + cfg.omega * broadcast_turns(a_step, batch)
    return CreditOutput(advantages=adv, metrics=group_size_metrics(sizes))


# -------------------------------------------------------------------------------------------------------- SALT
class SALTConfig(CreditConfig):
    """Options of `salt`."""

    node: Literal["state_action", "prefix"] = Field(
        "state_action", description="What makes two steps the same graph node: state_action = equal env state key "
                                    "before the turn and equal action text (a merged graph: paths may join again); "
                                    "prefix = equal (state, action) history up to and including the turn (a "
                                    "prefix tree: paths never re-join).")
    std_normalize: bool = Field(True, description="Outcome advantage of each trajectory: GRPO's (R − mean)/(std + "
                                                  "ε); false gives Dr.GRPO's R − mean.")
    epsilon: float = Field(1e-6, ge=0.0, description="Added to the group std before dividing.")


@CREDIT.register("salt", config=SALTConfig)
def salt(batch: Batch, cfg: SALTConfig) -> CreditOutput:
    """SALT, step-level advantage assignment via a trajectory graph [53] (Li et al. 2025, arXiv:2510.20022).

    The episodes of one prompt group are merged into a graph whose nodes are steps; equal steps are one node. Each
    trajectory keeps its outcome advantage ``A_i`` (GRPO by default); a step's advantage is the mean of ``A_j``
    over the distinct trajectories j passing through its node: ``Â_{i,k} = mean_{j ∋ node(i,k)} A_j``. Steps shared
    by successes and failures drift toward 0 (neutral), steps unique to one trajectory keep ``A_i``.
    Node identity (``node``): a step is (group, ``turn_state_ids``, ``turn_action_ids``), or with ``prefix`` the
    whole (state, action) history up to it. A step without a state key is its own node. [53]'s exact identity
    rule (state vs. full history, exact vs. fuzzy match) is UNVERIFIED here (only the abstract and summaries were
    available); state + action text is the reading of the reference notes. Metrics: node sizes in steps, named
    ``node_*`` like `group_size_metrics`.
    """
    a_ep = grpo_episode_advantages(batch, cfg.std_normalize, cfg.epsilon)
    _, valid = turn_rewards(batch)
    states = _turn_ids(batch.turn_state_ids, batch)
    actions = _turn_ids(batch.turn_action_ids, batch)
    groups = batch.group_index[:, None].expand_as(states)
    known = (states >= 0) & (actions >= 0)
    if cfg.node == "prefix":
        # node id of turn k = id of (node id of the previous step, state, action): equal ids ⇔ equal histories
        prev = torch.full_like(states[:, 0], -1)
        node = torch.full_like(states, -1)
        ok = torch.ones_like(states[:, 0], dtype=torch.bool)
        for k in range(states.shape[1]):
            ok = torch.where(valid[:, k], ok & known[:, k], ok)  # a history with an unkeyed step is unique
            col = torch.stack([groups[:, k], prev, states[:, k], actions[:, k]], dim=1)
            ids = torch.unique(col, dim=0, return_inverse=True)[1] + states.shape[0] * k  # distinct across k
            ids = torch.where(ok, ids, torch.full_like(ids, -1))  # -1: unknown, so a singleton in `_cluster`
            node[:, k] = torch.where(valid[:, k], ids, node[:, k])
            prev = torch.where(valid[:, k], ids, prev)
        cid, sizes = _cluster([node], valid, node >= 0)
    else:
        cid, sizes = _cluster([groups, states, actions], valid, known)
    # distinct trajectories per node: a trajectory that revisits a node counts once
    rows = torch.arange(batch.size, device=cid.device)[:, None].expand_as(cid)
    pairs = torch.unique(torch.stack([cid[valid], rows[valid]], dim=1), dim=0)
    _, node_mean, _ = group_moments(a_ep[pairs[:, 1]], pairs[:, 0], int(sizes.numel()))
    per_turn = torch.zeros_like(states, dtype=a_ep.dtype)
    per_turn[valid] = node_mean[cid[valid]].to(a_ep.dtype)
    return CreditOutput(advantages=broadcast_turns(per_turn, batch), metrics=group_size_metrics(sizes, "node"))


# -------------------------------------------------------------------------------------------------------- EMPG
class EMPGConfig(CreditConfig):
    """Options of `empg` (defaults: the official pseudocode on the EMPG project page, empgseed-seed.github.io)."""

    k: float = Field(1.0, description="k in g(Ĥ) = exp(−kĤ)/mean exp(−kĤ): how strongly confident steps are "
                                      "amplified and uncertain ones damped.")
    k_f: float = Field(1.0, description="k_f in the future-clarity bonus f(Ĥ) = exp(−k_f·Ĥ).")
    zeta: float = Field(0.1, description="ζ: weight of the next step's clarity bonus ζ·f(Ĥ_{k+1}).")
    normalize: Literal["mean", "mean_std", "none"] = Field(
        "mean", description="Final batch normalisation over steps: mean = subtract the mean step advantage (the "
                            "official pseudocode); mean_std = also divide by the std + ε; none = keep as is.")
    std_normalize: bool = Field(True, description="Base trajectory advantage: GRPO's (R − mean)/(std + ε); false "
                                                  "gives Dr.GRPO's R − mean.")
    epsilon: float = Field(1e-6, ge=0.0, description="Added to the std of the base advantage and of mean_std.")


def step_entropy(batch: Batch) -> tuple[Tensor, Tensor]:
    """``H_{i,k}`` = mean behaviour entropy over the action tokens of turn k ``[B, K]``, and the step flag."""
    if batch.behaviour_entropy is None:
        raise ValueError("empg needs batch.behaviour_entropy (the sampler's per-token entropy)")
    sums, counts = _per_turn_sum(batch.behaviour_entropy, batch)
    valid = counts > 0
    return torch.where(valid, sums / counts.clamp(min=1.0), torch.zeros_like(sums)), valid


@CREDIT.register("empg", config=EMPGConfig)
def empg(batch: Batch, cfg: EMPGConfig) -> CreditOutput:
    """EMPG, entropy-modulated policy gradients [146] (Wang et al. 2025, arXiv:2509.09265).

    ``H_{i,k}`` = mean behaviour entropy of step k's action tokens; ``Ĥ = (H − min H)/(max H − min H + 1e-8)``
    over all steps of the batch (Eq. 12); ``g = exp(−kĤ)/(mean exp(−kĤ) + 1e-8)`` (Eq. 10, mean 1 over the
    batch's steps); ``f = exp(−k_f Ĥ)`` (Eq. 11). ``A_{i,k} = g_{i,k}·A_i + ζ·f_{i,k+1}`` where k+1 is the next
    step of the same episode (no bonus on an episode's last step) and ``A_i`` is the GRPO trajectory advantage
    (Eq. 8); then (Eq. 7) the mean over all steps is subtracted (``normalize``). Confident steps get larger
    updates of either sign, uncertain steps smaller; the bonus favours steps that lead to clear next steps.
    Verified against the official pseudocode (project page): the three equations, the 1e-8 guards, the defaults
    k = k_f = 1, ζ = 0.1, the next-step bonus and the mean-only final normalisation (over steps, one value per
    step). The base estimator is the run's group advantage in the paper (GRPO/DAPO); here GRPO. The entropy is
    the sampler's (old policy), as the pseudocode's ``old_entropy``. Metrics: ``g_min``, ``g_max``,
    ``step_entropy``.
    """
    a_ep = grpo_episode_advantages(batch, cfg.std_normalize, cfg.epsilon)
    H, valid = step_entropy(batch)
    if not valid.any():
        return CreditOutput(advantages=torch.zeros_like(batch.action_mask))
    hv = H[valid]
    h_norm = torch.zeros_like(H)
    h_norm[valid] = (hv - hv.min()) / (hv.max() - hv.min() + EMPG_EPS)
    g_raw = torch.exp(-cfg.k * h_norm)
    g = g_raw / (g_raw[valid].mean() + EMPG_EPS)
    f = torch.exp(-cfg.k_f * h_norm)
    # f of the row's next step: scan right to left, carrying the f of the step seen last
    next_f = torch.zeros_like(f)
    has_next = torch.zeros_like(valid)
    carry = torch.zeros_like(f[:, 0])
    seen = torch.zeros_like(valid[:, 0])
    for k in reversed(range(f.shape[1])):
        next_f[:, k], has_next[:, k] = carry, seen
        carry = torch.where(valid[:, k], f[:, k], carry)
        seen = seen | valid[:, k]
    a = g * a_ep[:, None] + cfg.zeta * torch.where(has_next, next_f, torch.zeros_like(next_f))
    a = torch.where(valid, a, torch.zeros_like(a))
    if cfg.normalize != "none":
        av = a[valid]
        a = a - av.mean()
        if cfg.normalize == "mean_std":
            std = av.std() if av.numel() > 1 else torch.ones((), dtype=av.dtype, device=av.device)
            a = a / (std + cfg.epsilon)
        a = torch.where(valid, a, torch.zeros_like(a))
    metrics = {"g_min": float(g[valid].min()), "g_max": float(g[valid].max()), "step_entropy": float(hv.mean())}
    return CreditOutput(advantages=broadcast_turns(a, batch), metrics=metrics)
