"""Started interpreters and simulators, kept for re-use: starting one (a game interpreter, a JVM) costs much more
than resetting it. A handle whose call did not finish (the env time limit, Ctrl-C) is killed, never re-used."""

from __future__ import annotations

from typing import Any, Callable, Hashable


class HandlePool:
    """Started game interpreters (or simulators), kept per key for re-use, because starting one costs much more
    than resetting it. At most `max_idle` idle handles are kept in all; extra ones are closed."""

    def __init__(self, start: Callable[[Hashable], Any], close: Callable[[Any], None], max_idle: int = 256,
                 kill: Callable[[Any], None] | None = None):
        self._start, self._close, self.max_idle = start, close, max_idle
        self._kill = kill or close
        self._idle: dict[Hashable, list[Any]] = {}
        self._busy: set[int] = set()  # ids of handles with a call in flight
        self.started = 0

    def acquire(self, key: Hashable) -> Any:
        free = self._idle.get(key)
        if free:
            return free.pop()
        self.started += 1
        return self._start(key)

    def call(self, handle: Any, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, a call on `handle`. A call that raises (the env time limit, Ctrl-C, a dead process)
        discards the handle; one still in flight when the handle is released (a caller that stopped waiting for
        it) discards it then: a handle in an unknown state is never re-used."""
        self._busy.add(id(handle))
        try:
            return fn(*args)
        except BaseException:
            self.discard(handle)
            raise
        finally:
            self._busy.discard(id(handle))

    def release(self, key: Hashable, handle: Any) -> None:
        if id(handle) in self._busy:
            self.discard(handle)
        elif sum(len(v) for v in self._idle.values()) >= self.max_idle:
            self._close(handle)
        else:
            self._idle.setdefault(key, []).append(handle)

    def discard(self, handle: Any) -> None:
        """Throw away a handle whose last call did not finish (timed out, interrupted): its state is unknown, so
        it is killed, never re-used."""
        try:
            self._kill(handle)
        except Exception:  # already dead: nothing left to stop
            pass

    def close(self) -> None:
        for handles in self._idle.values():
            for h in handles:
                try:
                    self._close(h)
                except Exception:  # a handle whose process already died: nothing left to close
                    pass
        self._idle.clear()
