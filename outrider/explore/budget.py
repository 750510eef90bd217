"""Per-prompt rollout budgets: Knapsack RL [141] and its uniform baseline, over one pool of recurring prompts.

Both allocations are one explore piece, `budget`, so they see the same prompts in the same order and differ only
in how the step's ``prompts_per_step · group_size`` rollouts are split:

- ``uniform``: every prompt gets ``group_size`` (GRPO);
- ``knapsack``: each prompt's success rate p from its earlier rollouts (the piece's state) sets the value of
  giving it N rollouts, and a knapsack over the step's prompts maximises the total value under the same total;
- ``xrpo``: XRPO's phased allocation [134], sampled in rounds within the step: ``min_n`` each, then phases that
  go to the prompts whose t-interval would shrink most (plus an exploration bonus), with all-fail prompts seeded
  by solved exemplars (`outrider.explore.xrpo`; the exemplar bank is state too).

Prompts recur: at the first step the piece draws ``pool`` train seeds and then walks through them in epochs,
each epoch in a fresh random order, ``prompts_per_step`` seeds a step. The allocator follows the authors' code
(liziniu/KnapsackRL, ``verl/trainer/ppo/exploration_utils.py`` ``sampling_budget_by_knapsack`` and
``rl_dataset.py`` ``update_sample_state`` / ``get_sample_state``); see `allocate` and `SuccessTracker`.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from outrider.data import Episode, groups_of, has_reward_variance
from outrider.explore import EXPLORE, ExploreConfig, ExploreContext
from outrider.explore.xrpo import ExemplarBank, xrpo_step
from outrider.registry import BuildContext, Piece


def knapsack_value(p: float, n: int) -> float:
    """The value of n rollouts for a prompt of success rate p [141]: (1 − pⁿ − (1−p)ⁿ)·p·(1−p)², the chance
    that the group's rewards differ (a non-zero GRPO gradient) times the authors' information term p(1−p)²."""
    return (1.0 - p ** n - (1.0 - p) ** n) * p * (1.0 - p) ** 2


def solve_dp(rates: list[float], min_n: int, extra_max: int, budget: int) -> list[int]:
    """Extra rollouts (beyond ``min_n`` each) for prompts with 0 < p < 1, at most ``extra_max`` each, spending
    at most ``budget``: the authors' DP, maximising Σ_i v(k_i) with v(k) = knapsack_value(p, k + min_n) for k ≥ 1
    and v(0) = 0 (their code's choice: the value at min_n alone is not counted). Ties go to the smaller k, as in
    their loop. The budget the DP cannot place (every prompt at its cap) is spread evenly, as they do."""
    n_items = len(rates)
    out = [0] * n_items
    if budget <= 0 or n_items == 0:
        return out
    dp = np.full((n_items + 1, budget + 1), -np.inf)
    dp[0, 0] = 0.0
    choice = np.zeros((n_items + 1, budget + 1), dtype=np.int64)
    for i, p in enumerate(rates, start=1):
        # candidates[k, w] = dp[i−1, w−k] + v(k), k = 0..extra_max; argmax takes the first (smallest k) maximum
        candidates = np.full((extra_max + 1, budget + 1), -np.inf)
        candidates[0] = dp[i - 1]
        for k in range(1, min(extra_max, budget) + 1):
            candidates[k, k:] = dp[i - 1, : budget + 1 - k] + knapsack_value(p, k + min_n)
        choice[i] = candidates.argmax(0)
        dp[i] = candidates.max(0)
    usable = budget
    while usable > 0 and dp[n_items, usable] == -np.inf:
        usable -= 1
    w = usable
    for i in range(n_items, 0, -1):
        out[i - 1] = int(choice[i, w])
        w -= out[i - 1]
    left = budget - usable
    for j in range(n_items):
        out[j] += left // n_items + (1 if j < left % n_items else 0)
    return out


def allocate(rates: list[float | None], n: int, min_n: int, max_n: int, alpha: float = 0.9,
             negative_n: int | None = None, positive_n: int | None = None,
             allow_fallback: bool = True) -> tuple[list[int], dict[str, float]]:
    """Rollouts per prompt for a step of B prompts and a total of B·n, after the authors' code [141]:

    - a prompt without an estimate (None) gets n; p = 0 gets ``negative_n`` and p = 1 ``positive_n`` (both
      default ``min_n``); 0 < p < 1 gets ``min_n`` and takes part in the knapsack;
    - no such prompt: what is left goes evenly to the p = 0 prompts, those without an estimate included (as in
      their code, whose rate array holds 0 for them); none: every prompt gets n;
    - else, with ``allow_fallback``, if the prompts' estimated cost Σ min(max_n, log(1−α)/log(max(p, 1−p))) is
      below what is left, the excess goes evenly to the p = 0 prompts (none: to the other non-knapsack prompts;
      none of those either: not done, where the authors' code would divide by zero) and the knapsack gets the
      estimated cost; `solve_dp` places it, each prompt at most ``max_n`` in all.

    Returns the budgets (summing to B·n) and ``fallback`` (1 if the excess was moved) for the metrics."""
    negative_n = min_n if negative_n is None else negative_n
    positive_n = min_n if positive_n is None else positive_n
    size, total = len(rates), len(rates) * n
    budget = [0] * size
    effective: list[int] = []
    costs: dict[int, float] = {}
    for i, p in enumerate(rates):
        if p is None:
            budget[i] = n
        elif 0 < p < 1:
            budget[i] = min_n
            effective.append(i)
            costs[i] = float(np.log(1 - alpha) / np.log(max(p, 1 - p)))
        else:
            budget[i] = negative_n if p == 0 else positive_n
    left = total - sum(budget)
    # as in their code, a prompt without an estimate counts as p = 0 here (its rate array holds 0 for it)
    zero = [i for i, p in enumerate(rates) if p is None or p == 0]
    fallback = 0.0
    if left > 0 and not effective:
        if not zero:
            return [n] * size, {"fallback": fallback}
        for j, i in enumerate(zero):
            budget[i] += left // len(zero) + (1 if j < left % len(zero) else 0)
        return budget, {"fallback": fallback}
    estimated = sum(int(min(max_n, costs[i])) for i in effective)
    others = zero or [i for i in range(size) if i not in effective]
    if allow_fallback and estimated < left and others:
        fallback, excess = 1.0, left - estimated
        for j, i in enumerate(others):
            budget[i] += excess // len(others) + (1 if j < excess % len(others) else 0)
        left = estimated
    extra = solve_dp([rates[i] for i in effective], min_n, max_n - min_n, left)  # type: ignore[misc]
    for i, k in zip(effective, extra):
        budget[i] += k
    return budget, {"fallback": fallback}


class SuccessTracker:
    """Per-prompt success estimates as the authors keep them [141] (``update_sample_state``): every group's
    0/1 outcomes are appended; the estimate is the mean of the latest group, or of the latest
    ``buffer_length`` outcomes when the group had fewer (their robust epoch estimation); a prompt is estimated
    once it has ``min_count`` outcomes (their ``min_buffer_length``), else it gets the default budget."""

    def __init__(self, min_count: int = 8, buffer_length: int = 16):
        self.min_count, self.buffer_length = min_count, buffer_length
        self.history: dict[int, list[float]] = {}  # all outcomes of a prompt, oldest first
        self.estimate: dict[int, float] = {}

    def update(self, key: int, outcomes: list[float]) -> None:
        history = self.history.setdefault(key, [])
        history.extend(outcomes)
        recent = outcomes if len(outcomes) >= self.buffer_length else history[-self.buffer_length:]
        self.estimate[key] = float(np.mean(recent))

    def rate(self, key: int) -> float | None:
        return self.estimate[key] if len(self.history.get(key, ())) >= self.min_count else None

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()}, "estimate": dict(self.estimate)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {int(k): list(v) for k, v in state["history"].items()}
        self.estimate = {int(k): float(v) for k, v in state["estimate"].items()}


class BudgetConfig(ExploreConfig):
    allocation: Literal["knapsack", "uniform", "xrpo"] = Field(
        "knapsack", description="knapsack: Knapsack RL's per-prompt budgets [141]; uniform: group_size each (GRPO "
                                "over the same prompt pool, the baseline); xrpo: XRPO's phased allocation by "
                                "t-interval shrinkage and in-context seeding [134], sampled in rounds.")
    pool: int = Field(64, ge=1, description="Train seeds drawn at the first step and walked through in epochs "
                                            "(each in a fresh random order), so prompts recur and their success "
                                            "rates can be estimated.")
    min_n: int = Field(2, ge=1, description="Rollouts every prompt with 0 < p < 1 gets before the knapsack "
                                            "(the authors' MIN_N).")
    max_n: int = Field(128, ge=1, description="Most rollouts the knapsack gives one prompt (the authors' MAX_N); "
                                              "the fallback's excess may go beyond it.")
    negative_n: int | None = Field(None, ge=1, description="Rollouts for a prompt with p = 0 (null: min_n).")
    positive_n: int | None = Field(None, ge=1, description="Rollouts for a prompt with p = 1 (null: min_n).")
    alpha: float = Field(0.9, gt=0, lt=1, description="Confidence of the cost estimate log(1−α)/log(max(p, 1−p)) "
                                                      "that decides the fallback.")
    allow_fallback: bool = Field(True, description="Move the budget the knapsack prompts are not expected to "
                                                   "need to the p = 0 prompts (the authors' default).")
    min_count: int = Field(8, ge=0, description="Outcomes a prompt needs before its estimate is used "
                                                "(min_buffer_length); before that it gets group_size.")
    buffer_length: int = Field(16, ge=1, description="A group smaller than this is estimated over the prompt's "
                                                     "latest this-many outcomes (reward_buffer_length).")

    phases: int = Field(2, ge=1, description="xrpo: rounds after the first min_n each, the rest of the step's "
                                             "rollouts split evenly over them.")
    alpha_t: float = Field(0.05, gt=0, lt=1, description="xrpo: the t-interval's level, h = t_{1-alpha_t/2, n-1}"
                                                         "·s/sqrt(n).")
    explore_bonus: float = Field(0.1, ge=0, description="xrpo: λ of the exploration bonus λ·sqrt(log(1+T)/n), T "
                                                        "the RL step (0: off).")
    seeding: bool = Field(True, description="xrpo: a prompt whose min_n first rollouts all failed gets seed_n "
                                            "rollouts with solved exemplars in context (off-policy rows).")
    seed_n: int = Field(2, ge=1, description="xrpo: seeded rollouts per all-fail prompt (out of the step's total).")
    exemplars: int = Field(2, ge=1, description="xrpo: solved exemplars (other prompts' successes, prompt and "
                                                "answer, one per line) shown before a seeded prompt.")
    bank_size: int = Field(64, ge=1, description="xrpo: prompts whose latest success is kept as an exemplar.")

    @model_validator(mode="after")
    def _sizes(self) -> "BudgetConfig":
        for name in ("min_n", "negative_n", "positive_n"):
            value = getattr(self, name)
            if value is not None and value > self.group_size:
                raise ValueError(f"{name} ({value}) must not exceed group_size ({self.group_size}): the step's "
                                 "total is prompts_per_step · group_size")
        if self.max_n < self.min_n:
            raise ValueError(f"max_n ({self.max_n}) must be at least min_n ({self.min_n})")
        return self


@EXPLORE.register("budget", config=BudgetConfig)
class Budget(Piece):
    """Knapsack RL [141] (or uniform) rollout budgets over a recurring prompt pool: each step's prompts share
    prompts_per_step · group_size rollouts, split by the value (1 − pᴺ − (1−p)ᴺ)·p(1−p)² of N rollouts for a
    prompt of estimated success rate p; groups differ in size. Estimates, pool and epoch order are its state."""

    def __init__(self, cfg: BudgetConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        self.tracker = SuccessTracker(cfg.min_count, cfg.buffer_length)
        self.bank = ExemplarBank(cfg.bank_size)
        self.pool: list[int] = []
        self.order: list[int] = []
        self.position = 0
        self.epoch = 0

    def _next_prompts(self, ctx: ExploreContext) -> list[int]:
        cfg: BudgetConfig = self.cfg
        if not self.pool:
            self.pool = ctx.next_seeds(cfg.pool)
        out: list[int] = []
        while len(out) < cfg.prompts_per_step:
            if self.position >= len(self.order):
                rng = np.random.default_rng([int(ctx.rng.integers(2**31)), self.epoch])
                self.order = [self.pool[i] for i in rng.permutation(len(self.pool))]
                self.position, self.epoch = 0, self.epoch + 1
            out.append(self.order[self.position])
            self.position += 1
        return out

    def __call__(self, ctx: ExploreContext) -> tuple[list[Episode], dict[str, float]]:
        cfg: BudgetConfig = self.cfg
        seeds = self._next_prompts(ctx)
        t0 = time.perf_counter()
        rates = [self.tracker.rate(s) for s in seeds]
        if cfg.allocation in ("uniform", "xrpo"):  # xrpo allocates in its rounds, below
            sizes, info = [cfg.group_size] * len(seeds), {"fallback": 0.0}
        else:
            sizes, info = allocate(rates, cfg.group_size, cfg.min_n, cfg.max_n, cfg.alpha, cfg.negative_n,
                                   cfg.positive_n, cfg.allow_fallback)
        allocation_s = time.perf_counter() - t0
        extra: dict[str, float] = {}
        if cfg.allocation == "xrpo":
            episodes, extra = xrpo_step(ctx, seeds, cfg, self.bank)
            sizes = [sum(e.group_id == g for e in episodes) for g in dict.fromkeys(e.group_id for e in episodes)]
            seed_of = {e.group_id: e.seed for e in episodes}
        else:
            starts = [start for seed, size in zip(seeds, sizes) if size > 0
                      for start in ctx.group_starts([seed], size)]
            episodes = ctx.rollout(starts)
            ctx.score(episodes)
            seed_of = {start.group_id: start.seed for start in starts}
        groups = groups_of(episodes)
        for group_id, group in groups.items():
            self.tracker.update(seed_of[group_id], [float(e.success) for e in group if e.origin == "on_policy"])
        known = [r for r in rates if r is not None]
        return episodes, {
            "explore/groups_sampled": float(len(groups)),
            "explore/rollouts": float(len(episodes)),
            "explore/informative_groups": sum(has_reward_variance(g) for g in groups.values()) / max(len(groups), 1),
            "explore/group_size_max": float(max(sizes)), "explore/group_size_min": float(min(sizes)),
            "explore/estimated_prompts": len(known) / len(seeds),
            "explore/estimated_p0": sum(r == 0 for r in known) / len(seeds),
            "explore/estimated_p1": sum(r == 1 for r in known) / len(seeds),
            "explore/budget_fallback": info["fallback"], "explore/epoch": float(self.epoch),
            "time/explore/allocation_s": allocation_s, **extra,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict(), "pool": list(self.pool), "order": list(self.order),
                "position": self.position, "epoch": self.epoch, "bank": self.bank.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self.pool, self.order = list(state["pool"]), list(state["order"])
        self.position, self.epoch = int(state["position"]), int(state["epoch"])
        self.bank.load_state_dict(state.get("bank", {}))
