"""Env workers (`task.workers`): episodes identical to in-process stepping for the same seeds (MiniGrid, the
calculator, TextWorld where installed), restarts from snapshots and from replayed prefixes, an env's error and an
env's timeout as serially, and workers that stop with the pool (after an interrupt too)."""

from __future__ import annotations

import functools
import importlib.util
import json
import multiprocessing
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from outrider.data import Episode, Start
from outrider.envs.base import Demonstration, Task
from outrider.envs.workers import EnvWorkers, task_from_section
from outrider.errors import OutriderError
from outrider.explore.rollout import rollout
from outrider.policy.model import Policy
from outrider.policy.sampler import SamplingParams

MINIGRID = {"name": "minigrid", "env_id": "MiniGrid-DoorKey-5x5-v0", "max_turns": 6}
CALCULATOR = {"name": "calculator", "max_turns": 4}


@pytest.fixture(scope="module")
def minigrid_workers():
    with EnvWorkers(functools.partial(task_from_section, MINIGRID), 2) as workers:
        yield workers


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy.tiny(hidden=32, layers=1, heads=2, seed=0)


def play(policy: Policy, source: Any, starts: list[Start], max_turns: int, snapshots: bool = False,
         timeout: float | None = 30.0) -> list[Episode]:
    return rollout(policy, source, starts, SamplingParams(max_new_tokens=4), torch.Generator().manual_seed(3),
                   max_turns, snapshots, step_timeout_s=timeout)


def same_episodes(a: list[Episode], b: list[Episode]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.seed, x.group_id, x.success, x.done, x.metadata) == (y.seed, y.group_id, y.success, y.done,
                                                                      y.metadata)
        assert len(x.turns) == len(y.turns)
        for s, t in zip(x.turns, y.turns):
            assert (s.observation, s.observation_ids, s.action, s.action_ids, s.reward, s.info, s.finish_reason) == \
                   (t.observation, t.observation_ids, t.action, t.action_ids, t.reward, t.info, t.finish_reason)
            assert s.behaviour_logprobs == t.behaviour_logprobs
            assert (s.snapshot is None) == (t.snapshot is None)


