"""credit/: rewards → per-token advantages. Every piece has one signature: ``piece(batch) -> CreditOutput`` (a
function ``fn(batch, cfg)``, or a `Piece` subclass when it keeps state across steps).

Pieces read what they need from the `Batch` (``token_rewards``, ``action_mask``, ``group_index``, ``step_index``,
``values``, ``turn_state_ids``, ``behaviour_entropy``) so step-level methods (GiGPO, SALT) plug in without a new
signature. Every advantage is exactly 0 outside ``action_mask`` (observation tokens, padding, and the given
prefix of a restarted or continued episode). A piece that needs a value head declares ``Needs(values=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from outrider.registry import PieceConfig, Registry, register_package


@dataclass
class CreditOutput:
    advantages: Tensor  # [B, T], zero outside action tokens
    returns: Tensor | None = None  # [B, T] value targets (GAE only)
    metrics: dict[str, float] = field(default_factory=dict)  # logged as credit/<name> (e.g. step-group sizes)


class CreditConfig(PieceConfig):
    """Options common to credit pieces."""


CREDIT: Registry = Registry("credit")

register_package(__name__, __path__)  # every module of this package registers its pieces (a new method: a new file)
