"""update/: loss and optimiser step.

Two registries, one context. `LOSSES` holds policy surrogates ``fn(ctx, cfg) -> (loss [B, T], metrics)``;
`ENTROPY` holds entropy regulators: small classes built once per run from their config and called on every
minibatch, ``regulator(ctx) -> RegulatorOutput``, keeping whatever state they need across steps (an adaptive
coefficient, an anchor) in `state_dict`, which checkpoints carry. Both read a `TokenContext`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from outrider.stats import masked_mean
from outrider.registry import PieceConfig, Registry

AggregateFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class TokenContext:
    """One minibatch, token by token. Every tensor is ``[B, T]`` aligned like `Batch` (position t is token x_t).

    ``logprobs``, ``entropy`` and ``logits`` carry gradients; ``old_logprobs`` and ``advantages`` do not.
    """

    logprobs: Tensor  # log π_θ(x_t | x_<t) at the sampling temperature
    old_logprobs: Tensor  # the behaviour / old policy's log-probs of the same tokens
    advantages: Tensor
    mask: Tensor  # 1 on action tokens (the only trained tokens)
    entropy: Tensor | None = None  # H_t of π_θ(· | x_<t) at the sampling temperature
    logits: Tensor | None = None  # [B, T, V] temperature-scaled logits predicting x_t (only when a piece asks)
    # the run's loss aggregation (token-mean by default), so terms weigh tokens like the policy loss
    aggregate: AggregateFn = masked_mean
    generator: torch.Generator | None = None  # for pieces that sample tokens (Clip-Cov): seeded per step
    step_index: Tensor | None = None  # [B, T] long: the turn each token belongs to (-1 padding), for turn-level terms


@dataclass
class RegulatorOutput:
    """``term`` is added to the loss; ``token_weight`` (if any) multiplies the per-token policy loss before
    aggregation (the aggregation's denominator keeps every action token, as TRL and verl do)."""

    term: Tensor
    token_weight: Tensor | None = None
    metrics: dict[str, Tensor | float] = field(default_factory=dict)


class Regulator:
    """Base of entropy regulators. Subclasses implement `__call__`; stateful ones override the state methods."""

    needs_logits: ClassVar[bool] = False  # True: the learner passes full logits in `TokenContext.logits`

    def __init__(self, cfg: PieceConfig):
        self.cfg = cfg

    def __call__(self, ctx: TokenContext) -> RegulatorOutput:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# Trait of a loss or regulator entry: for a row whose advantages are 0 on every action token, its per-token loss,
# its term and its gradient are exactly 0, and it does not change what the other rows contribute (nothing is
# computed across rows: no batch quantiles, no covariance with the batch mean). The learner may then leave such
# rows out of the forward and backward (`update.skip_zero_advantage`) without changing the update.
ZERO_AT_ZERO_ADVANTAGE = "zero_at_zero_advantage"

LOSSES: Registry = Registry("update.loss")
ENTROPY: Registry = Registry("update.entropy")

from outrider.update import entropy, losses  # noqa: E402,F401  (registers the built-ins)
from outrider.update import cov, entropy_control  # noqa: E402,F401
from outrider.update import epo  # noqa: E402,F401
