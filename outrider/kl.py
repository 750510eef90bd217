"""Per-token estimators of KL(π_θ ‖ π_ref) from samples of π_θ (Schulman 2020, "Approximating KL Divergence").

With ``log ρ = log π_ref(x_t) − log π_θ(x_t)`` for a token x_t sampled from π_θ:

- ``k1 = −log ρ = log π_θ − log π_ref``: unbiased, high variance, can be negative.
- ``k2 = ½ (log ρ)²``: biased, low variance, always ≥ 0; used as a loss on on-policy samples its gradient is
  the true KL's gradient in expectation.
- ``k3 = clamp(ρ − log ρ − 1, −10, 10)``: unbiased (before the clamp) and always ≥ 0 (verl's ``low_var_kl``,
  as used by GRPO, DeepSeekMath, arXiv:2402.03300). As in verl, ``log ρ`` is clamped to [−20, 20] before
  ``exp`` and the value to [−10, 10]: a token whose reference probability is more than ≈ 13.6× the policy's
  (log ρ > 2.61), or less than ≈ 1.7e-5× (log ρ < −11.0), adds exactly 10 and no gradient, so a few tokens
  the reference finds far likelier cannot dominate the loss with an exponentially growing term.
"""

from __future__ import annotations

import torch
from torch import Tensor

from outrider.errors import OutriderError

KL_ESTIMATORS = ("k1", "k2", "k3")
LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0  # verl `kl_penalty_forward`, low_var_kl: torch.clamp(kld, min=-10, max=10)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token KL estimate, same shape as ``logprobs`` (mask and aggregate it yourself).

    ``k1 = logp − ref``; ``k2 = ½(logp − ref)²``; ``k3 = clamp(exp(d) − d − 1, −10, 10)`` with
    ``d = clamp(ref − logp, −20, 20)`` (verl's ``low_var_kl``; zero gradient where either clamp binds).
    Unknown estimators raise `OutriderError`.
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k2":
        return 0.5 * (logprobs - ref_logprobs) ** 2
    if estimator == "k3":
        log_ratio = torch.clamp(ref_logprobs - logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return torch.clamp(torch.exp(log_ratio) - log_ratio - 1.0, -K3_CLAMP, K3_CLAMP)
    raise OutriderError(f"unknown KL estimator '{estimator}'; valid: {', '.join(KL_ESTIMATORS)}")
