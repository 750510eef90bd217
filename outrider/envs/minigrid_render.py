"""Text renderings of a MiniGrid state for `minigrid_text` (the formats are described in its module docstring)."""

from __future__ import annotations

from typing import Any

from outrider.envs.minigrid_expert import DIR_VEC

ACTION_NAMES = ("left", "right", "forward", "pickup", "drop", "toggle", "done")
LETTER = {"key": "k", "ball": "b", "box": "x", "goal": "g", "lava": "v", "wall": "#"}
ORDER = {"key": 0, "ball": 1, "box": 2, "door": 3, "goal": 4, "lava": 5}  # listing order in the compact format
DOOR_LETTER = ("O", "C", "L")  # open, closed, locked


def door_state(door: Any) -> int:
    return 0 if door.is_open else (2 if door.is_locked else 1)


def egocentric_offset(env: Any, x: int, y: int) -> tuple[int, int]:
    """(steps forward, steps right) of cell (x, y) in the agent's frame."""
    ax, ay = env.agent_pos
    dx, dy = DIR_VEC[env.agent_dir]
    ox, oy = x - ax, y - ay
    return ox * dx + oy * dy, ox * -dy + oy * dx


def _letter(c: Any) -> str:
    if c is None:
        return "."
    if c.type == "door":
        return DOOR_LETTER[door_state(c)]
    return LETTER.get(c.type, "?")


def render_compact(env: Any) -> str:
    """The compact rendering (module docstring of `minigrid_text`): front cell, carried object, every object's
    letter and egocentric offsets, then ``>``."""
    front = _letter(env.grid.get(*env.front_pos))
    carry = _letter(env.carrying) if env.carrying is not None else "_"
    items = []
    for i, c in enumerate(env.grid.grid):
        if c is None or c.type in ("wall", "floor"):
            continue
        f, r = egocentric_offset(env, i % env.grid.width, i // env.grid.width)
        items.append((ORDER.get(c.type, 9), i, f"{_letter(c)}{_off(f)}{_off(r)}"))
    # a fixed order by kind (not by grid position), so the key's offsets always sit in the same chars
    return f"{front}{carry}{''.join(t for _, _, t in sorted(items))}>"


def render_verbose(env: Any, first: bool) -> str:
    """The verbose rendering for real LLMs: the mission (first turn), what the agent carries and faces, the objects
    in its partial view in words, free steps ahead/left/right and the valid actions."""
    grid, vis = env.gen_obs_grid()
    size = env.agent_view_size
    seen, walls = [], {}
    for j in range(size):
        for i in range(size):
            c = grid.get(i, j)
            if not vis[i, j] or c is None or c.type == "floor":
                continue
            fwd, right = size - 1 - j, i - size // 2
            if c.type == "wall":
                continue
            seen.append(f"{_name(c)} {_where(fwd, right)}")
    for label, vec in (("ahead", (0, -1)), ("left", (-1, 0)), ("right", (1, 0))):
        i, j, k = size // 2, size - 1, 0
        while True:
            i, j, k = i + vec[0], j + vec[1], k + 1
            if not (0 <= i < size and 0 <= j < size) or (grid.get(i, j) is not None
                                                          and not grid.get(i, j).can_overlap()):
                walls[label] = k - 1
                break
    carry = _name(env.carrying) if env.carrying is not None else "nothing"
    front = env.grid.get(*env.front_pos)
    lines = [f"Mission: {env.mission}."] if first else []
    lines += [f"You carry {carry}. In front of you: {_name(front) if front else 'an empty cell'}.",
              "You see: " + ("; ".join(seen) if seen else "nothing but walls") + ".",
              f"Free steps ahead: {walls['ahead']}, to the left: {walls['left']}, to the right: {walls['right']}.",
              f"Actions: {', '.join(ACTION_NAMES)}.", "Your action:"]
    return "\n".join(lines) + " "


def _name(c: Any) -> str:
    if c.type == "door":
        return f"a {('open', 'closed', 'locked')[door_state(c)]} {c.color} door"
    if c.type in ("goal", "lava", "wall"):
        return f"the {c.type}" if c.type == "goal" else f"a {c.type}"
    return f"a {c.color} {c.type}"


def _off(v: int) -> str:
    """One char per offset: 0-9, then a-i for -1..-9 (larger grids clip; compact targets small levels)."""
    v = max(-9, min(9, v))
    return str(v) if v >= 0 else "abcdefghi"[-v - 1]


def _where(fwd: int, right: int) -> str:
    parts = []
    if fwd:
        parts.append(f"{fwd} step{'s' * (fwd != 1)} ahead")
    if right:
        parts.append(f"{abs(right)} step{'s' * (abs(right) != 1)} to the {'right' if right > 0 else 'left'}")
    return " and ".join(parts) or "here"
