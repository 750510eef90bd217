"""Learner terms for preference and offline data: `dpo` reads the batch's pairwise view (`Batch.pairs`, the chosen and
rejected rows of each group); `nll` is the likelihood of chosen (or all) rows."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from outrider.registry import Needs, PieceConfig
from outrider.update import TERMS, TermOutput, TokenContext


class DPOConfig(PieceConfig):
    """Options of the `dpo` term."""

    beta: float = Field(0.1, gt=0, description="β: the strength of the implicit KL to the reference.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="ε of conservative DPO: the pair's label is "
                                                                  "wrong with probability ε (0: plain DPO).")
    coef: float = Field(1.0, ge=0, description="Weight of the term in the learner's sum.")


@TERMS.register("dpo", config=DPOConfig, needs=Needs(ref_logprobs=True, pairs=True))
def dpo(ctx: TokenContext, cfg: DPOConfig) -> TermOutput:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290) on the batch's chosen/rejected pairs.

    With ``s(y) = Σ_t m_t (log π_θ(y_t) − log π_ref(y_t))`` over a row's trained tokens and the margin
    ``z = β (s(y_w) − s(y_l))``: ``ℓ = −(1 − ε) log σ(z) − ε log σ(−z)``, averaged over pairs (ε = 0: plain DPO;
    ε > 0: conservative DPO's smoothed labels). No pair in the minibatch gives 0. Metrics: ``dpo/margin`` (mean
    z), ``dpo/accuracy`` (share of pairs with z > 0), ``dpo/chosen`` and ``dpo/rejected`` (mean β·s).
    """
    b, m = ctx.batch, ctx.mask
    chosen, rejected = b.pairs()
    if chosen.numel() == 0:
        return TermOutput(loss=ctx.logprobs.sum() * 0.0)
    s = (torch.where(m > 0, ctx.logprobs - b.ref_logprobs, torch.zeros_like(m)) * m).sum(-1)
    z = cfg.beta * (s[chosen] - s[rejected])
    loss = -(1 - cfg.label_smoothing) * F.logsigmoid(z) - cfg.label_smoothing * F.logsigmoid(-z)
    zd = z.detach()
    return TermOutput(loss=cfg.coef * loss.mean(), metrics={
        "margin": zd.mean(), "accuracy": (zd > 0).float().mean(),
        "chosen": cfg.beta * s[chosen].detach().mean(), "rejected": cfg.beta * s[rejected].detach().mean()})


class NLLConfig(PieceConfig):
    """Options of the `nll` term."""

    coef: float = Field(1.0, ge=0, description="Weight of the term in the learner's sum.")
    rows: Literal["chosen", "all"] = Field("chosen", description="chosen: the chosen side of each pair only (DPO + "
                                                                "NLL, RPO); all: every row (fine-tuning on the "
                                                                "batch, e.g. rejection-sampled successes).")


@TERMS.register("nll", config=NLLConfig)
def nll(ctx: TokenContext, cfg: NLLConfig) -> TermOutput:
    """Negative log-likelihood of the selected rows' trained tokens, ``ℓ_t = −coef · log π_θ(x_t)``, per token
    (weighted by the rows' sample weights and reduced by the run's aggregation like the policy loss). With DPO it is
    RPO's regulariser (Pang et al. 2024, arXiv:2404.19733), which keeps the chosen responses' likelihood from
    falling; on its own, supervised fine-tuning on the batch."""
    keep = ctx.mask
    if cfg.rows == "chosen":
        keep = keep * (ctx.batch.preference > 0).to(keep.dtype)[:, None]
    return TermOutput(per_token=torch.where(keep > 0, -cfg.coef * ctx.logprobs, torch.zeros_like(ctx.logprobs)))
