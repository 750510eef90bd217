"""Built-in entropy regulators: `none` and the plain `bonus`. Others live in their own modules of this package."""

from __future__ import annotations

import torch
from pydantic import Field

from outrider.registry import Needs, NoOptions, PieceConfig
from outrider.update import ENTROPY, Regulator, RegulatorOutput, TokenContext


class EntropyBonusConfig(PieceConfig):
    """Options of the `bonus` entropy regulator."""

    coef: float = Field(0.001, description="β in −β·H: a positive value rewards entropy (keeps exploring).")


@ENTROPY.register("none", config=NoOptions, 
                  needs=Needs(zero_at_zero_advantage=True, micro_batch="rows"))
class NoRegulator(Regulator):
    """No entropy term: adds 0 (the aggregated entropy ``H`` is still reported as the ``entropy`` metric)."""

    def __call__(self, ctx: TokenContext) -> RegulatorOutput:
        h = ctx.aggregate(ctx.entropy.detach(), ctx.mask)
        return RegulatorOutput(torch.zeros((), dtype=h.dtype, device=h.device), metrics={"entropy": h})


@ENTROPY.register("bonus", config=EntropyBonusConfig, needs=Needs(micro_batch="rows"))
class EntropyBonus(Regulator):
    """Entropy bonus ``−β · agg(H_t)`` with ``H_t = −Σ_v π(v|x_<t) log π(v|x_<t)`` (A3C, Mnih et al. 2016; PPO,
    arXiv:1707.06347). Minimising the term raises policy entropy against the early entropy collapse of RL on
    reasoning LMs [153]; [153] and [149] find the bonus sensitive to β (it can blow entropy up), hence the small
    default.
    """

    cfg: EntropyBonusConfig

    def __call__(self, ctx: TokenContext) -> RegulatorOutput:
        h = ctx.aggregate(ctx.entropy, ctx.mask)
        return RegulatorOutput(-self.cfg.coef * h, metrics={"entropy": h.detach()})
