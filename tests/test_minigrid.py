"""MiniGrid in text: rendering, parsing, invalid actions, snapshot/restore, state keys, the BFS expert, splits."""

import pytest

from outrider.envs.base import ENVS
from outrider.envs.minigrid_render import egocentric_offset
from outrider.envs.minigrid_text import (EVAL_OFFSET, SHORT, MiniGridConfig, MiniGridTask, MiniGridTextEnv,
                                         room_starts, split_starts)
from outrider.errors import OutriderError

DOORKEY = "MiniGrid-DoorKey-5x5-v0"
SEEDS = list(range(10**8, 10**8 + 8))


def task(env_id: str = DOORKEY, **kw) -> MiniGridTask:
    return MiniGridTask(MiniGridConfig(env_id=env_id, **kw))


def layout(env) -> bytes:
    """What makes a layout: the grid's encoding and the agent's start pose."""
    return env.env.grid.encode().tobytes() + bytes([*map(int, env.env.agent_pos), int(env.env.agent_dir)])


def test_compact_render_and_parse() -> None:
    env = MiniGridTextEnv(DOORKEY)
    obs = env.reset(3)
    assert obs.endswith(">") and len(obs) == 12  # front, carry, 3 objects x 3 chars, ">"
    assert obs[1] == "_" and [obs[i] for i in (2, 5, 8)] == ["k", "L", "g"]  # nothing carried; key, door, goal
    for text, name in [("f", "forward"), (" l ", "left"), ("R", "right"), ("toggle", "toggle"), ("x", "done")]:
        assert env.parse(text) == name
    assert env.parse("fly") is None and env.parse("") is None
    verbose = MiniGridTextEnv(DOORKEY, "verbose")
    assert verbose.parse("turn left") == "left" and verbose.parse("I go forward.") == "forward"
    assert verbose.parse("l") is None  # aliases are compact-only
    first = verbose.reset(3)
    assert "Mission: use the key" in first and "Actions: left, right, forward" in first


def test_offsets_follow_the_agent_frame() -> None:
    env = MiniGridTextEnv(DOORKEY)
    env.reset(0)
    e = env.env
    fx, fy = e.front_pos
    assert egocentric_offset(env.env, fx, fy) == (1, 0)
    env.step("r")  # turning right: the cell that was ahead is now on the left
    assert egocentric_offset(env.env, fx, fy) == (0, -1)
    from outrider.envs.minigrid_render import _off
    assert [_off(v) for v in (0, 3, -1, -2, 12)] == ["0", "3", "a", "b", "9"]


def test_invalid_action_is_a_turn_without_env_step() -> None:
    env = MiniGridTextEnv(DOORKEY)
    obs = env.reset(5)
    key = env.state_key()
    obs2, reward, done, info = env.step("jump")
    assert info["invalid"] and not done and reward == 0.0
    assert "lrfpdtx" in obs2 and obs2.endswith(obs)  # error names the actions, then the unchanged state
    assert env.state_key() == key and env.env.step_count == 0
    v = MiniGridTextEnv(DOORKEY, "verbose")
    v.reset(5)
    assert "one of: left, right, forward, pickup, drop, toggle, done" in v.step("jump")[0]


def test_snapshot_restore_replays_identically() -> None:
    env = MiniGridTextEnv(DOORKEY)
    env.reset(7)
    env.step("l")
    snap = env.snapshot()
    actions = ["f", "r", "f", "p", "t", "f"]
    first = [env.step(a)[0] for a in actions]
    for _ in range(2):  # one snapshot, restored twice
        env.restore(snap)
        assert [env.step(a)[0] for a in actions] == first


def test_state_key_equality() -> None:
    a, b = MiniGridTextEnv(DOORKEY), MiniGridTextEnv(DOORKEY)
    a.reset(11)
    b.reset(11)
    assert a.state_key() == b.state_key()
    hash(a.state_key())
    a.step("l")
    assert a.state_key() != b.state_key()
    a.step("r")
    assert a.state_key() == b.state_key()  # same state reached by another path
    b.reset(12)
    assert a.state_key() != b.state_key() or a.env.agent_pos != b.env.agent_pos


