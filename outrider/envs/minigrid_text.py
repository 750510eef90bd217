"""MiniGrid / BabyAI played in text (task ``minigrid``).

The grid worlds are those of "Minigrid & Miniworld: Modular & Customizable Reinforcement Learning Environments for
Goal-Oriented Tasks" (Chevalier-Boisvert et al., 2023) and "BabyAI: A Platform to Study the Sample Efficiency of
Grounded Language Learning" (Chevalier-Boisvert et al., 2019). The policy reads a text rendering of the state and
answers one action per turn; reward, termination and the step limit are MiniGrid's own.

Two renderings:

* ``compact`` (for the built-in char-level tiny model, whose 512-token context must hold the *whole* episode):
  ``{front}{carry}{objects}>``, e.g. ``#_k1bL21g30>``. ``front`` is the cell ahead (``.`` empty, ``#`` wall, else
  an object letter), ``carry`` the carried object's letter (``_`` none), then every non-wall object of the full
  grid (keys, balls, boxes, doors, goals, lava, in that order) as three chars: its letter, its offset *forward*
  and its offset to the *right* in the agent's frame, each offset one char (``0``-``9`` for 0..9, ``a``-``i`` for
  -1..-9; ``k1b`` = a key 1 ahead and 2 to the left). Letters: ``k`` key, ``b`` ball, ``x`` box, ``g`` goal, ``v``
  lava, doors by state ``L`` locked, ``C`` closed, ``O`` open. A DoorKey turn is 12 chars + action + EOS = 14
  tokens. Why so short: the rollout re-reads the whole episode every turn, so sampling cost grows with the square
  of the turn length (a first version with signed two-char offsets had 23 tokens a turn, 1.6x more). Why
  egocentric offsets of a fully observed object list, not MiniGrid's 7x7 partial view: the view is 49+ cells per
  turn, and partial observability would ask a 2-layer model to remember what it saw; with offsets the right action
  is a short function of the last observation ("key at 10: pickup", "target to the right: turn right"). Walls are
  not listed (only the cell ahead is), so the compact format suits open-room levels such as DoorKey; colours and
  the mission are left out (DoorKey's mission never changes). Actions: ``l r f p d t x`` (left, right, forward,
  pickup, drop, toggle, done); full names work too.
* ``verbose`` (for real LLMs): the mission, what the agent carries and faces, the objects in MiniGrid's egocentric
  partial view in words, the distance to the nearest wall/obstacle ahead, left and right, and the valid actions.

An unparseable action is a turn without an env step: ``info["invalid"]``, the observation is an error naming the
valid actions followed by the current state.

Held-out layouts. Different env seeds often give the same layout (DoorKey-5x5 has only 48: agent start, key,
door and goal cells), so disjoint *seeds* would still evaluate on trained layouts. Layouts are split instead: a
layout (the grid's encoding plus the agent's start pose) is held out when a hash of it falls below
``task.holdout``. A train seed (RL or demonstration) whose layout is held out moves on by a fixed stride until it
finds a train layout; eval seed ``s`` starts at env seed ``2**31 + s`` and moves on until it finds a held-out one.
Training therefore never sees a held-out layout; levels with few layouts repeat their few held-out ones across
eval seeds.

One layout, random starts (``task.fixed_layout: SEED``): every episode plays the layout of env seed SEED, with the
agent put at a start drawn by the episode's seed from the layout's starts (every empty cell of the agent's own room,
reached without crossing a wall or door, × 4 directions), the setting of [130]'s "shared structure" arm. The starts
are split by a hash of (cell, direction): a ``holdout`` share of them (at least one, never all) is held out and
only evaluation starts there, so held-out evaluation means held-out starts on a layout training has seen.

Warm-start demonstrations (``task.demos``): ``expert`` (the BFS expert's shortest solutions) or ``random_walk``
(uniformly random actions, the level's own observations): a warm start that teaches the action format and nothing
of the solutions, for measuring exploration. A walk that happens to solve its layout is drawn again, so no
demonstration shows a success.

Cells for archives (Go-Explore): besides ``state_key``, the task offers ``cell_functions``: ``position`` (the
state key without the agent's direction: position, carried object, doors and objects), a coarser cell.
"""

from __future__ import annotations

