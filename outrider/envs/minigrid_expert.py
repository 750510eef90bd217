"""Scripted MiniGrid expert: breadth-first search over an abstract copy of the grid, giving a shortest action
sequence (optimal in env steps) for the level's goal.

The environments are those of *Minimalistic Gridworld Environment for Gymnasium* (MiniGrid) and BabyAI, from
"Minigrid & Miniworld: Modular & Customizable Reinforcement Learning Environments for Goal-Oriented Tasks"
(Chevalier-Boisvert et al., 2023) and "BabyAI: A Platform to Study the Sample Efficiency of Grounded Language
Learning" (Chevalier-Boisvert et al., 2019).

The search state is (agent position, direction, carried object, door states, positions of movable objects). The
transition model copies MiniGrid's rules for the six actions used (left, right, forward, pickup, drop, toggle), so
the plan replays exactly in the real env (tests check that). Goals supported:

* ``goal`` — step onto a goal square (DoorKey, MultiRoom, Empty, FourRooms ...);
* ``pickup`` — be carrying a given object (KeyCorridor, UnlockPickup: "pick up the <color> ball");
* ``goto`` — face one of the target objects (BabyAI GoTo levels, whose instruction succeeds when the object is in
  the cell in front of the agent).

Search on a copy, not on deep copies of the gym env: a DoorKey-5x5 plan takes ~1 ms this way, which matters because
the warm start asks for thousands of demonstrations. Dropping is only searched when the goal is ``pickup`` (the
agent may have to put the key down to pick up the ball); elsewhere it never shortens a plan, and leaving it out
keeps the state space small.
"""

from __future__ import annotations

import pickle
from collections import deque
from typing import Any, Hashable

# MiniGrid's direction vectors (0 = east/right, 1 = south/down, 2 = west/left, 3 = north/up)
DIR_VEC = ((1, 0), (0, 1), (-1, 0), (0, -1))
PICKABLE = frozenset({"key", "ball", "box"})
ACTIONS = ("forward", "left", "right", "pickup", "drop", "toggle")  # BFS expansion order: fixed ⇒ deterministic plans


class PlanError(Exception):
    """The expert found no plan (unsupported goal or unreachable state)."""


def _goal_spec(env: Any) -> tuple[str, Any]:
    """What the level asks for, read from the unwrapped env: ('goal', None), ('pickup', obj) or ('goto', cells)."""
    instrs = getattr(env, "instrs", None)
    if instrs is not None:  # BabyAI: only the plain "go to" instruction is supported
        if type(instrs).__name__ == "GoToInstr":
            return "goto", frozenset(tuple(p) for p in instrs.desc.obj_poss)
        raise PlanError(f"the expert cannot solve BabyAI instruction {type(instrs).__name__} ({env.mission!r})")
    target = getattr(env, "obj", None)
    if target is not None and getattr(target, "type", None) in PICKABLE:
        return "pickup", target
    grid = env.grid
    if any(c is not None and c.type == "goal" for c in grid.grid):
        return "goal", None
    raise PlanError(f"the expert does not know the goal of {type(env).__name__} ({env.mission!r})")


