"""ScienceWorld tasks as a multi-turn task [ScienceWorld: Wang et al. 2022, "ScienceWorld: Is your Agent Smarter
than a 5th Grader?"]: 30 elementary-science tasks (boil water, find a living thing, test conductivity, ...), each
with numbered variations split by the simulator into train / dev / test.

The simulator runs in a JVM. Starting one costs ~1 s on the dev CPU and loading a task variation ~0.2 s, so the
task keeps started simulators in a pool and re-uses them across episodes (one simulator per concurrently running
episode: each holds one game state); ``close()`` (also run at exit) stops them.

An env seed picks variation ``seed % len(split)`` of the split's list (train: ``get_variations_train()``, eval:
``get_variations_test()`` or ``_dev()``), so eval variations are never trained on. The first observation is the
task description followed by the room's description; later ones are the simulator's answers (its own text,
printable ASCII, cut at ``max_obs_chars``). Reward: the score delta / 100 (scores run from 0 to 100, and to -100
when a task is failed); ``success`` when the episode ends with score 100. The simulator lists the valid actions
with every step (its ``valid`` info; a step costs ~0.05-0.2 s on the dev CPU, that list included); they are put
in ``info["admissible"]`` when ``admissible: true``, without "reset task" (it would restart the episode inside
the episode); typed anyway, "reset task" is not sent: the step is ``invalid``, the observation an error line,
and the episode goes on. ``invalid`` otherwise marks an action the parser refused ("No known action matches that
input."), not one outside that list: the simulator accepts phrasings and no-op actions the list lacks, gold
actions included. Demonstrations are the gold action sequences (``get_gold_action_sequence()``) of train
variations; one longer than ``max_turns`` raises an OutriderError naming the length needed (it is not cut: a cut
gold sequence would be a demonstration that fails).

The simulator's own step limit (``envStepLimit``) counts its clock ticks, not actions (``wait`` is 10 ticks and
more), so it is set far above any horizon: the episode's length is ``max_turns``, which the rollout enforces, and
a gold replay is never ended early by the simulator. ``simplification`` is checked against the simulator's list
(``easy`` or a comma-separated subset of teleportAction, openDoors, openContainers, selfWateringFlowerPots,
noElectricalAction) before any load.

``snapshot()`` is (seed, actions so far) and ``restore`` replays them after a reset, as for TextWorld.
"""

from __future__ import annotations

import atexit
import shutil
import weakref
from typing import Any, Hashable, Literal

from pydantic import Field

from outrider.envs.base import ENVS, Demonstration, ReplaySnapshot, Split, StepInfo, Task, TaskConfig
from outrider.envs.pool import HandlePool
from outrider.envs.textworld_task import clean_text
from outrider.errors import OutriderError


NO_MATCH = "No known action matches that input"
REFUSED = frozenset({"reset task"})  # would restart the task's progress inside the episode
STEP_LIMIT = 10**9  # simulator ticks; the horizon is max_turns (see the module docstring)


class ScienceWorldConfig(TaskConfig):
    task_name: str = Field("find-living-thing", description="One of ScienceWorld's 30 task names, e.g. boil, melt, "
                                                            "find-living-thing (`outrider` lists them on a typo).")
    simplification: str = Field("easy", description="Simplification string passed to load(), e.g. `easy` or "
                                                    "`teleportAction,openDoors` ('' for none).")
    eval_variations: Literal["test", "dev"] = Field("test", description="Which held-out variation list eval uses.")
    admissible: bool = Field(True, description="Put the simulator's valid actions in info['admissible'].")
    max_obs_chars: int = Field(2000, ge=16, description="Observations are cut to this many characters.")
    max_turns: int = Field(30, ge=1, description="Horizon: the most actions in one episode.")
    eval_size: int = Field(16, ge=1, description="Held-out seeds evaluated (capped at the number of variations).")
    max_simulators: int = Field(16, ge=1, description="The most idle simulators (JVMs) kept for re-use.")


def _close_pool(pool: HandlePool) -> None:
    pool.close()


