"""The optimisation step: PPO epochs over minibatches of one packed batch, with KL, entropy and value terms.

``loss = agg(w_i · m_t · ℓ_policy) + β · agg(KL) [when KL is in the loss] + regulator term + c_v · agg(ℓ_value)``
where ``agg`` is the recipe's aggregation mode, ``w_i`` the episode's sample weight and ``m_t`` the entropy
regulator's token weight (1 unless the regulator masks tokens).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

from outrider.stats import masked_mean
from outrider.data import Batch
from outrider.policy.model import Policy
from outrider.registry import Entry, PieceConfig
from outrider.update import ZERO_AT_ZERO_ADVANTAGE, Regulator, TokenContext
from outrider.update.aggregate import AGGREGATIONS, aggregate
from outrider.update.cov import token_covariance
from outrider.update.kl import kl_penalty


class KLConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _k1_only_in_reward(self) -> "KLConfig":
        # k1 = log π − log π_ref has the gradient ∇log π, whose expectation under π is 0: as a loss it does nothing
        if self.estimator == "k1" and self.placement == "loss" and self.coef > 0:
            raise ValueError("estimator k1 has zero expected gradient as a loss term; use k2 or k3 with "
                             "placement: loss, or k1 with placement: reward")
        return self

    estimator: Literal["k1", "k2", "k3"] = Field("k3", description="Per-token KL estimator (Schulman's k1/k2/k3).")
    coef: float = Field(0.0, ge=0, description="β. 0 turns KL off and skips the reference model entirely.")
    placement: Literal["loss", "reward"] = Field(
        "loss", description="loss: β·KL added to the loss; reward: −β·KL added to each action token's reward.")


class UpdateConfig(BaseModel):
    """How the policy is updated from a batch with advantages."""

    model_config = ConfigDict(extra="forbid")
    loss: dict = Field(default_factory=lambda: {"name": "ppo"},
                       description="Policy surrogate: {name: ppo|gspo|clip_cov|kl_cov, ...options} "
                                   "(a bare name is accepted).")
    aggregation: str = Field("token-mean", description=f"Loss aggregation: one of {', '.join(AGGREGATIONS)}.")
    norm_length: int | None = Field(None, ge=1, description="Constant length for seq-mean-token-sum-norm "
                                                            "(default: the generation budget).")
    epochs: int = Field(1, ge=1, description="PPO epochs over each batch.")
    minibatches: int = Field(1, ge=1, description="Minibatches per epoch (optimiser steps per epoch).")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1).")
    grad_clip: float | None = Field(1.0, gt=0, description="Max global gradient norm (null: no clipping).")
    kl: KLConfig = Field(default_factory=KLConfig, description="KL to the frozen warm-started reference.")
    entropy: dict = Field(default_factory=lambda: {"name": "none"},
                          description="Entropy regulator: {name: none|bonus|adaptive_entropy|entropy_mask|"
                                      "siren, ...options}.")
    shared_prefix: bool = Field(
        True, description="Run each group's common prompt through the model once per forward instead of once per "
                          "completion (same results up to float rounding; used when it saves ≥ 10% of tokens).")
    skip_zero_advantage: bool = Field(
        True, description="Leave rows whose advantages are 0 on every action token (e.g. a GRPO group where every "
                          "completion got the same reward) out of the training forward and backward, keeping them "
                          "in the loss's denominator: the same update up to float rounding. Applies only when the "
                          "loss and the entropy regulator declare that such rows contribute nothing (ppo, gspo; "
                          "regulator none), with no KL in the loss and no value loss. The update's own metrics "
                          "(policy/*, loss/*, entropy_reg/*) then describe the trained rows (row 0 when none is); "
                          "update/skipped_rows_frac says how many were left out.")
    vf_coef: float = Field(0.5, ge=0, description="Value-loss weight (used when the credit piece needs values).")
    value_clip: float | None = Field(0.2, gt=0, description="PPO value clipping range (null: unclipped).")

    @field_validator("loss", "entropy", mode="before")
    @classmethod
    def _name_shorthand(cls, v: object) -> object:
        return {"name": v} if isinstance(v, str) else v

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"betas must each be in [0, 1), got {list(v)}")
        return v

    @field_validator("aggregation")
    @classmethod
    def _known_aggregation(cls, v: str) -> str:
        if v not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation '{v}'; valid: {', '.join(AGGREGATIONS)}")
        return v


@torch.no_grad()
def prepare(batch: Batch, policy: Policy, reference: Policy | None, cfg: UpdateConfig, temperature: float,
            need_old: bool, need_values: bool, top_k: int = 0, top_p: float = 1.0) -> None:
    """Fill the batch's old log-probs, values and reference log-probs (one no-grad forward each, only if needed).

    ``top_k``/``top_p`` are the sampler's: the policy's log-probs are those of the truncated distribution the
    tokens were drawn from (`Policy.score`); the reference's stay untruncated (k3 then estimates the KL of the
    sampling policy to the reference model).

    The policy runs in eval mode here and in `learner_step`: dropout would make the "old" and the new
    log-probs of the same parameters differ, biasing the ratio (TRL and verl likewise disable dropout for RL).
    """
    policy.eval()
    if need_old or need_values:
        groups = batch.group_index if cfg.shared_prefix else None
        scores = policy.score(batch.input_ids, batch.attention_mask, temperature, values=need_values, groups=groups,
                              top_k=top_k, top_p=top_p)
        batch.old_logprobs = scores.logprobs if need_old else None
        batch.values = scores.values
    if reference is not None:
        batch.ref_logprobs = reference.score(batch.input_ids, batch.attention_mask, temperature,
                                             groups=batch.group_index if cfg.shared_prefix else None).logprobs


def kl_into_rewards(batch: Batch, cfg: UpdateConfig) -> Tensor:
    """r_t ← r_t − β·KL_t on action tokens (KL in the reward, as in InstructGPT-style PPO); returns the mean KL."""
    kl = kl_penalty(batch.old_logprobs, batch.ref_logprobs, cfg.kl.estimator) * batch.action_mask
    batch.token_rewards = batch.token_rewards - cfg.kl.coef * kl
    return masked_mean(kl, batch.action_mask)


def entropy_advantage_covariance(logprobs: Tensor, advantages: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The masked mean of [153]'s `token_covariance` (positive predicts entropy falling) and the fraction of
    tokens with cov_t > 1 (the band Clip-Cov acts on)."""
    cov = token_covariance(logprobs, advantages, mask)
    return masked_mean(cov, mask), masked_mean((cov > 1).to(cov.dtype), mask)


