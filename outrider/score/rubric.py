"""Rubric rewards: partial credit from the named checks a task's checker reports (the task's ``criteria`` hook).

A rubric is the dict ``criteria(env, response) -> {name: passed}`` of the task (stepsum: ``format``, ``step_1`` …
``step_{n−1}``, ``answer``). Two components score it (episode level):

- ``rubric`` (RGR's weighted rubric score [50]): fixed weights per criterion name (glob patterns, ``step_*``),
  ``R = Σ_c w_c·1[c passed] / Σ_c w_c`` over the problem's criteria, so a response that meets every criterion
  scores 1 and one that meets none 0. With the explore piece ``herl`` (rubric-guided refinements mixed into the
  group as off-policy rows) it is RGR-GRPO (recipe ``rgr_stepsum``).
- ``verpo`` (VeRPO [66]): the weights are difficulties estimated from pass statistics during training. Per
  criterion name c, pass counts P_c and trial counts N_c (``statistics: running``: over all steps so far, each
  step's counts first multiplied by ``decay``, kept in checkpoints; ``group``: within the episode's own group, as
  the paper estimates a unit test's pass rate over a prompt's sampled group), smoothed
  ``ρ_c = (P_c + α)/(N_c + 2α)``; difficulty ``d_c = 1 − ρ_c`` (a rarer pass weighs more), normalised over the
  problem's criteria, ``w_c = d_c / Σ_c' d_c'`` (uniform when every d is 0), dense credit
  ``D = Σ_c w_c·1[c passed] ∈ [0, 1]``; combined with the global pass/fail O (the env's verifier, summed over
  turns): ``add``: ``R = O + β·D``; ``gate``: ``R = O`` when O ≥ 1 else ``β·D`` (partial credit only for failures).
  The running counts include the current step's (updated before scoring, so a step's weights are known from its
  own batch and the past).

VeRPO's and RGR's formulas here are from their abstracts and third-party summaries (the papers' full text and code
were not reachable): the weight rule (1 − pass rate, normalised), α, β and the two combinations are this module's
choices, not checked constants.

Both log per step ``rubric/pass/<c>`` (pass rate of each criterion), ``rubric/partial`` (mean credit D, or R for
``rubric``), ``rubric/partial_wrong`` (mean D of responses whose answer is wrong) and ``rubric/hacked`` (share of
responses that meet every criterion but ``answer``, with the answer wrong: partial credit earned without the
result); ``verpo`` also ``rubric/weight/<c>`` (mean weight of each criterion over the step's episodes) and
``time/score/<name>_s`` (checking and weighting).
"""

from __future__ import annotations

import fnmatch
import time
from collections import defaultdict
from typing import Any, Literal

from pydantic import Field

from outrider.data import Episode
from outrider.envs.base import close_env
from outrider.errors import OutriderError
from outrider.registry import BuildContext, Piece
from outrider.score import SCORE, ComponentConfig

CRITERIA_TASKS = "stepsum"  # built-in tasks with the criteria hook
ANSWER = "answer"


def criteria_of(task: Any, episode: Episode) -> dict[str, bool]:
    """The task's rubric verdicts on the episode's last action, from a train env reset to the episode's seed and
    replayed to its last turn."""
    from outrider.explore.step_check import env_at, time_limit  # explore imports score: import on use

    k = len(episode.turns) - 1
    with time_limit(task) as clock:
        env, _ = env_at(task, episode, k, clock)
        try:
            return {str(c): bool(v) for c, v in task.criteria(env, episode.turns[k].action).items()}
        finally:
            close_env(env)


def require_criteria(task: Any, where: str) -> None:
    """A one-line error when the run's task has no ``criteria`` hook."""
    if task is not None and not callable(getattr(task, "criteria", None)):
        raise OutriderError(f"{where}: needs the task's criteria(env, action) hook (named checks a response passes, "
                            f"envs/base.py), which {type(task).__name__} does not have; built-in tasks with it: "
                            f"{CRITERIA_TASKS}")


def outcome(episode: Episode) -> float:
    """The global pass/fail: the env's own reward summed over turns (the verifier)."""
    return float(sum(t.reward for t in episode.turns))


