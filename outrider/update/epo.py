"""EPO, entropy-regularised policy optimisation for multi-turn agents [10] (Xu et al. 2025, arXiv:2509.22576).

Formulas and defaults follow the official code (github.com/WujiangXu/EPO: `verl/workers/actor/dp_actor.py`
``update_policy`` / ``generate_entropy_penalty`` / ``_calculate_epoch_based_entropy_weight`` and
`verl/trainer/config/ppo_trainer.yaml`); the paper text itself was only available as its abstract. Deviations are
named in the docstrings.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from outrider.stats import masked_mean
from outrider.registry import BuildContext, PieceConfig
from outrider.update import ENTROPY, Regulator, RegulatorOutput, TokenContext


class EPOConfig(PieceConfig):
    """Options of `epo` (defaults: the official `ppo_trainer.yaml`, except `smooth`, which EPO is about)."""

    coef: float = Field(0.001, description="β (`entropy_coeff`): weight of the trajectory-level entropy bonus "
                                           "−β·agg(H) over the action tokens of every turn.")
    smooth: bool = Field(True, description="Add the entropy smoothing penalty (the official yaml has it off; the "
                                           "EPO runs turn it on).")
    smooth_coef: float = Field(1.0, ge=0.0, description="α (`entropy_smooth_coeff`): weight of the smoothing "
                                                        "penalty inside the bonus, term = −β·(agg(H) − α·w·agg(P)).")
    min_ratio: float = Field(0.8, ge=0.0, description="κ_l: the band's lower edge is κ_l·H̄ (0 disables it).")
    max_ratio: float = Field(1.2, gt=0.0, description="κ_r: the band's upper edge is κ_r·H̄.")
    out_range_penalty: float = Field(0.1, ge=0.0, description="c: penalty scale on a token outside the band.")
    penalty: Literal["deviation", "constant"] = Field(
        "deviation", description="deviation: P_t = c·|H_t − H̄| outside the band (pulls entropy back toward the "
                                 "historical mean); constant: P_t = c outside the band, as the official code (the "
                                 "value is logged but carries no gradient).")
    mask_mode: Literal["token", "turn"] = Field(
        "token", description="token: each token's H_t is tested against the band; turn: the turn's mean entropy "
                             "is (the official 'seq' mode, whose rows are turns), and P covers the whole turn.")
    per_turn: bool = Field(True, description="Keep one historical mean per turn index (the official "
                                             "`entropy_history[rollout_step]`); false: one mean for all turns.")
    window: int = Field(0, ge=0, description="0: H̄ is the mean of every past update's entropy (official default); "
                                             "n > 0: of the last n updates (`use_sliding_window`, window_size 5).")
    start_turn: int = Field(0, ge=0, description="Smooth only tokens of turns ≥ this index (the official code "
                                                 "smooths a micro-batch once any of its steps reaches "
                                                 "max_steps // 2; 0 smooths every turn).")
    schedule: bool = Field(False, description="Multiply the penalty by the phase schedule w(k) "
                                              "(`enable_smooth_weights`, off in the official yaml).")
    horizon: int = Field(150, ge=1, description="K of the schedule, counted in regulator calls (one per optimiser "
                                                "step; the official counts RL steps, default 150).")
    lambda_slow: float = Field(2.0, ge=0.0, description="Decay rate of the schedule's first half.")
    lambda_fast: float = Field(3.0, ge=0.0, description="γ: decay rate of the schedule's second half.")

    @model_validator(mode="after")
    def _band(self) -> "EPOConfig":
        if self.min_ratio >= self.max_ratio:
            raise ValueError(f"need min_ratio < max_ratio (got {self.min_ratio}, {self.max_ratio})")
        return self


def phase_weight(k: int, horizon: int, lambda_slow: float = 2.0, lambda_fast: float = 3.0) -> float:
    """EPO's phase schedule [10] (official ``_calculate_epoch_based_entropy_weight``), k clamped to [0, K]:
    ``w = 1 − 0.2·(1 − exp(−λ_s·k/(K//2)))`` for ``k ≤ K//2`` (1 → ≈0.8, slowly), else
    ``w = 0.8·exp(−λ_f·(k − K//2)/(K − K//2))`` (0.8 → 0.8·e^{−λ_f}, fast)."""
    k = max(0, min(k, horizon))
    half = horizon // 2
    if k <= half:
        return 1.0 if half == 0 else 1.0 - 0.2 * (1.0 - math.exp(-lambda_slow * k / half))
    return 0.8 * math.exp(-lambda_fast * (k - half) / (horizon - half))


def _turn_sums(h: Tensor, mask: Tensor, turn: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """Per-row, per-turn sum of ``h`` over action tokens ``[B, K]`` and the action-token counts."""
    act = (mask > 0) & (turn >= 0)
    idx = turn.clamp(min=0, max=K - 1)
    hs = torch.zeros(h.shape[0], K, dtype=h.dtype, device=h.device).scatter_add_(
        1, idx, torch.where(act, h, torch.zeros_like(h)))
    n = torch.zeros_like(hs).scatter_add_(1, idx, act.to(h.dtype))
    return hs, n


@ENTROPY.register("epo", config=EPOConfig)
class EPO(Regulator):
    """EPO [10]: trajectory-level entropy bonus plus entropy smoothing against a historical mean.

    ``term = −β·agg(H_t) + β·α·w·agg(P_t)`` over the action tokens of every turn (the bonus is aggregated over the
    whole multi-turn trajectory like the policy loss; official ``policy_loss = pg − β·(agg(H) − α·agg(P))``).
    Smoothing: ``H̄_k`` is the historical mean entropy of turn index k (one entry per past call: the call's
    token-mean entropy of turn k, detached); the band is ``(κ_l·H̄_k, κ_r·H̄_k)`` (strict, as the official code);
    a token of turn k whose entropy (``mask_mode`` token) or whose turn's mean entropy (turn) lies outside gets
    ``P_t = c·|H_t − H̄_k|`` (``penalty`` deviation, with H_t the tested value) or the official constant ``c``
    (no gradient); inside ``P_t = 0``. Only past calls form H̄ (the first call, or a turn never seen, is not
    smoothed), and the current call is appended afterwards. ``w = phase_weight(calls)`` when ``schedule`` is on,
    else 1. Deviations from the official code: the differentiable deviation penalty is the default (the
    official constant penalty only shifts the loss value); ``start_turn`` replaces the per-micro-batch
    "any step ≥ max_steps//2" gate; the history is updated per call, not per RL step. State: the per-turn
    history, the call count (checkpointed). Metrics: ``entropy``, ``out_of_band_frac``, ``penalty``,
    ``weight`` (w), ``hist_mean`` (mean H̄ over the turns present).
    """

    cfg: EPOConfig

    def __init__(self, cfg: EPOConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        self.sums: list[float] = []  # per turn index (or [all] when not per_turn): Σ of past per-call means
        self.counts: list[int] = []
        self.recent: list[list[float | None]] = []  # the last `window` calls' per-turn means (window > 0 only)
        self.calls = 0

    def _history(self, K: int) -> list[float | None]:
        """H̄ per turn index (None: never seen) for turns 0..K−1."""
        if self.cfg.window > 0:
            means = []
            for k in range(K):
                vals = [e[k] for e in self.recent if k < len(e) and e[k] is not None]
                means.append(sum(vals) / len(vals) if vals else None)
            return means
        return [self.sums[k] / self.counts[k] if k < len(self.counts) and self.counts[k] else None
                for k in range(K)]

    def _record(self, entry: list[float | None]) -> None:
        if self.cfg.window > 0:
            self.recent = (self.recent + [entry])[-self.cfg.window:]
            return
        for k, v in enumerate(entry):
            if v is None:
                continue
            while len(self.sums) <= k:
                self.sums.append(0.0)
                self.counts.append(0)
            self.sums[k] += v
            self.counts[k] += 1

    def __call__(self, ctx: TokenContext) -> RegulatorOutput:
        h, mask = ctx.entropy, ctx.mask
        turn = ctx.step_index if ctx.step_index is not None else torch.zeros_like(mask, dtype=torch.long)
        if not self.cfg.per_turn:
            turn = torch.where(turn >= 0, torch.zeros_like(turn), turn)
        K = int(turn.max().item()) + 1 if turn.numel() and int(turn.max().item()) >= 0 else 1
        bonus = ctx.aggregate(h, mask)
        zero = torch.zeros((), dtype=h.dtype, device=h.device)
        hd = h.detach()
        sums, n = _turn_sums(hd, mask, turn, K)
        hist = self._history(K)
        weight = phase_weight(self.calls, self.cfg.horizon, self.cfg.lambda_slow, self.cfg.lambda_fast) \
            if self.cfg.schedule else 1.0
        penalty, out_frac = zero, zero
        known = torch.tensor([v is not None for v in hist], device=h.device)
        if self.cfg.smooth and bool(known.any()):
            h_bar_k = torch.tensor([0.0 if v is None else v for v in hist], dtype=h.dtype, device=h.device)
            idx = turn.clamp(min=0, max=K - 1)
            h_bar = h_bar_k[idx]
            eligible = (mask > 0) & (turn >= self.cfg.start_turn) & known[idx]
            if self.cfg.mask_mode == "turn":
                # the turn's mean with gradient: Σ_{t∈turn} H_t / n_turn, gathered back onto the turn's tokens
                s_grad, n_turn = _turn_sums(h, mask, turn, K)
                tested = torch.gather(s_grad / n_turn.clamp(min=1.0), 1, idx)
            else:
                tested = h
            inside = (tested.detach() > self.cfg.min_ratio * h_bar) & (tested.detach() < self.cfg.max_ratio * h_bar)
            out = eligible & ~inside
            if self.cfg.penalty == "deviation":
                p = self.cfg.out_range_penalty * (tested - h_bar).abs()
            else:
                p = torch.full_like(h, self.cfg.out_range_penalty)
            p = torch.where(out, p, torch.zeros_like(p))
            penalty = ctx.aggregate(p, mask)
            out_frac = masked_mean(out.to(h.dtype), mask)
        term = -self.cfg.coef * (bonus - self.cfg.smooth_coef * weight * penalty)
        # this call's entry: the token-mean entropy of each turn index over the minibatch
        tot, cnt = sums.sum(0), n.sum(0)
        present = [float(tot[k] / cnt[k]) if float(cnt[k]) > 0 else None for k in range(K)]
        seen = [v for v in hist if v is not None]
        metrics: dict[str, Tensor | float] = {"entropy": bonus.detach(), "out_of_band_frac": out_frac,
                                              "penalty": penalty.detach(), "weight": weight}
        if seen:
            metrics["hist_mean"] = sum(seen) / len(seen)
        if bool((mask > 0).any()):  # an empty minibatch measures nothing: leave the history alone
            self._record(present)
            self.calls += 1
        return RegulatorOutput(term, metrics=metrics)

    def state_dict(self) -> dict[str, Any]:
        return {"sums": list(self.sums), "counts": list(self.counts),
                "recent": [list(e) for e in self.recent], "calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = [float(v) for v in state.get("sums", [])]
        self.counts = [int(v) for v in state.get("counts", [])]
        self.recent = [list(e) for e in state.get("recent", [])]
        self.calls = int(state.get("calls", 0))
