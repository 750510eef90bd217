"""Self-imitation learner terms on replayed rows (``origin == "replay"``): SPEAR's [113] and the classic SIL.

Both read the replayed rows a replay piece put in the batch (`outrider.explore.replay`: weight 0, so the policy
surrogate leaves them alone) and return a scalar loss aggregated over those rows' trained tokens only, as the
authors' separate replay loss is (SPEAR's ``dp_actor.update_policy(data, data_replay)``): the rows' sample
weights do not apply.

- ``spear_sil`` [113]: ``ℓ_t = max(−Â·r_t, −Â·clip(r_t, 1 − ε_low, 1 + ε_high))`` with ``r_t = π_θ(x_t)/μ(x_t)``,
  μ the recorded behaviour log-probs, Â the row's recalibrated advantage (``Batch.row_advantage``), positive
  rows only; with ``clip_cov`` the gradient of a few random tokens in the covariance band is detached (the
  existing `clip_cov` surrogate, computed over the replayed tokens, with the authors' replay constants: ratio
  0.02, band (2, 60)). The weight ramps up: ``coef·(1 − cos(π·t/T))/2`` for step t ≤ T (``ramp_steps``, the
  authors' ``max_replay_loss_ascending_steps`` 100), ``coef`` after.
- ``sil`` (Oh et al. 2018, "Self-Imitation Learning", arXiv:1806.05635): ``ℓ_t = −log π_θ(x_t)·g_t
  + β·½·g_t²`` with ``g_t = min((R_t − V_t)₊, c)``, R_t the undiscounted return from token t (the rewards at and
  after it) and V_t the value head's prediction (`Needs(values=True)`: the PPO recipe's head); β = 0.01 as in the
  paper. As in the authors' code (junhyukoh/self-imitation-learning, ``common/self_imitation.py``
  ``build_loss_op``): the gap is clipped at c = 1 (``clip``; above it the value part is linear, its gradient
  −c), and both parts are summed over the replayed tokens and divided by ``max(n_valid, min_samples)``, n_valid the
  tokens with R > V (their ``num_samples``, ``min_batch_size`` 64); ``normalize: aggregate`` uses the recipe's
  aggregation over all replayed tokens instead. The weight g is detached in the policy part; only tokens that did
  better than the value predicts train.

Metrics: ``sil/rows`` (replayed rows with a positive weight, share of the minibatch's rows), ``sil/coef``,
``sil/advantage_mean``; for ``spear_sil`` the ratio against μ over the replayed tokens, ``sil/ratio_mean``,
``sil/ratio_max`` and ``sil/clipped_frac`` (tokens where the clip holds: r > 1 + ε_high), and
``sil/cov_detached_frac``; for ``sil`` ``sil/value_loss`` and ``sil/valid_frac`` (replayed tokens with R > V).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from outrider.data import ORIGINS
from outrider.kl import LOG_RATIO_CLAMP
from outrider.registry import BuildContext, Needs, PieceConfig
from outrider.stats import masked_mean
from outrider.update import TERMS, Term, TermOutput, TokenContext
from outrider.update.cov import ClipCovConfig, clip_cov
from outrider.update.losses import clipped_surrogate

REPLAY = ORIGINS.index("replay")


def replay_rows(ctx: TokenContext) -> Tensor:
    """[B] bool: the minibatch's replayed rows."""
    b = ctx.batch
    if b is None or b.origin is None:
        return torch.zeros(ctx.mask.shape[0], dtype=torch.bool, device=ctx.mask.device)
    return b.origin == REPLAY


def ramp(step: int, steps: int) -> float:
    """``(1 − cos(π·min(step, T)/T))/2``: 0 at step 0, 1 from step T on (T = 0: always 1)."""
    return 1.0 if steps == 0 else (1.0 - math.cos(math.pi * min(step, steps) / steps)) / 2.0


