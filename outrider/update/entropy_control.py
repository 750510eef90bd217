"""Entropy regulators that control entropy selectively or adaptively: `entropy_mask` [168], `siren` [149] and
`adaptive_entropy` (Skywork-OR1). See `outrider.update.cov` for Clip-Cov / KL-Cov [153], which are losses."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, model_validator
from torch import Tensor

from outrider.stats import masked_mean, quantile
from outrider.registry import BuildContext, Needs, PieceConfig
from outrider.update import ENTROPY, Regulator, RegulatorOutput, TokenContext

LOG_EPS = 1e-12  # SIREN's guard in the renormalisation and the log (official code)


# ---------------------------------------------------------------- entropy_mask [168]


class EntropyMaskConfig(PieceConfig):
    """Options of `entropy_mask`."""

    rho: float = Field(0.2, ge=0.0, le=1.0, description="ρ: the fraction of highest-entropy action tokens that "
                       "keep their policy gradient ([168] uses 0.2; 1.0 keeps all, 0 only the maximum).")


@ENTROPY.register("entropy_mask", config=EntropyMaskConfig)
class EntropyMask(Regulator):
    """High-entropy token mask, "Beyond the 80/20 rule" [168] (Wang et al. 2025, arXiv:2506.01939).

    ``m_t = 1[H_t ≥ τ]`` on action tokens with ``τ = quantile({H_t : t ∈ M}, 1 − ρ)`` (linear interpolation,
    over the minibatch, H detached), multiplied into the per-token policy loss; no term. Only the "forking" tokens
    get gradient, which [168] finds matches or beats full-gradient RLVR at ρ = 0.2. As in TRL the loss
    denominator still counts every action token. Metrics: ``kept_frac``, ``threshold`` (τ), ``entropy``.
    """

    cfg: EntropyMaskConfig

    def __call__(self, ctx: TokenContext) -> RegulatorOutput:
        h, mask = ctx.entropy.detach(), ctx.mask
        valid = mask > 0
        zero = torch.zeros((), dtype=h.dtype, device=h.device)
        if not valid.any():
            return RegulatorOutput(zero, torch.zeros_like(h), {"kept_frac": zero, "threshold": zero})
        tau = quantile(h[valid], 1.0 - self.cfg.rho)
        weight = ((h >= tau) & valid).to(h.dtype)  # ≥ as in TRL: ties at the threshold are kept
        metrics = {"kept_frac": masked_mean(weight, mask), "threshold": tau, "entropy": masked_mean(h, mask)}
        return RegulatorOutput(zero, weight, metrics)


# ---------------------------------------------------------------- siren [149]


class SirenConfig(PieceConfig):
    """Options of `siren` (defaults: the official ``exp_scripts/siren.sh``)."""

    coef: float = Field(0.005, ge=0.0, description="c in c·(Ĥ − H_anchor)².")
    mask_ratio: float = Field(0.8, ge=0.0, lt=1.0, description="Per-response quantile q of the top-p entropy; only "
                              "tokens strictly above it are regularised (0.8 keeps about the top 20%).")
    top_p: float = Field(0.8, gt=0.0, le=1.0, description="Nucleus mass p of the top-p entropy (the token whose "
                         "cumulative probability reaches p is excluded).")
    top_k: int = Field(0, ge=0, description="Look for the nucleus among the k most likely tokens only (a memory "
                       "saving; the official code uses 10000). 0: the full vocabulary.")


def top_p_entropy(logits: Tensor, top_p: float, top_k: int = 0) -> Tensor:
    """SIREN's top-p entropy [149]: ``H^p = −Σ_{v∈N} p̃_v log(p̃_v + 1e-12)`` with ``p = softmax(logits)``,
    ``N`` = the longest prefix of the probability-sorted vocabulary whose cumulative mass is ``< top_p`` (the token
    that reaches ``top_p`` is excluded, so ``p_max ≥ top_p`` gives an empty nucleus and H^p = 0) and
    ``p̃ = p·1[N] / (Σ_N p + 1e-12)``; ``top_p = 1`` keeps every token (the plain entropy). With ``top_k > 0``
    only the k most likely tokens are considered (their probabilities stay those of the full softmax).
    Gradients flow through ``p``; ``logits`` [..., V]."""
    probs = torch.softmax(logits, dim=-1)
    if 0 < top_k < probs.shape[-1]:
        sorted_p = torch.topk(probs, top_k, dim=-1).values
    else:
        sorted_p = torch.sort(probs, dim=-1, descending=True).values
    # rank < searchsorted(cum, p, side=left)  ⇔  cum[rank] < p, since cum is non-decreasing. At p = 1 whether the
    # last token's cumulative sum reaches 1 is rounding noise, so p ≥ 1 means the whole (top-k) distribution
    if top_p < 1.0:
        nucleus = torch.cumsum(sorted_p.detach(), dim=-1) < top_p
    else:
        nucleus = torch.ones_like(sorted_p, dtype=torch.bool)
    kept = sorted_p * nucleus.to(sorted_p.dtype)
    p_tilde = kept / (kept.sum(-1, keepdim=True) + LOG_EPS)
    return -(p_tilde * torch.log(p_tilde + LOG_EPS)).sum(-1)  # entropy is order-free: no need to unsort


def peak_mask(values: Tensor, mask: Tensor, q: float) -> Tensor:
    """SIREN's per-response peak mask [149]: ``1[x_t > quantile_q({x_s : s ∈ M_i})]`` on action tokens, with
    the linear quantile over response i's own action tokens; strict, so a flat response selects nothing."""
    x = values.detach()
    valid = mask > 0
    thresh = torch.nanquantile(torch.where(valid, x, torch.full_like(x, float("nan"))), q, dim=-1, keepdim=True)
    return (x > thresh) & valid  # a response with no action token has a NaN threshold: nothing selected


