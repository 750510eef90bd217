"""update/: the loss, as a sum of terms, and the optimiser step.

Three registries, one context. `LOSSES` holds policy surrogates ``fn(ctx, cfg) -> (loss [B, T], metrics)``;
`ENTROPY` holds entropy regulators, ``regulator(ctx) -> RegulatorOutput`` (classes: some keep state, an adaptive
coefficient or an anchor, in `state_dict`); `TERMS` holds further learner terms a recipe adds under
``update.terms`` (a self-imitation loss, a pairwise preference loss), ``term(ctx) -> TermOutput``. Every one reads
a `TokenContext`. The learner (`learner.py`) turns the recipe's loss, KL, entropy regulator, value loss and extra
terms into `Term`s and sums them: a term returns its loss (or a per-token loss the learner weights and aggregates)
and its metrics under its own prefix, so adding one never touches the learner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from torch import Tensor

from outrider.registry import BuildContext, Piece, PieceConfig, Registry, register_package
from outrider.stats import masked_mean

if TYPE_CHECKING:
    from outrider.data import Batch

AggregateFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class TokenContext:
    """One minibatch, token by token. Every tensor is ``[B, T]`` aligned like `Batch` (position t is token x_t).

    ``logprobs``, ``entropy``, ``logits`` and ``values`` carry gradients; ``old_logprobs`` and ``advantages`` do
    not. ``batch`` is the minibatch itself, for terms that read more of it (reference log-probs, returns, the
    rows' origins and preferences).
    """

    logprobs: Tensor  # log π_θ(x_t | x_<t) at the sampling temperature
    old_logprobs: Tensor  # the old policy's log-probs of the same tokens (see `update.off_policy` for replayed rows)
    advantages: Tensor
    mask: Tensor  # 1 on trained action tokens (the only trained tokens)
    entropy: Tensor | None = None  # H_t of π_θ(· | x_<t) at the sampling temperature
    logits: Tensor | None = None  # [B, T, V] temperature-scaled logits predicting x_t (only when a piece asks)
    # the run's loss aggregation (token-mean by default), so terms weigh tokens like the policy loss
    aggregate: AggregateFn = masked_mean
    generator: torch.Generator | None = None  # for pieces that sample tokens (Clip-Cov): seeded per step
    step_index: Tensor | None = None  # [B, T] long: the turn each token belongs to (-1 padding), for turn-level terms
    values: Tensor | None = None  # [B, T] the value head's current predictions (when a piece needs values)
    batch: "Batch | None" = None


@dataclass
class TermOutput:
    """What a learner term gives back: a scalar ``loss`` added as it is, or a ``per_token`` loss ``[B, T]`` (0 off
    the mask) that the learner multiplies by each row's sample weight and every term's ``token_weight`` and
    reduces with the run's aggregation. ``token_weight`` (an entropy mask) multiplies every per-token term.
    ``metrics`` are logged as named (a key with a ``/``) or under the term's prefix."""

    loss: Tensor | None = None
    per_token: Tensor | None = None
    token_weight: Tensor | None = None
    metrics: dict[str, Tensor | float] = field(default_factory=dict)


class Term(Piece):
    """Base of learner terms (registered ones may also be functions ``fn(ctx, cfg) -> TermOutput``). Bare metric
    keys are logged as ``<prefix>/<key>`` (``prefix`` defaults to the term's name); a per-token term's reduced
    loss as ``loss/<name>``."""

    prefix: ClassVar[str | None] = None

    def __init__(self, cfg: PieceConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)

    def __call__(self, ctx: TokenContext) -> TermOutput:
        raise NotImplementedError


@dataclass
class RegulatorOutput:
    """``term`` is added to the loss; ``token_weight`` (if any) multiplies the per-token policy loss before
    aggregation (the aggregation's denominator keeps every action token, as TRL and verl do)."""

    term: Tensor
    token_weight: Tensor | None = None
    metrics: dict[str, Tensor | float] = field(default_factory=dict)


class Regulator(Piece):
    """Base of entropy regulators. Subclasses implement `__call__`; stateful ones override the state methods. A
    regulator that reads the full logits declares ``Needs(logits=True)`` where it is registered."""

    def __call__(self, ctx: TokenContext) -> RegulatorOutput:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


LOSSES: Registry = Registry("update.loss")
ENTROPY: Registry = Registry("update.entropy")
TERMS: Registry = Registry("update.terms")

register_package(__name__, __path__)  # every module of this package registers its pieces (a new method: a new file)
