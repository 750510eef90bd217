"""PAV [139]: process rewards as progress under a prover policy μ, estimated by Monte-Carlo rollouts of μ.

A response is cut into steps a_1 … a_K (after each `delimiter` token); s_h is the prompt plus a_1 … a_{h−1}. The
step's progress is μ's advantage ``A^μ(s_h, a_h) = Q^μ(s_h, a_h) − V^μ(s_h) = V^μ(s_{h+1}) − V^μ(s_h)`` (text
transitions are deterministic), with ``V^μ(s)`` the chance that μ, continuing from s, ends with a right answer:
the mean verifier reward of `rollouts` continuations sampled from μ (the task's own env scores them). After the
last step the response is complete, so ``V^μ(s_{K+1})`` is the response's own outcome (no rollout). [139]'s RL
reward is ``Q^π(s_h, a_h) + α A^μ(s_h, a_h)``: the recipe lists the verifier and `pav` with weight α, and a credit
that keeps the step rewards on their steps (`outcome_plus_dense`) gives each token of step h the outcome advantage
plus α A^μ_h. Summed over steps the progress telescopes to ``outcome − V^μ(s_1)``, which a group baseline removes:
PAV only acts through per-step credit.

μ is loaded from a directory (an earlier checkpoint, or the warm start) and must share the policy's tokenizer: the
prefixes are the policy's token ids. Identical prefixes within a step (the prompt, shared first steps of a group)
are rolled out once. The rollouts' generator rides in checkpoints. Cost per step: ``time/score/pav_s``,
``pav/rollouts`` (continuations sampled) and ``pav/rollout_tokens``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import Field

from outrider.data import Episode, Start
from outrider.errors import OutriderError
from outrider.registry import BuildContext, Needs, Piece
from outrider.score import SCORE, ComponentConfig


class PAVConfig(ComponentConfig):
    """Options of `pav`."""

    prover: str = Field(..., description="Directory of the prover policy μ (an earlier checkpoint or the warm "
                                         "start, e.g. runs/sft_stepsum); same tokenizer as the policy.")
    rollouts: int = Field(4, ge=1, description="Monte-Carlo continuations of μ per prefix (V^μ estimate).")
    delimiter: str = Field(",", min_length=1, description="A step ends after each action token whose text "
                                                           "contains this string.")
    temperature: float = Field(1.0, gt=0, description="μ's sampling temperature in the rollouts.")
    max_new_tokens: int = Field(24, ge=1, description="Token limit of a continuation (the recipe's own, usually).")


def step_spans(token_texts: list[str], delimiter: str) -> list[tuple[int, int]]:
    """Half-open token spans of the steps: a step ends after each token whose text contains `delimiter`; the
    tokens after the last one are the final step (none when empty)."""
    spans, start = [], 0
    for t, text in enumerate(token_texts):
        if delimiter in text:
            spans.append((start, t + 1))
            start = t + 1
    if start < len(token_texts):
        spans.append((start, len(token_texts)))
    return spans


def progress(values: list[float]) -> list[float]:
    """``A_h = V(s_{h+1}) − V(s_h)`` for h = 1 … K from the K + 1 values ``V(s_1) … V(s_{K+1})``."""
    return [values[h + 1] - values[h] for h in range(len(values) - 1)]


def dense_rewards(advantages: list[float], spans: list[tuple[int, int]], n: int) -> list[float]:
    """Step h's advantage on every token of its span, except the episode's last action token, which carries the
    outcome alone (so a credit can tell the two apart by place: `outcome_plus_dense`)."""
    out = [0.0] * n
    for a, (s, e) in zip(advantages, spans):
        for t in range(s, min(e, n - 1)):
            out[t] = a
    return out


Estimator = Callable[[list[tuple[int, list[int]]]], list[float]]


@SCORE.register("pav", config=PAVConfig, needs=Needs(level="token"))
class PAV(Piece):
    """PAV [139]: each step's progress ``A^μ_h = V^μ(s_{h+1}) − V^μ(s_h)`` under a prover μ (Monte-Carlo rollouts of
    μ from the step's prefix), on every token of the step but the response's last (module docstring).
    ``estimate`` maps ``(seed, prefix ids)`` to V̂^μ; tests replace it with a scripted prover."""

    def __init__(self, cfg: PAVConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        build = build or BuildContext()
        self.where = build.where or "pav"
        self.task, self.policy = build.task, build.policy
        self.generator = build.generator()
        self.prover = None
        self.stats: dict[str, float] = {}
        self.estimate: Estimator = self._monte_carlo

    def _load_prover(self):
        from outrider.policy.model import Policy

        path = Path(self.cfg.prover)
        if not path.is_dir():
            raise OutriderError(f"{self.where}.prover: no model directory at '{path}' (save one with outrider sft "
                                "--out DIR, or name a run's checkpoint)")
        prover = Policy.load(path, where=f"{self.where}.prover").eval().requires_grad_(False)
        if self.policy is not None and prover.tokenizer.get_vocab() != self.policy.tokenizer.get_vocab():
            raise OutriderError(f"{self.where}.prover: '{path}' has another tokenizer than the policy (the prefixes "
                                "are the policy's token ids)")
        return prover

    def _monte_carlo(self, prefixes: list[tuple[int, list[int]]]) -> list[float]:
        from outrider.explore.rollout import rollout
        from outrider.policy.sampler import SamplingParams

        if self.prover is None:
            self.prover = self._load_prover()
        n = self.cfg.rollouts
        starts = [Start(seed=seed, group_id=i, action_prefix=list(ids)) for i, (seed, ids) in enumerate(prefixes)
                  for _ in range(n)]
        params = SamplingParams(temperature=self.cfg.temperature, max_new_tokens=self.cfg.max_new_tokens)
        with torch.no_grad():
            eps = rollout(self.prover, lambda: self.task.make_env("train"), starts, params, self.generator)
        self.stats["rollouts"] += len(eps)
        self.stats["rollout_tokens"] += sum(e.num_action_tokens - e.prefix_tokens for e in eps)
        rewards = [sum(t.reward for t in e.turns) for e in eps]
        return [sum(rewards[i * n:(i + 1) * n]) / n for i in range(len(prefixes))]

    def __call__(self, episodes: list[Episode]) -> list[list[float]]:
        t0 = time.perf_counter()
        for k in ("rollouts", "rollout_tokens", "steps", "abs_advantage", "episodes"):
            self.stats.setdefault(k, 0.0)
        plans, wanted = [], {}
        for e in episodes:
            ids = [i for t in e.turns for i in t.action_ids]
            texts = [self._token_text(i) for i in ids]
            spans = step_spans(texts, self.cfg.delimiter)
            keys = [(e.seed, tuple(ids[:s])) for s, _ in spans]  # s_1 … s_K: before each step
            for key in keys:
                wanted.setdefault(key, len(wanted))
            plans.append((ids, spans, keys, sum(t.reward for t in e.turns)))
        values = self.estimate([(seed, list(p)) for seed, p in wanted]) if wanted else []
        out = []
        for ids, spans, keys, outcome in plans:
            adv = progress([values[wanted[k]] for k in keys] + [outcome])
            self.stats["steps"] += len(adv)
            self.stats["abs_advantage"] += sum(abs(a) for a in adv)
            out.append(dense_rewards(adv, spans, len(ids)))
        self.stats["episodes"] += len(episodes)
        self.stats["seconds"] = self.stats.get("seconds", 0.0) + time.perf_counter() - t0
        return out

    def _token_text(self, token_id: int) -> str:
        return self.policy.decode([token_id]) if self.policy is not None else str(token_id)

    def step_metrics(self) -> dict[str, float]:
        s, self.stats = self.stats, {}
        steps = max(s.get("steps", 0.0), 1.0)
        return {"time/score/pav_s": s.get("seconds", 0.0), "pav/rollouts": s.get("rollouts", 0.0),
                "pav/rollout_tokens": s.get("rollout_tokens", 0.0),
                "pav/abs_advantage": s.get("abs_advantage", 0.0) / steps,
                "pav/steps_per_episode": s.get("steps", 0.0) / max(s.get("episodes", 0.0), 1.0)}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

