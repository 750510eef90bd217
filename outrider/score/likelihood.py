"""Likelihood rewards: the policy's own probability of a reference answer after its reasoning (log-p [46],
RLPR [67]), and the self-aligned reward SAR [78] on its own response. No verifier, no second model: one
teacher-forced scoring pass of the policy being trained (`policy.continuation.continuation_logprobs`).

`likelihood` (trajectory level). For an episode with prompt x, response ``z # y`` (reasoning z before the last
``answer_mark``; the whole response when there is none) and reference y* (``StepInfo.reference``), the
reference replaces the model's answer and is scored teacher-forced: ``ℓ_i = log π(y*_i | x, z, #, y*_<i)``
over its n tokens (its EOS included with ``end_token``). Variants:

- ``p``: ``exp(Σ_i ℓ_i)`` = p(y* | x, z), the sequence probability [46];
- ``mean_p``: ``(1/n) Σ_i exp(ℓ_i)``, the mean token probability (RLPR [67]; its code's
  ``mean_exp_log_softmax``);
- ``log_p``: ``Σ_i ℓ_i`` = log p(y* | x, z) [46] (JEPO-like);
- ``mean_log_p``: ``(1/n) Σ_i ℓ_i``, length-normalised log-p.

An empty target (n = 0) scores 1 (``p``) or 0 (the others). ``debias`` (RLPR [67]) subtracts the same score of y*
without reasoning, r_noCoT = score(y* | x, #): ``clip(r − r_noCoT, 0, 1)`` for ``p``/``mean_p`` (as RLPR's code
clips ``score − scoreA``), ``r − r_noCoT`` unclipped for the log variants (their range is not [0, 1]). r_noCoT is
one pass per distinct prompt of the call. RLPR's other half, dropping prompts whose reward std is below an EMA
threshold, is the exploration piece ``std_filter`` (`explore/std_filter.py`).

`sar` (trajectory level) [78]: how much the query lowers the perplexity of the model's own response a:
``R_SA = clip((ppl(a) − ppl(a|q)) / ppl(a), −1, 1)`` with ``ppl(a|q) = exp(−mean_i log π(a_i | q, a_<i))`` and
ppl(a) the same with only the BOS as context (two passes); an empty response scores 0. It is added to the
verifier in the paper (weight = its coefficient).

Both log their time per step (``time/score/<name>_s``, the scoring passes) and the scored tokens
(``<name>/tokens``) through ``step_metrics``; ``likelihood`` also logs its raw and no-CoT means.
"""

from __future__ import annotations

import math
import time
from typing import Literal

from pydantic import Field

from outrider.data import Episode, sequence_ids
from outrider.errors import OutriderError
from outrider.policy.continuation import continuation_logprobs
from outrider.registry import BuildContext, Piece
from outrider.score import SCORE, ComponentConfig

Variant = Literal["p", "mean_p", "log_p", "mean_log_p"]


def aggregate(logprobs: list[float], variant: Variant) -> float:
    """One likelihood reward from a target's token log-probs (see the module docstring for the formulas)."""
    n = len(logprobs)
    if variant == "p":
        return math.exp(sum(logprobs))
    if n == 0:
        return 0.0
    if variant == "mean_p":
        return sum(math.exp(v) for v in logprobs) / n
    if variant == "log_p":
        return float(sum(logprobs))
    if variant == "mean_log_p":
        return float(sum(logprobs)) / n
    raise OutriderError(f"likelihood.variant: {variant!r} is not one of p, mean_p, log_p, mean_log_p")


def debiased(score: float, no_cot: float, variant: Variant) -> float:
    """RLPR's debiasing [67]: ``clip(r − r_noCoT, 0, 1)`` for probabilities, ``r − r_noCoT`` for log-probs."""
    delta = score - no_cot
    return min(max(delta, 0.0), 1.0) if variant in ("p", "mean_p") else delta


def sar_reward(response_logprobs_given_q: list[float], response_logprobs_alone: list[float]) -> float:
    """SAR [78]: ``clip((ppl(a) − ppl(a|q)) / ppl(a), −1, 1)``, ppl = exp(−mean log-prob); 0 for an empty a."""
    if not response_logprobs_given_q:
        return 0.0
    ppl_q = math.exp(-sum(response_logprobs_given_q) / len(response_logprobs_given_q))
    ppl_a = math.exp(-sum(response_logprobs_alone) / len(response_logprobs_alone))
    return min(max((ppl_a - ppl_q) / ppl_a, -1.0), 1.0)


def split_reasoning(response: str, mark: str) -> str:
    """The reasoning z of a response: the text before the last `mark` (the whole response without one; empty
    with no mark at all, i.e. a task whose response is the answer alone)."""
    if not mark:
        return ""
    return response.rsplit(mark, 1)[0] if mark in response else response


def prompt_ids(episode: Episode, bos_id: int | None) -> list[int]:
    """Every token before the episode's last action (BOS, the observations and earlier turns' actions)."""
    ids, _, _ = sequence_ids(episode, bos_id)
    return ids[: len(ids) - len(episode.turns[-1].action_ids)] if episode.turns else ids