import hashlib
import pickle
import random
from typing import Any, Callable, Hashable, Literal

from pydantic import Field, field_validator

from outrider.envs.base import ENVS, EVAL_OFFSET, Demonstration, Split, StepInfo, Task, TaskConfig
from outrider.envs.minigrid_render import ACTION_NAMES, door_state, render_compact, render_verbose
from outrider.envs.minigrid_expert import PlanError, on_a_shortest_path, plan
from outrider.errors import OutriderError

LAYOUT_STRIDE = 7_919  # a seed whose layout belongs to the other split moves on by this much
MAX_REDRAWS = 2_000
ACTION_IDS = {name: i for i, name in enumerate(ACTION_NAMES)}  # MiniGrid's action numbers
ALIASES = {"l": "left", "r": "right", "f": "forward", "p": "pickup", "d": "drop", "t": "toggle", "x": "done"}
SHORT = {v: k for k, v in ALIASES.items()}
PHRASES = {"turn left": "left", "turn right": "right", "move forward": "forward", "go forward": "forward",
           "pick up": "pickup", "open": "toggle", "open door": "toggle", "stop": "done"}
EXAMPLES = ("MiniGrid-DoorKey-5x5-v0", "MiniGrid-DoorKey-8x8-v0", "MiniGrid-KeyCorridorS3R1-v0",
            "MiniGrid-MultiRoom-N2-S4-v0", "BabyAI-GoToObj-v0")


def _registry() -> dict[str, Any]:
    import gymnasium as gym
    import minigrid  # noqa: F401  (registers the MiniGrid and BabyAI ids)
    return gym.registry


class MiniGridConfig(TaskConfig):
    """A MiniGrid/BabyAI level played in text."""

    env_id: str = Field("MiniGrid-DoorKey-5x5-v0", description="Gymnasium id of a MiniGrid or BabyAI level, e.g. "
                                                               "MiniGrid-DoorKey-5x5-v0, MiniGrid-KeyCorridorS3R1-v0, "
                                                               "BabyAI-GoToObj-v0.")
    format: Literal["compact", "verbose"] = Field("compact", description="Observation text: 'compact' (object "
                                                  "offsets in ~12 chars, for the char-level tiny model) or "
                                                  "'verbose' (sentences, mission and valid actions, for LLMs).")
    max_turns: int | None = Field(None, ge=1, description="Horizon in turns (invalid actions count); default: the "
                                                          "level's max_steps, capped at 64.")
    eval_size: int = Field(128, ge=1, description="Held-out episodes per evaluation pass (eval seeds; levels with "
                                                  "few layouts repeat their held-out layouts).")
    holdout: float = Field(0.25, gt=0.0, lt=1.0, description="Share of layouts held out for evaluation, chosen by a "
                                                             "hash of the layout (grid and agent start); training "
                                                             "never sees a held-out layout.")
    fixed_layout: int | None = Field(None, ge=0, description="One layout for every episode: the level's layout "
                                                            "of this env seed, the agent at a start (cell and "
                                                            "direction in its own room) drawn by the episode's seed; "
                                                            "evaluation plays the held-out `holdout` share of the "
                                                            "starts, never trained on. null: a fresh layout per "
                                                            "episode (layouts split by `holdout`).")
    demos: Literal["expert", "random_walk"] = Field("expert", description="Warm-start demonstrations: 'expert' (BFS "
                                                    "shortest solutions) or 'random_walk' (uniformly random actions "
                                                    "for max_turns turns, walks that solve the layout drawn again: "
                                                    "teaches the format, reveals no solution).")

    @field_validator("env_id")
    @classmethod
    def _known(cls, v: str) -> str:
        ids = _registry()
        if v not in ids or not (v.startswith("MiniGrid-") or v.startswith("BabyAI-")):
            raise ValueError(f"unknown MiniGrid/BabyAI env {v!r}; valid e.g. {', '.join(EXAMPLES)}")
        return v