def difficulty_weights(names: list[str], passes: dict[str, float], trials: dict[str, float],
                       alpha: float) -> dict[str, float]:
    """VeRPO's weights over one problem's criteria [66]: ``d_c = 1 − (P_c + α)/(N_c + 2α)`` normalised to sum 1
    (uniform when they are all 0, e.g. every criterion always passed and α = 0). An unseen criterion with α = 0
    has ρ = 0 (d = 1)."""
    d = {}
    for c in names:
        n = trials.get(c, 0.0) + 2 * alpha
        d[c] = 1.0 - ((passes.get(c, 0.0) + alpha) / n if n > 0 else 0.0)
    total = sum(d.values())
    if total <= 0:
        return {c: 1.0 / len(names) for c in names} if names else {}
    return {c: v / total for c, v in d.items()}


def weighted_credit(verdicts: dict[str, bool], weights: dict[str, float]) -> float:
    """``Σ_c w_c·1[c passed]``."""
    return sum(w for c, w in weights.items() if verdicts.get(c, False))


class _RubricLog:
    """Per-step pass rates and hacking statistics, shared by both components."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.passed: dict[str, float] = defaultdict(float)
        self.seen: dict[str, float] = defaultdict(float)
        self.weight: dict[str, float] = defaultdict(float)
        self.credit: list[float] = []
        self.wrong_credit: list[float] = []
        self.hacked = 0
        self.seconds = 0.0

    def add(self, verdicts: dict[str, bool], credit: float, wrong: bool, weights: dict[str, float]) -> None:
        for c, ok in verdicts.items():
            self.seen[c] += 1
            self.passed[c] += ok
        for c, w in weights.items():
            self.weight[c] += w
        self.credit.append(credit)
        if wrong:
            self.wrong_credit.append(credit)
            others = [ok for c, ok in verdicts.items() if c != ANSWER]
            self.hacked += bool(others) and all(others)

    def metrics(self, name: str, weights: bool) -> dict[str, float]:
        n = max(len(self.credit), 1)
        out = {f"rubric/pass/{c}": self.passed[c] / self.seen[c] for c in sorted(self.seen)}
        if weights:
            out.update({f"rubric/weight/{c}": self.weight[c] / self.seen[c] for c in sorted(self.seen)})
        out["rubric/partial"] = sum(self.credit) / n
        out["rubric/partial_wrong"] = sum(self.wrong_credit) / max(len(self.wrong_credit), 1)
        out["rubric/hacked"] = self.hacked / n
        out[f"time/score/{name}_s"] = self.seconds
        self.reset()
        return out


class _RubricPiece(Piece):
    """What both rubric components share: the task's criteria hook (checked at build) and the per-step log."""

    logs_weights = True

    def __init__(self, cfg: ComponentConfig, build: BuildContext | None = None):
        build = build or BuildContext()
        require_criteria(build.task, build.where or "score")
        super().__init__(cfg, build)
        self.task = build.task
        self.log = _RubricLog()

    def step_metrics(self) -> dict[str, float]:
        return self.log.metrics(self.name, weights=self.logs_weights)


class RubricConfig(ComponentConfig):
    """Options of the `rubric` component."""

    weights: dict[str, float] = Field(default_factory=dict, description="Weight per criterion name or glob pattern "
                                                                         "(e.g. {answer: 2, step_*: 1}); the first "
                                                                         "matching key counts.")
    default_weight: float = Field(1.0, ge=0, description="Weight of a criterion no key of weights matches.")