def plan(env: Any, max_states: int = 400_000) -> list[str]:
    """A shortest list of action names that solves the unwrapped MiniGrid `env` from its current state."""
    kind, target = _goal_spec(env)
    grid = env.grid
    w, h = grid.width, grid.height
    walls: set[tuple[int, int]] = set()
    lava: set[tuple[int, int]] = set()
    goals: set[tuple[int, int]] = set()
    doors: list[tuple[int, int]] = []
    door_color: list[str] = []
    movable: list[Any] = []  # objects that can be picked up; their positions are part of the state
    mov_pos: list[tuple[int, int] | None] = []
    for y in range(h):
        for x in range(w):
            c = grid.get(x, y)
            if c is None:
                continue
            if c.type == "wall":
                walls.add((x, y))
            elif c.type == "lava":
                lava.add((x, y))
            elif c.type == "goal":
                goals.add((x, y))
            elif c.type == "door":
                doors.append((x, y))
                door_color.append(c.color)
            elif c.type in PICKABLE:
                movable.append(c)
                mov_pos.append((x, y))
            # floor and other overlappable cells are treated as empty
    carried = env.carrying
    if carried is not None:
        movable.append(carried)
        mov_pos.append(None)
    door_index = {p: i for i, p in enumerate(doors)}
    # door state: 0 open, 1 closed, 2 locked
    d0 = tuple(0 if grid.get(*p).is_open else (2 if grid.get(*p).is_locked else 1) for p in doors)
    carry0 = len(movable) - 1 if carried is not None else -1
    allow_drop = kind == "pickup"
    target_idx = next((i for i, o in enumerate(movable) if o is target), -1) if kind == "pickup" else -1
    if kind == "pickup" and target_idx < 0:
        raise PlanError("the object to pick up is not in the grid")

    def done(pos: tuple[int, int], d: int, carry: int) -> bool:
        if kind == "goal":
            return pos in goals
        if kind == "pickup":
            return carry == target_idx
        dx, dy = DIR_VEC[d]
        return (pos[0] + dx, pos[1] + dy) in target

    start = (tuple(env.agent_pos), env.agent_dir, carry0, d0, tuple(mov_pos))
    if done(start[0], start[1], start[2]):
        return ["done"]  # already there: BabyAI checks its instruction after any action, "done" included
    parent: dict[Hashable, tuple[Hashable, str] | None] = {start: None}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        pos, d, carry, ds, mp = state
        if done(pos, d, carry):
            actions = []
            while parent[state] is not None:
                state, a = parent[state]
                actions.append(a)
            return actions[::-1]
        dx, dy = DIR_VEC[d]
        front = (pos[0] + dx, pos[1] + dy)
        occupant = next((i for i, p in enumerate(mp) if p == front), -1)
        for a in ACTIONS:
            nxt = None
            if a == "left":
                nxt = (pos, (d - 1) % 4, carry, ds, mp)
            elif a == "right":
                nxt = (pos, (d + 1) % 4, carry, ds, mp)
            elif a == "forward":
                if not (0 <= front[0] < w and 0 <= front[1] < h) or front in walls or front in lava:
                    continue  # bumping changes nothing; lava ends the episode in failure
                if occupant >= 0:
                    continue
                if front in door_index and ds[door_index[front]] != 0:
                    continue
                nxt = (front, d, carry, ds, mp)
            elif a == "pickup":
                if carry >= 0 or occupant < 0:
                    continue
                mp2 = mp[:occupant] + (None,) + mp[occupant + 1:]
                nxt = (pos, d, occupant, ds, mp2)
            elif a == "drop":
                if not allow_drop or carry < 0 or occupant >= 0 or front in walls or front in door_index \
                        or front in goals or front in lava:
                    continue
                mp2 = mp[:carry] + (front,) + mp[carry + 1:]
                nxt = (pos, d, -1, ds, mp2)
            elif a == "toggle":
                if front not in door_index:
                    continue  # boxes would open into their contents: not modelled, never needed for the goals
                i = door_index[front]
                s = ds[i]
                if s == 2:
                    if carry < 0 or movable[carry].type != "key" or movable[carry].color != door_color[i]:
                        continue
                    s2 = 0
                else:
                    s2 = 1 - s
                nxt = (pos, d, carry, ds[:i] + (s2,) + ds[i + 1:], mp)
            if nxt is not None and nxt not in parent:
                parent[nxt] = (state, a)
                queue.append(nxt)
        if len(parent) > max_states:
            break
    raise PlanError(f"no plan found for {env.mission!r} (searched {len(parent)} states)")


def on_a_shortest_path(env: Any, action_id: int) -> bool:
    """Whether MiniGrid action `action_id` is a right step in `env` (a gym env, left unchanged): it ends the episode
    in success, or the expert's shortest plan is one step shorter after it. Bumps, detours, failures and states
    the expert cannot solve are wrong steps."""
    try:
        before = len(plan(env))
    except PlanError:
        return False
    trial = pickle.loads(pickle.dumps(env, pickle.HIGHEST_PROTOCOL))  # the step is tried on a copy
    _, reward, terminated, truncated, _ = trial.step(action_id)
    if terminated or truncated:
        return bool(terminated and reward > 0)
    try:
        return len(plan(trial)) == before - 1
    except PlanError:
        return False