def test_determinism_and_disjoint_splits() -> None:
    t = task()
    tr, ev = t.make_env("train"), t.make_env("eval")
    assert tr.reset(4) == t.make_env("train").reset(4)
    ev.reset(0)
    assert ev.env._np_random_seed >= EVAL_OFFSET and ev.held_out()  # eval seeds sit above every train seed

    # DoorKey-5x5 has only 48 layouts: disjoint seeds alone would evaluate on trained layouts
    held_out = set()
    for s in range(64):
        ev.reset(s)
        held_out.add(layout(ev))
    assert 3 <= len(held_out) <= 24
    for s in list(range(300)) + [10**8 + i for i in range(100)] + [2**31 - 1 - i for i in range(50)]:
        tr.reset(s)
        assert tr.env._np_random_seed < EVAL_OFFSET and not tr.held_out() and layout(tr) not in held_out


@pytest.mark.parametrize("env_id", ["MiniGrid-DoorKey-5x5-v0", "MiniGrid-DoorKey-8x8-v0",
                                    "MiniGrid-KeyCorridorS3R1-v0", "MiniGrid-KeyCorridorS3R2-v0",
                                    "MiniGrid-MultiRoom-N2-S4-v0", "BabyAI-GoToObj-v0"])
def test_expert_solves_levels(env_id: str) -> None:
    for fmt in ("compact", "verbose"):
        t = task(env_id, format=fmt, max_turns=64)
        demos = t.demonstrations(SEEDS)  # raises if any replay fails
        assert len(demos) == len(SEEDS) and all(d.turns for d in demos)
        env = t.make_env("train")
        for seed, demo in zip(SEEDS, demos):
            obs = env.reset(seed)
            for o, a in demo.turns:  # the demo shows exactly what the env shows
                assert o == obs
                obs, reward, done, info = env.step(a)
            assert done and info["success"] and reward > 0


def test_expert_is_optimal_on_doorkey() -> None:
    # an independent check of the planner's transition model: BFS over deep copies of the real env
    t = task()
    for seed in SEEDS[:2]:
        demo = t.demonstrations([seed])[0]
        env = t.make_env("train")
        env.reset(seed)
        frontier, seen, depth = [env.snapshot()], {env.state_key()}, 0
        while frontier and depth < len(demo.turns):
            depth += 1
            nxt = []
            for snap in frontier:
                for a in "lrfpt":
                    env.restore(snap)
                    _, _, done, info = env.step(a)
                    assert not info.get("success") or depth == len(demo.turns), f"shorter plan at depth {depth}"
                    if not done and env.state_key() not in seen:
                        seen.add(env.state_key())
                        nxt.append(env.snapshot())
            frontier = nxt
        env.reset(seed)
        events = [e for _, a in demo.turns for e in env.step(a)[3]["events"]]
        assert events == ["picked_key", "unlocked_door", "opened_door", "reached_goal"]


def test_unsolvable_level_raises() -> None:
    t = task("BabyAI-PickupLoc-v0")
    with pytest.raises(OutriderError, match="cannot solve"):
        t.demonstrations([10**8])


def test_unknown_env_id_error() -> None:
    with pytest.raises(OutriderError, match=r"task\.env_id: .*unknown MiniGrid/BabyAI env 'MiniGrid-Nope-v0'.*"
                                            r"MiniGrid-DoorKey-5x5-v0"):
        ENVS.build({"name": "minigrid", "env_id": "MiniGrid-Nope-v0"}, "task")
    with pytest.raises(OutriderError, match="task.env_id"):
        ENVS.build({"name": "minigrid", "env_id": "CartPole-v1"}, "task")


def test_max_turns_default_and_too_short() -> None:
    assert task().max_turns == 64 and task("BabyAI-GoToObj-v0").max_turns >= 1
    with pytest.raises(OutriderError, match="task.max_turns"):
        task(max_turns=2).demonstrations(SEEDS)