class MiniGridTextEnv:
    """One MiniGrid env behind the text `Env` protocol (see the module docstring for the renderings)."""

    def __init__(self, env_id: str, fmt: str = "compact", split: Split = "train", holdout: float = 0.25,
                 fixed_layout: int | None = None):
        import gymnasium as gym
        _registry()
        # step the unwrapped env: MiniGrid enforces max_steps itself, and the checker wrappers only cost time
        self.env = gym.make(env_id, disable_env_checker=True).unwrapped
        self.fmt, self.split, self.holdout, self.fixed_layout = fmt, split, holdout, fixed_layout
        self.done = False
        self.invalid_count = 0
        self.last_observation = ""
        self.starts: list[tuple[tuple[int, int], int]] = []
        if fixed_layout is not None:
            self.env.reset(seed=fixed_layout)
            train, held = split_starts(room_starts(self.env), holdout)
            self.starts = held if split == "eval" else train

    # --- protocol -------------------------------------------------------------------------------------------
    def reset(self, seed: int) -> str:
        if self.fixed_layout is not None:
            return self._reset_fixed(seed)
        base = EVAL_OFFSET if self.split == "eval" else 0
        offset = seed % EVAL_OFFSET
        for _ in range(MAX_REDRAWS):
            self.env.reset(seed=base + offset)
            if self.held_out() == (self.split == "eval"):
                break
            offset = (offset + LAYOUT_STRIDE) % EVAL_OFFSET
        else:
            raise OutriderError(f"task.holdout: no {self.split} layout of {self.env.spec.id if self.env.spec else ''} "
                                f"found in {MAX_REDRAWS} seeds; use a holdout between 0.1 and 0.5")
        self.done, self.invalid_count = False, 0
        self.last_observation = self.render(first=True)
        return self.last_observation

    def _reset_fixed(self, seed: int) -> str:
        """The fixed layout with the agent at the split's start drawn by `seed` (``task.fixed_layout``)."""
        self.env.reset(seed=self.fixed_layout)
        (x, y), direction = self.starts[random.Random(seed).randrange(len(self.starts))]
        self.env.agent_pos, self.env.agent_dir = (x, y), direction
        self.done, self.invalid_count = False, 0
        self.last_observation = self.render(first=True)
        return self.last_observation

    def held_out(self) -> bool:
        """Whether the current layout (grid encoding and agent start pose) belongs to the eval split."""
        env = self.env
        layout = env.grid.encode().tobytes() + bytes([*map(int, env.agent_pos), int(env.agent_dir)])
        return int.from_bytes(hashlib.sha256(layout).digest()[:8], "big") / 2**64 < self.holdout

    def step(self, action: str) -> tuple[str, float, bool, StepInfo]:
        obs, reward, done, info = self._step(action)
        self.last_observation = obs  # what `restore` gives back
        return obs, reward, done, info

    def _step(self, action: str) -> tuple[str, float, bool, StepInfo]:
        if self.done:
            raise RuntimeError("step() after the episode ended; call reset()")
        name = self.parse(action)
        if name is None:
            self.invalid_count += 1
            return self.invalid_text(action) + self.render(), 0.0, False, {"invalid": True, "events": []}
        env = self.env
        before = self._tracked()
        _, reward, terminated, truncated, _ = env.step(ACTION_IDS[name])
        events = self._events(before, self._tracked())
        success = bool(terminated and reward > 0)
        if success and env.grid.get(*env.agent_pos) is not None and env.grid.get(*env.agent_pos).type == "goal":
            events.append("reached_goal")
        self.done = bool(terminated or truncated)
        info: dict[str, Any] = {"invalid": False, "events": events, "action": name}
        if self.done:
            info["success"] = success
            info["metrics"] = {"env_steps": float(env.step_count), "invalid_actions": float(self.invalid_count)}
        return self.render(), float(reward), self.done, info

    def state_key(self) -> tuple:
        """Agent position, direction, carried object, door states and positions of pickable objects."""
        env = self.env
        carry = (env.carrying.type, env.carrying.color) if env.carrying is not None else None
        doors, objs = [], []
        for i, c in enumerate(env.grid.grid):
            if c is None:
                continue
            if c.type == "door":
                doors.append((i, door_state(c)))
            elif c.type in ("key", "ball", "box"):
                objs.append((i, c.type, c.color))
        return (tuple(int(v) for v in env.agent_pos), int(env.agent_dir), carry, tuple(doors), tuple(objs))

    def snapshot(self) -> bytes:
        """The whole state as pickled bytes: immutable, so one snapshot can be restored many times, and ~3.4x
        faster to take than a deep copy of the env (124 µs vs 425 µs for DoorKey-6x6), which matters when an
        archive keeps a snapshot of every turn."""
        return pickle.dumps((self.env, self.done, self.invalid_count, self.last_observation), pickle.HIGHEST_PROTOCOL)

    def restore(self, state: bytes) -> str:
        """Back to the snapshot's state; returns the observation shown there."""
        self.env, self.done, self.invalid_count, self.last_observation = pickle.loads(state)
        return self.last_observation

    # --- text -----------------------------------------------------------------------------------------------
    def parse(self, text: str) -> str | None:
        """The action name for `text`, or None when it names no action (aliases in the compact format only)."""
        t = " ".join(text.strip().lower().replace(".", " ").replace("!", " ").split())
        if t in ACTION_IDS:
            return t
        if self.fmt == "compact":
            return ALIASES.get(t)
        if t in PHRASES:
            return PHRASES[t]
        words = [w for w in t.split() if w in ACTION_IDS]  # e.g. "I will go forward" -> forward
        return words[-1] if len(set(words)) == 1 else None

    def invalid_text(self, action: str) -> str:
        if self.fmt == "compact":
            return "?lrfpdtx "
        return (f"Invalid action {action.strip()[:40]!r}. Answer with one of: {', '.join(ACTION_IDS)}.\n")

    def render(self, first: bool = False) -> str:
        return render_compact(self.env) if self.fmt == "compact" else render_verbose(self.env, first)

    # --- events ---------------------------------------------------------------------------------------------
    def _tracked(self) -> tuple[Any, dict[int, int]]:
        doors = {i: door_state(c) for i, c in enumerate(self.env.grid.grid) if c is not None and c.type == "door"}
        return self.env.carrying, doors

    @staticmethod
    def _events(before: tuple, after: tuple) -> list[str]:
        out = []
        if before[0] is None and after[0] is not None:
            out.append(f"picked_{after[0].type}")
        elif before[0] is not None and after[0] is None:
            out.append(f"dropped_{before[0].type}")
        for i, s in after[1].items():
            b = before[1].get(i, s)
            if b == 2 and s == 0:
                out += ["unlocked_door", "opened_door"]
            elif b == 1 and s == 0:
                out.append("opened_door")
            elif b == 0 and s == 1:
                out.append("closed_door")
        return out


