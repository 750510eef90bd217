"""XRPO's rollout exploration [134]: phased allocation by expected uncertainty reduction, and in-context seeding
of all-fail prompts. Used by the ``budget`` piece as ``allocation: xrpo`` (`outrider.explore.budget`), so XRPO,
Knapsack RL and uniform see the same prompts in the same order at the same total rollouts per step; the
novelty-aware sharpening is the credit piece ``xrpo_sharpen`` (`outrider.credit.sharpen`).

**Phased allocation.** The step's ``B = P·G`` rollouts (P prompts, G = ``group_size``) are sampled in rounds:

1. phase 0: every prompt gets ``min_n`` rollouts;
2. seeding (``seeding: true``): a prompt whose phase-0 rollouts all failed gets ``seed_n`` more, sampled with
   ``exemplars`` solved exemplars (prompt and answer of the run's own successes on *other* prompts) shown before
   its prompt; they join its group as off-policy rows (the context is left out of the trained sequence, the
   recorded behaviour log-probs are those under it, ``origin: guided``), trained through the surrogate with the
   ratio π_θ/μ;
3. phases 1..``phases``: what is left is split evenly over the phases; within a phase the rollouts go one at a
   time to the prompt of highest priority ``Π_q = Δ̂_q(n_q) + φ_q``, n_q raised by one after each pick (s_q
   kept), at most ``max_n`` per prompt; then the phase is sampled and the statistics updated.

With r_q the rewards of prompt q's rollouts so far in this step, n_q = |r_q|, s_q their sample std:

- ``h_q(n) = t_{1−α/2, n−1}·s_q/√n`` (the half-width of the t-interval on the mean reward; scipy's t quantile);
  n < 2 has no interval: h = ∞;
- ``Δ̂_q(n) = h_q(n) − h_q(n + 1)``, the expected shrinkage from one more rollout (∞ at n = 1, 0 when s_q = 0);
- ``φ_q = λ·√(log(1 + T)/n_q)``, T the RL step: the exploration bonus, so an all-fail or all-pass prompt
  (s = 0) still draws rollouts as its n stays small.

What was checked: h, Δ̂ and Π are as the paper's abstract, a review of it and two public re-implementations state
them. Not checked (the authors' code, UIUC-MLSys/XRPO, has no stored copy here, and only the paper's first page
could be read): the constants (α = 0.05, λ = 0.1, the re-implementations' defaults), whether T counts steps or
rollouts, the number and sizes of the phases, whether n_q and s_q run over the step or the prompt's history
(here: the step, the statistics the phases refine), and the seeding's exemplar count, format and placement.
"""

from __future__ import annotations

import math
import time
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import stats

from outrider.data import Episode, Start


@lru_cache(maxsize=4096)
def t_quantile(alpha: float, dof: int) -> float:
    """``t_{1−α/2, dof}``, cached: scipy's ppf costs ~0.1 ms a call and a phase asks for it per pick and prompt."""
    return float(stats.t.ppf(1 - alpha / 2, dof))


def half_width(n: int, s: float, alpha: float) -> float:
    """``h(n) = t_{1−α/2, n−1}·s/√n`` [134]; ∞ for n < 2 (no interval); 0 for s = 0 and n ≥ 2."""
    if n < 2:
        return math.inf
    if s == 0:
        return 0.0
    return t_quantile(alpha, n - 1) * s / math.sqrt(n)


def reduction(n: int, s: float, alpha: float) -> float:
    """``Δ̂(n) = h(n) − h(n + 1)`` [134]: ∞ at n = 1, 0 when s = 0."""
    return math.inf if n < 2 else half_width(n, s, alpha) - half_width(n + 1, s, alpha)


def bonus(n: int, step: int, lam: float) -> float:
    """``φ = λ·√(log(1 + T)/n)`` [134], T the RL step; ∞ for n = 0."""
    return math.inf if n == 0 else lam * math.sqrt(math.log1p(step) / n)


def sample_std(rewards: list[float]) -> float:
    """The unbiased sample std (0 for fewer than two rewards)."""
    return float(np.std(rewards, ddof=1)) if len(rewards) > 1 else 0.0