def _kill_simulator(sim: Any) -> None:
    """Stop a simulator that may be busy: its JVM is killed (a shutdown request would wait for it, or fail loudly
    once it is gone), then the Python side's sockets are closed."""
    gateway = sim._gateway
    if gateway.java_process is not None:
        gateway.java_process.kill()
        gateway.java_process.wait()
    gateway.close()
    gateway.shutdown_callback_server()
    # every Java object's finalizer would try to reach the dead JVM (logging a traceback per object, at GC time)
    gateway._gateway_client.is_connected = False
    sim.close = lambda: None  # its __del__ would ask the dead JVM to shut down


class ScienceWorldEnv(ReplaySnapshot):
    """One episode at a time on a pooled ScienceWorld simulator."""

    def __init__(self, task: "ScienceWorldTask", split: Split):
        self.task, self.split = task, split
        self._sim: Any = None
        self.seed = 0
        self.history: list[str] = []
        self.admissible: list[str] = []
        self._score = 0.0
        self._look = ""

    def _release(self) -> None:
        if self._sim is not None:
            self.task.pool.release("sim", self._sim)
            self._sim = None

    def close(self) -> None:
        self._release()

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """A call to the simulator; one that does not finish (the env time limit, Ctrl-C) discards it: its JVM
        is stopped, never re-used."""
        sim = self._sim
        try:
            return self.task.pool.call(sim, lambda: getattr(sim, method)(*args, **kwargs))
        except BaseException:
            if self._sim is sim:
                self._sim = None
            raise

    def reset(self, seed: int, gold: bool = False) -> str:
        self._release()
        self.seed = int(seed)
        variations = self.task.variations(self.split)
        self._sim = self.task.pool.acquire("sim")
        self._call("load", self.task.cfg.task_name, variations[self.seed % len(variations)],
                   self.task.cfg.simplification, generateGoldPath=gold)
        obs, info = self._call("reset")
        self.history, self._score = [], float(info.get("score", 0) or 0)
        self._update(info)
        return self.task.render(f"{self._sim.get_task_description()}\n\n{obs}")

    def step(self, action: str) -> tuple[str, float, bool, StepInfo]:
        if self._sim is None:
            raise RuntimeError("step() before reset()")
        command = " ".join(action.strip().split())
        if command.lower() in REFUSED:  # not sent; kept in the history, where replaying refuses it again
            self.history.append(command)
            out: dict[str, Any] = {"success": False, "invalid": True, "events": []}
            if self.task.cfg.admissible:
                out["admissible"] = list(self.admissible)
            return self.task.render(f"'{command.lower()}' is not allowed in this episode."), 0.0, False, out
        obs, _, done, info = self._call("step", command)
        # the parser's refusal, not membership in the valid list: the simulator accepts phrasings (and actions
        # such as opening an open door) that its enumerated list does not contain, gold actions included
        invalid = obs.strip().startswith(NO_MATCH)
        self.history.append(command)
        score = float(info.get("score", 0) or 0)
        reward = (score - self._score) / 100.0
        self._score = score
        self._update(info)
        out = {"success": bool(done and score >= 100), "invalid": bool(invalid),
                               "events": ["progress"] if reward > 0 else []}
        if self.task.cfg.admissible:
            out["admissible"] = list(self.admissible)
        if done:
            out["metrics"] = {"score": score / 100.0}
        return self.task.render(obs), reward, bool(done), out

    def _update(self, info: dict[str, Any]) -> None:
        self._look = str(info.get("look", ""))
        valid = info.get("valid") or []
        self.admissible = [a for a in valid if a != "reset task"] if self.task.cfg.admissible else []

    def state_key(self) -> Hashable:
        """The room's description (its lines sorted: the simulator lists a room's objects in no fixed order, so
        the same state can read differently after a restore) and the score."""
        return "\n".join(sorted(self._look.splitlines())), self._score


