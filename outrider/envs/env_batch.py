"""A rollout's envs as one batch, stepped in two phases per turn: the sampler draws every active episode's action
in one batch, then every env is stepped through an `EnvBatch`. `LocalEnvs` steps them one after another in this
process (the default, `task.workers: 1`); `outrider.envs.workers.RemoteEnvs` sends them to worker processes. Both
run the per-env code here (`reach`, `step`), so episodes are identical for the same seeds: the sampler's draws do
not depend on the order in which envs answer, and each env is driven by its own seed and actions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from outrider.envs.base import Env, close_env
from outrider.envs.time_limit import EnvTimeout, TimeLimit



@dataclass
class Reply:
    """An env's answer to a reach or a step: the observation, and for a step its reward, done and info; the state
    key and snapshot of the state now reached (before the next action), when asked for and the episode goes on;
    ``timed_out`` when the call ran past the time limit (the env is then closed and gone)."""

    obs: str = ""
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    has_key: bool = False
    state_key: Any = None
    snapshot: Any = None
    timed_out: bool = False


def _describe_state(env: Env, reply: Reply, snapshot: bool) -> Reply:
    key = getattr(env, "state_key", None)
    if callable(key):
        reply.has_key, reply.state_key = True, key()
    if snapshot:
        reply.snapshot = env.snapshot()  # type: ignore[attr-defined]
    return reply


def reach(env: Env, seed: int, snapshot: Any, prefix_actions: Sequence[str], clock: TimeLimit,
          want_snapshot: bool) -> Reply:
    """Reset the env to `seed` and bring it to the end of a start's prefix (``restore(snapshot)``, else replaying
    its actions); the observation there, and the state's key (and snapshot, with `want_snapshot`)."""
    try:
        obs = clock.call(env.reset, seed)
        if snapshot is not None:
            restore = getattr(env, "restore", None)
            if not callable(restore):
                raise ValueError(f"a start with a snapshot needs an env with restore(); {type(env).__name__} has "
                                 "none")
            obs = clock.call(restore, snapshot)
        else:
            for k, action in enumerate(prefix_actions):
                obs, _, done, _ = clock.call(env.step, action)
                if done:
                    raise ValueError(f"a start's prefix ends the episode at its turn {k} (seed {seed}); a prefix "
                                     "must lead to a state where the episode goes on")
    except EnvTimeout:
        return Reply(timed_out=True)
    return _describe_state(env, Reply(obs=obs), want_snapshot)


def step(env: Env, action: str, clock: TimeLimit, goes_on: bool, want_snapshot: bool) -> Reply:
    """One env step; unless the episode ends here (done, or not `goes_on`: the horizon), the next state's key
    (and snapshot, with `want_snapshot`)."""
    try:
        obs, reward, done, info = clock.call(env.step, action)
    except EnvTimeout:
        return Reply(timed_out=True)
    reply = Reply(obs=obs, reward=float(reward), done=bool(done), info=dict(info))
    return _describe_state(env, reply, want_snapshot) if goes_on and not done else reply


# a reach job: (env index, seed, snapshot or None, prefix actions, keep a snapshot);
# a step job: (env index, action, the episode goes on after it unless done, keep a snapshot)
ReachJob = tuple[int, int, Any, Sequence[str], bool]
StepJob = tuple[int, str, bool, bool]


class EnvBatch(Protocol):
    """A rollout's envs, one per episode, addressed by index. An env that timed out is closed and gone."""

    def reach(self, jobs: list[ReachJob]) -> list[Reply]: ...

    def step(self, jobs: list[StepJob]) -> list[Reply]: ...

    def close(self, i: int) -> None: ...

    def close_all(self) -> None: ...


class LocalEnvs:
    """The envs in this process, made by `make_env` and stepped one after another under one `TimeLimit`."""

    def __init__(self, make_env: Callable[[], Env], n: int, step_timeout_s: float | None):
        self.envs: list[Env | None] = []
        self.clock = TimeLimit(step_timeout_s).__enter__()
        try:
            self.envs = [make_env() for _ in range(n)]
        except BaseException:
            self.close_all()
            raise

    def _answer(self, i: int, reply: Reply) -> Reply:
        if reply.timed_out:  # an env in an unknown state (a pooled interpreter) is closed, not re-used
            self.close(i)
        return reply

    def reach(self, jobs: list[ReachJob]) -> list[Reply]:
        return [self._answer(i, reach(self.envs[i], seed, snap, prefix, self.clock, keep))
                for i, seed, snap, prefix, keep in jobs]

    def step(self, jobs: list[StepJob]) -> list[Reply]:
        return [self._answer(i, step(self.envs[i], action, self.clock, on, keep)) for i, action, on, keep in jobs]

    def close(self, i: int) -> None:
        env, self.envs[i] = self.envs[i], None
        if env is not None:
            close_env(env)

    def close_all(self) -> None:
        try:
            for i in range(len(self.envs)):
                self.close(i)
        finally:
            self.clock.__exit__(None, None, None)


class TimedEnvs:
    """An `EnvBatch` whose calls are timed: the seconds spent in them (stepping in this process, or sending to and
    waiting for the workers) are added to ``timers["env_s"]``."""

    def __init__(self, envs: EnvBatch, timers: dict[str, float]):
        self.envs, self.timers = envs, timers

    def _timed(self, fn: Callable[..., Any], *args: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.timers["env_s"] = self.timers.get("env_s", 0.0) + time.perf_counter() - t

    def reach(self, jobs: list[ReachJob]) -> list[Reply]:
        return self._timed(self.envs.reach, jobs)

    def step(self, jobs: list[StepJob]) -> list[Reply]:
        return self._timed(self.envs.step, jobs)

    def close(self, i: int) -> None:
        self._timed(self.envs.close, i)

    def close_all(self) -> None:
        self._timed(self.envs.close_all)


def open_envs(make_env: Any, n: int, step_timeout_s: float | None,
              timers: dict[str, float] | None = None) -> EnvBatch:
    """The envs of a rollout: `make_env` is an env factory (envs in this process) or an object with
    ``open_batch(n, step_timeout_s)`` (a split of a worker pool). With `timers`, the time spent opening them and
    in every later call is added to ``timers["env_s"]``."""
    t = time.perf_counter()
    opener = getattr(make_env, "open_batch", None)
    envs = opener(n, step_timeout_s) if callable(opener) else LocalEnvs(make_env, n, step_timeout_s)
    if timers is None:
        return envs
    timers["env_s"] = timers.get("env_s", 0.0) + time.perf_counter() - t
    return TimedEnvs(envs, timers)


__all__ = ["EnvBatch", "LocalEnvs", "ReachJob", "Reply", "StepJob", "TimedEnvs", "open_envs", "reach", "step"]
