"""Entropy- and likelihood-aware outcome credit: CANON [156], RiskPO [163] and PPL/position shaping [144].

Notation as in `outcome.py`: ``R_i = Σ_t r_{i,t}·m_{i,t}`` is episode i's summed reward, ``m`` the action mask, a
group ``g`` the episodes sharing ``batch.group_index``. Every advantage is exactly 0 outside the action mask.
Formulas and defaults follow the official code of each method (checked; see the docstrings for the deviations).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from outrider.credit import CREDIT, CreditConfig, CreditOutput
from outrider.credit.outcome import broadcast_to_actions, episode_scores
from outrider.credit.wrapped import WrappedCreditConfig
from outrider.stats import group_ids, group_moments, masked_mean
from outrider.data import Batch
from outrider.errors import OutriderError

RISKPO_EPS = 1e-6  # added to every RiskPO denominator, as in the reference code
QUESTION_STD_FLOOR = 1e-3  # RiskPO: a question whose reward std is at most this uses std 1
SUM_MEAN_FLOOR = 1e-6  # RiskPO sum_mean: below this |Σ (r − r̄_q)| the paper advantage is split equally
PPL_STD_FLOOR = 1e-6  # ppl_position: a group whose inlier logPPL std is at most this uses std 1
POSITION_SLOPE = 15.0  # ppl_position: steepness k of the sigmoid position bonus σ(k(rel_pos − 0.5))


def _groups(group_index: Tensor) -> list[Tensor]:
    """Row indices of each group (ascending group id), each in batch order."""
    return [(group_index == g).nonzero().flatten() for g in torch.unique(group_index)]


# --------------------------------------------------------------------------------------------------- CANON [156]
class CanonConfig(CreditConfig):
    """Options of `canon`."""

    metric: Literal["entropy", "length"] = Field(
        "entropy", description="What splits a group into halves: the response's token-mean behaviour entropy, or "
                               "its number of action tokens.")
    alpha: float = Field(1.0, ge=0.0, description="α (Eq. 8): >1 favours the low-entropy half (entropy metric) or "
                                                  "the long half (length metric); 1 is neutral.")
    beta: float = Field(0.0, description="β: added to the High half's inter-group term, subtracted from the Low "
                                         "half's (β > 0 favours high-entropy / long responses).")
    lam: float = Field(1.0, ge=0.0, le=1.0, description="λ (μ in Eq. 5): weight of the inter-group term (compare "
                                                        "with the other half); 1 − λ weighs the intra-group term.")
    scale: float = Field(1.0, gt=0.0, description="Divisor of every advantage. The original divides by max_len = "
                                                  "8192 for Dr.GRPO's seq-mean-token-sum; outrider's loss "
                                                  "aggregation already normalises, so 1 by default.")


def _canon_high(metric: Tensor, groups: list[Tensor]) -> Tensor:
    """True for the High half: per group, a stable ascending sort (ties keep batch order); ranks ≥ n//2 are High,
    so an odd group gives High the extra member [156]."""
    high = torch.zeros(metric.shape[0], dtype=torch.bool, device=metric.device)
    for rows in groups:
        order = torch.sort(metric[rows], stable=True).indices
        high[rows[order[rows.numel() // 2:]]] = True
    return high


@CREDIT.register("canon", config=CanonConfig)
def canon(batch: Batch, cfg: CanonConfig) -> CreditOutput:
    """CANON conditional advantage (Conditional Advantage Estimation for RL in Large Reasoning Models) [156].

    Each group is split by rank of a metric m_i (``entropy``: token-mean behaviour entropy over the action mask;
    ``length``: number of action tokens) into a Low half (ranks < n//2) and a High half; μ_L, μ_H are their mean
    rewards. With s = ``scale``:

    - entropy, High: ``A = [λ(R − α·μ_L + β) + (1−λ)(R − μ_H)] / s``;
      Low: ``A = [λ(α·R − μ_H − β) + (1−λ)(R − μ_L)] / s``.
    - length (α placed the other way round), High: ``A = [λ(α·R − μ_L + β) + (1−λ)(R − μ_H)] / s``;
      Low: ``A = [λ(R − α·μ_H − β) + (1−λ)(R − μ_L)] / s``.

    The λ term compares with the other half (inter-group), the 1−λ term within the own half (intra-group). No std
    normalisation. α = 1, β = 0, λ = ½ with equal halves gives Dr.GRPO's ``R − mean_g R``; the default λ = 1 is
    pure inter-group. A group of size 1 uses μ_L = μ_H = 0 as the reference code does (its lone member is High),
    so ``A = (R + λβ)/s``. The entropy is the sampler's (``batch.behaviour_entropy``), i.e. old-policy entropy.
    """
    m = batch.action_mask
    scores = episode_scores(batch)
    if cfg.metric == "entropy":
        h = batch.behaviour_entropy if batch.behaviour_entropy is not None else torch.zeros_like(m)
        metric = masked_mean(h, m, dim=-1)
    else:
        metric = m.sum(-1)
    high = _canon_high(metric, _groups(batch.group_index))
    inverse, k = group_ids(batch.group_index)
    # the halves' means: exact for equal rewards, so α = 1, β = 0 gives exactly 0 on an all-equal group
    count, half_mean, _ = group_moments(scores, 2 * inverse + high.long(), 2 * k)
    lone = (count[2 * inverse] + count[2 * inverse + 1]) < 2  # reference convention: both means 0
    mu_h = torch.where(lone, 0.0, half_mean[2 * inverse + 1]).to(scores.dtype)
    mu_l = torch.where(lone, 0.0, half_mean[2 * inverse]).to(scores.dtype)
    a, b, lam = cfg.alpha, cfg.beta, cfg.lam
    if cfg.metric == "entropy":
        inter_high, inter_low = scores - a * mu_l + b, a * scores - mu_h - b
    else:
        inter_high, inter_low = a * scores - mu_l + b, scores - a * mu_h - b
    adv_high = lam * inter_high + (1 - lam) * (scores - mu_h)
    adv_low = lam * inter_low + (1 - lam) * (scores - mu_l)
    adv = torch.where(high, adv_high, adv_low) / cfg.scale
    return CreditOutput(advantages=broadcast_to_actions(adv, m))


# -------------------------------------------------------------------------------------------------- RiskPO [163]
class RiskPOConfig(CreditConfig):
    """Options of `riskpo`."""

    alpha: float = Field(0.2, gt=0.0, lt=1.0, description="Lower quantile level α (quantile_down): the CVaR tail "
                                                          "and the lower RVaR bound.")
    beta: float = Field(0.8, gt=0.0, le=1.0, description="Upper quantile level β (quantile_up) of the RVaR range "
                                                         "(the MATH script uses 0.9).")
    bundle_size: int = Field(5, ge=1, description="Questions (groups) per bundle B, taken in ascending group_index "
                                                  "order; the last bundle may be smaller.")
    w_mix: float = Field(1.5, ge=0.0, description="Weight w of the CVaR part in (w·g_C + g_R)/(w + 1); 0 gives "
                                                  "pure RVaR.")
    credit: Literal["sum_mean", "std", "uniform"] = Field(
        "sum_mean", description="How a paper's advantage reaches its responses: sum_mean (∝ r_i − r̄_q), std "
                                "(÷ σ_q), uniform (copied).")
    natural_baseline: bool = Field(False, description="Add (q_α − q_β) to the RVaR numerator "
                                                      "(natural_baseline_adv; the MATH script turns it on).")
    norm_adv_by_std: bool = Field(True, description="Divide each paper's advantage by (σ_b + 1e-6), σ_b the "
                                                    "bundle's unbiased std of paper scores.")

    @model_validator(mode="after")
    def _ordered(self) -> "RiskPOConfig":
        if self.alpha >= self.beta:
            raise ValueError(f"alpha ({self.alpha}) must be below beta ({self.beta})")
        return self


def _riskpo_paper_advantage(papers: Tensor, cfg: RiskPOConfig) -> Tensor:
    """Mixed RVaR/CVaR advantage ``(w·g_C + g_R)/(w + 1) / (σ_b + ε)`` of each paper score S_j of one bundle;
    g_R, g_C as in `riskpo` [163]."""
    if papers.numel() == 1:  # one paper: both quantiles are S itself, σ_b = 1
        q_a = q_b = papers[0]
        sigma = torch.ones((), dtype=papers.dtype, device=papers.device)
    else:
        q_a, q_b = torch.quantile(papers, cfg.alpha), torch.quantile(papers, cfg.beta)
        sigma = papers.std()
    g_r = torch.relu(papers - q_a) - torch.relu(papers - q_b)
    if cfg.natural_baseline:
        g_r = g_r + (q_a - q_b)
    g_r = g_r / (cfg.beta - cfg.alpha + RISKPO_EPS)
    g_c = -torch.relu(q_a - papers) / (cfg.alpha + RISKPO_EPS)
    adv = (cfg.w_mix * g_c + g_r) / (cfg.w_mix + 1.0)
    return adv / (sigma + RISKPO_EPS) if cfg.norm_adv_by_std else adv


@CREDIT.register("riskpo", config=RiskPOConfig)
def riskpo(batch: Batch, cfg: RiskPOConfig) -> CreditOutput:
    """RiskPO bundled risk-sensitive advantage (RiskPO: Risk-based Policy Optimization via Verifiable Reward) [163].

    Groups (questions), in ascending ``group_index`` order, form bundles of B = ``bundle_size``. Paper j of a bundle
    takes the j-th response (batch order) of each question; #papers = the bundle's smallest group, so responses
    beyond it (unequal group sizes) get advantage 0. Paper score ``S_j = Σ_q R_{q,j}``. Per bundle, with
    ``q_α, q_β = torch.quantile({S_j}, α / β)`` (linear) and ε = 1e-6:

    - RVaR: ``g_R = [(S − q_α)⁺ − (S − q_β)⁺ (+ q_α − q_β if natural_baseline)] / (β − α + ε)``
    - CVaR: ``g_C = −(q_α − S)⁺ / (α + ε)``
    - ``A_paper = (w·g_C + g_R)/(w + 1)``, then ``/ (σ_b + ε)`` when ``norm_adv_by_std`` (σ_b: unbiased std of the
      bundle's S_j; a single paper uses q_α = q_β = S and σ_b = 1).

    Credit to response i of question q in the paper: ``uniform`` A_i = A_paper; ``std`` A_i = A_paper/(σ_q + ε),
    σ_q the unbiased std of q's rewards (1 if ≤ 1e-3 or q has one response); ``sum_mean``
    ``A_i = A_paper·(R_i − r̄_q)/Σ_{i'∈paper}(R_{i'} − r̄_{q'})``, split equally (A_paper/|paper|) when
    |Σ| ≤ 1e-6. No baseline. The reference's SGD quantile tracking is not used: its tracked quantiles reach the
    advantage only after it is computed, so the batch quantiles are what it effectively trains on.
    """
    scores = episode_scores(batch)
    adv = torch.zeros_like(scores)
    groups = _groups(batch.group_index)
    for start in range(0, len(groups), cfg.bundle_size):
        bundle = groups[start:start + cfg.bundle_size]
        n_papers = min(rows.numel() for rows in bundle)
        members = torch.stack([rows[:n_papers] for rows in bundle], dim=1)  # [papers, questions] row indices
        paper_adv = _riskpo_paper_advantage(scores[members].sum(1), cfg)  # [papers]
        q_mean = torch.stack([scores[rows].mean() for rows in bundle])  # [questions]
        q_std = torch.stack([scores[rows].std() if rows.numel() > 1 else scores.new_zeros(()) for rows in bundle])
        q_std = torch.where(q_std > QUESTION_STD_FLOOR, q_std, torch.ones_like(q_std))
        if cfg.credit == "uniform":
            share = paper_adv[:, None].expand_as(members)
        elif cfg.credit == "std":
            share = paper_adv[:, None] / (q_std[None, :] + RISKPO_EPS)
        else:
            dev = scores[members] - q_mean[None, :]
            total = dev.sum(1, keepdim=True)
            ok = total.abs() > SUM_MEAN_FLOOR
            ratio = torch.where(ok, dev / torch.where(ok, total, torch.ones_like(total)),
                                torch.full_like(dev, 1.0 / members.shape[1]))
            share = paper_adv[:, None] * ratio
        adv[members.flatten()] = share.flatten().to(adv.dtype)
    return CreditOutput(advantages=broadcast_to_actions(adv, batch.action_mask))


# --------------------------------------------------------------------------------------------- PPL/position [144]
class PPLPositionConfig(WrappedCreditConfig):
    """Options of `ppl_position`."""

    piece: ClassVar[str] = "ppl_position"

    ppl_alpha: float = Field(0.01, ge=0.0, description="α of the perplexity shaping (ppl_delta); 0 disables it.")
    mode: Literal["scale", "penalty"] = Field(
        "scale", description="scale: A·clamp(1 − α·w_ppl, 0.8, 1.2) (favours low-PPL responses); penalty: "
                             "A − α·sign(A)·clip(w_ppl, −2, 2).")
    iqr_mask: bool = Field(False, description="Zero the advantages of responses whose logPPL is an IQR outlier in "
                                              "their group (the penalty path's loss mask in the reference).")
    position_alpha: float = Field(0.1, ge=0.0, description="α of the position bonus (location_alpha); 0 disables "
                                                           "it.")


def ppl_weights(batch: Batch) -> tuple[Tensor, Tensor]:
    """Per-group standardised log-perplexity ``w_ppl`` and the IQR inlier flag, both ``[B]`` [144].

    ``logPPL_i = −mean_t log π_b(y_t)`` over action tokens (behaviour log-probs; all-zero log-probs give 0).
    Per group: Q1, Q3 = torch.quantile(·, .25 / .75); inlier iff Q1 − 1.5·IQR ≤ x ≤ Q3 + 1.5·IQR; μ and the
    population σ over the inliers (all members if none), σ ≤ 1e-6 → 1; ``w_ppl_i = (logPPL_i − μ)/σ`` for
    every member, outliers included.
    """
    m = batch.action_mask
    lp = batch.behaviour_logprobs if batch.behaviour_logprobs is not None else torch.zeros_like(m)
    log_ppl = -masked_mean(lp, m, dim=-1)
    w, inlier = torch.zeros_like(log_ppl), torch.ones_like(log_ppl)
    for rows in _groups(batch.group_index):
        x = log_ppl[rows]
        q1, q3 = torch.quantile(x, 0.25), torch.quantile(x, 0.75)
        keep = (x >= q1 - 1.5 * (q3 - q1)) & (x <= q3 + 1.5 * (q3 - q1))
        clean = x[keep] if bool(keep.any()) else x
        mu, sigma = clean.mean(), clean.std(unbiased=False)
        sigma = sigma if float(sigma) > PPL_STD_FLOOR else torch.ones_like(sigma)
        w[rows] = (x - mu) / sigma
        inlier[rows] = keep.to(inlier.dtype)
    return w, inlier


def position_bonus(adv: Tensor, mask: Tensor, alpha: float) -> Tensor:
    """``A_t + sign(A_t)·min(b_t, 0.5|A_t|)``, ``b_t = α·σ(15(rel_pos_t − 0.5))``,
    ``rel_pos_t = (cumsum(m)_t − 1)/Σm`` over the row's action tokens (all turns) [144]. Late tokens are magnified
    for both signs; the cap keeps the sign and at most 1.5× the magnitude; A = 0 stays 0."""
    n = mask.sum(-1, keepdim=True).clamp(min=1.0)
    rel_pos = (torch.cumsum(mask, dim=-1) - 1.0) / n
    bonus = alpha * torch.sigmoid(POSITION_SLOPE * (rel_pos - 0.5))
    out = adv + torch.sign(adv) * torch.minimum(bonus, 0.5 * adv.abs())
    return torch.where(mask > 0, out, torch.zeros_like(out))


@CREDIT.register("ppl_position", config=PPLPositionConfig)
def ppl_position(batch: Batch, cfg: PPLPositionConfig) -> CreditOutput:
    """Perplexity and position shaping of a base credit piece (Decomposing the Entropy-Performance Exchange) [144].

    ``A`` = the base piece's advantages, then (in the reference's order):

    1. position bonus (``position_alpha`` > 0): ``A_t ← A_t + sign(A_t)·min(α_pos·σ(15(rel_pos_t − 0.5)),
       0.5|A_t|)``, see `position_bonus`;
    2. PPL shaping (``ppl_alpha`` > 0) with ``w_ppl`` from `ppl_weights`: ``scale`` ``A ← A·clamp(1 − α·w_ppl,
       0.8, 1.2)`` (low-PPL emphasis; the reference computes this weight but never applies it, a bug, so this is
       the intended form), or ``penalty`` ``A ← A − α·sign(A)·clip(w_ppl, −2, 2)``;
    3. ``iqr_mask``: ``A ← 0`` for IQR outliers. The reference removes them from the loss mask instead; here their
       tokens stay in a token-mean denominator but carry no gradient.

    The log-probs are the sampler's (``batch.behaviour_logprobs``) rather than a recomputed old-policy pass; with
    all-zero log-probs (hand-made batches) w_ppl = 0 and only the position bonus acts. The reference gates the
    bonus with a trainer flag whose schedule is not published; here it is always on when enabled.
    """
    entry, base_cfg = CREDIT.build(cfg.base, "credit.base")
    m = batch.action_mask
    adv = entry.create(base_cfg)(batch).advantages.clone()
    if cfg.position_alpha > 0:
        adv = position_bonus(adv, m, cfg.position_alpha)
    if cfg.ppl_alpha > 0 or cfg.iqr_mask:
        w, inlier = ppl_weights(batch)
        if cfg.ppl_alpha > 0 and cfg.mode == "scale":
            adv = adv * torch.clamp(1.0 - cfg.ppl_alpha * w, 0.8, 1.2)[:, None]
        elif cfg.ppl_alpha > 0:
            adv = adv - cfg.ppl_alpha * torch.sign(adv) * torch.clamp(w, -2.0, 2.0)[:, None]
        if cfg.iqr_mask:
            adv = adv * inlier[:, None]
    return CreditOutput(advantages=torch.where(m > 0, adv, torch.zeros_like(adv)))