@ENTROPY.register("siren", config=SirenConfig, needs=Needs(logits=True))
class Siren(Regulator):
    """SIREN, selective self-anchored entropy regularisation [149] (arXiv:2509.25133).

    ``H^p_t`` = the top-p entropy (`top_p_entropy`); ``S`` = the per-response peak mask (`peak_mask`, q =
    ``mask_ratio``); ``Ĥ = mean_i mean_{t∈S_i} H^p_t`` over the responses with a selected token; the term is
    ``c·(Ĥ − H_anchor)²`` where ``H_anchor`` is Ĥ measured (detached) at the first call and fixed after: it
    pulls entropy back from both sides, so unlike a bonus it cannot blow entropy up. The top-p and peak masks
    confine the regulariser to plausible actions at forking positions. The anchor is state (checkpointed).
    Metrics: ``topp_entropy`` (Ĥ), ``anchor``, ``peak_frac`` (selected / action tokens).
    """

    cfg: SirenConfig

    def __init__(self, cfg: SirenConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        self.anchor: float | None = None

    def __call__(self, ctx: TokenContext) -> RegulatorOutput:
        if ctx.logits is None:
            raise ValueError("siren needs the full logits in TokenContext.logits (it declares Needs(logits=True))")
        valid = ctx.mask > 0
        # only action positions: the [N, V] softmax and sort are the memory peak, prompts need not pay for them
        hp_valid = top_p_entropy(ctx.logits[valid], self.cfg.top_p, self.cfg.top_k)
        hp = torch.zeros(ctx.mask.shape, dtype=hp_valid.dtype, device=hp_valid.device).masked_scatter(valid, hp_valid)
        selected = peak_mask(hp, ctx.mask, self.cfg.mask_ratio)
        # a statistic, not a loss: the mean over the rows that have a selected token of their mean Hp
        sel = selected.to(hp.dtype)
        h_hat = masked_mean(masked_mean(hp, sel, dim=-1), (sel.sum(-1) > 0).to(hp.dtype))
        if self.anchor is None and selected.any():
            # [149] anchors at global step 1 on the old policy; the first minibatch's policy is that policy
            self.anchor = float(h_hat.detach())
        if self.anchor is None:
            term = torch.zeros((), dtype=hp.dtype, device=hp.device)
        else:
            term = self.cfg.coef * (h_hat - self.anchor) ** 2
        metrics: dict[str, Tensor | float] = {"topp_entropy": h_hat.detach(),
                                              "peak_frac": masked_mean(selected.to(hp.dtype), ctx.mask)}
        if self.anchor is not None:  # no NaN placeholder: metrics.jsonl must stay valid JSON
            metrics["anchor"] = self.anchor
        return RegulatorOutput(term, metrics=metrics)

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchor = state.get("anchor")


# ---------------------------------------------------------------- adaptive_entropy (Skywork-OR1)


class AdaptiveEntropyConfig(PieceConfig):
    """Options of `adaptive_entropy` (defaults: TRL's, with Skywork-OR1's c_max)."""

    target: float = Field(0.2, ge=0.0, description="Target token-mean entropy H_tgt (nats).")
    delta: float = Field(0.005, ge=0.0, description="δ: coefficient step per optimiser step (TRL 0.005; "
                         "Skywork-OR1's scripts 1e-4).")
    coef_init: float = Field(0.0, ge=0.0, description="Initial coefficient c.")
    coef_min: float = Field(0.0, ge=0.0, description="Lower clamp of c.")
    coef_max: float = Field(0.005, ge=0.0, description="Upper clamp of c (Skywork-OR1 0.005; TRL 1.0).")

    @model_validator(mode="after")
    def _ordered(self) -> "AdaptiveEntropyConfig":
        if not self.coef_min <= self.coef_init <= self.coef_max:
            raise ValueError(f"need coef_min ≤ coef_init ≤ coef_max (got {self.coef_min}, {self.coef_init}, "
                             f"{self.coef_max})")
        return self


@ENTROPY.register("adaptive_entropy", config=AdaptiveEntropyConfig)
class AdaptiveEntropy(Regulator):
    """Adaptive entropy bonus of Skywork-OR1 (arXiv:2505.22312), with TRL's semantics (trl PR #6140).

    Skywork-OR1 is He et al. 2025, "Skywork Open Reasoner 1 Technical Report" (not in the paper index).

    ``term = −c_eff · agg(H_t)`` with ``c_eff = c`` if the entropy measured at the previous call is ≤ H_tgt, else 0
    (the first call gates on this minibatch's entropy). Then, with ``H̄`` this minibatch's token-mean entropy,
    ``c ← min(c + δ, c_max)`` if ``H̄ ≤ H_tgt`` else ``c ← max(c − δ, c_min)``. The bonus switches on only
    once entropy has fallen to the target, and its strength grows while it stays there, so entropy is held near
    H_tgt instead of being pushed up without bound. c and the last H̄ are state (checkpointed).
    Metrics: ``coef`` (c used at this call), ``active`` (1 if c_eff = c), ``entropy`` (H̄).
    """

    cfg: AdaptiveEntropyConfig

    def __init__(self, cfg: AdaptiveEntropyConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        self.coef: float = cfg.coef_init
        self.last_entropy: float | None = None

    def __call__(self, ctx: TokenContext) -> RegulatorOutput:
        h_agg = ctx.aggregate(ctx.entropy, ctx.mask)
        h_bar = float(masked_mean(ctx.entropy.detach(), ctx.mask))
        gate = h_bar if self.last_entropy is None else self.last_entropy
        active = gate <= self.cfg.target
        coef = self.coef
        term = -(coef if active else 0.0) * h_agg
        if bool((ctx.mask > 0).any()):  # an empty minibatch measures nothing: do not move the controller
            step = self.cfg.delta if h_bar <= self.cfg.target else -self.cfg.delta
            self.coef = min(max(self.coef + step, self.cfg.coef_min), self.cfg.coef_max)
            self.last_entropy = h_bar
        return RegulatorOutput(term, metrics={"coef": coef, "active": float(active), "entropy": h_bar})

    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.coef, "last_entropy": self.last_entropy}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coef = float(state.get("coef", self.cfg.coef_init))
        self.last_entropy = state.get("last_entropy")
