"""Env workers: a rollout's envs held and stepped in `task.workers` worker processes (see `env_batch` for the
two-phase step and the in-process `LocalEnvs`).

`RemoteEnvs` sends a rollout's envs to an `EnvWorkers` pool, env ``i`` to worker ``i mod N``, one message per
worker per phase, and the workers step theirs at the same time, with the same per-env code as in-process
(`env_batch.reach`, `env_batch.step`), so episodes are identical to serial stepping for the same seeds.

Workers are separate processes (``forkserver``: no copy of the trainer's threads, tensors or sockets), started
once per run; each builds its own task from a picklable factory (the trainer passes the recipe's task section),
so an env never crosses a process boundary, only its observations, infos, state keys and snapshots do (a snapshot
must survive `torch.save` anyway). Each worker runs its env calls under the task's time limit (`TimeLimit`, by
``SIGALRM`` in its own main thread), so a timed-out env ends its episode exactly as in-process. An exception raised
by an env in a worker is re-raised in the trainer as the same exception (the worker's traceback attached as a
note), so a bad env gives the same one-line error as serially. Workers ignore Ctrl-C: the trainer's interrupt
stops them, after letting each finish the calls it is in (its envs, e.g. simulators, are closed, not orphaned).
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import pickle
import signal
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from outrider.envs.base import Env, close_env
from outrider.envs.env_batch import ReachJob, Reply, StepJob, reach, step
from outrider.envs.time_limit import TimeLimit
from outrider.errors import OutriderError


def task_from_section(section: dict[str, Any]) -> Any:
    """The task a recipe's ``task`` section names, built from its options (what each env worker runs)."""
    from outrider.envs.base import ENVS  # every task module is registered by the package's import

    entry, cfg = ENVS.build(section, "task")
    return entry.fn(cfg)


@dataclass
class _Failure:
    """An exception raised by an env call in a worker, carried back to be raised in the trainer."""

    error: BaseException
    where: str


def _portable(error: BaseException) -> BaseException:
    """The exception itself when it survives pickling, else a RuntimeError with its type and message."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001  (any pickling failure)
        return RuntimeError(f"{type(error).__name__}: {error}")


def build_task(make_task: Callable[[], Any]) -> tuple[Any, "_Failure | None"]:
    """A worker's task, or the failure to raise at its first call (in the trainer, as the same exception)."""
    try:
        return make_task(), None
    except BaseException as e:  # noqa: BLE001
        return None, _Failure(_portable(e), traceback.format_exc())


def answer(task: Any, broken: "_Failure | None", envs: dict[int, Env], kind: str, split: str,
           timeout: float | None, jobs: list[tuple]) -> list[Any]:
    """A worker's replies to one batch of env jobs, under the task's time limit: a `Reply` a job, up to the first
    env error, which ends the list as a `_Failure` (serially the rollout stops at the first error)."""
    replies: list[Any] = []
    with TimeLimit(timeout) as clock:
        for job in jobs:
            try:
                if task is None:
                    raise broken.error  # type: ignore[union-attr]
                replies.append(_run_job(kind, split, job, envs, task, clock))
            except BaseException as e:  # noqa: BLE001  (the env's error, raised again in the trainer)
                replies.append(_Failure(_portable(e), traceback.format_exc()))
                break
    return replies


def shut(envs: dict[int, Env], task: Any) -> None:
    """Close a worker's envs and its task (pooled simulators and interpreters: a worker exits without running
    atexit hooks)."""
    for env in envs.values():
        close_env(env)
    envs.clear()
    close = getattr(task, "close", None)
    if callable(close):
        close()