def live_rows(advantages: Tensor, mask: Tensor) -> Tensor:
    """[B] bool: the row has a non-zero advantage on some action token."""
    return ((advantages != 0) & (mask > 0)).any(dim=-1)


def trained_rows(advantages: Tensor, mask: Tensor, live: Tensor | None = None) -> Tensor | None:
    """Indices of the rows with a non-zero advantage on some action token (`live`, if already computed), or None
    when that is every row.

    With no such row, row 0 is kept: its loss and gradients are exact zeros, so the optimiser still steps (AdamW
    moves parameters on a zero gradient through its moments and weight decay) exactly as on the full batch."""
    live = live_rows(advantages, mask) if live is None else live
    if bool(live.all()):
        return None
    rows = live.nonzero().squeeze(-1)
    return rows if rows.numel() else torch.zeros(1, dtype=torch.long, device=advantages.device)


def _trim(mb: Batch, rows: Tensor) -> Batch:
    """The sub-batch of `rows` without the padding columns that no kept row reaches."""
    sub = mb.select(rows)
    width = int(sub.attention_mask.sum(-1).max())
    return sub.select_columns(width) if width < sub.input_ids.shape[1] else sub


def learner_step(policy: Policy, optimizer: torch.optim.Optimizer, batch: Batch, loss_piece: tuple[Entry, PieceConfig],
                 regulator: Regulator, cfg: UpdateConfig, temperature: float,
                 generator: torch.Generator, norm_length: int,
                 regulator_traits: frozenset[str] = frozenset(), top_k: int = 0,
                 top_p: float = 1.0) -> dict[str, float]:
    """Run `epochs × minibatches` optimiser steps on `batch` (advantages already set); return mean metrics.
    Log-probs are scored under the sampler's ``top_k``/``top_p`` truncation (see `prepare`).

    When the loss entry and the regulator (its registry entry's `regulator_traits`) both have the
    `ZERO_AT_ZERO_ADVANTAGE` trait, `cfg.skip_zero_advantage` leaves zero-advantage rows out: the per-token loss
    of the kept rows is put back in its place in the minibatch, so every aggregation keeps its full-minibatch
    denominator."""
    loss_entry, loss_cfg = loss_piece
    agg_len = cfg.norm_length or norm_length

    def agg(x: Tensor, m: Tensor) -> Tensor:
        return aggregate(x, m, cfg.aggregation, agg_len)

    kl_in_loss = batch.ref_logprobs is not None and cfg.kl.placement == "loss" and cfg.kl.coef > 0
    skip = (cfg.skip_zero_advantage and ZERO_AT_ZERO_ADVANTAGE in (loss_entry.traits & regulator_traits)
            and not kl_in_loss and batch.returns is None)
    policy.eval()  # no dropout: see `prepare`; gradients flow in eval mode all the same
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for _ in range(cfg.epochs):
        order = torch.randperm(batch.size, generator=generator)
        for rows in order.chunk(cfg.minibatches):
            full = batch.select(rows)
            live = live_rows(full.advantages, full.action_mask) if skip else None
            kept = None if live is None else trained_rows(full.advantages, full.action_mask, live)
            mb = full if kept is None else _trim(full, kept)
            mask = mb.action_mask
            scores = policy.score(mb.input_ids, mb.attention_mask, temperature, entropy=True,
                                  values=mb.returns is not None, logits=regulator.needs_logits,
                                  groups=mb.group_index if cfg.shared_prefix else None, top_k=top_k, top_p=top_p)
            old = mb.old_logprobs if mb.old_logprobs is not None else scores.logprobs.detach()
            ctx = TokenContext(scores.logprobs, old, mb.advantages, mask, entropy=scores.entropy,
                               logits=scores.logits, aggregate=agg, generator=generator,
                               step_index=mb.step_index)
            per_token, metrics = loss_entry.fn(ctx, loss_cfg)
            reg = regulator(ctx)
            weight = mb.sample_weight[:, None] if reg.token_weight is None else \
                mb.sample_weight[:, None] * reg.token_weight
            if kept is None:
                loss = agg(per_token * weight, mask)
            else:
                width = full.action_mask.shape[1]
                kept_loss = torch.nn.functional.pad(per_token * weight, (0, width - mask.shape[1]))
                placed = per_token.new_zeros(full.action_mask.shape).index_copy(0, kept, kept_loss)
                loss = agg(placed, full.action_mask)
            metrics = {f"loss/{k}" if not k.startswith("clip") else f"clip/{k[5:]}": v for k, v in metrics.items()}
            metrics["loss/policy"] = loss.detach()
            if mb.ref_logprobs is not None:
                kl = kl_penalty(scores.logprobs, mb.ref_logprobs, cfg.kl.estimator)
                metrics["policy/kl"] = masked_mean(kl.detach(), mask)
                if cfg.kl.placement == "loss":
                    loss = loss + cfg.kl.coef * agg(kl, mask)
            loss = loss + reg.term
            metrics.update({f"entropy_reg/{k}": v for k, v in reg.metrics.items()})
            metrics["policy/entropy"] = masked_mean(scores.entropy.detach(), mask)
            metrics["policy/entropy_adv_cov"], metrics["policy/cov_gt1_frac"] = entropy_advantage_covariance(
                scores.logprobs.detach(), mb.advantages, mask)
            if mb.returns is not None:
                v_loss = value_loss(scores.values, mb.values, mb.returns, cfg.value_clip)
                metrics["loss/value"] = agg(v_loss, mask).detach()
                loss = loss + cfg.vf_coef * agg(v_loss, mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            params = [p for p in policy.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
            optimizer.step()
            metrics["loss/total"] = loss.detach()
            metrics["optim/grad_norm"] = grad_norm
            if live is not None:
                metrics["update/skipped_rows_frac"] = 1.0 - float(live.sum()) / full.size
            for k, v in metrics.items():  # per-key counts: some pieces skip a metric on some minibatches
                sums[k] += float(v)
                counts[k] += 1
    return {k: v / counts[k] for k, v in sums.items()}


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float | None) -> Tensor:
    """½·max((V − R)², (clip(V, V_old ± ε) − R)²) per token (PPO's clipped value loss)."""
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * unclipped
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum(unclipped, (clipped - returns) ** 2)
