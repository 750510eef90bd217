"""Outcome-based exploration bonuses [26]: rewards on the *final answer* (the task's canonical answer), not the
token sequence, so exploration works in the small space of outcomes.

- `outcome_ucb` (historical exploration): per (prompt, canonical answer) counts over the whole run, a UCB-style
  bonus on rarely seen answers, optionally baseline-corrected so that the bonus does not favour every answer.
- `outcome_batch` (batch exploration): a penalty for answers repeated inside a group, so the policy spreads its
  samples over distinct answers (test-time diversity).

Both are trajectory-level score components (on episodes); the recipe's ``weight`` is the paper's coefficient c.
The prompt of an episode is its first observation's text, the answer its last turn's ``StepInfo.canonical``; an
unparseable answer (canonical None) gets no bonus and is not counted. A task whose envs give no canonical answer
is a one-line error naming the field.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Literal

from pydantic import Field

from outrider.data import Episode
from outrider.errors import OutriderError
from outrider.registry import BuildContext, Piece
from outrider.score import SCORE, ComponentConfig


def outcome_key(episode: Episode, where: str) -> tuple[str, str | None]:
    """(prompt text, canonical answer or None) of an episode; an env that reports no ``canonical`` key at all is
    an error naming the field (the bonus would silently count nothing)."""
    if not episode.turns:
        return "", None
    info = episode.turns[-1].info
    if "canonical" not in info:
        raise OutriderError(f"{where}: the task gives no canonical answer (StepInfo.canonical on the last turn); "
                            "outcome bonuses need a task whose env reports one (single-turn tasks, calculator)")
    answer = info["canonical"]
    return episode.turns[0].observation, None if answer is None else str(answer)


def ucb_bonus(count: int) -> float:
    """b(N) = min(1, 1/√N): 1 for an answer never seen before (N = 0) [26]."""
    return 1.0 if count <= 0 else min(1.0, 1.0 / math.sqrt(count))


def corrected(bonuses: list[float], groups: list[Any], baseline: str, constant: float) -> list[float]:
    """The baseline-corrected bonus [26]: ``none`` b_i; ``mean`` b_i − mean of b over the episode's group (the
    other samples of its prompt this step, itself included); ``constant`` b_i − b₀."""
    if baseline == "none":
        return list(bonuses)
    if baseline == "constant":
        return [b - constant for b in bonuses]
    members: dict[Any, list[float]] = defaultdict(list)
    for b, g in zip(bonuses, groups):
        members[g].append(b)
    means = {g: sum(v) / len(v) for g, v in members.items()}
    return [b - means[g] for b, g in zip(bonuses, groups)]


class OutcomeUCBConfig(ComponentConfig):
    baseline: Literal["none", "mean", "constant"] = Field(
        "mean", description="Baseline subtracted from the bonus [26]: none (b = min(1, 1/√N), always ≥ 0), mean "
                            "(minus the mean bonus of the episode's group this step) or constant (minus `constant`).")
    constant: float = Field(0.5, ge=0, le=1, description="b₀ of baseline: constant.")
    correct_only: bool = Field(False, description="Give the bonus only to successful episodes (counts still see "
                                                  "every answer); false: every parsed answer, as in [26].")


@SCORE.register("outcome_ucb", config=OutcomeUCBConfig)
class OutcomeUCB(Piece):
    """Historical outcome exploration [26]: bonus b_i = min(1, 1/√N(x, a_i)), N(x, a) the number of earlier
    episodes of prompt x whose canonical answer was a (counted before this step's episodes are added), minus the
    chosen baseline; r̃ = r + c·b with c the component's weight. The counts are the piece's state."""

    def __init__(self, cfg: OutcomeUCBConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        self.where = (build.where if build else "") or "score"
        self.counts: dict[str, dict[str, int]] = {}

    def __call__(self, episodes: list[Episode]) -> list[float]:
        cfg: OutcomeUCBConfig = self.cfg
        keys = [outcome_key(e, f"{self.where} (outcome_ucb)") for e in episodes]
        raw = [0.0 if a is None else ucb_bonus(self.counts.get(x, {}).get(a, 0)) for x, a in keys]
        out = corrected(raw, [e.group_id for e in episodes], cfg.baseline, cfg.constant)
        for x, a in keys:  # counted after every bonus of the step is taken: one batch sees the same counts
            if a is not None:
                per_prompt = self.counts.setdefault(x, {})
                per_prompt[a] = per_prompt.get(a, 0) + 1
        if cfg.correct_only:
            out = [b if e.success else 0.0 for b, e in zip(out, episodes)]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"counts": {x: dict(a) for x, a in self.counts.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = {x: dict(a) for x, a in state.get("counts", {}).items()}


def batch_penalty(answers: list[str | None], groups: list[Any]) -> list[float]:
    """−(1/(G−1))·Σ_{j≠i} 1[a_j = a_i] over the episode's group of size G [26]: 0 for an answer no other member
    gave, −1 when every other member gave it; 0 in a group of one and for an unparseable answer."""
    members: dict[Any, list[str | None]] = defaultdict(list)
    for a, g in zip(answers, groups):
        members[g].append(a)
    out = []
    for a, g in zip(answers, groups):
        size = len(members[g])
        if a is None or size < 2:
            out.append(0.0)
            continue
        out.append(-(members[g].count(a) - 1) / (size - 1))
    return out


class OutcomeBatchConfig(ComponentConfig):
    correct_only: bool = Field(False, description="Penalise only successful episodes' repeats; false: every "
                                                  "parsed answer, as in [26].")


@SCORE.register("outcome_batch", config=OutcomeBatchConfig)
def outcome_batch(episodes: list[Episode], cfg: OutcomeBatchConfig) -> list[float]:
    """Batch outcome exploration [26]: r̃_i = r_i − c·(1/(G−1))·Σ_{j≠i} 1[a(y_j) = a(y_i)] within the episode's
    group (c: the component's weight), penalising answers the other samples of the prompt repeat."""
    answers = [outcome_key(e, "score (outcome_batch)")[1] for e in episodes]
    out = batch_penalty(answers, [e.group_id for e in episodes])
    return [p if (e.success or not cfg.correct_only) else 0.0 for p, e in zip(out, episodes)]
