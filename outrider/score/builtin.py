"""Built-in reward components: the task's verifier, exact/numeric match, format, length and overlong penalties."""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from outrider.answers import numeric_equal
from outrider.data import Episode
from outrider.registry import Needs
from outrider.score import SCORE, ComponentConfig


@SCORE.register("verifier", config=ComponentConfig)
def verifier(episodes: list[Episode], cfg: ComponentConfig) -> list[float]:
    """The env's own reward, summed over turns (for reasoning-gym tasks: the generator's `score_answer`)."""
    return [sum(t.reward for t in e.turns) for e in episodes]


@SCORE.register("verifier_steps", config=ComponentConfig, needs=Needs(level="step"))
def verifier_steps(episodes: list[Episode], cfg: ComponentConfig) -> list[list[float]]:
    """The env's own reward of each turn, kept on its turn (a step-level component): for envs with rewards along
    the way (bandit pulls, TextWorld score changes), so turn-level credit (GiGPO's step returns, REINFORCE++ /
    GAE returns) sees when each reward was earned. Same total as `verifier`, which puts the sum on the last turn."""
    return [[t.reward for t in e.turns] for e in episodes]


def _answer(e: Episode) -> str | None:
    return e.turns[-1].info.get("answer") if e.turns else None


def _reference(e: Episode) -> str:
    return str(e.turns[-1].info.get("reference", "")) if e.turns else ""


@SCORE.register("exact_match", config=ComponentConfig)
def exact_match(episodes: list[Episode], cfg: ComponentConfig) -> list[float]:
    """1 when the parsed answer equals the reference answer (both stripped), else 0; unparseable answers get 0."""
    return [float(_answer(e) is not None and _answer(e).strip() == _reference(e).strip()) for e in episodes]


class NumericMatchConfig(ComponentConfig):
    rel_tol: float = Field(1e-6, ge=0, description="Relative (and absolute) tolerance of the comparison.")


@SCORE.register("numeric_match", config=NumericMatchConfig)
def numeric_match(episodes: list[Episode], cfg: NumericMatchConfig) -> list[float]:
    """1 when the parsed answer and the reference are numbers within `rel_tol`, else 0."""
    return [float(_answer(e) is not None and numeric_equal(_answer(e), _reference(e), cfg.rel_tol)) for e in episodes]


class FormatConfig(ComponentConfig):
    pattern: str = Field(..., description="Regular expression the whole response must match (re.fullmatch, DOTALL).")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"not a valid regular expression: {e}") from None
        return v


@SCORE.register("format", config=FormatConfig)
def format_reward(episodes: list[Episode], cfg: FormatConfig) -> list[float]:
    """1 when the response matches `pattern` in full, else 0 (e.g. ``.*<answer>.*</answer>``)."""
    rx = re.compile(cfg.pattern, re.DOTALL)
    return [float(rx.fullmatch(e.response) is not None) for e in episodes]


class LengthConfig(ComponentConfig):
    target: int = Field(0, ge=0, description="Tokens allowed for free; each token beyond costs 1 (times weight).")


@SCORE.register("length", config=LengthConfig)
def length_penalty(episodes: list[Episode], cfg: LengthConfig) -> list[float]:
    """−max(0, |y| − target): a linear penalty on action tokens beyond `target` (scale it with the weight)."""
    return [-float(max(0, e.num_action_tokens - cfg.target)) for e in episodes]


class OverlongConfig(ComponentConfig):
    max_length: int = Field(..., ge=1, description="L_max: the generation budget in tokens.")
    buffer: int = Field(..., ge=1, description="L_cache: the soft zone before L_max where the penalty ramps to −1.")

    @model_validator(mode="after")
    def _buffer_fits(self) -> "OverlongConfig":
        if self.buffer > self.max_length:
            raise ValueError(f"buffer ({self.buffer}) must not exceed max_length ({self.max_length})")
        return self


@SCORE.register("overlong", config=OverlongConfig)
def overlong_penalty(episodes: list[Episode], cfg: OverlongConfig) -> list[float]:
    """DAPO's soft overlong punishment [Yu et al. 2025, DAPO]: 0 for |y| ≤ L_max − L_cache,
    ((L_max − L_cache) − |y|)/L_cache inside the buffer, −1 beyond L_max."""
    free = cfg.max_length - cfg.buffer
    out = []
    for e in episodes:
        n = e.num_action_tokens
        out.append(0.0 if n <= free else (-1.0 if n > cfg.max_length else (free - n) / cfg.buffer))
    return out
