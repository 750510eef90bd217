"""Env workers as Ray actors (`task.workers_backend: ray`): episodes identical to in-process stepping, restarts
from snapshots through an actor, an env's error as serially, a dead actor and a missing extra as one line, and a
run that starts and stops its own local Ray instance. Ray's start-up takes seconds: these are `slow`."""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys

import pytest

from outrider.data import Start
from outrider.envs.workers import task_from_section
from outrider.errors import OutriderError
from test_env_workers import policy  # noqa: F401  (a fixture)
from test_env_workers import (MINIGRID, BrokenEnv, BrokenTask, check_same_episodes, check_same_error, play,
                              same_episodes, untimed_run)

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the ray extra")


def test_the_ray_backend_without_ray_is_one_line_naming_the_extra(monkeypatch):
    from outrider.envs.ray_workers import RayEnvWorkers

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(OutriderError, match=r"task.workers_backend: ray: .*outrider\[ray\]"):
        RayEnvWorkers(BrokenTask, 2)


@pytest.mark.slow  # a fresh interpreter imports torch: seconds
def test_process_workers_do_not_import_ray():
    code = ("import sys; import outrider.trainer, outrider.envs.workers, outrider.compare; "
            "assert 'ray' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.fixture(scope="module")
def ray_pool():
    """A local Ray instance shared by the tests below (each pool joins it; room for two pools of 2 actors), and a
    MiniGrid pool on it."""
    import ray

    from outrider.envs.ray_workers import RayEnvWorkers

    import test_env_workers

    # the test tasks are not importable in a Ray worker (a recipe's are): send them by value
    ray.cloudpickle.register_pickle_by_value(test_env_workers)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    with RayEnvWorkers(functools.partial(task_from_section, MINIGRID), 2) as pool:
        yield pool
    assert ray.is_initialized()  # a pool leaves a Ray connection it did not make
    if started:
        ray.shutdown()


@pytest.mark.slow
@needs_ray
def test_a_ray_pool_starts_and_stops_its_own_local_ray(policy):
    import ray

    from outrider.envs.ray_workers import RayEnvWorkers

    if ray.is_initialized():
        pytest.skip("Ray is already connected in this process")
    with RayEnvWorkers(functools.partial(task_from_section, MINIGRID), 2) as pool:
        assert ray.is_initialized() and len(set(pool.pids)) == 2
        task, starts = task_from_section(MINIGRID), [Start(seed=s, group_id=s) for s in (4, 5)]
        same_episodes(play(policy, lambda: task.make_env("train"), starts, 6), play(policy, pool.split("train"),
                                                                                    starts, 6))
    assert not ray.is_initialized()


@pytest.mark.slow
@needs_ray
def test_ray_actors_play_the_same_episodes_and_restarts_as_in_process(policy, ray_pool):
    check_same_episodes(policy, MINIGRID, ray_pool)
    task = task_from_section(MINIGRID)
    local = lambda: task.make_env("train")  # noqa: E731
    starts = [Start(seed=s, group_id=s) for s in (1, 2, 3)]
    remote = play(policy, ray_pool.split("train"), starts, 6, snapshots=True)
    same_episodes(play(policy, local, starts, 6, snapshots=True), remote)
    mid = [e for e in remote if len(e.turns) >= 3]
    assert mid
    # snapshots taken in an actor restore in an actor (and in this process) to the same episodes
    restarts = [Start(seed=e.seed, group_id=9, prefix=e.turns[:2], snapshot=e.turns[2].snapshot) for e in mid]
    same_episodes(play(policy, local, restarts, 6), play(policy, ray_pool.split("train"), restarts, 6))


@pytest.mark.slow
@needs_ray
def test_an_env_error_in_an_actor_is_the_same_error_and_a_dead_actor_one_line(policy, ray_pool):
    from outrider.envs.ray_workers import RayEnvWorkers

    with RayEnvWorkers(BrokenTask, 2) as pool:
        check_same_error(policy, pool, 7, ValueError)
        check_same_error(policy, pool, 8, OutriderError)
        timed = [Start(seed=s, group_id=s) for s in (1, 9, 2)]
        same_episodes(play(policy, BrokenEnv, timed, 3, timeout=0.5), play(policy, pool.split("train"), timed, 3,
                                                                            timeout=0.5))
        import ray

        ray.kill(pool._actors[1])
        one_line = r"^task.workers: env worker 1 \(a Ray actor\) died \([^\n]*ray.kill[^\n]*$"
        with pytest.raises(OutriderError, match=one_line):
            play(policy, pool.split("train"), [Start(seed=s, group_id=s) for s in (1, 2)], 3)


@pytest.mark.slow
@needs_ray
def test_a_run_with_ray_env_workers_logs_the_same_metrics(tmp_path, ray_pool):
    assert untimed_run(tmp_path, "process", workers=1) == untimed_run(tmp_path, "ray", workers=2,
                                                                      workers_backend="ray")