def check_same_episodes(policy: Policy, section: dict, workers: EnvWorkers) -> None:
    task = task_from_section(section)
    starts = [Start(seed=s, group_id=s // 3) for s in [5, 5, 5, 17, 17, 17, 40]]
    serial = play(policy, lambda: task.make_env("train"), starts, task.max_turns)
    parallel = play(policy, workers.split("train"), starts, task.max_turns)
    again = play(policy, workers.split("train"), starts, task.max_turns)  # the same pool, new envs
    evaluation = play(policy, workers.split("eval"), starts[:3], task.max_turns)
    same_episodes(serial, parallel)
    same_episodes(serial, again)
    same_episodes(play(policy, lambda: task.make_env("eval"), starts[:3], task.max_turns), evaluation)
    assert sum(len(e.turns) for e in serial) > len(serial)  # multi-turn episodes, not one-turn ones


def test_workers_play_the_same_episodes_as_in_process_minigrid(policy, minigrid_workers):
    check_same_episodes(policy, MINIGRID, minigrid_workers)


def test_workers_play_the_same_episodes_as_in_process_calculator_three_workers(policy):
    with EnvWorkers(functools.partial(task_from_section, CALCULATOR), 3) as workers:
        check_same_episodes(policy, CALCULATOR, workers)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("textworld") is None, reason="needs the agents extra (textworld)")
def test_workers_play_the_same_episodes_as_in_process_textworld(policy, tmp_path):
    section = {"name": "textworld", "level": 2, "train_games": 2, "eval_games": 1, "max_turns": 3,
               "cache_dir": str(tmp_path)}
    with EnvWorkers(functools.partial(task_from_section, section), 2) as workers:
        check_same_episodes(policy, section, workers)


def test_restarts_from_snapshots_and_prefixes_match(policy, minigrid_workers):
    """Go-Explore's restores and R3L's replayed prefixes: snapshots taken in a worker restore in a worker (and
    in this process) to the same episodes."""
    task = task_from_section(MINIGRID)
    local = lambda: task.make_env("train")  # noqa: E731
    starts = [Start(seed=s, group_id=s) for s in (1, 2, 3)]
    serial = play(policy, local, starts, 6, snapshots=True)
    parallel = play(policy, minigrid_workers.split("train"), starts, 6, snapshots=True)
    same_episodes(serial, parallel)
    mid = [e for e in parallel if len(e.turns) >= 3]
    assert mid
    by_snapshot = [Start(seed=e.seed, group_id=9, prefix=e.turns[:2], snapshot=e.turns[2].snapshot) for e in mid]
    by_replay = [Start(seed=e.seed, group_id=9, prefix=e.turns[:2]) for e in mid]
    for restarts in (by_snapshot, by_replay):
        same_episodes(play(policy, local, restarts, 6), play(policy, minigrid_workers.split("train"), restarts, 6))


class BrokenEnv:
    """Raises on a chosen seed: at reset (seed 7) or at its second step (seed 8)."""

    def reset(self, seed: int) -> str:
        if seed == 7:
            raise ValueError("bad layout 7")
        self.seed, self.n = seed, 0
        return "go:"

    def step(self, action: str):
        self.n += 1
        if self.seed == 8 and self.n == 2:
            raise OutriderError("task.layout: seed 8 has no exit")
        if self.seed == 9:
            time.sleep(2)
        return "again:", 0.0, self.n == 3, {"invalid": not action.strip()}


class BrokenTask(Task):
    max_turns = 3

    def make_env(self, split):
        return BrokenEnv()

    def demonstrations(self, seeds):
        return [Demonstration(turns=[])]


@pytest.fixture(scope="module")
def broken_workers():
    with EnvWorkers(BrokenTask, 2) as workers:
        yield workers


def check_same_error(policy: Policy, workers: Any, seed: int, error: type) -> None:
    """Env 1 (in worker 1) raises at seed 7's reset or seed 8's second step: the same exception as serially, the
    worker named in a note; the pool goes on serving after an env's error."""
    starts = [Start(seed=s, group_id=s) for s in (1, seed, 2)]
    with pytest.raises(error) as serial:
        play(policy, BrokenEnv, starts, 3)
    with pytest.raises(error) as parallel:
        play(policy, workers.split("train"), starts, 3)
    assert str(parallel.value) == str(serial.value)
    assert "env worker 1" in "".join(getattr(parallel.value, "__notes__", []))
    same_episodes(play(policy, BrokenEnv, starts[:1], 3), play(policy, workers.split("train"), starts[:1], 3))


@pytest.mark.parametrize("seed,error", [(7, ValueError), (8, OutriderError)])
def test_an_env_error_in_a_worker_is_the_same_error(policy, broken_workers, seed, error):
    check_same_error(policy, broken_workers, seed, error)


class SleepyEnv(BrokenEnv):
    def step(self, action: str):
        time.sleep(0.01)
        return super().step(action)


@pytest.mark.parametrize("pooled", [False, True])
def test_the_rollout_times_its_env_calls(policy, broken_workers, pooled):
    """``timers["env_s"]``: at least the envs' own sleep (3 steps of 10 ms an episode), within the rollout's
    wall time, serially and with workers."""
    source = broken_workers.split("train") if pooled else SleepyEnv
    starts = [Start(seed=s, group_id=s) for s in (1, 2)]
    timers: dict[str, float] = {"env_s": 0.5}  # added to, not reset
    t = time.perf_counter()
    rollout(policy, source, starts, SamplingParams(max_new_tokens=4), torch.Generator().manual_seed(3), 3,
            timers=timers)
    wall = time.perf_counter() - t
    assert (0.5 < timers["env_s"] <= 0.5 + wall) and (pooled or timers["env_s"] >= 0.5 + 0.06)


def test_a_timed_out_env_in_a_worker_ends_its_episode_as_serially(policy, broken_workers):
    starts = [Start(seed=s, group_id=s) for s in (1, 9, 2)]
    serial = play(policy, BrokenEnv, starts, 3, timeout=0.5)
    parallel = play(policy, broken_workers.split("train"), starts, 3, timeout=0.5)
    same_episodes(serial, parallel)
    assert [bool(e.metadata.get("timed_out")) for e in parallel] == [False, True, False]


@pytest.mark.slow
def test_workers_stop_on_close_and_after_an_interrupt(policy):
    """Ctrl-C while the workers step (seed 9 sleeps 2 s): the interrupt reaches the trainer, the pool refuses to
    be used again, and closing it lets the busy worker finish, close its envs and exit."""
    workers = EnvWorkers(BrokenTask, 2)
    procs = list(workers._procs)
    play(policy, workers.split("train"), [Start(seed=1, group_id=1)], 3)  # started and answering

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.8)
    try:
        with pytest.raises(KeyboardInterrupt):
            play(policy, workers.split("train"), [Start(seed=9, group_id=9)], 3, timeout=None)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    with pytest.raises(OutriderError, match="task.workers"):
        play(policy, workers.split("train"), [Start(seed=1, group_id=1)], 3)
    workers.close()
    assert not any(p.is_alive() for p in procs) and all(p.exitcode == 0 for p in procs)