def test_random_walk_demos_show_no_solution_and_are_deterministic() -> None:
    """`demos: random_walk` teaches the format on the level's own observations and reveals no solution."""
    t = task("MiniGrid-DoorKey-6x6-v0", demos="random_walk", max_turns=24)
    demos = t.demonstrations(list(range(40)))
    assert [d.turns for d in demos[:3]] == [d.turns for d in t.demonstrations([0, 1, 2])]
    env = t.make_env("train")
    actions = set()
    for seed, demo in enumerate(demos):
        obs = env.reset(seed)
        for o, a in demo.turns:
            assert o == obs and a in "lrfpdtx"
            actions.add(a)
            obs, _, done, info = env.step(a)
        assert not info.get("success")
        assert done or len(demo.turns) == 24
    assert actions == set("lrfpdtx")


def test_position_cells_drop_the_direction() -> None:
    t = task()
    env = t.make_env("train")
    env.reset(3)
    key = env.state_key()
    env.step("l")
    turned = env.state_key()
    cell = t.cell_functions["position"]
    assert key != turned and cell(key) == cell(turned) == (key[0], *key[2:])


def test_doorkey6_held_out_layouts_are_disjoint_from_train_ones() -> None:
    """The sparse level of docs/exploration.md: no train seed (RL, demonstrations) reaches a held-out layout."""
    t = task("MiniGrid-DoorKey-6x6-v0")
    tr, ev = t.make_env("train"), t.make_env("eval")

    held_out = set()
    for s in range(128):
        ev.reset(s)
        held_out.add(layout(ev))
    assert len(held_out) > 32
    for s in list(range(400)) + [10**8 + i for i in range(200)]:
        tr.reset(s)
        assert not tr.held_out() and layout(tr) not in held_out


def test_fixed_layout_random_starts_hold_out_starts_and_keep_the_layout() -> None:
    """task.fixed_layout: one grid for every episode, the agent's start drawn by the seed from its room's starts;
    eval plays only held-out starts, which no train seed (RL or demonstration) reaches."""
    t = task("MiniGrid-DoorKey-6x6-v0", fixed_layout=0, demos="random_walk", max_turns=8)
    tr, ev = t.make_env("train"), t.make_env("eval")
    reference = MiniGridTextEnv("MiniGrid-DoorKey-6x6-v0")
    reference.env.reset(seed=0)
    grid, room = reference.env.grid.encode().tobytes(), set(room_starts(reference.env))
    assert len(room) == 28 and all(reference.env.grid.get(*cell) is None for cell, _ in room)
    assert {tuple(map(int, reference.env.agent_pos))} <= {cell for cell, _ in room}
    assert set(tr.starts) | set(ev.starts) == room and not set(tr.starts) & set(ev.starts)
    assert len(ev.starts) == round(0.25 * 28)

    def start(env) -> tuple:
        return tuple(map(int, env.env.agent_pos)), int(env.env.agent_dir)

    seen = {"train": set(), "eval": set()}
    for split, env in (("train", tr), ("eval", ev)):
        for s in list(range(90)) + [10**8 + i for i in range(10)]:
            env.reset(s)
            assert env.env.grid.encode().tobytes() == grid  # the one layout, doors and key in place
            seen[split].add(start(env))
    assert seen["train"] == set(tr.starts) and seen["eval"] == set(ev.starts)  # every start drawn, none crossed
    assert tr.reset(7) == t.make_env("train").reset(7)
    demo_starts = set()
    for demo_seed in range(10):
        t._demo_env.reset(demo_seed)
        demo_starts.add(start(t._demo_env))
    assert demo_starts <= set(tr.starts)
    assert len(t.demonstrations([3, 4])) == 2
    ev.reset(2)  # the expert solves a held-out start (the level stays solvable from any start)
    for name in t.expert_actions(ev):
        _, reward, done, info = ev.step(SHORT[name])
    assert done and info["success"]


def test_split_starts_keeps_both_splits_and_errors_below_two() -> None:
    starts = [((1, y), d) for y in (1, 2) for d in range(4)]
    train, held = split_starts(starts, 0.25)
    assert len(held) == 2 and sorted(train + held) == sorted(starts) and split_starts(starts, 0.25) == (train, held)
    assert len(split_starts(starts, 0.01)[1]) == 1 and len(split_starts(starts, 0.99)[0]) == 1
    with pytest.raises(OutriderError, match=r"^task\.fixed_layout: the layout has 1 start"):
        split_starts(starts[:1], 0.25)
