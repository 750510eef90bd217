"""`outrider compare --backend ray`: each recipe × seed is one Ray task that runs the same `outrider train` child
process the local backend runs, on whichever node has the declared CPUs (and GPUs) free.

Run directories must lie on a path every node sees (NFS, a shared disk): the task writes its run there and the
driver reads ``metrics.jsonl`` from there for the live table and the report. A task whose worker dies (a node lost,
an OOM kill, ``kill -9``) is retried by Ray; the retry finds ``recipe.yaml`` in the run directory and continues
with ``train --resume`` from the last checkpoint, which ends bit-identical to an uninterrupted run.
``RAY_ADDRESS`` (or `compare`'s ``ray_address``) joins an existing cluster; without it a local Ray instance is started for the
command and stopped after it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from outrider.compare import RunJob, _command, _table, child_env, record_exit, settle
from outrider.errors import OutriderError
from outrider.ray_cluster import connect, import_ray  # noqa: F401  (compare's entry points)

RETRIES = 3  # attempts after the first, for a worker that dies or a child killed by a signal
_PR_SET_PDEATHSIG = 1


class ChildKilled(RuntimeError):
    """The `train` child ended by a signal (OOM killer, kill -9): worth a retry, unlike a Python error."""


def _die_with_parent() -> None:
    """In the child, before exec: receive SIGKILL when the Ray worker that started it dies, so that a retried
    attempt never shares the run directory with an orphan of the dead one (Linux; elsewhere a no-op)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def run_attempt(job: RunJob, sets: list[str], threads: int) -> tuple[int, list[str]]:
    """One attempt at JOB on this node: a fresh run, or `train --resume` where an earlier attempt started it.
    Returns the exit code and the stderr lines; raises ChildKilled when a signal ended the child."""
    if settle(job) == "kept":  # an earlier attempt finished, and its worker died before reporting
        return 0, []
    env = child_env(job, threads)
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(_command(job, sets, threads), stdout=subprocess.DEVNULL, stderr=err,
                                stdin=subprocess.DEVNULL, env=env, preexec_fn=_die_with_parent)
        proc.wait()
        err.seek(0)
        lines = err.read().splitlines()
    if proc.returncode < 0:
        raise ChildKilled(f"{job.name}: train ended by signal {-proc.returncode}")
    return proc.returncode, lines


def cluster_cpus(ray: Any) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def check_fits(ray: Any, threads: int, gpus: float) -> None:
    """Refuse a task no node could ever hold (Ray would keep it pending forever): more CPUs or GPUs than the
    cluster has in all (a node smaller than that still leaves it pending; Ray's status shows it)."""
    have = ray.cluster_resources()
    if threads > have.get("CPU", 0):
        raise OutriderError(f"--threads: each run asks for {threads} CPUs, the Ray cluster has {have.get('CPU', 0):g}")
    if gpus > have.get("GPU", 0):
        raise OutriderError(f"--gpus-per-run: each run asks for {gpus:g} GPUs, the Ray cluster has "
                            f"{have.get('GPU', 0):g}")


def run_all_ray(ray: Any, jobs: list[RunJob], sets: list[str], parallel: int, threads: int, gpus: float,
                console: Console) -> None:
    """Submit the queued jobs as Ray tasks (at most PARALLEL in flight), with the local backend's live table."""
    check_fits(ray, threads, gpus)
    remote = ray.remote(run_attempt).options(num_cpus=threads, num_gpus=gpus, max_retries=RETRIES,
                                             retry_exceptions=[ChildKilled])
    queue = [j for j in jobs if j.state == "queued"]
    running: dict[Any, RunJob] = {}
    with Live(_table(jobs), console=console, refresh_per_second=2, transient=False) as live:
        try:
            while queue or running:
                while queue and len(running) < parallel:
                    job = queue.pop(0)
                    job.state, job.started = "running", time.monotonic()
                    running[remote.remote(on_shared_path(job), sets, threads)] = job
                done, _ = ray.wait(list(running), num_returns=1, timeout=0.25)
                for ref in done:
                    job = running.pop(ref)
                    try:
                        code, lines = ray.get(ref)
                    except Exception as e:  # retries exhausted, or the task itself failed
                        last = (str(e).strip().splitlines() or [""])[-1]
                        code, lines = 1, [f"ray: {type(e).__name__}: {last}"]
                    record_exit(job, code, lines)
                live.update(_table(jobs))
            live.update(_table(jobs))
        except KeyboardInterrupt:
            for ref in running:  # only the tasks this command submitted; their children die with their workers
                ray.cancel(ref, force=True)
            raise


def on_shared_path(job: RunJob) -> RunJob:
    """JOB with absolute recipe and run paths, as a task sees them: a relative path would resolve against each
    worker's own working directory. Both must lie on a path all nodes see."""
    return dataclasses.replace(job, recipe=Path(os.path.abspath(job.recipe)),
                               run_dir=Path(os.path.abspath(job.run_dir)))