@ENVS.register("scienceworld", config=ScienceWorldConfig)
class ScienceWorldTask(Task):
    """ScienceWorld [Wang et al. 2022]: one task, train variations for RL and demonstrations (gold sequences),
    held-out test (or dev) variations for eval."""

    def __init__(self, cfg: ScienceWorldConfig):
        try:
            from scienceworld import ScienceWorldEnv as Simulator
        except ImportError:
            raise OutriderError("task scienceworld needs the scienceworld package: pip install 'outrider[agents]'") \
                from None
        if shutil.which("java") is None:
            raise OutriderError("task scienceworld needs Java (a `java` on PATH, JDK >= 11)")
        self.cfg = cfg
        self.max_turns = cfg.max_turns
        # the simulator's limit counts ticks (a `wait` is 10+): far above any horizon, which max_turns sets
        self.pool = HandlePool(lambda _: Simulator("", envStepLimit=STEP_LIMIT), lambda sim: sim.close(),
                               max_idle=cfg.max_simulators, kill=_kill_simulator)
        atexit.register(_close_pool, self.pool)  # JVMs are child processes: stop them even without close()
        weakref.finalize(self, _close_pool, self.pool)
        sim = self.pool.acquire("sim")
        try:
            names = list(sim.get_task_names())
            if cfg.task_name not in names:
                raise OutriderError(f"task scienceworld: unknown task_name '{cfg.task_name}'; choose one of: "
                                    f"{', '.join(names)}")
            self._check_simplification(cfg.task_name, ["easy"] + list(sim.get_possible_simplifications()))
            sim.load(cfg.task_name, 0, cfg.simplification)
            self._variations = {"train": list(sim.get_variations_train()),
                                "eval": list(sim.get_variations_test() if cfg.eval_variations == "test"
                                             else sim.get_variations_dev())}
        finally:
            self.pool.release("sim", sim)
        self.eval_size = min(cfg.eval_size, len(self._variations["eval"]))
        self._demos: dict[int, Demonstration] = {}

    def _check_simplification(self, task_name: str, valid: list[str]) -> None:
        """One line naming task.simplification for a value the simulator would refuse (it checks the same)."""
        parts = self.cfg.simplification.split(",") if self.cfg.simplification else []
        bad = [p for p in parts if p not in valid]
        if bad:
            raise OutriderError(f"task scienceworld: unknown task.simplification '{bad[0]}' in "
                                f"'{self.cfg.simplification}'; use '' (none) or a comma-separated list, no spaces, "
                                f"of: {', '.join(valid)}")
        if "noElectricalAction" in parts and ("power-component" in task_name or "conductivity" in task_name):
            raise OutriderError(f"task scienceworld: task.simplification noElectricalAction cannot be used with "
                                f"task_name '{task_name}', which needs electrical actions")

    def variations(self, split: Split) -> list[int]:
        """The variation numbers of a split (train, or the held-out test/dev list for eval)."""
        return self._variations[split]

    def render(self, text: str) -> str:
        return clean_text(text)[: self.cfg.max_obs_chars] + "\n> "

    def make_env(self, split: Split) -> ScienceWorldEnv:
        return ScienceWorldEnv(self, split)

    def gold_actions(self, env: ScienceWorldEnv) -> list[str]:
        """The simulator's gold action sequence for the variation `env` was reset on with ``gold=True``."""
        return [a for a in env._sim.get_gold_action_sequence() if not a.startswith("ERROR")]

    def demonstrations(self, seeds: list[int]) -> list[Demonstration]:
        """Gold action sequences of the seeds' train variations, replayed to record observations; cached."""
        out = []
        n = len(self._variations["train"])
        for seed in seeds:
            index = seed % n
            if index not in self._demos:
                env = self.make_env("train")
                obs = env.reset(index, gold=True)
                turns = []
                for a in self.gold_actions(env):
                    turns.append((obs, a))
                    obs, _, done, _ = env.step(a)
                    if done:
                        break
                env.close()
                if len(turns) > self.max_turns:  # rejected, not cut: a cut gold sequence does not succeed
                    raise OutriderError(f"task scienceworld: the gold sequence of train variation "
                                        f"{self._variations['train'][index]} of {self.cfg.task_name} needs "
                                        f"{len(turns)} actions, more than task.max_turns={self.max_turns}: set "
                                        f"task.max_turns >= {len(turns)}")
                self._demos[index] = Demonstration(turns)
            out.append(self._demos[index])
        return out

    def close(self) -> None:
        """Stop every pooled simulator (JVM)."""
        self.pool.close()