@SCORE.register("rubric", config=RubricConfig)
class Rubric(_RubricPiece):
    """RGR's weighted rubric score [50]: ``Σ_c w_c·1[c passed] / Σ_c w_c`` with fixed weights, in [0, 1]."""

    logs_weights = False

    def __init__(self, cfg: RubricConfig, build: BuildContext | None = None):
        if any(w < 0 for w in cfg.weights.values()):
            raise OutriderError(f"{(build and build.where) or 'score'}.weights: must be ≥ 0, got {cfg.weights}")
        super().__init__(cfg, build)

    def weight_of(self, name: str) -> float:
        return next((w for k, w in self.cfg.weights.items() if fnmatch.fnmatchcase(name, k)), self.cfg.default_weight)

    def score(self, verdicts: dict[str, bool]) -> tuple[float, dict[str, float]]:
        """The normalised weighted score of one response's verdicts, and the normalised weights."""
        raw = {c: self.weight_of(c) for c in verdicts}
        total = sum(raw.values())
        weights = {c: w / total for c, w in raw.items()} if total > 0 else {}
        return weighted_credit(verdicts, weights), weights

    def __call__(self, episodes: list[Episode]) -> list[float]:
        t0 = time.perf_counter()
        out = []
        for e in episodes:
            verdicts = criteria_of(self.task, e)
            r, w = self.score(verdicts)
            self.log.add(verdicts, r, not verdicts.get(ANSWER, outcome(e) >= 1), w)
            out.append(r)
        self.log.seconds += time.perf_counter() - t0
        return out


class VerpoConfig(ComponentConfig):
    """Options of the `verpo` component."""

    beta: float = Field(0.5, ge=0, description="β: the dense credit's scale against the outcome's 1.")
    combine: Literal["add", "gate"] = Field("add", description="add: R = O + β·D; gate: R = O when the outcome "
                                                               "passes (O ≥ 1), else β·D.")
    statistics: Literal["running", "group"] = Field(
        "running", description="Where pass rates come from: running (counts over training, decayed, in "
                               "checkpoints) or group (the episode's own group, as the paper).")
    decay: float = Field(1.0, gt=0, le=1, description="running: the counts are multiplied by this before each "
                                                      "step's are added (1: all of training counts alike).")
    alpha: float = Field(1.0, ge=0, description="α: the pass rate's smoothing, (P + α)/(N + 2α).")


@SCORE.register("verpo", config=VerpoConfig)
class Verpo(_RubricPiece):
    """VeRPO's verifiable dense reward [66]: difficulty-weighted passed criteria plus the global outcome."""

    def __init__(self, cfg: VerpoConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        self.cfg: VerpoConfig = cfg
        self.passes: dict[str, float] = {}
        self.trials: dict[str, float] = {}

    def update(self, verdicts: list[dict[str, bool]]) -> None:
        """Fold one batch's verdicts into the running counts (after decaying them)."""
        for c in self.passes:
            self.passes[c] *= self.cfg.decay
            self.trials[c] *= self.cfg.decay
        for v in verdicts:
            for c, ok in v.items():
                self.passes[c] = self.passes.get(c, 0.0) + float(ok)
                self.trials[c] = self.trials.get(c, 0.0) + 1.0

    def rewards(self, episodes: list[Episode], verdicts: list[dict[str, bool]]) -> list[float]:
        """The episodes' rewards given their verdicts (updates the running counts first)."""
        cfg = self.cfg
        if cfg.statistics == "running":
            self.update(verdicts)
            stats = {e.group_id: (self.passes, self.trials) for e in episodes}
        else:
            stats = {}
            for e, v in zip(episodes, verdicts):
                p, n = stats.setdefault(e.group_id, (defaultdict(float), defaultdict(float)))
                for c, ok in v.items():
                    p[c] += ok
                    n[c] += 1
        out = []
        for e, v in zip(episodes, verdicts):
            weights = difficulty_weights(list(v), *stats[e.group_id], cfg.alpha)
            dense = weighted_credit(v, weights)
            o = outcome(e)
            r = o + cfg.beta * dense if cfg.combine == "add" else (o if o >= 1 else cfg.beta * dense)
            self.log.add(v, dense, not v.get(ANSWER, o >= 1), weights)
            out.append(r)
        return out

    def __call__(self, episodes: list[Episode]) -> list[float]:
        t0 = time.perf_counter()
        out = self.rewards(episodes, [criteria_of(self.task, e) for e in episodes])
        self.log.seconds += time.perf_counter() - t0
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"passes": dict(self.passes), "trials": dict(self.trials)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.passes = {str(k): float(v) for k, v in state.get("passes", {}).items()}
        self.trials = {str(k): float(v) for k, v in state.get("trials", {}).items()}