class SpearSILConfig(PieceConfig):
    coef: float = Field(1.0, ge=0, description="Weight of the term once ramped up (authors' replay_loss_coef 1).")
    ramp_steps: int = Field(100, ge=0, description="T: the weight rises as (1 - cos(pi t/T))/2 over the first T "
                                                   "steps (authors: 100; 0: full weight from the start).")
    clip_low: float = Field(0.2, ge=0, lt=1, description="epsilon_low of the ratio against the recorded log-probs.")
    clip_high: float = Field(0.28, ge=0, description="epsilon_high (authors' script: 0.28).")
    clip_cov: bool = Field(True, description="Detach the gradient of random high-covariance replayed tokens "
                                             "(Clip-Cov [153]) against over-confidence.")
    clip_cov_ratio: float = Field(0.02, ge=0, le=1, description="Share of replayed tokens detached (authors' "
                                                                "replay value 0.02).")
    clip_cov_lb: float = Field(2.0, description="Lower bound of the covariance band (authors' replay value 2).")
    clip_cov_ub: float = Field(60.0, description="Upper bound of the covariance band (authors' replay value 60).")


class StepCounter(Term):
    """A term that knows the RL step: it counts its calls, ``epochs × minibatches`` per step (from the recipe's
    update section), and keeps the count in its state."""

    def __init__(self, cfg: PieceConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        update = getattr(getattr(build, "recipe", None), "update", None)
        self.per_step = max(1, int(getattr(update, "epochs", 1)) * int(getattr(update, "minibatches", 1)))
        self.calls = 0

    def tick(self) -> int:
        """The current RL step (1-based), counting this call."""
        self.calls += 1
        return (self.calls - 1) // self.per_step + 1

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])


@TERMS.register("spear_sil", config=SpearSILConfig)
class SpearSIL(StepCounter):
    """SPEAR's self-imitation term [113]: PPO-clip against the recorded behaviour log-probs on replayed rows with a
    positive recalibrated advantage, Clip-Cov on them, its weight ramped up over ``ramp_steps``."""

    prefix = "sil"
    cfg: SpearSILConfig

    def __call__(self, ctx: TokenContext) -> TermOutput:
        cfg = self.cfg
        coef = cfg.coef * ramp(self.tick(), cfg.ramp_steps)
        b = ctx.batch
        adv_row = b.row_advantage if b is not None and b.row_advantage is not None else None
        rows = replay_rows(ctx)
        if adv_row is not None:
            rows = rows & torch.nan_to_num(adv_row, nan=0.0).gt(0)
        metrics: dict[str, Tensor | float] = {"coef": coef, "rows": float(rows.float().mean())}
        if not bool(rows.any()) or not bool((ctx.mask[rows] > 0).any()):
            return TermOutput(metrics=metrics)
        mask = ctx.mask[rows]
        adv = adv_row[rows][:, None] * mask
        mu = b.behaviour_logprobs[rows]
        logprobs = ctx.logprobs[rows]
        log_r = torch.where(mask > 0, logprobs - mu, torch.zeros_like(logprobs)).clamp(-LOG_RATIO_CLAMP,
                                                                                        LOG_RATIO_CLAMP)
        ratio = torch.exp(log_r).detach()
        if cfg.clip_cov:
            sub = TokenContext(logprobs, mu, adv, mask, aggregate=ctx.aggregate, generator=ctx.generator)
            per_token, cov_metrics = clip_cov(sub, ClipCovConfig(
                clip_low=cfg.clip_low, clip_high=cfg.clip_high, clip_ratio=cfg.clip_cov_ratio,
                clip_cov_lb=cfg.clip_cov_lb, clip_cov_ub=cfg.clip_cov_ub))
            metrics["cov_detached_frac"] = cov_metrics["cov_detached_frac"]
        else:
            per_token = clipped_surrogate(torch.exp(log_r), adv, cfg.clip_low, cfg.clip_high)
            per_token = torch.where(mask > 0, per_token, torch.zeros_like(per_token))
        metrics.update({"advantage_mean": float(adv_row[rows].mean()), "ratio_mean": masked_mean(ratio, mask),
                        "ratio_max": ratio[mask > 0].max(),
                        "clipped_frac": masked_mean((ratio > 1 + cfg.clip_high).to(ratio.dtype), mask)})
        loss = ctx.aggregate(per_token, mask)
        metrics["loss"] = loss.detach()
        return TermOutput(loss=coef * loss, metrics=metrics)


