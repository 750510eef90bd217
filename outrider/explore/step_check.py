"""What the retry family shares (R³L reflect-then-retry [0], Fission-GRPO [17], SCOPE / InT first-error
correction [7, 33]): where an episode went wrong, an env put back at one of its turns, turns played from given
actions, and what a piece's rollouts cost.

Where it went wrong, three rules over a finished episode's turns (indices are turns; the env state *before* turn
k's action is where a retry from k starts):

- ``invalid``: the first turn the env marked ``info["invalid"]`` (its error text is the next observation);
- ``no_progress``: the first turn after which no progress event occurs: one past the last turn whose
  ``info["events"]`` holds a progress event (0 when none happened);
- ``checker``: the first action the task's step checker rejects (``task.step_ok(env, action)``, replayed from
  the seed: `first_wrong_step`).

The task hooks (``step_ok``, ``oracle_step``, ``hint``) are optional `Task` methods (`outrider.envs.base`);
`require_hook` turns a missing one into a one-line error naming the option that needs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from outrider.data import Episode, Turn
from outrider.envs.base import Env, close_env
from outrider.envs.time_limit import DEFAULT_STEP_TIMEOUT_S, EnvTimeout, TimeLimit
from outrider.errors import OutriderError

HOOK_TASKS = "calculator, minigrid"  # the built-in tasks that have every step hook


def require_hook(task: Any, hook: str, field_name: str) -> None:
    """A one-line error when `task` lacks the optional method `hook` that the option `field_name` needs."""
    if not callable(getattr(task, hook, None)):
        raise OutriderError(f"{field_name}: needs the task's {hook}() hook (an optional Task method, envs/base.py), "
                            f"which {type(task).__name__} does not have; built-in tasks with it: {HOOK_TASKS}")


def time_limit(task: Any) -> TimeLimit:
    """The task's env-call time limit, as the rollout applies it."""
    return TimeLimit(getattr(task, "step_timeout_s", DEFAULT_STEP_TIMEOUT_S))


def first_invalid(episode: Episode) -> int | None:
    """The first turn the env marked invalid, or None."""
    return next((k for k, t in enumerate(episode.turns) if t.info.get("invalid")), None)


def is_progress(event: str, progress_events: Iterable[str] | None) -> bool:
    """A progress event: one of `progress_events`, or (None) any event whose name does not end in ``error``."""
    return event in progress_events if progress_events is not None else not event.endswith("error")


def after_last_progress(episode: Episode, progress_events: Iterable[str] | None = None) -> int | None:
    """The first turn after which no progress event occurs (one past the last turn with one; 0 when none
    happened), or None when the last turn made progress (no turn to retry after it)."""
    events = list(progress_events) if progress_events is not None else None
    last = max((k for k, t in enumerate(episode.turns)
                if any(is_progress(e, events) for e in t.info.get("events", ()))), default=-1)
    return last + 1 if last + 1 < len(episode.turns) else None


def env_at(task: Any, episode: Episode, k: int, clock: TimeLimit) -> tuple[Env, int]:
    """A fresh train env in the state before turn `k`'s action, and the env steps that took: ``restore`` of the
    turn's snapshot when it has one (0 steps), else reset to the seed and replay the first k actions."""
    env = task.make_env("train")
    try:
        clock.call(env.reset, episode.seed)
        snap = episode.turns[k].snapshot if k < len(episode.turns) else None
        if snap is not None:
            clock.call(env.restore, snap)  # type: ignore[attr-defined]
            return env, 0
        for turn in episode.turns[:k]:
            clock.call(env.step, turn.action)
        return env, k
    except BaseException:
        close_env(env)
        raise


def first_wrong_step(task: Any, episode: Episode) -> tuple[int | None, int]:
    """The first turn whose action the task's step checker rejects (replayed from the seed), or None when every
    action passes (or an env call times out); and the env steps the replay took."""
    steps = 0
    with time_limit(task) as clock:
        env = task.make_env("train")
        try:
            clock.call(env.reset, episode.seed)
            for k, turn in enumerate(episode.turns):
                if not turn.action_ids or not task.step_ok(env, turn.action):
                    return (k if turn.action_ids else None), steps
                if k + 1 < len(episode.turns):
                    clock.call(env.step, turn.action)
                    steps += 1
        except EnvTimeout:
            return None, steps
        finally:
            close_env(env)
    return None, steps


def given_turn(policy: Any, observation: str, first: bool, action: str, state_key: Any = None) -> Turn:
    """A turn whose action is given, not sampled (an oracle's step), encoded as the rollout and the warm start
    encode turns: the action ends with EOS; its behaviour log-probs and entropies are 0 (never drawn)."""
    ids = policy.encode(action) + [policy.eos_id]
    turn = Turn(observation=observation, observation_ids=policy.encode_observation(observation, first=first),
                action=action, action_ids=ids, behaviour_logprobs=[0.0] * len(ids),
                behaviour_entropy=[0.0] * len(ids), finish_reason="stop")
    if state_key is not None:
        turn.info["state_key"] = state_key
    return turn


def step_given(env: Env, turn: Turn, clock: TimeLimit) -> tuple[str, bool, dict[str, Any]]:
    """Play a given turn's action in `env`, filling its reward and info; returns (observation, done, info)."""
    obs, reward, done, info = clock.call(env.step, turn.action)
    turn.reward = float(reward)
    turn.info.update({k: v for k, v in info.items() if k != "state_key"})
    return obs, bool(done), dict(info)


def state_key(env: Env) -> Any:
    key = getattr(env, "state_key", None)
    return key() if callable(key) else None


@dataclass
class Cost:
    """What a piece's rollouts cost: env steps taken (sampled turns, replayed prefixes, checker replays, oracle
    steps) and tokens sampled (given tokens are not sampled). Running totals ride in the piece's state."""

    env_steps: float = 0.0
    tokens: float = 0.0
    totals: dict[str, float] = field(default_factory=dict)

    def episodes(self, episodes: list[Episode], given_turns: list[int], replayed: bool) -> tuple[float, float]:
        """Count freshly rolled-out episodes (their first `given_turns[i]` turns were given; `replayed`: the env
        reached them by replaying their actions); returns this call's (env steps, tokens)."""
        steps = tokens = 0.0
        for e, given in zip(episodes, given_turns):
            steps += sum(1 for t in e.turns[given:] if t.action_ids) + (given if replayed else 0)
            tokens += e.num_action_tokens - e.prefix_tokens
        self.env_steps += steps
        self.tokens += tokens
        return steps, tokens

    def metrics(self, prefix: str = "explore") -> dict[str, float]:
        """This step's counts and the running totals (the totals are updated here, once per step)."""
        self.totals["env_steps"] = self.totals.get("env_steps", 0.0) + self.env_steps
        self.totals["tokens"] = self.totals.get("tokens", 0.0) + self.tokens
        out = {f"{prefix}/env_steps": self.env_steps, f"{prefix}/sampled_tokens": self.tokens,
               f"{prefix}/env_steps_total": self.totals["env_steps"],
               f"{prefix}/sampled_tokens_total": self.totals["tokens"]}
        self.env_steps = self.tokens = 0.0
        return out
