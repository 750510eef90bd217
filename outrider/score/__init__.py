"""score/: reward components and their composition.

A component is a piece with one of two forms, declared by its `Needs`:

- **on episodes** (the default): ``component(episodes) -> list[value]`` over the whole batch (so group-level
  rewards are possible), called as soon as episodes exist (exploration strategies such as dynamic sampling read
  them); ``needs.level`` says whether a value is one float per episode (``trajectory``), a list per turn
  (``step``) or per action token (``token``). `compose` writes ``weight · value`` into
  ``episode.rewards[level][name]``.
- **on the packed batch** (``needs.packed``): ``component(batch) -> (rewards [B, T], metrics)``, called after the
  preparing forward, so it may read what it declared it needs (hidden states, reference or old log-probs) and
  train a model of its own on the batch (a novelty bonus, a process reward model). `compose_packed` adds
  ``weight · rewards`` on the trained action tokens to ``batch.token_rewards``. Such rewards reach credit but not
  the episodes' rewards, which exploration read earlier.

A component that keeps state (counts, a network and its optimiser) is a `Piece` subclass with `state_dict`.
An episode-level component reports metrics of its own (a monitor's statistics, its model's time) through an
optional method ``step_metrics() -> dict[str, float]``, called once per step after that step's episodes are scored
(every `compose` call since the previous one) and logged under the names it returns; a packed component returns its
metrics with its rewards instead.

**Isolation, the same for every component** (built-in, a user's `python` function or a plugin's piece): a call
that raises, a value that is not a number (or a list of the wrong length) and a NaN/±inf are caught here, never in
the component. Each is scored as the component's options say (`ComponentConfig`: ``on_error``, ``on_nonfinite``,
``max_failed_steps``), counted per step as ``score/<name>/errors`` and ``score/<name>/nonfinite`` (episodes, or
rows of a packed batch), and the first failure of each component is logged with its message.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import torch
from pydantic import Field

from outrider.data import Batch, Episode
from outrider.errors import OutriderError
from outrider.registry import Level, Piece, PieceConfig, Registry, register_package

log = logging.getLogger(__name__)

Fallback = Union[Annotated[float, Field(allow_inf_nan=False)], Literal["raise"]]


class ComponentConfig(PieceConfig):
    """Options every component has: what a failure scores (the recipe's `weight` is the composition's)."""

    on_error: Fallback = Field(0.0, description="Value (before weight) of an episode the component could not score: "
                                                "it raised, or returned something that is not a number (or a list "
                                                "of the wrong length); 'raise': stop the run with one line naming "
                                                "the component. Counted as score/<name>/errors.")
    on_nonfinite: Fallback = Field(0.0, description="Value (before weight) that replaces a NaN or ±inf the "
                                                     "component returned; 'raise': stop the run with one line. "
                                                     "Counted as score/<name>/nonfinite.")
    max_failed_steps: int | None = Field(None, ge=1, description="Stop the run with one line once the component "
                                                                 "failed (an error or a non-finite value) in this "
                                                                 "many consecutive steps; null: never.")


SCORE: Registry = Registry("score")


class ScoreFailure:
    """What a component returns in place of an episode's value when scoring that episode raised (the `python`
    component's per-episode form does): `compose` scores it as ``on_error`` and counts it, like a raising call."""

    def __init__(self, error: BaseException):
        self.error = error


@dataclass
class Component:
    """A built score piece with its recipe weight, its place in the recipe (``score[i]``, named by its errors) and
    its failure counts of the current step."""

    name: str
    piece: Piece
    weight: float
    where: str = ""
    errors: int = 0
    nonfinite: int = 0
    failed_steps: int = 0  # consecutive steps with a failure (max_failed_steps)
    last_failure: str = ""
    logged: bool = False

    @property
    def level(self) -> Level:
        return self.piece.needs.level

    def option(self, key: str) -> Any:
        """A failure option of the piece's config (defaults for a piece whose config is not a `ComponentConfig`)."""
        return getattr(self.piece.cfg, key, ComponentConfig.model_fields[key].default)

    def _label(self) -> str:
        return f"{self.where} ({self.name})" if self.where else self.name

    def failed(self, kind: Literal["errors", "nonfinite"], what: str, count: int = 1) -> float:
        """Count `count` failed episodes (or rows) and return the value they get; raise under ``'raise'``."""
        option = "on_error" if kind == "errors" else "on_nonfinite"
        value = self.option(option)
        what = " ".join(what.split())[:300]  # one line, however long the user's exception text
        if value == "raise":
            raise OutriderError(f"{self._label()}: {what}; set {self.where or 'score[i]'}.{option} to a number to "
                                "score such episodes instead of stopping")
        setattr(self, kind, getattr(self, kind) + count)
        self.last_failure = what
        if not self.logged:
            self.logged = True
            log.warning("%s: %s; scored %s and counted as score/%s/%s (logged once)", self._label(), what, value,
                        self.name, kind)
        return float(value)

    def end_step(self) -> dict[str, float]:
        """This step's counts as metrics (then reset); stops the run after ``max_failed_steps`` failing steps."""
        out = {f"score/{self.name}/errors": float(self.errors), f"score/{self.name}/nonfinite": float(self.nonfinite)}
        own = getattr(self.piece, "step_metrics", None)
        if own is not None and not self.piece.needs.packed:
            try:
                out.update({k: float(v) for k, v in own().items()})
            except OutriderError:
                raise
            except Exception as e:  # noqa: BLE001  (a component's metrics never stop the run either)
                self.failed("errors", f"step_metrics: {_error_text(e)}", count=0)
        self.failed_steps = self.failed_steps + 1 if self.errors or self.nonfinite else 0
        self.errors = self.nonfinite = 0
        limit = self.option("max_failed_steps")
        if limit is not None and self.failed_steps >= limit:
            raise OutriderError(f"{self._label()}: failed in {self.failed_steps} consecutive steps (max_failed_steps="
                                f"{limit}); last: {self.last_failure}")
        return out


