"""PRL's credit [162]: the outcome split over fixed-length segments by the KL-regularised optimum.

From the optimum of ``E[r*] − (1/η)·KL(π‖π_0)``, ``π*(a|x) ∝ π_0(a|x)·exp(η r*(x, a))``, so
``r*(x, a) − (1/η)·ln π*(a|x)/π_0(a|x)`` is a constant per prompt. [162] cuts the response into segments and
gives each segment the outcome minus ``1/η`` times the log-ratio of the policy to π_0 over the rest of the
response; summed over segments the log-ratios are the sequence's KL term, so the process rewards are the
KL-regularised objective handed out piece by piece.

This is the authors' code (``Process-Reward-Learning``, verl ``ray_trainer.py`` with ``adv_estimator=prm``,
``prm.adv=orm``, ``prm.step_split=length``; ``compute_prm_outcome_advantage`` in ``core_algos.py``), which is what
the piece reproduces; the paper's text past the abstract was not at hand to check it against:

- ``A^o_i = (R_i − mean_g R) / (std_g R + ε)``, GRPO's group-normalised outcome (unbiased std; a lone episode
  uses mean 0, std 1);
- ``d_{i,t} = log π_old(a_t) − log π_ref(a_t)`` on the action tokens (π_old: the sampling policy's recomputed
  log-probs; π_ref: the run's frozen reference, the warm start), and ``S_{i,t} = Σ_{s≥t} d_{i,s}``, the log-ratio
  of the rest of the response from token t on (token t included);
- segments are ``segment_length`` action tokens counted from the response's first one (the last one shorter),
  ``e_k`` the last token of segment k; every token of segment k gets ``A_{i,t} = A^o_i − S_{i,e_k}/η``.

So a segment's advantage is the outcome's minus the log-ratio from its *last* token to the end of the response
(the authors' reward sits on segment ends and is filled back over the segment, ``left_fill_by_next_nonzero``);
the per-segment process rewards ``−(1/η)·(S_{e_k} − S_{e_{k+1}})`` turned into returns-to-go give the same
numbers. ``segment_length: 1`` is a token-level KL-in-reward return-to-go. At the first step π_old = π_ref and the
advantage is GRPO's; the process term grows as the policy leaves the reference. The authors' defaults: η 200 (100
and 1 in other scripts), 256-token segments, responses up to 3,072 tokens, no other KL (``kl_loss_coef: 0``).
Multi-turn episodes: segments count action tokens only (observation tokens are skipped, as
`discounted_action_returns` does).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from outrider.credit import CREDIT, CreditConfig, CreditOutput
from outrider.credit.outcome import broadcast_to_actions, grpo_episode_advantages
from outrider.data import Batch
from outrider.errors import OutriderError
from outrider.registry import Needs
from outrider.stats import masked_mean


class PRLConfig(CreditConfig):
    """Options of `prl` [162]."""

    eta: float = Field(200.0, gt=0, description="η: the log-ratio to the reference enters as −(1/η)·Σ log π/π_ref "
                                                "over the rest of the response (the authors' 200 on responses of "
                                                "thousands of tokens).")
    segment_length: int = Field(256, ge=1, description="Action tokens per segment, counted from the response's "
                                                       "first (the authors' 256; 1: every token its own segment).")
    std_normalize: bool = Field(True, description="Divide the centred outcome by its group's std (GRPO, the "
                                                  "authors' default); false: R − mean_g R.")
    epsilon: float = Field(1e-6, ge=0.0, description="Added to the group std before dividing.")


def suffix_log_ratio(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """``S_t = Σ_{s≥t} m_s·(log π(a_s) − log π_ref(a_s))`` for every position of each row, ``[B, T]``."""
    d = torch.where(mask > 0, logprobs - ref_logprobs, torch.zeros_like(logprobs))
    return d.flip(-1).cumsum(-1).flip(-1)


def segment_end_values(values: Tensor, mask: Tensor, length: int) -> Tensor:
    """Each action token gets ``values`` at the last action token of its segment (segments of `length` action
    tokens from the row's first, the last one shorter); 0 outside the mask. ``[B, T]``."""
    m = mask > 0
    index = torch.cumsum(m.long(), -1) - 1  # the action token's rank in its row
    segment = torch.where(m, torch.div(index, length, rounding_mode="floor"), torch.zeros_like(index))
    count = m.long().sum(-1, keepdim=True)
    is_end = m & (((index + 1) % length == 0) | (index == count - 1))
    ends = torch.zeros(values.shape[0], values.shape[1] // length + 2, dtype=values.dtype, device=values.device)
    ends.scatter_(1, torch.where(is_end, segment, torch.full_like(segment, ends.shape[1] - 1)),
                  torch.where(is_end, values, torch.zeros_like(values)))
    return torch.where(m, ends.gather(1, segment), torch.zeros_like(values))


@CREDIT.register("prl", config=PRLConfig, needs=Needs(old_logprobs=True, ref_logprobs=True))
def prl(batch: Batch, cfg: PRLConfig) -> CreditOutput:
    """PRL [162]: GRPO's outcome advantage minus ``(1/η)·Σ_{s≥e_k} log π_old(a_s)/π_ref(a_s)`` on every token of
    fixed-length segment k, ``e_k`` its last token (the KL-regularised return from the segment's end).

    Metrics: ``credit/prl_process_abs`` (mean |S_{e_k}/η| over action tokens), ``credit/prl_log_ratio`` (mean
    sequence log-ratio ``Σ_t log π_old/π_ref``, a k1 estimate of the KL to the reference) and
    ``credit/prl_segments`` (mean segments per response)."""
    if batch.old_logprobs is None or batch.ref_logprobs is None:
        raise OutriderError("credit prl: needs the sampling policy's and the reference's log-probs (batch."
                            "old_logprobs, batch.ref_logprobs), which a run fills from the piece's needs")
    m = batch.action_mask
    outcome = broadcast_to_actions(grpo_episode_advantages(batch, cfg.std_normalize, cfg.epsilon), m)
    suffix = suffix_log_ratio(batch.old_logprobs, batch.ref_logprobs, m)
    process = -segment_end_values(suffix, m, cfg.segment_length) / cfg.eta
    tokens = m.sum(-1)
    metrics = {"prl_process_abs": float(masked_mean(process.abs(), m)),
               "prl_log_ratio": float(suffix[:, 0].mean()),
               "prl_segments": float(torch.ceil(tokens / cfg.segment_length).mean())}
    return CreditOutput(advantages=outcome + process * m, metrics=metrics)
