"""ScienceWorld adapter [Wang et al. 2022]: a gold episode succeeds, random valid actions run without error, train and
eval variations are disjoint, and a wrong task name gives one line listing the tasks. One JVM-backed task object
is shared by the module (starting a simulator costs ~1 s, loading a variation ~0.2 s)."""

from __future__ import annotations

import gc
import random
import shutil
import sys

import pytest

pytest.importorskip("scienceworld", reason="scienceworld not installed (pip install 'outrider[agents]')")
if shutil.which("java") is None:
    pytest.skip("ScienceWorld needs Java: no `java` on PATH", allow_module_level=True)

from outrider.envs import ENVS  # noqa: E402
from outrider.errors import OutriderError  # noqa: E402

SECTION = {"name": "scienceworld", "task_name": "find-living-thing", "simplification": "easy", "max_turns": 20,
           "max_simulators": 2}


def make_task(**section):
    entry, cfg = ENVS.build({**SECTION, **section}, "task")
    return entry.fn(cfg)


@pytest.fixture(scope="module")
def task():
    t = make_task()
    yield t
    t.close()


def test_gold_sequence_succeeds(task):
    (demo,) = task.demonstrations([10**8])
    assert 3 <= len(demo.turns) <= 20
    assert demo.turns[0][0].startswith("Your task is to")
    env = task.make_env("train")
    obs = env.reset(10**8)
    total, done, info = 0.0, False, {}
    for demo_obs, action in demo.turns:
        assert obs == demo_obs  # replaying gives the recorded observations: deterministic
        obs, reward, done, info = env.step(action)
        total += reward
        assert not info["invalid"]
    assert done and info["success"] and 0.5 < total <= 1.0 + 1e-9  # deltas from the score at reset (may be > 0)
    assert len(demo.turns) <= task.max_turns
    assert set(obs) <= set("\n" + "".join(chr(c) for c in range(32, 127)))
    env.close()


def test_random_admissible_actions_run(task):
    env = task.make_env("eval")
    env.reset(0)
    rng = random.Random(0)
    assert env.admissible and "reset task" not in env.admissible
    key = env.state_key()
    for _ in range(6):
        obs, reward, done, info = env.step(rng.choice(env.admissible))
        assert isinstance(obs, str) and -1.0 <= reward <= 1.0 and "admissible" in info
        if done:
            break
    obs, reward, done, info = env.step("xyzzy plugh")
    assert info["invalid"] or done
    restored = task.make_env("eval")
    restored.restore((0, ()))
    assert restored.state_key() == key
    env.close(), restored.close()


def test_train_and_eval_variations_are_disjoint(task):
    train, held_out = set(task.variations("train")), set(task.variations("eval"))
    assert train and held_out and not train & held_out
    assert task.eval_size <= len(held_out)


def test_unknown_task_name_lists_the_tasks():
    with pytest.raises(OutriderError) as err:
        make_task(task_name="boil-the-ocean")
    message = str(err.value)
    assert "\n" not in message and "boil-the-ocean" in message and "find-living-thing" in message
    assert "use-thermometer" in message


def test_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "scienceworld", None)
    with pytest.raises(OutriderError, match=r"needs the scienceworld package: pip install 'outrider\[agents\]'"):
        make_task()


def test_reset_task_is_refused_and_not_sent(task):
    # regression: "reset task" was left out of `admissible` but still sent when typed, resetting the progress
    (demo,) = task.demonstrations([10**8])
    actions = [a for _, a in demo.turns]
    env = task.make_env("train")
    env.reset(10**8)
    for a in actions[:-1]:
        env.step(a)
    key = env.state_key()
    for typed in ["reset task", "  RESET   Task "]:
        obs, reward, done, info = env.step(typed)
        assert info["invalid"] and reward == 0.0 and not done and "not allowed" in obs and "admissible" in info
        assert env.state_key() == key  # the score (progress) is kept
    state = env.snapshot()
    assert "reset task" in state[1]  # kept in the history: replay refuses it again
    restored = task.make_env("train")
    restored.restore(state)
    assert restored.state_key() == key
    obs, reward, done, info = env.step(actions[-1])
    assert done and info["success"] and reward > 0
    env.close(), restored.close()


def test_simulator_step_limit_does_not_end_episodes_early(task):
    # regression: envStepLimit was max_turns + 10, but the simulator counts ticks, not actions: a `wait` is 11,
    # so 3 waits ended a 20-turn episode (and could cut a gold replay short)
    env = task.make_env("eval")
    env.reset(0)
    for _ in range(3):
        _, _, done, info = env.step("wait")
        assert not done and not info["invalid"]
    env.close()


def test_gold_sequence_longer_than_max_turns_raises(task, monkeypatch):
    monkeypatch.setattr(task, "max_turns", 2)
    monkeypatch.setattr(task, "_demos", {})
    with pytest.raises(OutriderError) as err:
        task.demonstrations([10**8])
    message = str(err.value)
    assert "\n" not in message and "task.max_turns=2" in message and "actions" in message


def test_bad_simplification_is_one_line_naming_the_field():
    with pytest.raises(OutriderError) as err:
        make_task(simplification="easy,teleport")
    message = str(err.value)
    assert "\n" not in message and "task.simplification" in message and "'teleport'" in message
    for valid in ("easy", "teleportAction", "openDoors", "openContainers", "selfWateringFlowerPots",
                  "noElectricalAction"):
        assert valid in message
    with pytest.raises(OutriderError, match="task.simplification noElectricalAction cannot be used"):
        make_task(task_name="power-component", simplification="noElectricalAction")


def test_a_simulator_call_past_the_time_limit_kills_its_jvm(task, capfd):
    from outrider.envs.time_limit import EnvTimeout, TimeLimit

    env = task.make_env("train")
    env.reset(0)
    jvm = env._sim._gateway.java_process
    with TimeLimit(0.001) as clock, pytest.raises(EnvTimeout):
        clock.call(env.step, "look around")  # interrupted while waiting on the JVM's socket
    assert env._sim is None and jvm.poll() is not None  # killed, not returned to the pool
    env.close()
    assert env.reset(1).startswith("Your task is to")  # a fresh simulator
    env.close()
    del jvm
    gc.collect()  # the dead simulator's Java-object finalizers: silent, not a traceback each
    assert "Traceback" not in capfd.readouterr().err
