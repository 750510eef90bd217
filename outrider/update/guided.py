"""The off-policy term on teacher rows (``origin == "guided"``) of guidance pieces: LUFFY's policy shaping as
AMPO uses it [121] (``update.terms: [guided_shaping]``).

A teacher path has no behaviour probability the student could have drawn it with, so LUFFY and AMPO
(ElliottYan/LUFFY and SII-Enigma/AMPO, ``mix_core_alg.compute_token_on_off_policy_loss``) take μ = 1 and shape
the ratio: per trained token of a guided row

    ℓ_t = −A_t · f(π_θ(y_t)),   f(p) = p / (p + γ),   γ = 0.1 (their ``off_policy_reshape: p_div_p_0.1``),

with no clip on these rows (the PPO clip applies to on-policy rows only). ``∂ℓ/∂log π = −A·γ·p/(p + γ)²``
lifts the gradient of tokens the student finds unlikely (p ≪ γ), where the plain ``−A·p`` would vanish. A_t is
the credit piece's advantage (GRPO's over the mixed group). The guided rows have weight 0 in the policy surrogate
(the explore piece sets it), so this term is their only gradient. The loss is aggregated with the run's
aggregation over the minibatch's trained tokens (the on-policy and guided tokens together, as the authors' one
masked mean over the mixed batch; where the learner skips zero-advantage rows, over the tokens it kept).

HeRL [12] (explore piece ``herl``) samples its guided rows from the policy itself, with a hindsight experience in
context that training removes, so they have a behaviour probability: with ``ratio: behaviour`` the shaped
quantity is the importance ratio ``r_t = π_θ(y_t | x)/μ(y_t | x, experience)`` (μ the recorded behaviour
log-probs), ``ℓ_t = −A_t·r_t/(r_t + γ)``, γ = 1 (the authors' ``mixpolicy_vanilla`` loss with
``he_shaping_gamma: 1``, log r clamped to ±20 as theirs); ``ratio: probability`` (default) is LUFFY's μ = 1.

Metrics: ``guided_shaping/rows`` (share of the minibatch's rows), ``prob_mean`` (π_θ on guided tokens; r with
``ratio: behaviour``),
``shaped_mean`` (f), ``advantage_mean`` and ``loss``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from outrider.data import ORIGINS
from outrider.errors import OutriderError
from outrider.kl import LOG_RATIO_CLAMP
from outrider.registry import Needs, PieceConfig
from outrider.stats import masked_mean
from outrider.update import TERMS, TermOutput, TokenContext

GUIDED = ORIGINS.index("guided")


class GuidedShapingConfig(PieceConfig):
    coef: float = Field(1.0, ge=0, description="Weight of the term (the authors add it to the policy loss as is).")
    gamma: float = Field(0.1, gt=0, description="gamma of the shaping f(p) = p/(p + gamma) (AMPO/LUFFY: 0.1; "
                                                "HeRL: 1).")
    ratio: Literal["probability", "behaviour"] = Field(
        "probability", description="What is shaped: probability, p = pi_theta (a teacher path, mu = 1: AMPO); "
                                   "behaviour, p = pi_theta/mu with mu the recorded behaviour log-probs (HeRL's "
                                   "guided responses).")


def shaped(p: Tensor, gamma: float) -> Tensor:
    """``f(p) = p/(p + γ)``, LUFFY's policy shaping of the off-policy ratio."""
    return p / (p + gamma)


@TERMS.register("guided_shaping", config=GuidedShapingConfig, needs=Needs(zero_at_zero_advantage=True))
def guided_shaping(ctx: TokenContext, cfg: GuidedShapingConfig) -> TermOutput:
    """``coef · agg(−A_t·f(π_θ(y_t)))`` over the trained tokens of guided rows with weight 0 (0 elsewhere) [121]."""
    b = ctx.batch
    # only the guided rows the surrogate leaves out (weight 0): a row with weight 1 (`shaping: false`, HeRL's
    # `keep_context: true`) is trained by the surrogate already
    rows = (b.origin == GUIDED) & (b.sample_weight == 0) if b is not None and b.origin is not None else \
        torch.zeros(ctx.mask.shape[0], dtype=torch.bool, device=ctx.mask.device)
    metrics: dict[str, Tensor | float] = {"rows": float(rows.float().mean())}
    m = ctx.mask * rows[:, None].to(ctx.mask.dtype)
    if not bool((m > 0).any()):
        return TermOutput(metrics=metrics)
    if cfg.ratio == "behaviour":
        if b is None or b.behaviour_logprobs is None:
            raise OutriderError("update.terms.guided_shaping.ratio: behaviour needs the rows' behaviour log-probs "
                                "(the batch has none)")
        p = torch.exp((ctx.logprobs - b.behaviour_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    else:
        p = torch.exp(ctx.logprobs)
    f = shaped(p, cfg.gamma)
    per_token = torch.where(m > 0, -ctx.advantages * f, torch.zeros_like(f))
    loss = ctx.aggregate(per_token, ctx.mask)
    metrics.update({"prob_mean": masked_mean(p.detach(), m), "shaped_mean": masked_mean(f.detach(), m),
                    "advantage_mean": masked_mean(ctx.advantages, m), "loss": loss.detach()})
    return TermOutput(loss=cfg.coef * loss, metrics=metrics)