def room_starts(env: Any) -> list[tuple[tuple[int, int], int]]:
    """Every (empty cell, direction) of the agent's room in `env`'s current layout: the cells reached from the
    agent's position without crossing a wall or a door (objects are crossed, not started on), in grid order."""
    start = tuple(int(v) for v in env.agent_pos)
    seen, todo = {start}, [start]
    while todo:
        x, y = todo.pop()
        for nx, ny in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
            if not (0 <= nx < env.width and 0 <= ny < env.height) or (nx, ny) in seen:
                continue
            cell = env.grid.get(nx, ny)
            if cell is None or cell.type not in ("wall", "door", "lava"):
                seen.add((nx, ny))
                todo.append((nx, ny))
    cells = sorted((c for c in seen if env.grid.get(*c) is None), key=lambda c: (c[1], c[0]))
    return [(c, d) for c in cells for d in range(4)]


def split_starts(starts: list[tuple[tuple[int, int], int]],
                 holdout: float) -> tuple[list[tuple[tuple[int, int], int]], list[tuple[tuple[int, int], int]]]:
    """(train, held-out) starts: the round(holdout·n) starts with the smallest hash of (cell, direction) are held
    out, at least one and never all, so both splits exist and never share a start."""
    if len(starts) < 2:
        raise OutriderError(f"task.fixed_layout: the layout has {len(starts)} start(s) in the agent's room; "
                            "pick another seed (two or more are needed to hold some out)")
    digest = lambda s: hashlib.sha256(repr(s).encode()).digest()  # noqa: E731
    ranked = sorted(starts, key=digest)
    n_held = min(len(starts) - 1, max(1, round(holdout * len(starts))))
    held = set(ranked[:n_held])
    return [s for s in starts if s not in held], [s for s in starts if s in held]


