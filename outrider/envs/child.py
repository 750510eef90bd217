"""An object that lives in a child process, called over a pipe: for env code that runs native loops in-process.

A game interpreter loaded as a C library (TextWorld's frotz, through jericho) runs in the caller's process, where
nothing can stop a call that never returns: not a Python thread, not a signal handler (which runs only once the C
call returns). In a child process the same object can be killed. `ChildObject` forks the current process (fast:
nothing is re-imported), builds the object there with ``factory()``, and runs each `call` in the child; the parent
waits on the pipe, which the env time limit (`envs/time_limit.py`) can interrupt, and `kill` ends a child that no
longer answers. The child's stdout and stderr go to ``/dev/null``: an interpreter that loops while printing (frotz
on an input it does not know) writes nothing anywhere. Results cross the pipe pickled: a `reply` function run in the
child keeps them small.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
from typing import Any, Callable

# fork: the child starts from the parent's memory, with every module already imported (a fresh interpreter would
# import the game library again, ~0.7 s per child); it runs library code only, never torch
_CONTEXT = multiprocessing.get_context("fork")


def _serve(conn: Any, factory: Callable[[], Any], reply: Callable[[str, Any], Any]) -> None:
    gc.disable()  # the serving loop makes no cycles; collections would copy the parent's pages for nothing
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the whole group: the parent decides
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        obj = factory()
    except Exception as e:  # noqa: BLE001  (reported to the parent, which raises it)
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ok", None))
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent went away
            return
        if message is None:
            break
        method, args = message
        try:
            conn.send(("ok", reply(method, getattr(obj, method)(*args))))
        except Exception as e:  # noqa: BLE001
            conn.send(("error", f"{type(e).__name__}: {e}"))
    close = getattr(obj, "close", None)
    if callable(close):
        close()


class ChildError(RuntimeError):
    """The object in the child raised, or the child died."""


class ChildObject:
    """``factory()`` built and kept in a forked child; ``call(method, *args)`` runs ``obj.method(*args)`` there and
    returns ``reply(method, result)`` (computed in the child)."""

    def __init__(self, factory: Callable[[], Any], reply: Callable[[str, Any], Any] = lambda method, r: r):
        self._conn, child_end = _CONTEXT.Pipe()
        self._process = _CONTEXT.Process(target=_serve, args=(child_end, factory, reply), daemon=True)
        self._process.start()
        child_end.close()
        try:
            self._receive()  # the factory's outcome
        except BaseException:  # it failed, or the env time limit (or Ctrl-C) stopped the wait: no child is left
            self.kill()
            raise

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def _receive(self) -> Any:
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError):
            raise ChildError(f"the child process (pid {self.pid}) exited") from None
        if status == "error":
            raise ChildError(value)
        return value

    def call(self, method: str, *args: Any) -> Any:
        self._conn.send((method, args))
        return self._receive()

    def close(self) -> None:
        """Ask the child to close its object and exit; kill it if it does not within a second."""
        try:
            self._conn.send(None)
        except (OSError, ValueError):
            pass
        self._process.join(1.0)
        self.kill()

    def kill(self) -> None:
        """End the child now (it may be stuck in native code)."""
        if self._process.is_alive():
            self._process.kill()
        self._process.join()
        self._conn.close()
