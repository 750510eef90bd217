"""Per-token estimators of KL(π_θ ‖ π_ref) from samples of π_θ (Schulman 2020, "Approximating KL Divergence").

With ``log ρ = log π_ref(x_t) − log π_θ(x_t)`` for a token x_t sampled from π_θ:

- ``k1 = −log ρ = log π_θ − log π_ref``: unbiased, high variance, can be negative.
- ``k2 = ½ (log ρ)²``: biased, low variance, always ≥ 0; used as a loss on on-policy samples its gradient is
  the true KL's gradient in expectation.
- ``k3 = ρ − log ρ − 1``: unbiased and always ≥ 0 (verl's ``low_var_kl``, as used by GRPO, DeepSeekMath,
  arXiv:2402.03300). ``log ρ`` is clamped to [−20, 20] before ``exp`` so one stray token cannot overflow.
"""

from __future__ import annotations

import torch
from torch import Tensor

from outrider.errors import OutriderError

KL_ESTIMATORS = ("k1", "k2", "k3")
LOG_RATIO_CLAMP = 20.0


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token KL estimate, same shape as ``logprobs`` (mask and aggregate it yourself).

    ``k1 = logp − ref``; ``k2 = ½(logp − ref)²``; ``k3 = exp(ref − logp) − (ref − logp) − 1`` with the log-ratio
    clamped to [−20, 20]. Unknown estimators raise `OutriderError`.
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k2":
        return 0.5 * (logprobs - ref_logprobs) ** 2
    if estimator == "k3":
        log_ratio = torch.clamp(ref_logprobs - logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return torch.exp(log_ratio) - log_ratio - 1.0
    raise OutriderError(f"unknown KL estimator '{estimator}'; valid: {', '.join(KL_ESTIMATORS)}")
