"""What the env time limit (`task.step_timeout_s`) costs: a rollout of 128 single-turn episodes (grpo.yaml's task
and model) with and without it, interleaved in one process, and the cost of one limited call by SIGALRM timer
(what the main thread uses) and by a worker thread (the alternative for in-process envs).

    .venv/bin/python benchmarks/time_limit.py [--reps 60]

CPU time of one thread, so other processes on the machine disturb the figures less than wall time would.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from outrider.data import Start
from outrider.envs.time_limit import TimeLimit, _in_thread
from outrider.explore.rollout import rollout
from outrider.recipe import load_recipe
from outrider.trainer import build_policy, build_task, sampling_params

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "grpo.yaml"


def per_call(n: int = 20000) -> dict[str, float]:
    """Microseconds per call of a no-op: bare, under the SIGALRM limit, in a worker thread."""
    def noop() -> None:
        return None

    t = time.perf_counter()
    for _ in range(n):
        noop()
    bare = (time.perf_counter() - t) / n
    with TimeLimit(30.0) as clock:
        t = time.perf_counter()
        for _ in range(n):
            clock.call(noop)
        timer = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for _ in range(n // 10):
        _in_thread(noop, (), 30.0)
    thread = (time.perf_counter() - t) / (n // 10)
    return {"bare_us": bare * 1e6, "sigalrm_us": timer * 1e6, "worker_thread_us": thread * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=60)
    reps = parser.parse_args().reps
    torch.set_num_threads(1)
    rec = load_recipe(RECIPE)
    task, policy, params = build_task(rec), build_policy(rec, value_head=False), sampling_params(rec)
    starts = [Start(seed=s, group_id=s // 8) for s in range(128)]

    def one(limit: float | None) -> float:
        t = time.process_time()
        rollout(policy, lambda: task.make_env("train"), starts, params, torch.Generator().manual_seed(0), 1,
                step_timeout_s=limit)
        return time.process_time() - t

    times: dict[float | None, list[float]] = {None: [], 30.0: []}
    for _ in range(3):
        one(None), one(30.0)
    for _ in range(reps):
        for limit in times:
            times[limit].append(one(limit))
    for limit, v in times.items():
        print(f"rollout of 128 episodes, step_timeout_s={limit}: median {statistics.median(v) * 1e3:.2f} ms, "
              f"min {min(v) * 1e3:.2f} ms (n={reps})")
    print("per call: " + ", ".join(f"{k} {v:.2f}" for k, v in per_call().items()))


if __name__ == "__main__":
    main()
