"""Learner terms for preference and offline data. The pairwise terms read the batch's pairwise view (`Batch.pairs`:
the chosen and rejected rows of each group) and the frozen reference's log-probs: `dpo` (with conservative DPO's
label smoothing), `robust_dpo`, `ipo` and `step_apo` (CPL [115], a value margin on step-level pairs); `nll` is the
likelihood of chosen (or all) rows.

Every pairwise term starts from one number per row, the summed log-ratio over its trained tokens,
``s(y) = Σ_t m_t (log π_θ(y_t) − log π_ref(y_t))``: a response prefix (a step-level pair's shared earlier steps)
is given, not trained, so it is outside ``m`` and cancels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from outrider.registry import Needs, PieceConfig
from outrider.update import TERMS, TermOutput, TokenContext

PAIRWISE = Needs(ref_logprobs=True, pairs=True, micro_batch="pairs")


@dataclass
class PairView:
    """The minibatch's pairs: row indices of the chosen and rejected side of each, and per row the summed log-ratio
    to the reference ``s``, the number of trained tokens ``n`` and the reward on them ``r`` (the row's value)."""

    chosen: Tensor
    rejected: Tensor
    s: Tensor
    n: Tensor
    r: Tensor

    @property
    def empty(self) -> bool:
        return self.chosen.numel() == 0


def pair_view(ctx: TokenContext) -> PairView:
    b, m = ctx.batch, ctx.mask
    chosen, rejected = b.pairs()
    s = (torch.where(m > 0, ctx.logprobs - b.ref_logprobs, torch.zeros_like(m)) * m).sum(-1)
    return PairView(chosen, rejected, s, m.sum(-1), (b.token_rewards * m).sum(-1))


def smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """``−(1 − ε) log σ(z) − ε log σ(−z)``: the logistic loss of a label that is wrong with probability ε."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def pair_metrics(v: PairView, z: Tensor, beta: float) -> dict[str, Tensor]:
    """``margin`` (mean z), ``accuracy`` (share of pairs whose implicit reward ranks them right, s_w > s_l),
    ``chosen`` / ``rejected`` (mean β·s of each side) and ``pairs`` (how many pairs the minibatch held)."""
    s = v.s.detach()
    return {"margin": z.detach().mean(), "accuracy": (s[v.chosen] > s[v.rejected]).float().mean(),
            "chosen": beta * s[v.chosen].mean(), "rejected": beta * s[v.rejected].mean(),
            "pairs": float(v.chosen.numel())}


def no_pairs(ctx: TokenContext) -> TermOutput:
    """A minibatch without a pair: a zero loss that keeps the graph, and ``pairs`` 0."""
    return TermOutput(loss=ctx.logprobs.sum() * 0.0, metrics={"pairs": 0.0})


class DPOConfig(PieceConfig):
    """Options of the `dpo` term."""

    beta: float = Field(0.1, gt=0, description="β: the strength of the implicit KL to the reference.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="ε of conservative DPO: the pair's label is "
                                                                  "wrong with probability ε (0: plain DPO).")
    coef: float = Field(1.0, ge=0, description="Weight of the term in the learner's sum.")


@TERMS.register("dpo", config=DPOConfig, needs=PAIRWISE)
def dpo(ctx: TokenContext, cfg: DPOConfig) -> TermOutput:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290) on the batch's chosen/rejected pairs.

    With the margin ``z = β (s(y_w) − s(y_l))``: ``ℓ = −(1 − ε) log σ(z) − ε log σ(−z)``, averaged over pairs
    (ε = 0: plain DPO, TRL's ``sigmoid`` loss; ε > 0: conservative DPO's smoothed labels). On step-level pairs (a
    shared response prefix, then one step each) it is Step-DPO. No pair in the minibatch gives 0. Metrics:
    ``dpo/margin`` (mean z), ``dpo/accuracy``, ``dpo/chosen`` and ``dpo/rejected`` (mean β·s), ``dpo/pairs``.
    """
    v = pair_view(ctx)
    if v.empty:
        return no_pairs(ctx)
    z = cfg.beta * (v.s[v.chosen] - v.s[v.rejected])
    return TermOutput(loss=cfg.coef * smoothed_logistic(z, cfg.label_smoothing).mean(),
                      metrics=pair_metrics(v, z, cfg.beta))


class RobustDPOConfig(DPOConfig):
    """Options of the `robust_dpo` term."""

    label_smoothing: float = Field(0.1, ge=0, lt=0.5, description="ε: the assumed rate at which pair labels are "
                                                                  "flipped (0: plain DPO).")


@TERMS.register("robust_dpo", config=RobustDPOConfig, needs=PAIRWISE)
def robust_dpo(ctx: TokenContext, cfg: RobustDPOConfig) -> TermOutput:
    """Robust DPO (rDPO, Chowdhury et al. 2024, arXiv:2403.00409): an unbiased loss under labels flipped at rate ε.

    ``ℓ = [−(1 − ε) log σ(z) + ε log σ(−z)] / (1 − 2ε)`` with ``z = β (s(y_w) − s(y_l))`` (TRL's ``robust`` loss):
    its expectation over the label noise is the clean DPO loss, where conservative DPO's smoothing is biased
    towards 0.5. Metrics as `dpo`'s, under ``robust_dpo/``."""
    v = pair_view(ctx)
    if v.empty:
        return no_pairs(ctx)
    z = cfg.beta * (v.s[v.chosen] - v.s[v.rejected])
    eps = cfg.label_smoothing
    loss = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return TermOutput(loss=cfg.coef * loss.mean(), metrics=pair_metrics(v, z, cfg.beta))


class IPOConfig(PieceConfig):
    """Options of the `ipo` term."""

    beta: float = Field(0.1, gt=0, description="τ: the regularisation strength; the target log-ratio gap is "
                                               "1/(2τ).")
    length_normalize: bool = Field(True, description="Average each side's log-ratio over its trained tokens (as "
                                                     "TRL and the IPO authors' runs do) instead of summing it.")
    coef: float = Field(1.0, ge=0, description="Weight of the term in the learner's sum.")


@TERMS.register("ipo", config=IPOConfig, needs=PAIRWISE)
def ipo(ctx: TokenContext, cfg: IPOConfig) -> TermOutput:
    """IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17): a squared loss that pulls the log-ratio gap to a fixed
    target instead of pushing it to infinity.

    ``h = s(y_w)/n_w − s(y_l)/n_l`` (``n`` the trained tokens; with ``length_normalize: false`` the sums ``s``) and
    ``ℓ = (h − 1/(2τ))²``, averaged over pairs (TRL's ``ipo`` loss). Metrics as `dpo`'s with z = h."""
    v = pair_view(ctx)
    if v.empty:
        return no_pairs(ctx)
    per_row = v.s / v.n.clamp(min=1.0) if cfg.length_normalize else v.s
    h = per_row[v.chosen] - per_row[v.rejected]
    loss = (h - 1 / (2 * cfg.beta)) ** 2
    return TermOutput(loss=cfg.coef * loss.mean(), metrics=pair_metrics(v, h, cfg.beta))


class StepAPOConfig(DPOConfig):
    """Options of the `step_apo` term."""

    alpha: float = Field(1.0, ge=0, description="α: how much of the value gap between the two sides the implicit "
                                                "reward margin must exceed (0: DPO).")


@TERMS.register("step_apo", config=StepAPOConfig, needs=PAIRWISE)
def step_apo(ctx: TokenContext, cfg: StepAPOConfig) -> TermOutput:
    """Step-APO of CPL [115]: DPO on (step-level) pairs whose value estimates set a margin.

    ``z = β (s(y_w) − s(y_l)) − α (V_w − V_l)`` and ``ℓ = −(1 − ε) log σ(z) − ε log σ(−z)``, where ``V`` is each
    row's reward on its trained tokens (the score pieces' value of a sampled step, or a pairs file's
    ``chosen_value``/``rejected_value``; the authors' code takes the MCTS Q-values of the two steps): a pair whose
    sides differ more in value must be separated more. α = 0 is DPO. Metrics as `dpo`'s, plus ``value_gap``."""
    v = pair_view(ctx)
    if v.empty:
        return no_pairs(ctx)
    gap = v.r[v.chosen] - v.r[v.rejected]
    z = cfg.beta * (v.s[v.chosen] - v.s[v.rejected]) - cfg.alpha * gap
    metrics = pair_metrics(v, z, cfg.beta)
    metrics["value_gap"] = gap.detach().mean()
    return TermOutput(loss=cfg.coef * smoothed_logistic(z, cfg.label_smoothing).mean(), metrics=metrics)


class NLLConfig(PieceConfig):
    """Options of the `nll` term."""

    coef: float = Field(1.0, ge=0, description="Weight of the term in the learner's sum.")
    rows: Literal["chosen", "all"] = Field("chosen", description="chosen: the chosen side of each pair only (DPO + "
                                                                "NLL, RPO); all: every row (fine-tuning on the "
                                                                "batch, e.g. rejection-sampled successes).")


@TERMS.register("nll", config=NLLConfig, needs=Needs(micro_batch="rows"))
def nll(ctx: TokenContext, cfg: NLLConfig) -> TermOutput:
    """Negative log-likelihood of the selected rows' trained tokens, ``ℓ_t = −coef · log π_θ(x_t)``, per token
    (weighted by the rows' sample weights and reduced by the run's aggregation like the policy loss). With DPO it is
    RPO's regulariser (Pang et al. 2024, arXiv:2404.19733), which keeps the chosen responses' likelihood from
    falling; on its own, supervised fine-tuning on the batch."""
    keep = ctx.mask
    if cfg.rows == "chosen":
        keep = keep * (ctx.batch.preference > 0).to(keep.dtype)[:, None]
    return TermOutput(per_token=torch.where(keep > 0, -cfg.coef * ctx.logprobs, torch.zeros_like(ctx.logprobs)))
