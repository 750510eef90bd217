"""The world: the `Env` protocol (text in, text out) and `Task`, which makes envs for a split and gives
demonstrations for the warm start. A single-turn task is an env whose episode ends after one action."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal, Protocol, TypedDict, runtime_checkable

from pydantic import Field

from outrider.envs.time_limit import DEFAULT_STEP_TIMEOUT_S
from outrider.errors import OutriderError
from outrider.registry import PieceConfig, Registry

Split = Literal["train", "eval"]

# Envs that derive a problem or layout from a seed: train seeds are drawn from [0, 2^31) and eval seed s maps to
# 2^31 + s, so the two splits never share a seed.
EVAL_OFFSET = 2**31


class StepInfo(TypedDict, total=False):
    """What ``Env.step`` reports besides the observation, the reward and done: every key is optional, and these are
    the ones the library reads. An env may add keys of its own (they are kept in `Turn.info`)."""

    success: bool  # the episode's outcome, on the final step
    invalid: bool  # the action could not be parsed or is not allowed: the observation is the env's error text
    events: list[str]  # progress-event names this step (e.g. ``picked_key``): ``event/<name>`` shares per batch
    metrics: dict[str, float]  # on the final step (e.g. ``regret``): averaged per batch as ``env/<name>``
    admissible: list[str]  # the valid commands, where the env has such a list
    answer: str | None  # single-turn tasks: the parsed answer (None: unparseable)
    reference: str  # single-turn tasks: the reference answer
    canonical: str | None  # the answer in a normal form, so equal answers count once (diversity)
    timed_out: bool  # the step ran past the env's time limit and the episode was ended


@runtime_checkable
class Env(Protocol):
    """Gymnasium-like text env.

    ``reset(seed)`` returns the first observation; ``step(action)`` returns ``(observation, reward, done, info)``
    with ``info`` a `StepInfo`. Optional methods, used when present: ``state_key() -> Hashable`` (the current state,
    before the next action: step grouping, archives, distinct-state counts); ``snapshot() -> state`` and
    ``restore(state) -> observation`` (restarts: after a restore the same actions give the same observations, and
    one snapshot can be restored many times; the state must survive `torch.save`, as archives are checkpointed);
    ``close()``, which the rollout calls when an episode is over (return a pooled interpreter, a simulator).
    """

    def reset(self, seed: int) -> str: ...

    def step(self, action: str) -> tuple[str, float, bool, StepInfo]: ...


def close_env(env: Env) -> None:
    """Call the env's ``close()`` if it has one."""
    close = getattr(env, "close", None)
    if callable(close):
        close()


class ReplaySnapshot:
    """``snapshot``/``restore`` by replay, for envs whose internal state cannot be copied (an external game
    process): the snapshot is ``(seed, actions so far)`` and restoring resets to the seed and replays the actions.
    The env keeps ``self.seed`` and ``self.history`` (the actions since reset)."""

    seed: int
    history: list[str]

    def snapshot(self) -> tuple[int, tuple[str, ...]]:
        return self.seed, tuple(self.history)

    def restore(self, state: tuple[int, tuple[str, ...]]) -> str:
        """Reset to the snapshot's seed and replay its actions; returns the observation at that point."""
        seed, actions = state
        obs = self.reset(seed)  # type: ignore[attr-defined]
        for action in actions:
            obs = self.step(action)[0]  # type: ignore[attr-defined]
        return obs


@dataclass(frozen=True)
class ParamDim:
    """One axis of a task's parameter space: a closed range, continuous or integer (an integer axis is sampled
    on [low − 0.5, high + 0.5] and rounded, so its end values are as likely as the others)."""

    name: str
    low: float
    high: float
    integer: bool = False


class ParamSpace:
    """A task's parameter space (a box), for teachers that choose where the policy trains (curricula [132]).

    ``box()`` gives the continuous bounds a teacher samples in; ``snap(x)`` clips a point into the box and rounds
    integer axes: the parameter vector a task builds its problem at."""

    def __init__(self, dims: list[ParamDim]):
        if not dims:
            raise ValueError("a parameter space needs at least one dimension")
        for d in dims:
            if d.high < d.low:
                raise ValueError(f"parameter {d.name}: high ({d.high}) < low ({d.low})")
        self.dims = list(dims)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dims]

    def box(self) -> tuple[list[float], list[float]]:
        """(lows, highs) of the continuous box a teacher samples in."""
        lows = [d.low - 0.5 if d.integer else d.low for d in self.dims]
        highs = [d.high + 0.5 if d.integer else d.high for d in self.dims]
        return lows, highs

    def snap(self, x: "list[float] | tuple[float, ...]") -> tuple[float, ...]:
        """The point of the space nearest `x`: clipped to each range, integer axes rounded (halves up)."""
        if len(x) != len(self.dims):
            raise ValueError(f"expected {len(self.dims)} parameters ({', '.join(self.names)}), got {len(x)}")
        out = []
        for d, v in zip(self.dims, x):
            v = min(max(float(v), d.low), d.high)
            out.append(float(min(int(v + 0.5), int(d.high))) if d.integer else v)
        return tuple(out)


