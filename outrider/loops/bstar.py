"""B-STaR [32]: rounds of rejection-sampling fine-tuning whose sampling temperature and reward threshold are chosen
each round to balance exploration and exploitation; STaR is the same loop with a one-point grid, and ReGFT [104]
the same loop with partial references as hints on the prompts it cannot solve.

A round (one run step):

1. **Calibrate** (when the grid has more than one point): sample ``calibration_samples`` responses for each of the
   ``calibration_prompts`` fixed train prompts at every temperature of ``temperatures``, score them, and pick the
   (T, τ) that maximises the balance score over the calibration prompts; ties go to the first in grid order (the
   lowest T, then the lowest τ), as the authors' scan keeps the first maximum.
2. **Sample** the round's prompts (the explore piece, e.g. ``group``: prompts_per_step × group_size) at T.
3. **Select** per prompt the distinct responses whose total reward is above τ (``r > τ``, strictly, as in the
   authors' code) and **fine-tune** on them with the learner's terms (``nll``) at temperature 1.

Balance score, per query i [32] (authors' code, ``determine_hyper.py`` ``cal_modi_acc_soft``)::

    bs_i = min(n'_i / n*, 1) · n'_i / n_i

with n_i the distinct selected responses of query i, n'_i the distinct selected ones that are correct (the env's
verdict: the oracle, which the reward may only approximate) and n* = 8. The score is the mean of bs_i over the
queries with at least one selected response (the authors' code leaves a query with none out of the mean); nothing
selected anywhere scores 0. The paper's grids: T ∈ {0.50, 0.55, …, 1.20}, τ ∈ {−1.00, −0.99, …, 1.00} (its reward
is PRM/5 + ORM); it searches T on a 1k-query dev subset with 64 samples each. With a 0/1 verifier as the only reward
the τ grid has two outcomes (everything, or the correct responses) and only T is really searched.

Simplifications: the authors' code re-chooses τ on the full round's samples at the chosen T and caps responses per
query to reach a target data size; here τ comes from the calibration subset with T and there is no cap.

ReGFT [104] (``hint_fraction`` > 0): a round's prompts whose every sample failed are sampled again, as many times,
with a partial reference in context (the task's demonstration cut at ⌈f·L⌉ characters, shown to the sampler only);
their selected responses join the round's fine-tuning data without the hint (off-policy rows, origin ``guided``;
the NLL term does not read behaviour log-probs). Run before RL, the fine-tuned checkpoint is the RL run's
``policy.model``.

Monitors, per round (on the round's samples): ``bstar/pass_at_k_s/<S>`` (Pass@K-S: the share of prompts with at
least S correct among their K samples), ``bstar/unique_correct`` (distinct correct responses per prompt),
``bstar/precision`` (share of the selected responses that are correct), ``bstar/balance_score``, the chosen
``bstar/temperature`` and ``bstar/threshold``, and the calibration's cost ``time/calibration_s``.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Annotated, Any, Sequence

import numpy as np
import torch
from pydantic import Field

from outrider.data import Episode, GroupIds, Start, groups_of
from outrider.errors import OutriderError
from outrider.explore.rollout import rollout
from outrider.loops import LOOPS, Run
from outrider.loops.rl import collect
from outrider.loops.self_training import fine_tune, require_terms
from outrider.observe.metrics import episode_metrics
from outrider.policy.sft import partial_hint
from outrider.registry import BuildContext, Piece, PieceConfig
from outrider.score import compose

PAPER_TEMPERATURES = [round(0.50 + 0.05 * i, 2) for i in range(15)]  # 0.50 … 1.20 (train_bstar.sh)
PAPER_THRESHOLDS = [round(-1.0 + 0.01 * i, 2) for i in range(201)]  # −1.00 … 1.00 (determine_hyper.py)
CALIBRATION_SEED = 3 * 10**7  # calibration prompts' seed stream, apart from the explore piece's per-step draws
HINT_STREAM = 10**6  # the hinted resampling's generator stream (calibration streams use the grid's indices)

Sample = tuple[str, float, bool]  # (response, total reward, correct by the env's verdict)


class BStarConfig(PieceConfig):
    """Options of the `bstar` loop."""

    temperatures: list[Annotated[float, Field(gt=0)]] = Field(default_factory=lambda: list(PAPER_TEMPERATURES), min_length=1,
                                      description="Sampling temperatures searched each round (the paper's 0.50 to "
                                                  "1.20 by 0.05); one value: fixed (STaR).")
    thresholds: list[float] | None = Field(None, min_length=1,
                                           description="Reward thresholds τ searched each round (a response is "
                                                       "kept when its total reward > τ); null: the paper's −1.00 to "
                                                       "1.00 by 0.01; one value: fixed (STaR).")
    n_star: int = Field(8, ge=1, description="n*: the balance score's cap on distinct correct responses per query "
                                             "(the authors' code: 8).")
    calibration_prompts: int = Field(16, ge=1, description="Train prompts the grid is searched on (fixed for the "
                                                           "run; the paper: a 1k-query dev subset).")
    calibration_samples: int = Field(16, ge=1, description="Samples per calibration prompt at each temperature (the "
                                                           "paper: 64).")
    hint_fraction: float = Field(0.0, ge=0, lt=1, description="ReGFT [104]: on a round's prompts whose every "
                                                               "sample failed, sample as many again with the first "
                                                               "⌈f·L⌉ characters of the task's demonstration (L its "
                                                               "length) as sampler-only context, and keep their "
                                                               "correct ones too, trained without the hint (0: off).")
    hint_template: str = Field("Hint: {hint}\n", description="The hint's text before the observation; {hint} is "
                                                             "the cut demonstration (policy.warm_start's "
                                                             "hint_template, so a warm start with hint_fraction "
                                                             "teaches the model to read it).")
    pass_s: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 2, 4], min_length=1,
                              description="S values of the logged Pass@K-S (≥ S correct among a prompt's K "
                                          "samples).")


def select_unique(samples: Sequence[Sample], threshold: float) -> list[int]:
    """Indices of the distinct responses (first occurrence) whose reward is > `threshold`."""
    seen, keep = set(), []
    for i, (response, reward, _) in enumerate(samples):
        if reward > threshold and response not in seen:
            seen.add(response)
            keep.append(i)
    return keep


def query_balance(samples: Sequence[Sample], threshold: float, n_star: int) -> float | None:
    """``bs_i = min(n'_i / n*, 1) · n'_i / n_i`` of one query; None when nothing is selected (left out of the mean)."""
    keep = select_unique(samples, threshold)
    if not keep:
        return None
    correct = sum(samples[i][2] for i in keep)
    return min(correct / n_star, 1.0) * correct / len(keep)


def balance_score(queries: Sequence[Sequence[Sample]], threshold: float, n_star: int) -> float:
    """Mean ``bs_i`` over the queries with at least one selected response; 0 when no query has one [32]."""
    scores = [s for s in (query_balance(q, threshold, n_star) for q in queries) if s is not None]
    return float(np.mean(scores)) if scores else 0.0


def choose(by_temperature: dict[float, Sequence[Sequence[Sample]]], thresholds: Sequence[float],
           n_star: int) -> tuple[float, float, float]:
    """The (T, τ, score) of the highest balance score over the grid; the first maximum in grid order wins."""
    best = (float("nan"), float("nan"), float("-inf"))
    for t, queries in by_temperature.items():
        for tau in thresholds:
            score = balance_score(queries, tau, n_star)
            if score > best[2]:
                best = (t, tau, score)
    return best


def as_samples(episodes: Sequence[Episode]) -> list[list[Sample]]:
    """Each group's episodes as (response, total reward, success) samples, in group order."""
    return [[(e.response, e.total_reward(), bool(e.success)) for e in g] for g in groups_of(list(episodes)).values()]


def pass_at_k_s(queries: Sequence[Sequence[Sample]], s: int) -> float:
    """Pass@K-S: the share of queries with at least S correct among their K samples [32]."""
    return float(np.mean([sum(c for _, _, c in q) >= s for q in queries])) if queries else 0.0


def unique_correct(queries: Sequence[Sequence[Sample]]) -> float:
    """Mean number of distinct correct responses per query."""
    return float(np.mean([len({r for r, _, c in q if c}) for q in queries])) if queries else 0.0


def hinted_starts(task: Any, failed: Sequence[Sequence[Episode]], fraction: float, template: str,
                  first_group: int) -> list[Start]:
    """As many hinted starts as each failed group has members, each group under a new id from `first_group` on: the
    task's demonstration of the group's seed, cut at `fraction`, as context before the observation (removed from
    the trained sequence by the rollout, so the episodes are off-policy: origin ``guided``)."""
    demos = task.demonstrations([g[0].seed for g in failed])
    return [Start(g[0].seed, first_group + k, context=template.format(hint=partial_hint(d.turns[0][1], fraction)),
                  context_at="before_observation", origin="guided")
            for k, (g, d) in enumerate(zip(failed, demos)) for _ in g]


def hinted_metrics(episodes: Sequence[Episode]) -> dict[str, float]:
    """ReGFT's hinted resampling in numbers: ``regft/hinted_success`` (share of hinted samples correct),
    ``regft/hinted_solved`` (share of the all-fail prompts with at least one correct hinted sample) and
    ``regft/hinted_tokens`` (action tokens sampled under hints, the extra sampling cost)."""
    groups = list(groups_of(list(episodes)).values())
    return {"regft/hinted_success": sum(e.success for e in episodes) / max(len(episodes), 1),
            "regft/hinted_solved": sum(any(e.success for e in g) for g in groups) / max(len(groups), 1),
            "regft/hinted_tokens": float(sum(e.num_action_tokens for e in episodes))}


@LOOPS.register("bstar", config=BStarConfig)
class BStar(Piece):
    """B-STaR rounds [32] (one round per step): calibrate (T, τ) by the balance score on a fixed prompt subset,
    sample the round's prompts at T, fine-tune on the distinct responses with reward > τ. A one-point grid
    (``temperatures: [0.7]``, ``thresholds: [0.5]``) is STaR: no calibration. State in checkpoints: the round
    index, the calibration prompts and every round's chosen (T, τ, score) and selected count."""

    cfg: BStarConfig

    def __init__(self, cfg: BStarConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        require_terms(build, "bstar")
        if cfg.hint_fraction and build is not None and not hasattr(build.task, "demonstrations"):
            raise OutriderError("loop bstar: hint_fraction needs a task with demonstrations (valid: 0 here)")
        seed = build.seed if build else 0
        rng = np.random.default_rng([seed, CALIBRATION_SEED])
        self.calibration_seeds = [int(x) for x in rng.integers(0, 2**31 - 1, cfg.calibration_prompts)]
        self.rounds: list[dict[str, float]] = []

    @property
    def thresholds(self) -> list[float]:
        return PAPER_THRESHOLDS if self.cfg.thresholds is None else self.cfg.thresholds

    @property
    def searches(self) -> bool:
        return len(self.cfg.temperatures) * len(self.thresholds) > 1

    def calibrate(self, run: Run, step: int) -> tuple[float, float, float]:
        """Sample the calibration prompts at every grid temperature and return the best (T, τ, score)."""
        by_t: dict[float, list[list[Sample]]] = {}
        groups = GroupIds()
        starts = [Start(seed, g) for seed in self.calibration_seeds
                  for g in [groups.new()] for _ in range(self.cfg.calibration_samples)]
        for i, t in enumerate(self.cfg.temperatures):
            stream = np.random.SeedSequence([run.seed, CALIBRATION_SEED, step, i]).generate_state(1)[0]
            generator = torch.Generator(device=run.device).manual_seed(int(stream))
            episodes = rollout(run.policy, run.env_source("train"), starts, replace(run.params, temperature=t),
                               generator, run.task.max_turns)
            compose(episodes, run.pieces.components)
            by_t[t] = as_samples(episodes)
        return choose(by_t, self.thresholds, self.cfg.n_star)

    def __call__(self, run: Run, step: int) -> dict[str, float]:
        t_step = time.perf_counter()
        cfg, metrics = self.cfg, {}
        if self.searches:
            t0 = time.perf_counter()
            temperature, threshold, calib_score = self.calibrate(run, step)
            metrics["time/calibration_s"] = time.perf_counter() - t0
            metrics["bstar/calibration_balance_score"] = calib_score
        else:
            temperature, threshold = cfg.temperatures[0], self.thresholds[0]
        timers = {"sample_s": 0.0, "sample_tokens": 0.0}
        episodes, explore_metrics = collect(replace(run, params=replace(run.params, temperature=temperature)),
                                            step, timers)
        metrics.update(explore_metrics)
        metrics.update(episode_metrics(episodes))
        queries = as_samples(episodes)
        by_group = list(groups_of(episodes).values())
        kept = [g[i] for g, q in zip(by_group, queries) for i in select_unique(q, threshold)]
        if cfg.hint_fraction:
            kept += self.hinted(run, by_group, temperature, threshold, step, metrics, timers)
        correct_kept = sum(e.success for e in kept)
        metrics.update({"bstar/temperature": temperature, "bstar/threshold": threshold,
                        "bstar/balance_score": balance_score(queries, threshold, cfg.n_star),
                        "bstar/unique_correct": unique_correct(queries),
                        "bstar/precision": correct_kept / len(kept) if kept else 0.0,
                        "bstar/selected": float(len(kept)),
                        "bstar/selected_frac": len(kept) / max(len(episodes), 1)})
        for s in cfg.pass_s:
            metrics[f"bstar/pass_at_k_s/{s}"] = pass_at_k_s(queries, s)
        t_train, train_tokens = time.perf_counter(), 0.0
        if kept:  # supervised likelihood under the model itself (temperature 1), whatever T sampled
            learned, train_tokens = fine_tune(run, kept, step, 1.0)
            metrics.update(learned)
        self.rounds.append({"step": float(step), "temperature": temperature, "threshold": threshold,
                            "selected": float(len(kept))})
        metrics["bstar/round"] = float(len(self.rounds))
        metrics.update(run.timing(timers["sample_s"], timers["sample_tokens"], time.perf_counter() - t_train,
                                  train_tokens, time.perf_counter() - t_step))
        return metrics

    def hinted(self, run: Run, groups: list[list[Episode]], temperature: float, threshold: float, step: int,
               metrics: dict[str, float], timers: dict[str, float]) -> list[Episode]:
        """ReGFT [104]: resample the groups with no success under a partial reference and return the distinct
        selected hinted episodes. Metrics: ``regft/hinted_prompts``, those of `hinted_metrics`,
        ``regft/hinted_selected``; the hinted tokens count in the step's sampled tokens."""
        failed = [g for g in groups if not any(e.success for e in g)]
        metrics["regft/hinted_prompts"] = float(len(failed))
        if not failed:
            return []
        t0 = time.perf_counter()
        starts = hinted_starts(run.task, failed, self.cfg.hint_fraction, self.cfg.hint_template,
                               max(e.group_id for g in groups for e in g) + 1)
        stream = np.random.SeedSequence([run.seed, CALIBRATION_SEED, step, HINT_STREAM]).generate_state(1)[0]
        episodes = rollout(run.policy, run.env_source("train"), starts, replace(run.params, temperature=temperature),
                           torch.Generator(device=run.device).manual_seed(int(stream)), run.task.max_turns)
        compose(episodes, run.pieces.components)
        timers["sample_s"] += time.perf_counter() - t0
        hinted = list(groups_of(episodes).values())
        kept = [g[i] for g, q in zip(hinted, as_samples(episodes)) for i in select_unique(q, threshold)]
        metrics.update(hinted_metrics(episodes))
        timers["sample_tokens"] += metrics["regft/hinted_tokens"]
        metrics["regft/hinted_selected"] = float(len(kept))
        return kept

    def state_dict(self) -> dict[str, object]:
        return {"calibration_seeds": list(self.calibration_seeds), "rounds": [dict(r) for r in self.rounds]}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.calibration_seeds = [int(s) for s in state["calibration_seeds"]]  # type: ignore[union-attr]
        self.rounds = [dict(r) for r in state["rounds"]]  # type: ignore[union-attr]