def allocate_phase(rewards: list[list[float]], budget: int, step: int, alpha: float, lam: float,
                   max_n: int) -> list[int]:
    """One phase [134]: ``budget`` rollouts given one at a time to the prompt of highest ``Δ̂(n) + φ(n)``
    (ties to the first), its n raised by one after each pick with its s kept; a prompt at ``max_n`` takes no
    more. Returns the rollouts per prompt (summing to ``budget`` unless every prompt is at its cap)."""
    n = [len(r) for r in rewards]
    s = [sample_std(r) for r in rewards]
    extra = [0] * len(rewards)
    for _ in range(budget):
        scores = [reduction(n[i], s[i], alpha) + bonus(n[i], step, lam) if n[i] < max_n else -math.inf
                  for i in range(len(rewards))]
        best = int(np.argmax(scores))
        if scores[best] == -math.inf:
            break
        n[best] += 1
        extra[best] += 1
    return extra


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` near-equal shares, the larger ones first."""
    return [total // parts + (1 if j < total % parts else 0) for j in range(parts)]


class ExemplarBank:
    """Solved exemplars for seeding [134]: the latest successful (prompt, answer) text of each prompt (seed), at
    most ``size`` prompts, oldest dropped first. State: the ordered (seed, text) pairs."""

    def __init__(self, size: int):
        self.size = size
        self.items: dict[int, str] = {}

    def add(self, episodes: list[Episode]) -> None:
        for e in episodes:
            if e.success and e.origin == "on_policy" and e.turns:
                self.items.pop(e.seed, None)
                self.items[e.seed] = e.turns[0].observation + e.response
        while len(self.items) > self.size:
            self.items.pop(next(iter(self.items)))

    def context(self, seed: int, k: int, rng: np.random.Generator) -> str | None:
        """k exemplars of prompts other than ``seed``, drawn without replacement, one per line; None if none."""
        others = [text for s, text in self.items.items() if s != seed]
        if not others:
            return None
        picks = rng.choice(len(others), size=min(k, len(others)), replace=False)
        return "".join(others[int(i)] + "\n" for i in sorted(picks))

    def state_dict(self) -> dict[str, Any]:
        return {"items": [[s, t] for s, t in self.items.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.items = {int(s): str(t) for s, t in state.get("items", [])}


def xrpo_step(ctx: Any, seeds: list[int], cfg: Any, bank: ExemplarBank) -> tuple[list[Episode], dict[str, float]]:
    """Sample one step's rollouts in XRPO's rounds (module docstring); ``cfg`` is the budget piece's config.
    Returns the scored episodes and the piece's metrics; ``time/explore/allocation_s`` is the planning alone
    (priorities and exemplar draws), not the rounds' sampling."""
    planning = 0.0
    groups = [ctx.groups.new() for _ in seeds]
    total = len(seeds) * cfg.group_size
    episodes: list[Episode] = []
    rewards: list[list[float]] = [[] for _ in seeds]

    def run(starts: list[Start], owners: list[int]) -> list[Episode]:
        out = ctx.rollout(starts) if starts else []
        ctx.score(out)
        for i, e in zip(owners, out):
            rewards[i].append(e.total_reward())
        episodes.extend(out)
        return out

    first = min(cfg.min_n, cfg.group_size)
    run([Start(seed=s, group_id=g) for s, g in zip(seeds, groups) for _ in range(first)],
        [i for i in range(len(seeds)) for _ in range(first)])
    left = total - first * len(seeds)
    seeded, seed_success, context_chars = 0, 0, 0
    if cfg.seeding and left > 0:
        t0 = time.perf_counter()
        starts, owners = [], []
        for i, (s, g) in enumerate(zip(seeds, groups)):
            if all(not e.success for e in episodes if e.group_id == g):
                text = bank.context(s, cfg.exemplars, ctx.rng)
                for _ in range(min(cfg.seed_n, left - len(starts))) if text is not None else ():
                    starts.append(Start(seed=s, group_id=g, context=text, context_at="before_observation",
                                        origin="guided"))
                    owners.append(i)
                    context_chars += len(text)
        planning += time.perf_counter() - t0
        out = run(starts, owners)
        seeded, seed_success = len(out), sum(e.success for e in out)
        left -= len(out)
    for phase_budget in split_evenly(left, cfg.phases):
        t0 = time.perf_counter()
        extra = allocate_phase(rewards, phase_budget, ctx.step, cfg.alpha_t, cfg.explore_bonus, cfg.max_n)
        planning += time.perf_counter() - t0
        run([Start(seed=s, group_id=g) for s, g, k in zip(seeds, groups, extra) for _ in range(k)],
            [i for i, k in enumerate(extra) for _ in range(k)])
    bank.add(episodes)
    return episodes, {"explore/seeded_rollouts": float(seeded),
                      "explore/seeded_success": seed_success / max(seeded, 1),
                      "explore/seeded_prompts": float(len({e.group_id for e in episodes if e.origin == "guided"})),
                      "explore/context_chars": context_chars / max(seeded, 1),
                      "explore/exemplars": float(len(bank.items)), "time/explore/allocation_s": planning}