class SILConfig(PieceConfig):
    coef: float = Field(1.0, ge=0, description="Weight of the self-imitation policy part.")
    value_coef: float = Field(0.01, ge=0, description="beta: weight of the value part (Oh et al.: 0.01).")
    clip: float | None = Field(1.0, gt=0, description="c: (R - V)+ clipped at c in both parts (authors' code: 1; "
                                                      "null: no clip).")
    normalize: Literal["valid", "aggregate"] = Field(
        "valid", description="valid: sums over the replayed tokens / max(tokens with R > V, min_samples) (authors' "
                             "code); aggregate: the recipe's aggregation over all replayed tokens.")
    min_samples: int = Field(64, ge=1, description="normalize: valid: the divisor's floor (authors' min_batch_size "
                                                   "64).")


def sil_gap_losses(returns: Tensor, values: Tensor, clip: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """Per token: the clipped gap ``g = min((R − V)₊, c)`` (detached), its value loss ``½·(R − V)₊²`` up to c and
    ``c·((R − V)₊ − c/2)`` above (gradient −g, the authors' clipped ``delta``), and the ``R > V`` indicator."""
    raw = torch.clamp(returns - values, min=0.0)
    gap = raw if clip is None else torch.clamp(raw, max=clip)
    value = 0.5 * raw ** 2 if clip is None else torch.where(raw <= clip, 0.5 * raw ** 2, clip * (raw - 0.5 * clip))
    return gap.detach(), value, (returns > values).to(values.dtype)


@TERMS.register("sil", config=SILConfig, needs=Needs(values=True))
class SIL(Term):
    """Self-Imitation Learning (Oh et al. 2018): ``−log π·g + β·½·g²``, ``g = min((R − V)₊, c)``, on replayed
    rows."""

    prefix = "sil"
    cfg: SILConfig

    def __call__(self, ctx: TokenContext) -> TermOutput:
        cfg, b = self.cfg, ctx.batch
        rows = replay_rows(ctx)
        metrics: dict[str, Tensor | float] = {"coef": cfg.coef, "rows": float(rows.float().mean())}
        if ctx.values is None or not bool(rows.any()) or not bool((ctx.mask[rows] > 0).any()):
            return TermOutput(metrics=metrics)
        mask = ctx.mask[rows]
        rewards = b.token_rewards[rows] * mask
        returns = rewards.flip(-1).cumsum(-1).flip(-1)  # R_t: the rewards at and after token t (γ = 1)
        gap, value, valid = sil_gap_losses(returns, ctx.values[rows], cfg.clip)
        gap, value, valid = gap * mask, value * mask, valid * mask
        policy = -ctx.logprobs[rows] * gap
        n_valid = float(valid.sum())
        if cfg.normalize == "valid":
            n = max(n_valid, float(cfg.min_samples))
            policy_loss, value_loss = policy.sum() / n, value.sum() / n
        else:
            policy_loss, value_loss = ctx.aggregate(policy, mask), ctx.aggregate(value, mask)
        metrics.update({"advantage_mean": masked_mean(gap, mask), "loss": policy_loss.detach(),
                        "value_loss": value_loss.detach(), "valid_frac": n_valid / float(mask.sum())})
        return TermOutput(loss=cfg.coef * policy_loss + cfg.value_coef * value_loss, metrics=metrics)
