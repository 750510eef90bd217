"""The env time limit (`task.step_timeout_s`): an env call that does not answer ends its episode as failed, counted,
and its env is closed; TextWorld's backslash commands are refused; a hung game interpreter is killed and its
output discarded."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from conftest import read_jsonl, tiny_recipe
from outrider.data import Start
from outrider.envs import ENVS
from outrider.envs.reasoning_gym_task import ReasoningGymConfig, ReasoningGymTask
from outrider.envs.time_limit import EnvTimeout, TimeLimit
from outrider.explore.rollout import rollout
from outrider.policy.model import Policy
from outrider.policy.sampler import SamplingParams


class StuckEnv:
    """Answers seed 0 at once; on seed 1 `step` and on seed 2 `reset` wait until closed (like a stuck simulator)."""

    closed: list[int] = []

    def __init__(self):
        self.stop = threading.Event()

    def reset(self, seed: int) -> str:
        self.seed = seed
        if seed == 2:
            self.stop.wait()
        return f"seed {seed}:"

    def step(self, action: str):
        if self.seed == 1:
            self.stop.wait()
        return "", 1.0, True, {"success": True}

    def close(self) -> None:
        StuckEnv.closed.append(self.seed)
        self.stop.set()


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy.tiny(hidden=32, layers=1, heads=2, seed=0)


def _play(policy: Policy) -> list:
    StuckEnv.closed = []
    starts = [Start(seed=s, group_id=s) for s in (0, 1, 2)]
    return rollout(policy, StuckEnv, starts, SamplingParams(max_new_tokens=2), torch.Generator().manual_seed(0), 1,
                   step_timeout_s=0.3)


@pytest.mark.parametrize("thread", [False, True], ids=["main thread (SIGALRM)", "worker thread"])
def test_a_stuck_env_call_ends_its_episode_as_failed_and_closes_the_env(policy, thread):
    box: dict = {}
    t0 = time.perf_counter()
    if thread:
        worker = threading.Thread(target=lambda: box.update(episodes=_play(policy)))
        worker.start()
        worker.join(30)
    else:
        box["episodes"] = _play(policy)
    assert time.perf_counter() - t0 < 10
    fine, stuck_step, stuck_reset = box["episodes"]
    assert fine.success and not fine.metadata.get("timed_out")
    for e in (stuck_step, stuck_reset):
        assert e.metadata["timed_out"] and not e.success and not e.done
        assert e.turns[-1].info["timed_out"] and e.turns[-1].reward == 0.0
    assert stuck_step.turns[0].action_ids  # it acted; the env did not answer
    assert not stuck_reset.turns[0].action_ids  # it never got an observation to act on
    assert sorted(StuckEnv.closed) == [0, 1, 2]  # each env closed exactly once


def test_time_limit_leaves_a_previous_alarm_handler_alone():
    import signal

    with TimeLimit(5.0) as clock:
        assert signal.getsignal(signal.SIGALRM) == clock._alarm
        assert clock.call(lambda x: x + 1, 1) == 2
    assert signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None)
    with pytest.raises(EnvTimeout):
        with TimeLimit(0.1) as clock:
            clock.call(time.sleep, 5)


class _StuckVerifier(ReasoningGymTask):
    """chain_sum whose verifier never answers: every step runs into the time limit."""

    def verify(self, problem, answer):
        time.sleep(60)
        return 0.0


def test_run_counts_timeouts_and_finishes(tmp_path, monkeypatch):
    from outrider.recipe import parse_recipe
    from outrider.registry import Entry
    from outrider.trainer import Trainer

    # registered for this test only: other tests compare the registry's names with a fresh process's
    monkeypatch.setitem(ENVS._entries, "test_stuck_verifier",
                        Entry("test_stuck_verifier", _StuckVerifier, ReasoningGymConfig))

    recipe = tiny_recipe(train={"steps": 1}, policy={"warm_start": {"steps": 0}},
                         observe={"eval_prompts": 1, "eval_samples": 2, "pass_at": [1]})
    recipe["task"].update(name="test_stuck_verifier", step_timeout_s=0.2)
    t0 = time.perf_counter()
    summary = Trainer(parse_recipe(recipe), tmp_path / "run", quiet=True).run()
    assert time.perf_counter() - t0 < 60
    (row,) = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["step"] == 1]
    assert row["env/timeouts"] == 4.0 and row["episode/timed_out_frac"] == 1.0  # 2 prompts x 2 samples
    assert summary["eval_end"]["accuracy"] == 0.0
    json.dumps(summary)


def test_step_timeout_must_be_positive_or_null():
    from outrider.errors import OutriderError

    entry, cfg = ENVS.build({**tiny_recipe()["task"], "step_timeout_s": None}, "task")
    assert cfg.step_timeout_s is None
    with pytest.raises(OutriderError, match=r"task.step_timeout_s: Input should be greater than 0"):
        ENVS.build({**tiny_recipe()["task"], "step_timeout_s": 0}, "task")


def _hang() -> None:
    time.sleep(60)


def test_a_child_object_that_does_not_start_in_time_leaves_no_process():
    import multiprocessing

    from outrider.envs.child import ChildError, ChildObject

    before = set(multiprocessing.active_children())
    with TimeLimit(0.5) as clock, pytest.raises(EnvTimeout):
        clock.call(ChildObject, _hang)
    assert set(multiprocessing.active_children()) == before
    with pytest.raises(ChildError, match="ZeroDivisionError: division by zero"):
        ChildObject(lambda: 1 / 0)
    child = ChildObject(lambda: [3, 1, 2])
    assert child.call("index", 2) == 2 and child.call("__len__") == 3
    with pytest.raises(ChildError, match="ValueError"):
        child.call("index", 7)
    child.close()
    assert set(multiprocessing.active_children()) == before
