"""Entropy regulators: ``fn(entropy [B, T], mask, cfg, aggregate_fn) -> (term, metrics)``; the scalar ``term``
is ADDED to the policy loss. ``aggregate_fn(x, mask) -> scalar`` is the run's loss aggregation (see
`outrider.update.aggregate`), so the entropy is weighed across tokens exactly like the policy loss.
"""

from __future__ import annotations

from typing import Callable

import torch
from pydantic import Field
from torch import Tensor

from outrider.registry import NoOptions, PieceConfig
from outrider.update import ENTROPY

AggregateFn = Callable[[Tensor, Tensor], Tensor]


class EntropyBonusConfig(PieceConfig):
    """Options of the `bonus` entropy regulator."""

    coef: float = Field(0.001, description="β in −β·H: a positive value rewards entropy (keeps exploring).")


@ENTROPY.register("none", config=NoOptions)
def none(
    entropy: Tensor, mask: Tensor, cfg: PieceConfig, aggregate_fn: AggregateFn
) -> tuple[Tensor, dict[str, Tensor]]:
    """No entropy term: returns 0 (the aggregated entropy ``H`` is still reported as the ``entropy`` metric)."""
    h = aggregate_fn(entropy.detach(), mask)
    return torch.zeros((), dtype=entropy.dtype, device=entropy.device), {"entropy": h}


@ENTROPY.register("bonus", config=EntropyBonusConfig)
def bonus(
    entropy: Tensor, mask: Tensor, cfg: EntropyBonusConfig, aggregate_fn: AggregateFn
) -> tuple[Tensor, dict[str, Tensor]]:
    """Entropy bonus ``−β · agg(H_t)`` with ``H_t = −Σ_v π(v|x_<t) log π(v|x_<t)`` (A3C, Mnih et al. 2016; PPO,
    arXiv:1707.06347). Minimising the term raises policy entropy against the early entropy collapse of RL on
    reasoning LMs [153]; [153] also finds the bonus sensitive to β, hence the small default.
    """
    h = aggregate_fn(entropy, mask)
    return -cfg.coef * h, {"entropy": h.detach()}