@ENVS.register("minigrid", config=MiniGridConfig)
class MiniGridTask(Task):
    """MiniGrid/BabyAI levels played in text [Chevalier-Boisvert et al., Minigrid & Miniworld; BabyAI].

    Reward and success are the env's; demonstrations come from a shortest-path BFS expert
    (outrider.envs.minigrid_expert)."""

    def __init__(self, cfg: MiniGridConfig):
        self.cfg = cfg
        self._demo_env = MiniGridTextEnv(cfg.env_id, cfg.format, "train", cfg.holdout, cfg.fixed_layout)
        self._demo_env.reset(0)  # BabyAI levels set max_steps on reset
        self.max_turns = cfg.max_turns or min(int(self._demo_env.env.max_steps), 64)
        self.eval_size = cfg.eval_size

    def make_env(self, split: Split) -> MiniGridTextEnv:
        return MiniGridTextEnv(self.cfg.env_id, self.cfg.format, split, self.cfg.holdout, self.cfg.fixed_layout)

    @property
    def cell_functions(self) -> dict[str, Callable[[Hashable], Hashable]]:
        """Coarser archive cells than the state key (Go-Explore's ``explore.cell``): ``position`` drops the
        agent's direction."""
        return {"position": lambda key: (key[0], *key[2:])}

    def random_walk(self, seed: int) -> Demonstration:
        """`max_turns` uniformly random actions from the train layout of `seed` (fewer if the episode ends); a walk
        that solves the layout is drawn again (up to 100 times, then cut before its last action), so none shows a
        success (``demos: random_walk``)."""
        env, rng = self._demo_env, random.Random(seed)
        names = [SHORT[a] if self.cfg.format == "compact" else a for a in ACTION_IDS]
        for _ in range(100):
            obs, turns, info = env.reset(seed), [], {}
            for _ in range(self.max_turns):
                action = rng.choice(names)
                turns.append((obs, action))
                obs, _, done, info = env.step(action)
                if done:
                    break
            if not info.get("success"):
                return Demonstration(turns)
        return Demonstration(turns[:-1])

    def expert_actions(self, env: MiniGridTextEnv) -> list[str]:
        """The expert's optimal action names from `env`'s current state."""
        try:
            return plan(env.env)
        except PlanError as e:
            raise OutriderError(f"task.env_id: the minigrid expert cannot solve {self.cfg.env_id}: {e}") from None

    # --- step hooks (envs/base.py `Task`): the BFS expert is the step checker and the oracle ------------------
    def step_ok(self, env: MiniGridTextEnv, action: str) -> bool:
        """A right step: one that ends the episode in success, or after which the expert's shortest plan is one
        step shorter (the action lies on some shortest path). Invalid actions, bumps, detours and failures are
        wrong steps; `env` is left as it was (the step is tried on a copy)."""
        name = env.parse(action)
        return name is not None and on_a_shortest_path(env.env, ACTION_IDS[name])

    def oracle_step(self, env: MiniGridTextEnv) -> str:
        """The BFS expert's next action from `env`'s state (the short letter in the compact format)."""
        name = self.expert_actions(env)[0]
        return SHORT[name] if self.cfg.format == "compact" else name

    def hint(self, env: MiniGridTextEnv) -> str:
        """The expert's next action as the hint."""
        return self.oracle_step(env)

    def demonstrations(self, seeds: list[int]) -> list[Demonstration]:
        if self.cfg.demos == "random_walk":
            return [self.random_walk(seed) for seed in seeds]
        env, out = self._demo_env, []
        for seed in seeds:
            obs = env.reset(seed)
            turns = []
            for name in self.expert_actions(env):
                action = SHORT[name] if self.cfg.format == "compact" else name
                turns.append((obs, action))
                obs, _, done, info = env.step(action)
                if done:
                    break
            if not (env.done and info.get("success")):
                raise OutriderError(f"task.env_id: the minigrid expert failed on {self.cfg.env_id} seed {seed} "
                                    f"(plan of {len(turns)} steps did not succeed)")
            if len(turns) > self.max_turns:
                raise OutriderError(f"task.max_turns: {self.max_turns} is shorter than the expert's {len(turns)}-step "
                                    f"solution of {self.cfg.env_id} seed {seed}; raise it")
            out.append(Demonstration(turns))
        return out