def reference_of(episode: Episode, where: str) -> str:
    """The reference answer the env reported on the last turn (``StepInfo.reference``); a one-line error when the
    task gives none."""
    info = episode.turns[-1].info if episode.turns else {}
    if "reference" not in info or info["reference"] is None:
        raise OutriderError(f"{where}: the task gives no reference answer (StepInfo.reference on the last turn); "
                            "likelihood rewards need a task with one (single-turn tasks such as sortlist)")
    return str(info["reference"])


class LikelihoodConfig(ComponentConfig):
    """Options of `likelihood` (log-p of a reference [46], RLPR [67])."""

    variant: Variant = Field("mean_p", description="p: p(y*|x,z); mean_p: mean token probability (RLPR); log_p: "
                                                   "log p(y*|x,z); mean_log_p: log p per token (length-normalised).")
    debias: bool = Field(False, description="Subtract the score of y* without the reasoning (RLPR): clipped to "
                                            "[0, 1] for p and mean_p, plain for the log variants.")
    answer_mark: str = Field("#", description="The text before the last mark is the reasoning z; the reference "
                                              "is scored after z and the mark. Empty: no reasoning (z = '').")
    end_token: bool = Field(True, description="Score the EOS after the reference too (the answer must also end).")


@SCORE.register("likelihood", config=LikelihoodConfig)
class Likelihood(Piece):
    """The policy's likelihood of the reference answer after its own reasoning, teacher-forced [46, 67]."""

    cfg: LikelihoodConfig

    def __init__(self, cfg: LikelihoodConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        self.policy = build.policy if build is not None else None
        self.where = (build.where if build else "") or "likelihood"
        self._metrics: dict[str, float] = {}
        self._seconds = 0.0
        self._tokens = 0

    def _target(self, reference: str) -> list[int]:
        return self.policy.encode(reference) + ([self.policy.eos_id] if self.cfg.end_token else [])

    def __call__(self, episodes: list[Episode]) -> list[float]:
        t0 = time.perf_counter()
        cfg, mark = self.cfg, self.cfg.answer_mark
        pairs, no_cot_keys, no_cot_pairs = [], [], {}
        for e in episodes:
            prompt = prompt_ids(e, self.policy.bos_id)
            target = self._target(reference_of(e, self.where))
            z = split_reasoning(e.turns[-1].action, mark) if e.turns else ""
            pairs.append((prompt + self.policy.encode(z + mark), target))
            key = (tuple(prompt), tuple(target))
            no_cot_keys.append(key)
            if cfg.debias and key not in no_cot_pairs:
                no_cot_pairs[key] = (prompt + self.policy.encode(mark), target)
        keys = list(no_cot_pairs)
        scored = continuation_logprobs(self.policy, pairs + [no_cot_pairs[k] for k in keys])
        raw = [aggregate(lp, cfg.variant) for lp in scored[:len(pairs)]]
        out = raw
        if cfg.debias:
            base = {k: aggregate(lp, cfg.variant) for k, lp in zip(keys, scored[len(pairs):])}
            out = [debiased(r, base[k], cfg.variant) for r, k in zip(raw, no_cot_keys)]
            self._metrics["likelihood/no_cot"] = sum(base.values()) / max(len(base), 1)
        self._metrics["likelihood/raw"] = sum(raw) / max(len(raw), 1)
        self._tokens += sum(len(t) for _, t in pairs) + sum(len(no_cot_pairs[k][1]) for k in keys)
        self._seconds += time.perf_counter() - t0
        return out

    def step_metrics(self) -> dict[str, float]:
        out = {**self._metrics, "time/score/likelihood_s": self._seconds, "likelihood/tokens": float(self._tokens)}
        self._metrics, self._seconds, self._tokens = {}, 0.0, 0
        return out


class SARConfig(ComponentConfig):
    """Options of `sar` (self-aligned reward [78]); its coefficient is the recipe weight."""


@SCORE.register("sar", config=SARConfig)
class SelfAlignedReward(Piece):
    """SAR [78]: the relative drop in the response's perplexity that the query brings, clipped to [−1, 1]."""

    def __init__(self, cfg: SARConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        self.policy = build.policy if build is not None else None
        self._seconds = 0.0
        self._tokens = 0

    def __call__(self, episodes: list[Episode]) -> list[float]:
        t0 = time.perf_counter()
        start = [self.policy.bos_id if self.policy.bos_id is not None else self.policy.eos_id]
        pairs = []
        for e in episodes:
            action = list(e.turns[-1].action_ids) if e.turns else []
            pairs += [(prompt_ids(e, self.policy.bos_id) or start, action), (start, action)]
        scored = continuation_logprobs(self.policy, pairs)
        out = [sar_reward(scored[2 * i], scored[2 * i + 1]) for i in range(len(episodes))]
        self._tokens += sum(len(t) for _, t in pairs)
        self._seconds += time.perf_counter() - t0
        return out

    def step_metrics(self) -> dict[str, float]:
        out = {"time/score/sar_s": self._seconds, "sar/tokens": float(self._tokens)}
        self._seconds, self._tokens = 0.0, 0
        return out

