"""KL to the reference in the reward: a packed component (InstructGPT-style PPO, REINFORCE++)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor

from outrider.data import Batch
from outrider.kl import kl_penalty
from outrider.registry import Needs
from outrider.score import SCORE, ComponentConfig
from outrider.stats import masked_mean


class KLRewardConfig(ComponentConfig):
    estimator: Literal["k1", "k2", "k3"] = Field("k1", description="Per-token KL estimator (Schulman's k1/k2/k3).")


@SCORE.register("kl_penalty", config=KLRewardConfig,
                needs=Needs(packed=True, old_logprobs=True, ref_logprobs=True))
def kl_reward(batch: Batch, cfg: KLRewardConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """``r_t = −KL_t(π_old ‖ π_ref)`` on each action token (scaled by the component's weight β, so the composed
    reward is ``r_t − β·KL_t``), with KL_t the chosen estimator (`outrider.kl`) of the sampling policy's
    (recomputed old) log-probs against the frozen reference. ``update.kl: {placement: reward, coef: β}`` builds
    this component; it can also be listed under ``score`` directly. Metric: ``policy/kl_in_reward``, the mean KL
    over action tokens."""
    kl = kl_penalty(batch.old_logprobs, batch.ref_logprobs, cfg.estimator) * batch.action_mask
    return -kl, {"policy/kl_in_reward": masked_mean(kl, batch.action_mask)}
