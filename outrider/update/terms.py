"""The learner's built-in terms, made from the recipe's ``update`` section: the policy surrogate (with the
off-policy correction), KL to the reference, the entropy regulator and the value loss. Extra terms come from the
`TERMS` registry (``update.terms``); `build_terms` returns them all in the order the learner sums them.

``loss = agg(w_i · m_t · ρ_t · ℓ_policy) + β · agg(KL) + regulator term + c_v · agg(ℓ_value) + Σ extra terms``
where ``agg`` is the recipe's aggregation, ``w_i`` the episode's sample weight, ``m_t`` the product of the terms'
token weights (an entropy mask) and ``ρ_t`` the policy term's importance weight on off-policy rows.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from outrider.kl import kl_penalty
from outrider.registry import BuildContext, Entry, Needs, NoOptions, Piece
from outrider.stats import masked_mean
from outrider.update import TERMS, Term, TermOutput, TokenContext
from outrider.update.micro_batch import check_terms
from outrider.update.off_policy import OffPolicyConfig, correct, origin_metrics

if TYPE_CHECKING:
    from outrider.update.learner import KLConfig, UpdateConfig


def _policy_metric_name(key: str) -> str:
    return f"clip/{key[5:]}" if key.startswith("clip") else f"loss/{key}"


class PolicyTerm(Term):
    """The policy-gradient surrogate (`update.loss`), per token, with the importance correction of
    `update.off_policy` on off-policy rows. Logged as ``loss/policy``; the surrogate's metrics as ``loss/<key>``
    (``clip/<...>`` for clip fractions)."""

    def __init__(self, loss: Piece, off_policy: OffPolicyConfig):
        super().__init__(NoOptions())
        self.loss, self.off_policy = loss, off_policy
        self.entry = loss.entry

    @property
    def name(self) -> str:
        return "policy"

    def __call__(self, ctx: TokenContext) -> TermOutput:
        b, weight, extra = ctx.batch, None, {}
        if b is not None and b.off_policy is not None and bool(b.off_policy.any()):
            old, weight, rho = correct(ctx.old_logprobs, b.behaviour_logprobs, ctx.mask, b.off_policy,
                                       self.off_policy)
            ctx = replace(ctx, old_logprobs=old)
            extra = origin_metrics(rho, ctx.mask, b.origin, b.off_policy, self.off_policy)
        per_token, metrics = self.loss(ctx)
        if weight is not None:
            per_token = per_token * weight
        return TermOutput(per_token=per_token, metrics={**{_policy_metric_name(k): v for k, v in metrics.items()},
                                                        **extra})


class KLTerm(Term):
    """``β · agg(KL_t)`` with the chosen estimator of the current policy against the frozen reference (`outrider.kl`).
    With ``placement: reward`` the KL is a reward (`score.kl_reward`) and this term only logs it (β = 0 here).
    Metric: ``policy/kl``, the mean KL over trained tokens."""

    prefix = "policy"

    def __init__(self, cfg: "KLConfig", coef: float):
        super().__init__(NoOptions())
        self.kl, self.coef = cfg, coef
        # only logged (β = 0), it changes nothing, so zero-advantage rows may be skipped
        self.entry = _entry("kl", Needs(ref_logprobs=True, zero_at_zero_advantage=coef == 0,
                                                micro_batch="rows"))

    def __call__(self, ctx: TokenContext) -> TermOutput:
        kl = kl_penalty(ctx.logprobs, ctx.batch.ref_logprobs, self.kl.estimator)
        out = TermOutput(metrics={"policy/kl": masked_mean(kl.detach(), ctx.mask)})
        if self.coef > 0:
            out.loss = self.coef * ctx.aggregate(kl, ctx.mask)
        return out


class EntropyTerm(Term):
    """The entropy regulator (`update.entropy`): its term, its token weight, its metrics as ``entropy_reg/<key>``."""

    prefix = "entropy_reg"

    def __init__(self, regulator: Piece):
        super().__init__(NoOptions())
        self.regulator = regulator
        self.entry = regulator.entry

    def __call__(self, ctx: TokenContext) -> TermOutput:
        reg = self.regulator(ctx)
        return TermOutput(loss=reg.term, token_weight=reg.token_weight,
                          metrics={f"entropy_reg/{k}": v for k, v in reg.metrics.items()})


class ValueTerm(Term):
    """``c_v · agg(½·max((V − R)², (clip(V, V_old ± ε) − R)²))`` when the credit piece gave value targets R (GAE).
    Metric: ``loss/value`` (before c_v)."""

    def __init__(self, vf_coef: float, clip: float | None):
        super().__init__(NoOptions())
        self.vf_coef, self.clip = vf_coef, clip
        self.entry = _entry("value", Needs(values=True, micro_batch="rows"))

    def __call__(self, ctx: TokenContext) -> TermOutput:
        b = ctx.batch
        if b.returns is None:
            return TermOutput()
        v_loss = value_loss(ctx.values, b.values, b.returns, self.clip)
        return TermOutput(loss=self.vf_coef * ctx.aggregate(v_loss, ctx.mask),
                          metrics={"loss/value": ctx.aggregate(v_loss, ctx.mask).detach()})


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float | None) -> Tensor:
    """½·max((V − R)², (clip(V, V_old ± ε) − R)²) per token (PPO's clipped value loss)."""
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * unclipped
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum(unclipped, (clipped - returns) ** 2)


def _entry(name: str, needs: Needs) -> Entry:
    """The entry of a built-in term (made from the recipe's update section, not registered)."""
    return Entry(name, None, NoOptions, needs)


def build_terms(cfg: "UpdateConfig", loss: Piece, regulator: Piece, values: bool, reference: bool,
                build: BuildContext | None = None, extra: list[Piece] | None = None) -> list[Piece]:
    """The learner's terms in summation order: policy, KL (when a reference exists: a loss with ``placement:
    loss``, else a logged diagnostic), entropy, value (when a piece asked for values), then the recipe's
    ``update.terms`` (built here unless given)."""
    terms: list[Piece] = [PolicyTerm(loss, cfg.off_policy)]
    if reference:
        terms.append(KLTerm(cfg.kl, cfg.kl.coef if cfg.kl.placement == "loss" else 0.0))
    terms.append(EntropyTerm(regulator))
    if values:
        terms.append(ValueTerm(cfg.vf_coef, cfg.value_clip))
    if extra is None:
        extra = [TERMS.create(t, build, f"update.terms[{i}]") for i, t in enumerate(cfg.terms)]
    if cfg.max_tokens_per_micro_batch is not None:
        check_terms(terms + extra)  # here, when the run is built: not after a warm start and a step's sampling
    return terms + extra