def score_step_metrics(components: list[Component]) -> dict[str, float]:
    """``score/<name>/errors`` and ``score/<name>/nonfinite`` of every episode-level component for the step that
    just scored its episodes (every `compose` call since the previous one); see `Component.end_step`."""
    out: dict[str, float] = {}
    for comp in components:
        if not comp.piece.needs.packed:
            out.update(comp.end_step())
    return out


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _spread(value: float, n: int) -> list[float]:
    """A fallback value as a per-turn or per-token list: all of it on the last entry (the episode's sum is it)."""
    return [0.0] * (n - 1) + [value] if n else []


def _checked(comp: Component, value: Any, episode: Episode) -> float | list[float]:
    """The component's value for one episode, failures replaced as its options say (before weight)."""
    level = comp.level
    n = len(episode.turns) if level == "step" else episode.num_action_tokens
    if isinstance(value, ScoreFailure):
        fallback = comp.failed("errors", _error_text(value.error))
        return fallback if level == "trajectory" else _spread(fallback, n)
    try:
        if level == "trajectory":
            number = float(value)
        else:
            numbers = [float(v) for v in value]
            if len(numbers) != n:
                raise ValueError(f"a {level}-level value needs {n} entries for this episode, got {len(numbers)}")
    except (TypeError, ValueError) as e:
        fallback = comp.failed("errors", f"returned {value!r:.80} ({_error_text(e)})")
        return fallback if level == "trajectory" else _spread(fallback, n)
    if level == "trajectory":
        return number if math.isfinite(number) else comp.failed("nonfinite", f"returned {number}")
    if all(math.isfinite(v) for v in numbers):
        return numbers
    fallback = comp.failed("nonfinite", f"returned a non-finite {level}-level value")
    return [v if math.isfinite(v) else fallback for v in numbers]


def compose(episodes: list[Episode], components: list[Component]) -> None:
    """Attach every episode-level component's weighted reward to every episode, at its level, under its name;
    failures are scored and counted as each component's options say (see the module docstring)."""
    for comp in components:
        if comp.piece.needs.packed:
            continue
        try:
            values = list(comp.piece(episodes))
            if len(values) != len(episodes):
                raise ValueError(f"returned {len(values)} values for {len(episodes)} episodes")
        except OutriderError:
            raise
        except Exception as e:  # noqa: BLE001  (any failure of a component is isolated; see the module docstring)
            values = [ScoreFailure(e)] * len(episodes)
        level = comp.level
        for episode, value in zip(episodes, values):
            checked = _checked(comp, value, episode)
            if level == "trajectory":
                episode.rewards[level][comp.name] = comp.weight * checked
            else:
                episode.rewards[level][comp.name] = [comp.weight * v for v in checked]


def _last_trained(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] with 1 on each row's last trained token (rows with none stay 0)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask > 0, positions, torch.full_like(positions, -1)).amax(-1, keepdim=True)
    return ((positions == last) & (mask > 0)).to(mask.dtype)


def _packed_rewards(comp: Component, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
    """A packed component's token rewards on trained tokens and its own metrics, failures replaced: a failed call
    gives each row ``on_error`` on its last trained token; a non-finite token reward becomes ``on_nonfinite``."""
    mask = batch.action_mask
    try:
        rewards, own = comp.piece(batch)
        rewards = torch.as_tensor(rewards, dtype=mask.dtype, device=mask.device)
        if rewards.shape != mask.shape:
            raise ValueError(f"returned token rewards of shape {tuple(rewards.shape)}, expected {tuple(mask.shape)}")
    except OutriderError:
        raise
    except Exception as e:  # noqa: BLE001  (isolated like every component's failure)
        fallback = comp.failed("errors", _error_text(e), count=batch.size)
        return fallback * _last_trained(mask), {}
    bad = ~torch.isfinite(rewards) & (mask > 0)
    if bool(bad.any()):
        fallback = comp.failed("nonfinite", "returned non-finite token rewards", count=int(bad.any(-1).sum()))
        rewards = torch.where(bad, torch.full_like(rewards, fallback), rewards)
    return torch.where(mask > 0, rewards * mask, torch.zeros_like(rewards)), own


def compose_packed(batch: Batch, components: list[Component]) -> dict[str, float]:
    """Add every packed component's weighted token rewards to ``batch.token_rewards`` (on trained action tokens
    only); return ``reward/<name>`` (the mean per-episode sum), ``time/score/<name>_s`` (the component's own time,
    a model's training step included), ``score/<name>/errors`` and ``nonfinite`` (rows) and the components' own
    metrics. Called once per step."""
    metrics: dict[str, float] = {}
    for comp in components:
        if not comp.piece.needs.packed:
            continue
        t0 = time.perf_counter()
        rewards, own = _packed_rewards(comp, batch)
        metrics[f"time/score/{comp.name}_s"] = time.perf_counter() - t0
        added = comp.weight * rewards
        batch.token_rewards = batch.token_rewards + added
        metrics[f"reward/{comp.name}"] = float(added.sum(-1).mean())
        metrics.update({k: float(v) for k, v in own.items()})
        metrics.update(comp.end_step())
    return metrics


register_package(__name__, __path__)  # every module of this package registers its pieces (a new method: a new file)
