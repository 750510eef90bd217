"""P2S [39]: the path-faithfulness reward (PFR), the policy's own probability of a gold chain of thought's suffix
after its reasoning prefix, as a process reward over steps. No verifier model, no PRM: teacher-forced scoring
passes of the policy being trained (`policy.continuation.continuation_logprobs`), as RLPR [67] scores the reference
answer after the whole reasoning.

**Gold CoT.** The task's hook ``gold_cot(env) -> str`` on the episode's problem (stepsum: the short program trace
``8,17,21,#21``, right by construction: this replaces [39]'s synthesised and filtered gold CoT). It is cut into
steps g_1 … g_N after each `delimiter` (the answer step last, without one).

**Steps of a response.** A step boundary is each action token whose text holds the `delimiter`; step k is the
tokens up to the k-th boundary (after the previous one). The tokens after the last boundary (the answer, EOS) are
no step: only reasoning prefixes that end a step are scored.

**PFR.** At boundary k (k = 1 … M, M = min(boundaries, N − 1): a gold suffix of at least one step is left) the
gold suffix ``g_{>k} = g_{k+1} … g_N`` (plus EOS with `end_token`) is scored teacher-forced after the prompt x and
the response's own first k steps a_≤k: ``ℓ_i = log π(g_{>k,i} | x, a_≤k, g_{>k,<i})``, and

    PFR_k = agg(ℓ)   (`variant`: mean_p = (1/n) Σ_i exp ℓ_i, RLPR's; geo_p = exp((1/n) Σ_i ℓ_i), the
                      length-normalised probability; p, log_p, mean_log_p as in `likelihood`)

The alignment is by position (the k-th response step against the gold's k-th), a choice here: [39]'s method text
was not reachable (only its abstract). A prefix that diverged (a wrong partial sum) makes the gold suffix unlikely,
so PFR drops at the wrong step and stays low after it; at k = N − 1 the suffix is the answer step alone and PFR is
RLPR's score of the answer after the reasoning. Boundaries past N − 1 (extra steps: the gold suffix is empty) and
a response without a boundary are not scored. PFR_0 is the whole gold CoT after the prompt alone (one pass per
distinct prompt; `progress` only).

**Combined with the outcome** (`combine`; the component is token-level, weight α in the recipe):

- ``mean``: ``(1/M) Σ_k PFR_k`` on the response's last action token (0 when M = 0): a trajectory value that the
  group credit (`grpo`) adds to the verifier's, [39]'s "PFR integrated with an outcome reward";
- ``step``: PFR_k on every token of step k (dense; the response's last action token left to the outcome, as `pav`
  does), for `outcome_plus_dense`: each step's tokens get the group-normalised outcome plus α·PFR_k;
- ``progress``: ``PFR_k − PFR_{k−1}`` on step k's tokens (dense, centred: the change in faithfulness the step
  brings, PAV's [139] form with PFR as the value; summed it telescopes to PFR_M − PFR_0).

Only the last turn's action is cut into steps (single-turn tasks; earlier turns' tokens get 0). Cost and signal
per step: ``time/score/p2s_s`` (gold CoTs and the scoring passes), ``p2s/rows`` and ``p2s/tokens`` (distinct
sequences and their target tokens scored: identical prefix–suffix pairs, such as a group's shared first steps,
are scored once), ``p2s/steps_per_episode`` (scored steps), ``p2s/pfr`` (mean PFR over scored steps) and
``p2s/pfr_first`` (mean PFR_1).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Literal

from pydantic import Field

from outrider.data import Episode
from outrider.envs.base import close_env
from outrider.errors import OutriderError
from outrider.policy.continuation import continuation_logprobs
from outrider.registry import BuildContext, Needs, Piece
from outrider.score import SCORE, ComponentConfig
from outrider.score.likelihood import aggregate, prompt_ids

PFRVariant = Literal["mean_p", "geo_p", "p", "log_p", "mean_log_p"]


def pfr_value(logprobs: list[float], variant: PFRVariant) -> float:
    """One PFR from the gold suffix's token log-probs: `likelihood`'s variants plus ``geo_p`` = exp(mean log-p)."""
    if variant == "geo_p":
        return math.exp(sum(logprobs) / len(logprobs)) if logprobs else 1.0
    return aggregate(logprobs, variant)


def gold_steps(gold: str, delimiter: str) -> list[str]:
    """The gold CoT's steps, each with its delimiter (the last one without): concatenated they give it back."""
    parts = gold.split(delimiter)
    return [p + delimiter for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def boundaries(token_texts: list[str], delimiter: str) -> list[int]:
    """End (exclusive token index) of each step: one past every token whose text holds the delimiter."""
    return [t + 1 for t, text in enumerate(token_texts) if delimiter in text]


def place(values: list[float], ends: list[int], n: int, combine: str, pfr0: float = 0.0) -> list[float]:
    """Per-token rewards of one response of `n` action tokens from its step PFRs (`values`, step k ending at
    ``ends[k]``): ``mean`` on the last token; ``step``/``progress`` on each step's tokens, the last token left 0."""
    out = [0.0] * n
    if n == 0:
        return out
    if combine == "mean":
        out[-1] = sum(values) / len(values) if values else 0.0
        return out
    previous, start = pfr0, 0
    for v, end in zip(values, ends):
        r = v if combine == "step" else v - previous
        for t in range(start, min(end, n - 1)):
            out[t] = r
        previous, start = v, end
    return out


class P2SConfig(ComponentConfig):
    """Options of `p2s` (the path-faithfulness reward [39])."""

    variant: PFRVariant = Field("mean_p", description="PFR of a gold suffix's tokens: mean_p, mean token probability "
                                                      "(RLPR's); geo_p, exp(mean log-p), the length-normalised "
                                                      "probability; p, log_p, mean_log_p as in likelihood.")
    combine: Literal["mean", "step", "progress"] = Field(
        "step", description="mean: mean PFR over the scored steps on the last token (with grpo); step: PFR_k on "
                            "step k's tokens (dense, with outcome_plus_dense); progress: PFR_k − PFR_{k−1} there, "
                            "PFR_0 the gold CoT after the prompt alone.")
    delimiter: str = Field(",", min_length=1, description="A step ends after each action token whose text contains "
                                                           "this string (stepsum's `,`); the gold CoT is cut there "
                                                           "too.")
    end_token: bool = Field(True, description="Score the EOS after the gold suffix too.")


GoldFn = Callable[[Episode], str]


@SCORE.register("p2s", config=P2SConfig, needs=Needs(level="token"))
class P2S(Piece):
    """P2S [39]: at each step boundary of the response, the policy's probability of the gold CoT's remaining steps
    after its own prefix (module docstring). ``gold_of`` maps an episode to its gold CoT (the task's ``gold_cot``
    hook by default; tests set it)."""

    cfg: P2SConfig

    def __init__(self, cfg: P2SConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        build = build or BuildContext()
        self.where = build.where or "p2s"
        self.task, self.policy = build.task, build.policy
        if self.task is not None and not callable(getattr(self.task, "gold_cot", None)):
            raise OutriderError(f"{self.where}: needs the task's gold_cot(env) hook (a reference chain of thought "
                                f"for the episode's problem); {type(self.task).__name__} has none (stepsum does)")
        self.gold_of: GoldFn = self._task_gold
        self.stats: dict[str, float] = {}

    def _task_gold(self, episode: Episode) -> str:
        from outrider.explore.step_check import env_at, time_limit  # explore imports score: import on use

        with time_limit(self.task) as clock:
            env, _ = env_at(self.task, episode, len(episode.turns) - 1, clock)
            try:
                return str(self.task.gold_cot(env))
            finally:
                close_env(env)

    def _target(self, steps: list[str]) -> list[int]:
        return self.policy.encode("".join(steps)) + ([self.policy.eos_id] if self.cfg.end_token else [])

    def __call__(self, episodes: list[Episode]) -> list[list[float]]:
        t0 = time.perf_counter()
        cfg = self.cfg
        pairs: list[tuple[list[int], list[int]]] = []
        index: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}

        def row(context: list[int], target: list[int]) -> int:
            """The pair's row; identical pairs (a group's shared first steps, one prompt's PFR_0) are scored once."""
            key = (tuple(context), tuple(target))
            if key not in index:
                index[key] = len(pairs)
                pairs.append((context, target))
            return index[key]

        plans = []
        for e in episodes:
            ids = list(e.turns[-1].action_ids) if e.turns else []
            prompt = prompt_ids(e, self.policy.bos_id) or [self.policy.bos_id if self.policy.bos_id is not None
                                                            else self.policy.eos_id]
            gold = gold_steps(self.gold_of(e), cfg.delimiter)
            ends = boundaries([self._token_text(i) for i in ids], cfg.delimiter)[: max(len(gold) - 1, 0)]
            rows = [row(prompt + ids[:end], self._target(gold[k:])) for k, end in enumerate(ends, start=1)]
            base = row(prompt, self._target(gold)) if cfg.combine == "progress" and ends else None
            plans.append((e.num_action_tokens - len(ids), len(ids), ends, rows, base))
        scored = continuation_logprobs(self.policy, pairs) if pairs else []
        values = [pfr_value(lp, cfg.variant) for lp in scored]
        out = []
        for earlier, n, ends, rows, base in plans:
            pfr = [values[r] for r in rows]
            out.append([0.0] * earlier + place(pfr, ends, n, cfg.combine, values[base] if base is not None else 0.0))
            self._add("steps", len(pfr))
            self._add("pfr", sum(pfr))
            self._add("pfr_first", pfr[0] if pfr else 0.0)
            self._add("scored_episodes", float(bool(pfr)))
        self._add("episodes", len(episodes))
        self._add("rows", len(pairs))
        self._add("tokens", sum(len(t) for _, t in pairs))
        self._add("seconds", time.perf_counter() - t0)
        return out

    def _add(self, key: str, value: float) -> None:
        self.stats[key] = self.stats.get(key, 0.0) + float(value)

    def _token_text(self, token_id: int) -> str:
        return self.policy.decode([token_id])

    def step_metrics(self) -> dict[str, float]:
        s, self.stats = self.stats, {}
        return {"time/score/p2s_s": s.get("seconds", 0.0), "p2s/rows": s.get("rows", 0.0),
                "p2s/tokens": s.get("tokens", 0.0),
                "p2s/steps_per_episode": s.get("steps", 0.0) / max(s.get("episodes", 0.0), 1.0),
                "p2s/pfr": s.get("pfr", 0.0) / max(s.get("steps", 0.0), 1.0),
                "p2s/pfr_first": s.get("pfr_first", 0.0) / max(s.get("scored_episodes", 0.0), 1.0)}