def _serve(conn: Any, make_task: Callable[[], Any], index: int) -> None:
    """A worker's loop: build the task, then answer batches of env jobs until told to stop or the trainer is
    gone; its envs are closed on the way out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the trainer stops workers; an interrupt would lose envs
    envs: dict[int, Env] = {}
    task, broken = build_task(make_task)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the trainer is gone
            break
        if message is None:
            break
        replies = answer(task, broken, envs, *message)
        try:
            conn.send(replies)
        except Exception as e:  # noqa: BLE001  (an info or snapshot that cannot be pickled)
            conn.send([_Failure(RuntimeError(f"env worker {index}: a reply cannot be sent to the trainer: {e}"),
                                traceback.format_exc())])
    shut(envs, task)


def _run_job(kind: str, split: str, job: tuple, envs: dict[int, Env], task: Any, clock: TimeLimit) -> Reply:
    if kind == "close":
        env = envs.pop(job[0], None)
        if env is not None:
            close_env(env)
        return Reply()
    if kind == "reach":
        i, seed, snap, prefix, keep = job
        env = envs[i] = task.make_env(split)
        reply = reach(env, seed, snap, prefix, clock, keep)
    else:
        i, action, on, keep = job
        reply = step(envs[i], action, clock, on, keep)
    if reply.timed_out:
        close_env(envs.pop(i))
    return reply


class WorkerPool:
    """What the worker pools share (`EnvWorkers`: processes; `ray_workers.RayEnvWorkers`: Ray actors): `n`
    workers, env ids unique in the pool, ``split(name)`` in place of an env factory, and the one-line errors.
    A subclass sends each worker its jobs in ``call`` and stops them in ``close``."""

    def __init__(self, n: int):
        if n < 2:
            raise OutriderError(f"task.workers: {n} worker processes is not a pool; use 1 for in-process envs")
        self.n, self._next_id, self.broken = n, 0, False

    def split(self, name: str) -> "_Split":
        return _Split(self, name)

    def _ids(self, n: int) -> int:
        first, self._next_id = self._next_id, self._next_id + n
        return first

    def call(self, kind: str, split: str, timeout: float | None, jobs: list[list[tuple]]) -> list[list[Any]]:
        """Send each worker its jobs (one message each, all sent before any answer is read) and return their
        replies; any error or interrupt leaves the pool broken (to be closed, not re-used)."""
        self._usable()
        try:
            for k, part in enumerate(jobs):
                if part:
                    self._send(k, (kind, split, timeout, part))
            return [self._receive(k, timeout, len(part)) if part else [] for k, part in enumerate(jobs)]
        except BaseException:
            self.broken = True
            raise

    def _send(self, k: int, message: tuple) -> None:
        raise NotImplementedError

    def _receive(self, k: int, timeout: float | None, count: int) -> list[Any]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _usable(self) -> None:
        if self.broken:
            raise OutriderError("task.workers: the env workers were stopped by an earlier error or interrupt")

    @staticmethod
    def _patience(timeout: float | None, count: int) -> float | None:
        # a worker enforces the time limit on each call; this bound only catches one stuck outside Python
        return None if timeout is None else timeout * (count + 1) + 60.0

    @staticmethod
    def _stuck(k: int, wait: float) -> OutriderError:
        return OutriderError(f"task.workers: env worker {k} gave no answer in {wait:.0f} s (stuck in native code "
                             "past task.step_timeout_s); use task.workers: 1 to see where")

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class EnvWorkers(WorkerPool):
    """`n` worker processes, each with its own task built by `make_task` (a picklable function: the trainer
    passes the recipe's task section), started now and stopped by `close()` (also a context manager).
    ``split(name)`` is what a rollout takes in place of an env factory. A worker that dies or stops answering
    ends the run with an OutriderError; after an interrupt the pool is closed, not re-used."""

    def __init__(self, make_task: Callable[[], Any], n: int):
        super().__init__(n)
        try:
            pickle.dumps(make_task)
        except Exception as e:  # noqa: BLE001
            raise OutriderError(f"task.workers: the task cannot be sent to a worker process ({e}); use "
                                "task.workers: 1") from None
        # forkserver: a fresh server process imports outrider once (torch included), then each worker is forked
        # from it in milliseconds; never forked from the trainer, whose threads and env sockets it must not copy
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        self._conns, self._procs = [], []
        for k in range(n):
            parent, child = ctx.Pipe()
            # not daemonic: an env may start processes of its own (TextWorld's interpreters); a worker whose
            # trainer is gone, even killed, reads EOF from its pipe and exits
            proc = ctx.Process(target=_serve, args=(child, make_task, k), name=f"outrider-env-{k}")
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        self._pending = [False] * n
        atexit.register(self.close)  # a pool never closed still stops (before multiprocessing joins its children)

    def _send(self, k: int, message: tuple) -> None:
        try:
            self._conns[k].send(message)
        except OSError:  # its end of the pipe is closed: the worker is gone
            self._died(k)
        self._pending[k] = True

    def _receive(self, k: int, timeout: float | None, count: int) -> list[Any]:
        wait = self._patience(timeout, count)
        conn = self._conns[k]
        try:
            if not conn.poll(wait):
                raise self._stuck(k, wait)
            replies = conn.recv()
        except (EOFError, OSError):
            self._died(k)
        self._pending[k] = False
        return replies

    def _died(self, k: int) -> None:
        self._procs[k].join(1.0)
        raise OutriderError(f"task.workers: env worker {k} died (exit code {self._procs[k].exitcode}); the same "
                            "run with task.workers: 1 shows the env's error") from None

    def close(self) -> None:
        """Stop the workers: each finishes what it is doing (its reply is dropped), closes its envs and exits;
        one that does not within a few seconds is killed."""
        atexit.unregister(self.close)
        for k, conn in enumerate(self._conns):
            try:
                if self._pending[k] and conn.poll(10.0):
                    conn.recv()
                conn.send(None)
            except (EOFError, OSError):
                pass
        for proc in self._procs:
            proc.join(10.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        self._conns, self._procs, self.broken = [], [], True


class _Split:
    """A rollout's env source on a worker pool: ``open_batch`` gives `RemoteEnvs` of one split."""

    def __init__(self, workers: WorkerPool, split: str):
        self.workers, self.name = workers, split

    def open_batch(self, n: int, step_timeout_s: float | None) -> "RemoteEnvs":
        return RemoteEnvs(self.workers, self.name, n, step_timeout_s)


class RemoteEnvs:
    """A rollout's envs in the workers: env ``i`` lives in worker ``i mod N`` (ids unique in the pool)."""

    def __init__(self, workers: WorkerPool, split: str, n: int, step_timeout_s: float | None):
        self.workers, self.split, self.timeout = workers, split, step_timeout_s
        self.first = workers._ids(n)
        self.open = [False] * n

    def _call(self, kind: str, jobs: list[tuple]) -> list[Reply]:
        n = self.workers.n
        parts: list[list[tuple]] = [[] for _ in range(n)]
        for job in jobs:
            parts[job[0] % n].append((self.first + job[0],) + tuple(job[1:]))
        answers = self.workers.call(kind, self.split, self.timeout, parts)
        seen, out = [0] * n, []
        for job in jobs:
            k = job[0] % n
            if seen[k] >= len(answers[k]):  # the worker stopped at an earlier env's error: raise that
                continue
            reply = answers[k][seen[k]]
            seen[k] += 1
            if isinstance(reply, _Failure):
                reply.error.add_note(f"raised in env worker {k}:\n{reply.where}")
                raise reply.error
            out.append(reply)
        return out

    def reach(self, jobs: list[ReachJob]) -> list[Reply]:
        for job in jobs:
            self.open[job[0]] = True
        out = self._call("reach", jobs)
        for job, reply in zip(jobs, out):
            self.open[job[0]] = not reply.timed_out
        return out

    def step(self, jobs: list[StepJob]) -> list[Reply]:
        out = self._call("step", jobs)
        for job, reply in zip(jobs, out):
            self.open[job[0]] = not reply.timed_out
        return out

    def close(self, i: int) -> None:
        if self.open[i]:
            self.open[i] = False
            self._call("close", [(i,)])

    def close_all(self) -> None:
        if self.workers.broken:  # after an error or interrupt the pool is stopped whole, envs and all
            return
        jobs = [(i,) for i, is_open in enumerate(self.open) if is_open]
        self.open = [False] * len(self.open)
        if jobs:
            self._call("close", jobs)


__all__ = ["EnvWorkers", "RemoteEnvs", "WorkerPool", "answer", "build_task", "shut", "task_from_section"]