def require_param_space(task: "Task", field: str) -> ParamSpace:
    """The task's parameter space, or a one-line error naming `field` (the recipe option that needs it)."""
    space = task.param_space()
    if space is None:
        raise OutriderError(f"{field}: task {type(task).__name__} declares no parameter space (Task.param_space); "
                            "a curriculum needs a parametrised task, e.g. multisol")
    return space


@dataclass
class Demonstration:
    """A correct (or deliberately wrong) episode for supervised warm start: (observation, action) per turn."""

    turns: list[tuple[str, str]]


class TaskConfig(PieceConfig):
    """Options every task has."""

    eval_size: int = Field(512, ge=1, description="Number of held-out prompts/seeds in the eval split.")
    max_turns: int = Field(1, ge=1, description="Horizon: the most turns in one episode (1 for single-turn tasks).")
    step_timeout_s: float | None = Field(
        DEFAULT_STEP_TIMEOUT_S, gt=0, description="Time limit of one env call (reset, step, restore), in seconds: "
                                                  "a call past it ends its episode as failed (info timed_out, "
                                                  "counted as env/timeouts) and the env is closed and restarted "
                                                  "(null: no limit).")
    workers: int = Field(1, ge=1, le=64, description="Env worker processes that hold and step a multi-turn "
                                                     "rollout's envs at the same time (1: in the trainer's own "
                                                     "process, one after another). Episodes are identical either "
                                                     "way; worth it when env steps are slow against sampling "
                                                     "(TextWorld, ScienceWorld), see docs/benchmarks.md.")
    workers_backend: Literal["process", "ray"] = Field(
        "process", description="What the env workers are when task.workers > 1: process (local worker processes) "
                               "or ray (one Ray actor a worker, on the cluster at RAY_ADDRESS if set, else on a "
                               "local Ray instance started and stopped by the run; needs the extra outrider[ray]). "
                               "Episodes are identical either way.")


class Task(ABC):
    """Makes envs and demonstrations. Train seeds and eval seeds index disjoint sets of problems.

    Optional step hooks, for the pieces that locate or fix a wrong step (R³L's checker pivot, SCOPE's first-error
    correction, Fission's cut, hint reflections: `outrider.explore.step_check`); each takes an env of this task
    in the state *before* an action, and must not change it:

    - ``step_ok(env, action) -> bool``: a step checker: is `action` a right step from here (on some optimal
      solution, or a correct partial result)?
    - ``oracle_step(env) -> str``: the oracle's action from here (an expert's next step).
    - ``hint(env) -> str``: a hint text for this state (a reflection a piece may show the sampler).
    - ``feedback(env, action) -> str``: the criteria `action` does not meet from here, in words (empty when it
      meets them all): what a hindsight-guided retry is shown (HeRL [12], explore piece ``herl``).
    - ``criteria(env, action) -> dict[str, bool]``: the named checks of a rubric and whether `action` meets each
      (e.g. ``format``, ``step_1``, ``answer``); the same names across problems wherever they mean the same
      check, so statistics per name make sense (rubric rewards: score pieces ``rubric``, ``verpo`` [66, 50]).

    A piece that needs a hook the task lacks stops the run with one line naming its option.
    """

    max_turns: int = 1
    eval_size: int = 512

    @property
    def step_timeout_s(self) -> float | None:
        """The time limit of one env call: the task's `step_timeout_s` option (its `cfg`), else the default."""
        return getattr(getattr(self, "cfg", None), "step_timeout_s", DEFAULT_STEP_TIMEOUT_S)

    @property
    def workers(self) -> int:
        """Env worker processes of a run: the task's `workers` option (its `cfg`), else 1 (in-process envs)."""
        return int(getattr(getattr(self, "cfg", None), "workers", 1))

    @property
    def workers_backend(self) -> str:
        """What the env workers are: the task's `workers_backend` option (its `cfg`), else local processes."""
        return str(getattr(getattr(self, "cfg", None), "workers_backend", "process"))

    @abstractmethod
    def make_env(self, split: Split) -> Env: ...

    def param_space(self) -> ParamSpace | None:
        """The task's parameter space (difficulty knobs a curriculum may choose), or None (the default: the
        task is not parametrised). A task that returns one also implements `param_seed`."""
        return None

    def param_seed(self, params: tuple[float, ...], index: int) -> int:
        """A train seed whose problem is built at `params` (a point of `param_space`, already snapped); `index`
        picks among the problems at that point (distinct indices give distinct seeds where the point has
        several problems)."""
        raise NotImplementedError(f"{type(self).__name__} declares no parameter space")

    def param_region(self, params: tuple[float, ...]) -> str | None:
        """A name for the region of the parameter space `params` lies in (e.g. an unlearnable one), for the
        curriculum's per-region sample shares; None (the default): no regions."""
        return None

    @abstractmethod
    def demonstrations(self, seeds: list[int]) -> list[Demonstration]:
        """Expert episodes for the given train seeds."""


ENVS: Registry = Registry("task")
