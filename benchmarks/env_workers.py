"""Env workers (`task.workers`): the wall time of one multi-turn rollout under two variants, interleaved A B A B
in one process, after one warm-up rollout of each (simulators and interpreters started, the workers' tasks built:
once per run, timed apart as ``startup``). A variant is ``serial`` (envs in this process), ``process``
(`--workers` worker processes) or ``ray`` (`--workers` Ray actors on a local Ray instance started here:
`task.workers_backend: ray`). Both play the same starts with the same sampler seed; the episodes are checked to be
identical. The sampler's own time is measured inside the rollout (``sampler_s``), so ``env_s`` = wall − sampler is
what the env steps (and, with workers, the messages) cost on the trainer's side.

    nice -n 10 .venv/bin/python benchmarks/env_workers.py --task scienceworld --rounds 3
    nice -n 10 .venv/bin/python benchmarks/env_workers.py --task textworld --episodes 16 --rounds 3
    nice -n 10 .venv/bin/python benchmarks/env_workers.py --task minigrid --variants process ray --rounds 3

The model is each task's tiny recipe model, untrained (its actions are mostly invalid, so episodes run to the
horizon: the most env steps per rollout). Writes benchmarks/results/env_workers_<task>.json (serial against
processes; other pairs: env_workers_<task>_<A>_<B>.json) with each round's times, median/min/max, and the
machine's load before and after (`os.getloadavg`, and `uptime`'s line).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

import outrider.explore.rollout as rollout_module
from outrider.data import Start
from outrider.envs.base import Task
from outrider.envs.workers import EnvWorkers, task_from_section
from outrider.explore.rollout import rollout
from outrider.policy.model import Policy
from outrider.policy.sampler import SamplingParams

TASKS = {
    # the slow envs: a JVM simulator (~0.05-0.2 s a step), a game interpreter in a child process
    "scienceworld": {"name": "scienceworld", "task_name": "find-living-thing", "simplification": "easy",
                     "max_obs_chars": 300, "max_turns": 15, "max_simulators": 8},
    "textworld": {"name": "textworld", "challenge": "coin_collector", "level": 5, "train_games": 48,
                  "eval_games": 16, "format": "compact", "max_turns": 8},
    # the cheap env: a few microseconds of Python per step
    "minigrid": {"name": "minigrid", "env_id": "MiniGrid-DoorKey-5x5-v0", "max_turns": 16},
    # an env that waits 50 ms a step without using the CPU (a remote simulator or service): what workers give
    # when a core is not the bound
    "sleep": {"max_turns": 10},
}


class SleepEnv:
    def reset(self, seed: int) -> str:
        self.n = 0
        return "wait:"

    def step(self, action: str):
        time.sleep(0.05)
        self.n += 1
        return "wait:", 0.0, self.n == 10, {}


class SleepTask(Task):
    max_turns = 10

    def make_env(self, split):
        return SleepEnv()

    def demonstrations(self, seeds):
        return []
OUT = Path(__file__).resolve().parent / "results"


def timed_sampler() -> dict[str, float]:
    """Wrap the rollout's sampler so its time is summed into the returned dict."""
    spent = {"s": 0.0}
    inner = rollout_module.sample

    def sample(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent["s"] += time.perf_counter() - t

    rollout_module.sample = sample
    return spent


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def open_source(variant: str, task: Task, make_task, n: int) -> tuple[Any, Any]:
    """A variant's env source for `rollout`, and its pool (None for serial)."""
    if variant == "serial":
        return (lambda: task.make_env("train")), None
    if variant == "ray":
        from outrider.envs.ray_workers import RayEnvWorkers

        pool = RayEnvWorkers(make_task, n)
    else:
        pool = EnvWorkers(make_task, n)
    return pool.split("train"), pool


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", choices=sorted(TASKS), default="scienceworld")
    parser.add_argument("--variants", nargs=2, choices=["serial", "process", "ray"], default=["serial", "process"],
                        help="the two variants timed against each other (A B)")
    parser.add_argument("--workers", type=int, default=2)
    # ScienceWorld holds a JVM (~0.5 GB) per running episode, twice here (serial and workers): keep it small
    parser.add_argument("--episodes", type=int, default=4, help="episodes per rollout (4 a seed)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    section = TASKS[args.task]
    make_task = SleepTask if args.task == "sleep" else functools.partial(task_from_section, section)
    task = make_task()
    positions = 1024 if args.task == "scienceworld" else 512
    policy = Policy.tiny(hidden=128, layers=2, heads=4, max_positions=positions, seed=0)
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    starts = [Start(seed=1000 + k // 4, group_id=k // 4) for k in range(args.episodes)]
    spent = timed_sampler()
    load_before, uptime_before = os.getloadavg(), uptime()

    sources, pools, startup = {}, [], {}
    try:
        for variant in args.variants:
            name = variant if variant == "serial" else f"{variant}{args.workers}"
            t = time.perf_counter()
            sources[name], pool = open_source(variant, task, make_task, args.workers)
            if pool is not None:
                pools.append(pool)
                startup[f"{name}_started_s"] = time.perf_counter() - t

        def one(source) -> tuple[float, float, list]:
            spent["s"] = 0.0
            t0 = time.perf_counter()
            episodes = rollout(policy, source, starts, params, torch.Generator().manual_seed(0), task.max_turns,
                               step_timeout_s=60.0)
            return time.perf_counter() - t0, spent["s"], episodes

        reference = None
        for name, source in sources.items():  # warm-up: simulators started, the workers' tasks built
            wall, _, episodes = one(source)
            startup[f"{name}_first_rollout_s"] = wall
            actions = [[t.action for t in e.turns] for e in episodes]
            assert reference is None or actions == reference, "the variants played different episodes"
            reference = actions
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in sources}
        for r in range(args.rounds):
            for name, source in sources.items():
                wall, sampler, episodes = one(source)
                assert [[t.action for t in e.turns] for e in episodes] == reference
                rounds[name].append({"wall_s": wall, "sampler_s": sampler, "env_s": wall - sampler})
                print(f"round {r} {name}: {wall:.2f} s (sampler {sampler:.2f} s)", flush=True)
    finally:
        for pool in pools:
            pool.close()
    steps = sum(len(a) for a in reference)
    summary = {name: {k: {"median": statistics.median(x[k] for x in rs), "min": min(x[k] for x in rs),
                          "max": max(x[k] for x in rs)} for k in ("wall_s", "sampler_s", "env_s")}
               for name, rs in rounds.items()}
    names = list(sources)
    speedup = [a["wall_s"] / b["wall_s"] for a, b in zip(rounds[names[0]], rounds[names[1]])]
    result = {"task": section, "variants": names, "workers": args.workers, "episodes": args.episodes,
              "env_steps": steps, "max_new_tokens": args.max_new_tokens, "startup": startup, "rounds": rounds,
              "summary": summary, "speedup_per_round": speedup, "speedup_median": statistics.median(speedup),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "uptime_before": uptime_before,
              "uptime_after": uptime(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    OUT.mkdir(exist_ok=True)
    tail = "" if args.variants == ["serial", "process"] else "_" + "_".join(args.variants)
    path = OUT / f"env_workers_{args.task}{tail}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps({"summary": summary, "speedup_median": result["speedup_median"], "env_steps": steps,
                      "startup": startup, "load": [uptime_before, result["uptime_after"]]}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
