"""Env workers as Ray actors (`task.workers_backend: ray`): the same pool as `workers.EnvWorkers`, with each
worker a Ray actor instead of a local process, so a rollout's envs can live on other nodes of a cluster.

One actor per worker holds its envs (env ``i`` of a rollout in actor ``i mod N``, as with processes) and runs the
same per-env code (`workers.answer`: `env_batch.reach`/`step` under the task's time limit), so episodes are
identical to serial stepping for the same seeds. An env's exception comes back as the same exception (the actor's
traceback attached as a note); an actor that dies is one line naming ``task.workers``; one that gives no answer
past the time limit's bound is the same line as a stuck process.

Ray is joined at ``RAY_ADDRESS`` when it is set (an existing cluster, left running), else a local Ray instance is
started for the run and stopped with the pool; where this process is already connected to Ray, that connection
is used. Each actor asks Ray for ``cpus_per_worker`` CPUs (1: an env worker keeps a core busy); on a cluster,
every node that may hold one needs outrider and the task's own packages (TextWorld, ScienceWorld) installed. Ray
is imported only when this backend is asked for; without the extra the run stops with one line naming
``outrider[ray]``.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import threading
from typing import Any, Callable

from outrider.envs.base import Env
from outrider.envs.workers import WorkerPool, answer, build_task, shut
from outrider.errors import OutriderError
from outrider.ray_cluster import connect

START_S = 300.0  # actors that are not all running by then: a cluster without the CPUs free, or a broken worker


class EnvActor:
    """One env worker on Ray: its task (built from `make_task` in the actor) and its envs by pool-wide id."""

    def __init__(self, make_task: Callable[[], Any]):
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the trainer stops the actors; an interrupt would lose envs
        self.envs: dict[int, Env] = {}
        self.task, self.broken = build_task(make_task)

    def pid(self) -> int:
        return os.getpid()

    def call(self, kind: str, split: str, timeout: float | None, jobs: list[tuple]) -> list[Any]:
        return answer(self.task, self.broken, self.envs, kind, split, timeout, jobs)

    def close(self) -> None:
        shut(self.envs, self.task)


def _last_line(error: BaseException) -> str:
    """The last line of a Ray error's text (Ray's own are many lines, the cause last), without colour codes."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


class RayEnvWorkers(WorkerPool):
    """`n` env workers as Ray actors, each with its own task built by `make_task` (the trainer passes the
    recipe's task section), started now (waiting until every actor runs) and stopped by `close()`: each finishes
    its call, closes its envs and is killed; a local Ray instance started here is shut down."""

    def __init__(self, make_task: Callable[[], Any], n: int, cpus_per_worker: float = 1.0,
                 address: str | None = None):
        super().__init__(n)
        self._actors: list[Any] = []
        self._pending: list[Any] = [None] * n
        ray, self._owns = connect(address, max(n, os.cpu_count() or 1), "task.workers_backend: ray")
        self._ray = ray
        try:
            cpus = ray.cluster_resources().get("CPU", 0)
            if n * cpus_per_worker > cpus:  # Ray would keep the actors pending forever
                raise OutriderError(f"task.workers: {n} env workers (Ray actors of {cpus_per_worker:g} CPU) need "
                                    f"{n * cpus_per_worker:g} CPUs, the Ray cluster has {cpus:g}")
            actor = ray.remote(EnvActor).options(num_cpus=cpus_per_worker, max_restarts=0)
            self._actors = [actor.remote(make_task) for _ in range(n)]
            waits = [a.pid.remote() for a in self._actors]
            ready, _ = ray.wait(waits, num_returns=n, timeout=START_S)
            if len(ready) < n:  # the CPUs are taken by others' tasks, or an actor cannot start
                raise OutriderError(f"task.workers: {n} env workers (Ray actors of {cpus_per_worker:g} CPU) did not "
                                    f"all start within {START_S:.0f} s; see `ray status`")
            self.pids = [self._get(k, ref) for k, ref in enumerate(waits)]
        except BaseException:
            self.close()
            raise
        atexit.register(self.close)  # a pool never closed still stops, before Ray's own exit hook

    def _send(self, k: int, message: tuple) -> None:
        self._pending[k] = self._actors[k].call.remote(*message)

    def _receive(self, k: int, timeout: float | None, count: int) -> list[Any]:
        wait = self._patience(timeout, count)
        ready, _ = self._ray.wait([self._pending[k]], timeout=wait)
        if not ready:
            raise self._stuck(k, wait)
        replies = self._get(k, self._pending[k])
        self._pending[k] = None
        return replies

    def _get(self, k: int, ref: Any) -> Any:
        errors = self._ray.exceptions
        try:
            return self._ray.get(ref)
        except errors.RayActorError as e:
            raise OutriderError(f"task.workers: env worker {k} (a Ray actor) died ({_last_line(e)}); the same run "
                                "with task.workers: 1 shows the env's error") from None
        except errors.RayTaskError as e:  # not an env's error (those come back as replies): e.g. a reply Ray
            # cannot serialise
            cause = getattr(e, "cause", None) or e
            raise OutriderError(f"task.workers: env worker {k} (a Ray actor) failed: {type(cause).__name__}: "
                                f"{_last_line(cause)}") from None

    def close(self) -> None:
        """Stop the actors: each finishes the call it is in (its reply is dropped), closes its envs and is
        killed (after 10 s at most); a local Ray instance started by this pool is shut down."""
        atexit.unregister(self.close)
        ray, actors, self._actors, self.broken = self._ray, self._actors, [], True
        if actors:
            try:
                pending = [r for r in self._pending if r is not None]
                if pending:
                    ray.wait(pending, num_returns=len(pending), timeout=10.0)
                closing = [a.close.remote() for a in actors]
                ray.wait(closing, num_returns=len(closing), timeout=10.0)
            except Exception:  # noqa: BLE001  (a dead actor or a lost cluster: killed below all the same)
                pass
            for a in actors:
                try:
                    ray.kill(a)
                except Exception:  # noqa: BLE001
                    pass
        self._pending = [None] * self.n
        if self._owns:
            self._owns = False
            ray.shutdown()


__all__ = ["EnvActor", "RayEnvWorkers"]