@pytest.mark.slow
def test_a_worker_that_dies_is_a_one_line_error(policy):
    with EnvWorkers(BrokenTask, 2) as workers:
        workers._procs[1].kill()
        workers._procs[1].join()
        with pytest.raises(OutriderError, match="env worker 1 died"):
            play(policy, workers.split("train"), [Start(seed=s, group_id=s) for s in (1, 2)], 3)


def test_workers_need_a_pool_and_a_task_that_can_be_sent():
    with pytest.raises(OutriderError, match="task.workers"):
        EnvWorkers(BrokenTask, 1)
    with pytest.raises(OutriderError, match="task.workers: the task cannot be sent"):
        EnvWorkers(lambda: BrokenTask(), 2)


def untimed_run(tmp_path: Path, name: str, **task: Any) -> list[dict]:
    """The metrics rows (less times and throughputs) of a 2-step MiniGrid GRPO run with these task options; the
    run's env workers are stopped when it ends, and each step logs its env time, within its sampling time."""
    from conftest import read_jsonl
    from outrider.recipe import load_recipe
    from outrider.trainer import Trainer

    recipe = {"task": {**MINIGRID, "max_turns": 16, "eval_size": 8, **task},
              "policy": {"model": "tiny", "hidden": 32, "layers": 1,
                         "warm_start": {"steps": 3, "batch_size": 8, "lr": 3.0e-3}},
              "explore": {"name": "group", "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 2},
              "score": [{"name": "verifier", "weight": 1.0}], "credit": {"name": "grpo"},
              "observe": {"eval_every": 0, "eval_prompts": 4, "eval_samples": 2, "pass_at": [1, 2],
                          "checkpoint_every": 0, "tensorboard": False},
              "train": {"steps": 2, "seed": 0, "threads": 1}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(recipe))
    trainer = Trainer(load_recipe(path), tmp_path / name, quiet=True)
    trainer.run()
    assert trainer.env_workers is None
    rows = read_jsonl(tmp_path / name / "metrics.jsonl")
    steps = [row for row in rows if "time/step_s" in row]
    assert steps and all(0 < row["time/env_s"] <= row["time/sample_s"] <= row["time/step_s"] for row in steps)
    return [{k: v for k, v in row.items() if not k.startswith(("time/", "throughput/"))} for row in rows]


def test_a_run_with_env_workers_logs_the_same_metrics_and_stops_its_workers(tmp_path):
    """The loop passes the run's pool to its rollouts and to evaluation: a run with `task.workers: 2` logs the
    same numbers as one without, and no worker outlives the run."""
    before = set(multiprocessing.active_children())  # other tests' pools may be alive
    serial, workers = untimed_run(tmp_path, "w1", workers=1), untimed_run(tmp_path, "w2", workers=2)
    assert not [p for p in set(multiprocessing.active_children()) - before if p.name.startswith("outrider-env")]
    assert serial == workers
    assert any("explore/env_steps" in row and row["explore/env_steps"] > 4 for row in workers)


def _descendants(pid: int) -> set[int]:
    """The live processes below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


@pytest.mark.slow  # a real `outrider train` process, interrupted mid-run
def test_ctrl_c_on_a_run_with_env_workers_exits_130_and_leaves_no_worker(tmp_path):
    from conftest import finish, read_jsonl, start_cli, write_recipe

    recipe = write_recipe(tmp_path, task={"workers": 2}, train={"steps": 100000},
                          observe={"checkpoint_every": 2})
    run = tmp_path / "run"
    proc = start_cli(["train", recipe, "--out", run, "--quiet"], tmp_path)
    deadline, workers = time.time() + 240, set()
    while time.time() < deadline and proc.poll() is None:
        rows = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
        if rows and rows[-1]["step"] >= 2:
            workers = _descendants(proc.pid)
            break
        time.sleep(0.2)
    assert len(workers) >= 3  # the forkserver and its two workers
    proc.send_signal(signal.SIGINT)
    result = finish(proc, timeout=60)
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr
    def alive() -> dict[int, str]:
        out = {}
        for p in workers:
            try:
                if Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    out[p] = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
            except (OSError, IndexError):
                pass
        return out

    deadline = time.time() + 10.0  # the forkserver leaves when it sees the trainer gone
    while alive() and time.time() < deadline:
        time.sleep(0.2)
    assert not alive()
