"""A wall-clock limit on env calls (``reset``, ``step``, ``restore``): `task.step_timeout_s`.

An env that never answers (a game interpreter looping on an input, a simulator stuck) must not hang the run. The
rollout makes every env call through `TimeLimit.call`; one that runs past the limit raises `EnvTimeout`, and the
rollout ends that episode as failed (``info["timed_out"]``) and closes the env, which throws its interpreter away
instead of pooling it.

How a call is stopped. In the main thread (a CLI run), by ``SIGALRM`` from ``setitimer``: the handler raises
`EnvTimeout` in the waiting code, which interrupts Python code and blocking reads (a pipe to a game process, a
socket to a JVM), and costs two system calls per env call, no thread hop: the common in-process envs (single-turn
tasks, bandits, MiniGrid, the calculator) run at full speed. What it cannot stop is native code that never returns
to Python, which no Python mechanism can interrupt in-process: such envs run their native part in a child process
(TextWorld's interpreter: `envs/child.py`) that is killed when abandoned. Outside the main thread (signals reach
only the main thread), or where something else already uses ``SIGALRM`` (a test runner's own timeout), the call
runs in a worker thread that is waited for with the limit and abandoned after it.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")

DEFAULT_STEP_TIMEOUT_S = 30.0


class EnvTimeout(BaseException):
    """An env call ran past the task's time limit (`task.step_timeout_s`). Raised asynchronously, anywhere in the
    env's code, so it derives from BaseException like KeyboardInterrupt: library code's ``except Exception`` (a
    client that turns any error into its own) does not swallow it."""


class TimeLimit:
    """Runs env calls under a limit of `seconds` (None: no limit). Use as a context manager around a rollout:
    entering it installs the ``SIGALRM`` handler once (and exiting it restores the previous one), so each call
    only arms and disarms the timer."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self._signals = False
        self._armed = False
        self._previous: Any = None

    def __enter__(self) -> "TimeLimit":
        self._signals = (self.seconds is not None and threading.current_thread() is threading.main_thread()
                         and signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, signal.SIG_IGN, None)
                         and signal.getitimer(signal.ITIMER_REAL)[0] == 0)
        if self._signals:
            self._previous = signal.signal(signal.SIGALRM, self._alarm)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._signals:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)
            self._signals = False

    def _alarm(self, signum: int, frame: Any) -> None:
        if self._armed:  # a late alarm after the call returned is ignored
            self._armed = False
            raise EnvTimeout(f"no answer within {self.seconds:g} s")

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, or `EnvTimeout` once it has run `seconds`."""
        if self.seconds is None:
            return fn(*args)
        if self._signals:
            self._armed = True
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
            try:
                return fn(*args)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                self._armed = False
        return _in_thread(fn, args, self.seconds)


def _in_thread(fn: Callable[..., T], args: tuple, seconds: float) -> T:
    """Run `fn` in a daemon thread and wait `seconds` for it; past that, abandon it (it cannot be stopped)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread)
            box["error"] = e

    worker = threading.Thread(target=target, daemon=True, name="outrider-env-call")
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise EnvTimeout(f"no answer within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]
